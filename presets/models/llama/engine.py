"""Step engine for Llama: runs the scheduler's step plans over a paged KV cache. Knows token ids, not text."""

import logging
from dataclasses import dataclass

import torch

from presets.engine.kv_memory import available_cpu_memory, size_pool
from presets.engine.scheduler import PlanItem, StepPlan
from presets.engine.step_loop import KVConfig
from presets.models.llama import cpu_kernels
from presets.models.llama.kv_cache import PagedStep
from presets.models.llama.model import Transformer

log = logging.getLogger(__name__)


@dataclass
class CacheSettings:
    max_seq_len: int
    max_batch_size: int
    block_size: int = 16
    memory: int = 0  # bytes; 0: the device's default (engine docstring)
    gpu_memory_utilization: float = 0.9
    prefix_caching: bool = True
    max_num_batched_tokens: int = 2048  # the largest step, for the CUDA memory profile


class LlamaEngine:
    """The model with its KV pool. The pool's size: `memory` bytes when given; else on CUDA
    gpu_memory_utilization of the device's memory less what the weights and a largest step take; else
    (CPU) max_batch_size x max_seq_len positions, what a slot cache would hold, up to kv_memory.CPU_DEFAULT_CAP."""

    def __init__(self, model: Transformer, cache: CacheSettings, cpu_packed: bool = True, agree=None):
        """`agree(num_blocks)` -> the smallest over the ranks (each rank sizes its own pool; all must match)."""
        self.model = model
        self.max_num_batched_tokens = cache.max_num_batched_tokens
        self.device, self.dtype = model.norm.weight.device, model.norm.weight.dtype
        self.max_seq_len = cache.max_seq_len
        if cpu_packed and self.device.type == "cpu":
            forms = cpu_kernels.pack_linears(model, cache.max_batch_size)
            log.info(
                "CPU, %s: linear layers: %s", str(self.dtype).removeprefix("torch."), cpu_kernels.describe_forms(forms)
            )
        per_token = model.kv_bytes_per_token()
        default = available = None
        if self.device.type == "cuda":
            default, available = self._cuda_budget(cache)
        else:
            available = available_cpu_memory()
        pool = size_pool(
            per_token, cache.block_size, cache.max_seq_len, cache.max_batch_size, cache.memory, available, default
        )
        if agree is not None:
            pool.num_blocks = agree(pool.num_blocks)
        model.setup_caches(pool.num_blocks, pool.block_size, cache.max_seq_len)
        self.pool = pool
        self.kv_config = KVConfig(pool.num_blocks, pool.block_size, cache.prefix_caching)
        log.info("%s", pool.describe(cache.max_seq_len))
        if cpu_packed and self.device.type == "cpu":
            n = cpu_kernels.attach_decode_attention(model)
            log.info(
                "CPU attention: one-token items by cpu_kernels.c's decode kernel on %d of %d layers (the rest and "
                "prompt chunks by PyTorch's SDPA)",
                n,
                len(model.layers),
            )

    def _cuda_budget(self, cache: CacheSettings) -> tuple[int | None, int]:
        """(default pool bytes, bytes free now) on CUDA: a largest step (max_num_batched_tokens prompt tokens)
        is run on a pool just big enough first, so what it needs beyond the weights is measured, then left free."""
        n, bs = cache.max_num_batched_tokens, cache.block_size
        lengths = [min(cache.max_seq_len, n - at) for at in range(0, n, cache.max_seq_len)]  # a full step's prompts
        items, first = [], 0
        for slot, length in enumerate(lengths):
            items.append(PlanItem(slot, 0, [0] * length, list(range(first, first + -(-length // bs))), True))
            first += -(-length // bs)
        torch.cuda.empty_cache()
        self.model.setup_caches(first, bs, cache.max_seq_len)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)  # weights and the profiling pool
        self.run(StepPlan(items))
        torch.cuda.synchronize(self.device)
        step_peak = torch.cuda.max_memory_allocated(self.device) - base  # what the step itself needs
        self.model.setup_caches(0, cache.block_size, cache.max_seq_len)  # drop the profiling pool
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        in_use = total - free  # weights, the CUDA context, other processes
        default = int(cache.gpu_memory_utilization * total) - in_use - max(0, step_peak)
        log.info(
            "CUDA: %.1f GiB in use after the weights, a %d-token step needs %.1f GiB more",
            in_use / 2**30,
            n,
            step_peak / 2**30,
        )
        return max(default, 0), free

    def heartbeat(self) -> None:
        """One rank: nobody to tell (process/ranks.py LeaderEngine sends it under torchrun)."""

    def close(self) -> None:
        """The weights and the pool go with the process."""

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> torch.Tensor:
        """Run one step plan; logits (S, V) of the items that sample, in plan order."""
        tokens, step = PagedStep.build(plan.items, self.model.layers[0].attention.cache.block_size, self.device)
        return self.model(tokens, step)
