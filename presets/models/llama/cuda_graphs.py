"""Decode steps replayed as CUDA graphs: one graph per batch-size bucket, captured once at start.

A decode step (every item one token, every item sampled) has the same shapes for a given number of
sequences, so its whole forward (embeddings, every layer's matmuls, KV writes and the Triton attention
kernel, the logits) is recorded once per bucket and then replayed with one launch instead of hundreds
of Python-issued ones. A step of B sequences takes the smallest bucket >= B; the rows beyond B are padding
whose key and value go to a scratch block no sequence owns and whose logits are dropped. The step's
inputs are copied into the graph's static buffers before the replay. Prompt chunks and mixed steps run
eagerly (their shapes vary with every step).

`capture(fn)` is a seam: on CUDA it records fn into a torch.cuda.CUDAGraph and returns its replay; the
CPU tests pass one that calls fn again, which reads the same static buffers, so the bucketing, padding and
buffer copies are tested without a GPU (tests/test_cuda_graphs.py).
"""

import logging
import time
from collections.abc import Callable

import torch

from presets.models.llama.kv_cache import PagedStep
from presets.models.llama.triton_attention import AttentionPlan

log = logging.getLogger(__name__)


def buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 (vLLM's choice too), up to and including max_batch."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8)) + [max_batch]
    return sorted(set(sizes))


def cuda_capture(device, pool=None) -> Callable[[Callable[[], torch.Tensor]], Callable[[], torch.Tensor]]:
    """A capture function for `device`: warm fn up on a side stream, record it, return the graph's replay."""
    mempool = pool if pool is not None else torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream(device)  # one for every warm-up: memory cached on a stream stays with it

    def capture(fn):
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # Triton compiles and autotunes outside the capture
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=mempool):
            out = fn()

        def replay():
            graph.replay()
            return out

        return replay

    return capture


class _Bucket:
    """The static inputs of one batch size and the replay that reads them."""

    def __init__(self, model, size: int, width: int, group: int, scratch: int, device):
        long = dict(dtype=torch.long, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.size = size
        self.tokens = torch.zeros(1, size, **long)
        self.positions = torch.zeros(1, size, **long)
        self.write_blocks = torch.full((size,), scratch, **long)
        self.write_offsets = torch.zeros(size, **long)
        self.tables = torch.full((size, width), scratch, **i32)
        self.item_pos = torch.zeros(size, **i32)
        plan = AttentionPlan.decodes(self.tables, self.item_pos, group)
        empty = torch.zeros(0, **long)
        self.step = PagedStep(
            self.positions,
            self.write_blocks,
            self.write_offsets,
            empty.view(0, 0),
            empty,
            [],
            torch.arange(size, **long),
            plan,
        )
        self.model = model
        self.replay = None

    @torch.inference_mode()
    def forward(self) -> torch.Tensor:
        return self.model(self.tokens, self.step)


class DecodeGraphs:
    """Captured decode steps of `model` (Triton attention on, one rank) for batches up to max_batch."""

    def __init__(self, model, max_batch: int, max_seq_len: int, group: int, scratch_block: int, capture):
        cache = model.layers[0].attention.cache
        self.block_size = cache.block_size
        self.scratch = scratch_block
        self.width = -(-max_seq_len // self.block_size)
        device = cache.k.device
        self.buckets = [_Bucket(model, b, self.width, group, scratch_block, device) for b in buckets(max_batch)]
        t0 = time.perf_counter()
        for b in reversed(self.buckets):  # the largest first: smaller ones reuse its memory
            b.replay = capture(b.forward)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # what the warm-ups cached outside the graphs' pool
        self.capture_seconds = time.perf_counter() - t0
        self.replays = 0
        log.info(
            "CUDA graphs: decode steps of %s sequences captured in %.1fs",
            ", ".join(str(b.size) for b in self.buckets),
            self.capture_seconds,
        )

    def fits(self, items) -> bool:
        """A decode step this can replay: every item one sampled token, no more of them than the largest bucket."""
        if not 0 < len(items) <= self.buckets[-1].size:
            return False
        return all(
            len(it.tokens) == 1 and it.sample and not it.adapter and len(it.blocks) <= self.width for it in items
        )

    def run(self, items) -> torch.Tensor:
        """Logits (B, V) of a decode step, in plan order."""
        n = len(items)
        b = next(b for b in self.buckets if b.size >= n)
        bs, pad = self.block_size, b.size - n
        positions = [it.start for it in items] + [0] * pad
        tables = [it.blocks + [self.scratch] * (self.width - len(it.blocks)) for it in items]
        tables += [[self.scratch] * self.width] * pad
        b.tokens.copy_(torch.tensor([[it.tokens[0] for it in items] + [0] * pad]), non_blocking=True)
        b.positions.copy_(torch.tensor([positions]), non_blocking=True)
        b.write_blocks.copy_(torch.tensor([it.blocks[it.start // bs] for it in items] + [self.scratch] * pad))
        b.write_offsets.copy_(torch.tensor([p % bs for p in positions]), non_blocking=True)
        b.tables.copy_(torch.tensor(tables, dtype=torch.int32), non_blocking=True)
        b.item_pos.copy_(torch.tensor(positions, dtype=torch.int32), non_blocking=True)
        self.replays += 1
        return b.replay()[:n].clone()  # the static output is overwritten by the next replay


def reserve_bytes(max_batch: int, vocab_size: int) -> int:
    """Device memory the graphs keep beyond the KV pool: each bucket's own fp32 logits (the rest of a step's
    activations share one pool), plus a margin; the engine leaves it out of the KV budget."""
    return sum(buckets(max_batch)) * vocab_size * 4 + (256 << 20)
