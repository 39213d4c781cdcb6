"""Step engine for Llama: runs the scheduler's step plans over a paged KV cache. Knows token ids, not text."""

import logging
from dataclasses import dataclass

import torch
from fairscale.nn.model_parallel.initialize import get_model_parallel_rank, get_model_parallel_world_size

from presets.engine.adapters import LoraAdapter
from presets.engine.kv_memory import available_cpu_memory, size_pool
from presets.engine.scheduler import PlanItem, StepPlan
from presets.engine.step_loop import KVConfig
from presets.models.llama import cpu_kernels, lora, triton_attention
from presets.models.llama.cuda_graphs import DecodeGraphs, cuda_capture, reserve_bytes
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
    attention: str = "auto"  # auto | sdpa | triton (choose_attention)
    cuda_graphs: bool = True  # CUDA with Triton attention on one rank: decode steps replayed as graphs
    max_loras: int = 8  # LoRA adapters one step may mix


def choose_attention(requested: str, device: torch.device, cpu_packed: bool) -> str:
    """How steps read the paged cache: "triton" (triton_attention.py, in place), "c" (cpu_kernels.c's decode
    kernel for one-token items, gather and SDPA for prompt chunks) or "sdpa" (gather, then PyTorch's SDPA:
    the reference the others are tested against). auto: triton on CUDA GPUs of compute capability 8.0 and up
    (A100, H100, L4...; Triton's bf16 needs sm_80), SDPA on older ones (T4, V100), c on the CPU."""
    ampere = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    if requested == "auto":
        if ampere and triton_attention.available():
            return "triton"
        return "c" if device.type == "cpu" and cpu_packed else "sdpa"
    runnable = ampere or triton_attention.interpreted()
    if requested == "triton" and not (triton_attention.available() and runnable):
        raise ValueError("--attention triton needs the triton package and a CUDA GPU of compute capability >= 8.0")
    return requested


class LlamaEngine:
    """The model with its KV pool. The pool's size: `memory` bytes when given; else on CUDA
    gpu_memory_utilization of the device's memory less what the weights and a largest step take; else
    (CPU) max_batch_size x max_seq_len positions, what a slot cache would hold, up to kv_memory.CPU_DEFAULT_CAP."""

    def __init__(
        self,
        model: Transformer,
        cache: CacheSettings,
        cpu_packed: bool = True,
        agree=None,
        capture=None,
        adapters: list[LoraAdapter] = (),
    ):
        """`agree(num_blocks)` -> the smallest over the ranks (each rank sizes its own pool; all must match).
        `capture`: how decode graphs are recorded (cuda_graphs.py); default: CUDA graphs where they apply.
        `adapters`: LoRA adapters served in slots 1, 2, ... (lora.py)."""
        self.model = model
        if adapters:
            lora.attach(model, list(adapters), get_model_parallel_rank(), get_model_parallel_world_size())
        self.max_num_batched_tokens = cache.max_num_batched_tokens
        self.device, self.dtype = model.norm.weight.device, model.norm.weight.dtype
        self.max_seq_len = cache.max_seq_len
        if cpu_packed and self.device.type == "cpu":
            forms = cpu_kernels.pack_linears(model, cache.max_batch_size)
            log.info(
                "CPU, %s: linear layers: %s", str(self.dtype).removeprefix("torch."), cpu_kernels.describe_forms(forms)
            )
        self.attention = choose_attention(cache.attention, self.device, cpu_packed)
        att = model.layers[0].attention
        self.kernel_group = att.n_local_heads // att.n_local_kv_heads if self.attention == "triton" else 0
        self.pool = pool = self._size_pool(cache, agree)
        capture = self._graph_capture(cache, capture)
        # With graphs the pool has one block more than the scheduler plans with: padding rows write there.
        model.setup_caches(pool.num_blocks + (capture is not None), pool.block_size, cache.max_seq_len)
        self.kv_config = KVConfig(pool.num_blocks, pool.block_size, cache.prefix_caching, cache.max_loras)
        log.info("%s", pool.describe(cache.max_seq_len))
        log.info("attention: %s", self.attention)
        self.graphs = None
        if capture is not None:
            self.graphs = DecodeGraphs(
                model, cache.max_batch_size, cache.max_seq_len, self.kernel_group, pool.num_blocks, capture
            )
        if self.attention == "c":
            n = cpu_kernels.attach_decode_attention(model)
            log.info(
                "CPU attention: one-token items by cpu_kernels.c's decode kernel on %d of %d layers (the rest and "
                "prompt chunks by PyTorch's SDPA)",
                n,
                len(model.layers),
            )

    def _size_pool(self, cache: CacheSettings, agree):
        """The KV pool: what memory allows (less the decode graphs' reserve on CUDA), agreed over the ranks."""
        default = available = None
        if self.device.type == "cuda":
            default, available = self._cuda_budget(cache)
            graphs = cache.cuda_graphs and self.attention == "triton" and get_model_parallel_world_size() == 1
            if graphs and default is not None:
                default = max(0, default - reserve_bytes(cache.max_batch_size, self.model.args.vocab_size))
        else:
            available = available_cpu_memory()
        per_token = self.model.kv_bytes_per_token()
        pool = size_pool(
            per_token, cache.block_size, cache.max_seq_len, cache.max_batch_size, cache.memory, available, default
        )
        if agree is not None:
            pool.num_blocks = agree(pool.num_blocks)
        return pool

    def _graph_capture(self, cache: CacheSettings, capture):
        """How decode graphs are recorded, or None: only over the Triton kernel (graphs replay its fixed-shape
        launches), on one CUDA rank."""
        if self.attention != "triton":
            return None
        if capture is None and cache.cuda_graphs and self.device.type == "cuda":
            return cuda_capture(self.device) if get_model_parallel_world_size() == 1 else None
        return capture

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

    def add_adapter(self, adapter: LoraAdapter, slot: int) -> None:
        """A LoRA adapter loaded while serving (engine thread, between steps; one rank only)."""
        lora.add(self.model, adapter, slot, get_model_parallel_rank(), get_model_parallel_world_size())

    def remove_adapter(self, slot: int) -> None:
        lora.remove(self.model, slot)

    def heartbeat(self) -> None:
        """One rank: nobody to tell (process/ranks.py LeaderEngine sends it under torchrun)."""

    def close(self) -> None:
        """The weights and the pool go with the process."""

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> torch.Tensor:
        """Run one step plan; logits (S, V) of the items that sample, in plan order."""
        if self.graphs is not None and self.graphs.fits(plan.items):
            return self.graphs.run(plan.items)
        block_size = self.model.layers[0].attention.cache.block_size
        tokens, step = PagedStep.build(plan.items, block_size, self.device, self.kernel_group)
        return self.model(tokens, step)
