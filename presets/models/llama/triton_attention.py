"""Attention over the paged KV cache in place, as one Triton kernel (the CUDA path; kv_cache.py has the rest).

Every query row of a step attends to the keys of its own sequence at positions 0..its own position, read
through the sequence's block table: no per-step gather of K and V. One kernel serves both kinds of item:
- a decode (one query): one tile; the tile's rows are the query heads that share a KV head (GQA), so each
  key and value block is loaded once for all of them;
- a prompt chunk (n queries after a cached prefix or from position 0): tiles of `CHUNK_ROWS` queries.
A program handles one tile and one KV head: it walks the keys `BLOCK_N` positions at a time, each position's
block and offset looked up in the table (so any block size works), with an online softmax in fp32. Inputs
stay in their dtype (bf16/fp16 products accumulate in fp32 on the tensor cores; fp32 inputs use IEEE fp32,
not TF32); the probabilities are rounded to the value dtype for P @ V, as FlashAttention does.

Tested on the CPU in Triton's interpreter (TRITON_INTERPRET=1; tests/test_triton_attention.py) against SDPA
over gathered keys. Triton's interpreter (3.7 and 3.9) computes bf16 dots wrongly, so under it bf16 operands are
widened to fp32 first: the same products (a bf16 product is exact in fp32), summed in fp32.
"""

import contextlib
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU install without triton: the engine keeps the SDPA and C kernel paths
    triton = None

DECODE_ROWS = 16  # rows of a decode tile (query heads of one KV head, padded): tl.dot wants >= 16
CHUNK_ROWS = 64  # rows of a prompt-chunk tile, queries x heads of one KV head
BLOCK_N = 32  # key positions per inner step


def available() -> bool:
    return triton is not None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _dot(a, b, WIDEN: tl.constexpr):
        """a @ b accumulated in fp32; fp32 operands in IEEE fp32 (not TF32, the GPU's default)."""
        if WIDEN:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _paged_attention(
        Q,  # (N, H, hd): this step's queries
        K,  # (blocks, kvh, block_size, hd)
        V,
        Out,  # (N, H, hd)
        TABLES,  # (items, width) int32: block tables
        ITEM_ROW,  # (items,) int32: the item's first row in the step
        ITEM_LEN,  # (items,) int32: its number of rows (queries)
        ITEM_POS,  # (items,) int32: the position of its first row
        TILE_ITEM,  # (tiles,) int32: the item a tile belongs to
        TILE_Q0,  # (tiles,) int32: the tile's first query, counted within its item
        scale,
        block_size,
        stride_qn,
        stride_qh,
        stride_kb,
        stride_kh,
        stride_kt,
        stride_on,
        stride_oh,
        stride_tab,
        HEAD_DIM: tl.constexpr,
        HD: tl.constexpr,  # HEAD_DIM padded to a power of 2
        G: tl.constexpr,  # query heads per KV head
        G_PAD: tl.constexpr,
        ROWS: tl.constexpr,  # queries per tile x G_PAD
        BN: tl.constexpr,
        WIDEN: tl.constexpr,  # compute the dots in fp32 (interpreter with bf16 inputs; fp32 inputs)
    ):
        tile = tl.program_id(0)
        kv_head = tl.program_id(1)
        item = tl.load(TILE_ITEM + tile)
        q0 = tl.load(TILE_Q0 + tile)
        row0 = tl.load(ITEM_ROW + item)
        n = tl.load(ITEM_LEN + item)
        pos0 = tl.load(ITEM_POS + item)

        m = tl.arange(0, ROWS)
        query = q0 + m // G_PAD  # within the item
        g = m % G_PAD
        valid = (query < n) & (g < G)
        head = kv_head * G + g
        d = tl.arange(0, HD)
        dmask = d < HEAD_DIM
        rows = (row0 + query).to(tl.int64)
        q = tl.load(
            Q + rows[:, None] * stride_qn + head[:, None] * stride_qh + d[None, :],
            mask=valid[:, None] & dmask[None, :],
            other=0.0,
        )
        if WIDEN:
            q = q.to(tl.float32)
        q_pos = pos0 + query
        last = pos0 + tl.minimum(q0 + ROWS // G_PAD, n) - 1  # the last key any row of this tile reads

        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, HD], tl.float32)
        table = TABLES + item.to(tl.int64) * stride_tab
        for start in range(0, last + 1, BN):
            k_pos = start + tl.arange(0, BN)
            k_valid = k_pos <= last
            block = tl.load(table + k_pos // block_size, mask=k_valid, other=0).to(tl.int64)
            offset = (k_pos % block_size)[:, None] * stride_kt
            at = block[:, None] * stride_kb + kv_head * stride_kh + offset + d[None, :]
            kv_mask = k_valid[:, None] & dmask[None, :]
            k = tl.load(K + at, mask=kv_mask, other=0.0)
            v = tl.load(V + at, mask=kv_mask, other=0.0)
            if WIDEN:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = _dot(q, tl.trans(k), WIDEN) * scale  # (ROWS, BN) fp32
            s = tl.where((k_pos[None, :] <= q_pos[:, None]) & k_valid[None, :], s, float("-inf"))
            # Key position 0 is in the first block for every row, so m_new is finite from there on.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, WIDEN)
            m_i = m_new

        out = acc / l_i[:, None]
        tl.store(
            Out + rows[:, None] * stride_on + head[:, None] * stride_oh + d[None, :],
            out.to(Out.dtype.element_ty),
            mask=valid[:, None] & dmask[None, :],
        )


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass
class Launch:
    """One kernel launch's tile lists: tiles of `rows` rows over some of the step's items."""

    tile_item: torch.Tensor  # (tiles,) int32
    tile_q0: torch.Tensor  # (tiles,) int32
    rows: int


@dataclass
class AttentionPlan:
    """The step's items as the kernel reads them (built once per step, shared by every layer)."""

    tables: torch.Tensor  # (items, width) int32
    item_row: torch.Tensor  # (items,) int32
    item_len: torch.Tensor
    item_pos: torch.Tensor
    launches: list[Launch]

    @classmethod
    def build(cls, items: list[tuple[int, int, int, list[int]]], group: int, device) -> "AttentionPlan":
        """items: (first row, queries, first position, block table) per item, decodes (one query) first."""
        decodes = [i for i, it in enumerate(items) if it[1] == 1]
        launches = []
        if decodes:  # one tile per decode
            launches.append(_launch(decodes, [0] * len(decodes), decode_rows(group), device))
        per_tile = chunk_rows(group) // _pow2(group)
        chunk_tiles = [(i, q0) for i, it in enumerate(items) if it[1] > 1 for q0 in range(0, it[1], per_tile)]
        if chunk_tiles:
            launches.append(_launch(*zip(*chunk_tiles), chunk_rows(group), device))
        width = max((len(it[3]) for it in items), default=1) or 1
        tables = [it[3] + [0] * (width - len(it[3])) for it in items]  # padding is never read
        i32 = dict(dtype=torch.int32, device=device)
        return cls(
            torch.tensor(tables, **i32).view(len(items), width),
            torch.tensor([it[0] for it in items], **i32),
            torch.tensor([it[1] for it in items], **i32),
            torch.tensor([it[2] for it in items], **i32),
            launches,
        )

    @classmethod
    def decodes(cls, tables: torch.Tensor, item_pos: torch.Tensor, group: int) -> "AttentionPlan":
        """A plan of B decodes whose tables (B, width) and positions (B,) are the caller's (static) tensors:
        item i is row i."""
        rows = torch.arange(tables.shape[0], dtype=torch.int32, device=tables.device)
        launch = Launch(rows, torch.zeros_like(rows), decode_rows(group))
        return cls(tables, rows, torch.ones_like(rows), item_pos, [launch])


def decode_rows(group: int) -> int:
    """Rows of a decode tile: the group's query heads, padded to a power of 2 and to DECODE_ROWS."""
    return max(DECODE_ROWS, _pow2(group))


def chunk_rows(group: int) -> int:
    return max(CHUNK_ROWS, _pow2(group))


def _launch(item_ids, q0s, rows: int, device) -> Launch:
    i32 = dict(dtype=torch.int32, device=device)
    return Launch(torch.tensor(list(item_ids), **i32), torch.tensor(list(q0s), **i32), rows)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """q (N, H, hd) of a step whose keys and values are already in the cache -> attention output (N, H, hd)."""
    if triton is None:
        raise RuntimeError("the Triton attention kernel needs the triton package")
    n_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[1]
    group = n_heads // kv_heads
    out = torch.empty_like(q)
    widen = q.dtype == torch.float32 or (interpreted() and q.dtype == torch.bfloat16)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():  # Triton launches on the current one
        _launch_all(q, k_cache, v_cache, out, plan, head_dim, kv_heads, group, widen)
    return out


def _launch_all(q, k_cache, v_cache, out, plan: AttentionPlan, head_dim: int, kv_heads: int, group: int, widen: bool):
    for launch in plan.launches:
        grid = (launch.tile_item.shape[0], kv_heads)
        _paged_attention[grid](
            q,
            k_cache,
            v_cache,
            out,
            plan.tables,
            plan.item_row,
            plan.item_len,
            plan.item_pos,
            launch.tile_item,
            launch.tile_q0,
            head_dim**-0.5,
            k_cache.shape[2],
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            out.stride(0),
            out.stride(1),
            plan.tables.stride(0),
            HEAD_DIM=head_dim,
            HD=max(16, _pow2(head_dim)),
            G=group,
            G_PAD=_pow2(group),
            ROWS=launch.rows,
            BN=BLOCK_N,
            WIDEN=widen,
        )
