"""The paged KV cache and attention over block tables: the math of one engine step (see engine/scheduler.py).

Each layer's cache is a pool of blocks, k and v of shape (num_blocks, kv_heads, block_size, head_dim);
a sequence's position p lives in block table[p // block_size] at offset p % block_size. A step packs
every sequence's new tokens into one row of N tokens: first the items of one token (decodes), then the
multi-token prompt chunks. In every layer the step first writes all N keys and values into the pool,
then each item attends: so an item may read blocks that another item of the same step fills (a prefix
it shares). Items attend by the Triton kernel over the tables in place (triton_attention.py, CUDA's
path), by a C decode kernel (cpu_kernels.py), or by gathering their blocks for PyTorch's SDPA (below: the
reference the kernels are tested against).
"""

import itertools
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from presets.models.llama.triton_attention import AttentionPlan, paged_attention


class PagedKVCache(nn.Module):
    def __init__(self, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (num_blocks, n_kv_heads, block_size, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.block_size = block_size
        # Optional attention for the one-token items, fn(cache, step, q) -> (B, H, hd); cpu_kernels sets one.
        self.decode_kernel = None

    def gather(self, table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [0, length) of one sequence: each (kvh, length, hd)."""
        nb = -(-length // self.block_size)
        k = self.k[table[:nb]].transpose(0, 1).flatten(1, 2)[:, :length]  # (kvh, nb * bs, hd) -> first length
        v = self.v[table[:nb]].transpose(0, 1).flatten(1, 2)[:, :length]
        return k, v


@dataclass
class StepAdapters:
    """A step's rows by LoRA adapter: `runs` (slot, [(start, end), ...]) per adapter present; and the same as
    padded groups for one batched matmul over all of them: `slots` (k,) the adapters' slots - 1, `rows`
    (k, m) each adapter's rows padded with row 0, and which entries of the flattened (k * m) are real rows
    (`real`, into `rows.flatten()`)."""

    runs: list[tuple[int, list[tuple[int, int]]]]
    slots: torch.Tensor  # (k,) int64
    rows: torch.Tensor  # (k, m) int64
    real: torch.Tensor  # (n,) int64

    def __bool__(self) -> bool:
        return bool(self.runs)

    @classmethod
    def build(cls, runs: dict[int, list[tuple[int, int]]], device) -> "StepAdapters":
        ordered = sorted(runs.items())
        rows = [[r for start, end in spans for r in range(start, end)] for _, spans in ordered]
        m = max(map(len, rows))
        padded = [r + [0] * (m - len(r)) for r in rows]
        real = [g * m + j for g, r in enumerate(rows) for j in range(len(r))]
        t = partial(torch.tensor, dtype=torch.long, device=device)
        return cls(ordered, t([slot - 1 for slot, _ in ordered]), t(padded), t(real))


@dataclass
class Chunk:
    """A multi-token item: rows [row, row + n) of the step, positions [start, start + n) of its sequence."""

    row: int
    start: int
    n: int
    table: torch.Tensor  # (blocks,) int64


@dataclass
class PagedStep:
    positions: torch.Tensor  # (1, N): each token's position in its own sequence
    write_blocks: torch.Tensor  # (N,): the block each token's keys and values go to
    write_offsets: torch.Tensor  # (N,): the offset in that block
    single_tables: torch.Tensor  # (B, M) int64: block tables of the B one-token items, padded
    single_positions: torch.Tensor  # (B,) int64: their positions (each attends to 0..position)
    chunks: list[Chunk]
    sample_rows: torch.Tensor  # (S,): rows whose logits are wanted, in plan order
    kernel: AttentionPlan | None = None  # set: every item attends by the Triton kernel (triton_attention.py)
    lora: StepAdapters | None = None  # the rows of each LoRA adapter in the step (lora.py); None: none

    @classmethod
    def build(cls, items, block_size: int, device, kernel_group: int = 0) -> tuple[torch.Tensor, "PagedStep"]:
        """(tokens (1, N), step) for plan items (slot, start, tokens, blocks, sample): one-token items first.
        kernel_group > 0: attention by the Triton kernel, for that many query heads per KV head."""
        # One-token items first, then chunks; each kind grouped by LoRA adapter, so an adapter's rows are
        # at most two runs (its decodes, its chunks) that its low-rank path reads and writes in place.
        order = sorted((i for i, it in enumerate(items) if len(it.tokens) == 1), key=lambda i: items[i].adapter)
        order += sorted((i for i, it in enumerate(items) if len(it.tokens) > 1), key=lambda i: items[i].adapter)
        tokens, positions, blocks, offsets, last_row, chunks = [], [], [], [], {}, []
        for i in order:
            it = items[i]
            if len(it.tokens) > 1:
                chunks.append(Chunk(len(tokens), it.start, len(it.tokens), torch.tensor(it.blocks, device=device)))
            for p in range(it.start, it.start + len(it.tokens)):
                blocks.append(it.blocks[p // block_size])
                offsets.append(p % block_size)
            positions.extend(range(it.start, it.start + len(it.tokens)))
            tokens.extend(it.tokens)
            last_row[i] = len(tokens) - 1
        singles = [items[i] for i in order[: len(order) - len(chunks)]]
        width = max((len(it.blocks) for it in singles), default=0)
        tables = [it.blocks + [0] * (width - len(it.blocks)) for it in singles]  # padding is never read
        t = partial(torch.tensor, dtype=torch.long, device=device)
        step = cls(
            t(positions)[None],
            t(blocks),
            t(offsets),
            t(tables).view(len(singles), width),
            t([it.start for it in singles]),
            chunks,
            t([last_row[i] for i, it in enumerate(items) if it.sample]),
        )
        rows = [0] + list(itertools.accumulate(len(items[i].tokens) for i in order))
        runs: dict[int, list[tuple[int, int]]] = {}
        for j, i in enumerate(order):
            if items[i].adapter:
                spans = runs.setdefault(items[i].adapter, [])
                if spans and spans[-1][1] == rows[j]:
                    spans[-1] = (spans[-1][0], rows[j + 1])  # the run goes on
                else:
                    spans.append((rows[j], rows[j + 1]))
        if runs:
            step.lora = StepAdapters.build(runs, device)
        if kernel_group:
            spans = [(rows[j], len(items[i].tokens), items[i].start, items[i].blocks) for j, i in enumerate(order)]
            step.kernel = AttentionPlan.build(spans, kernel_group, device)
        return t(tokens)[None], step

    def attend(self, cache: PagedKVCache, q, k, v, gqa: bool) -> torch.Tensor:
        """q (1, N, H, hd), k and v (1, N, kvh, hd) of this step's tokens -> attention output (1, H, N, hd)."""
        cache.k[self.write_blocks, :, self.write_offsets] = k[0]  # every write before any read
        cache.v[self.write_blocks, :, self.write_offsets] = v[0]
        if self.kernel is not None:
            return paged_attention(q[0], cache.k, cache.v, self.kernel).transpose(0, 1)[None]
        outs, B = [], self.single_positions.shape[0]
        if B:
            outs.append(self.attend_singles(cache, q[0, :B], gqa).transpose(0, 1))  # (H, B, hd)
        for c in self.chunks:
            qc = q[0, c.row : c.row + c.n].transpose(0, 1)[None]  # (1, H, n, hd)
            if c.start == 0:  # a whole prompt: its own keys, causal
                kc, vc = (x[0, c.row : c.row + c.n].transpose(0, 1)[None] for x in (k, v))
                out = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, enable_gqa=gqa)
            else:  # the rest of a prompt after a cached prefix (or an earlier chunk): causal, aligned to the end
                length = c.start + c.n
                kc, vc = cache.gather(c.table, length)
                query_pos = torch.arange(c.start, length, device=q.device)[:, None]
                mask = torch.arange(length, device=q.device)[None] <= query_pos  # (n, length)
                out = F.scaled_dot_product_attention(qc, kc[None], vc[None], attn_mask=mask, enable_gqa=gqa)
            outs.append(out[0])
        return torch.cat(outs, dim=1)[None]

    def attend_singles(self, cache: PagedKVCache, q: torch.Tensor, gqa: bool) -> torch.Tensor:
        """One query per sequence over its own blocks: q (B, H, hd) -> (B, H, hd)."""
        if cache.decode_kernel is not None:
            return cache.decode_kernel(cache, self, q)
        B, M = self.single_tables.shape
        keys = cache.k[self.single_tables].transpose(1, 2).flatten(2, 3)  # (B, kvh, M * bs, hd)
        values = cache.v[self.single_tables].transpose(1, 2).flatten(2, 3)
        beyond = torch.arange(keys.shape[2], device=q.device) > self.single_positions[:, None]  # (B, L)
        mask = torch.zeros(beyond.shape, dtype=q.dtype, device=q.device).masked_fill_(beyond, float("-inf"))
        out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask[:, None, None], enable_gqa=gqa)
        return out[:, :, 0]

    def last(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states of the rows whose logits are wanted: (1, N, dim) -> (S, dim)."""
        return h[0, self.sample_rows]
