"""The Triton paged-attention kernel (CUDA's path), run on the CPU in Triton's interpreter (conftest sets
TRITON_INTERPRET=1): against SDPA over keys gathered from the same block tables, for decodes and prompt
chunks after a cached prefix, odd block sizes and lengths, GQA ratios, head sizes that are not powers of 2."""

import os
import random
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F

from presets.models.llama import triton_attention
from presets.models.llama.triton_attention import AttentionPlan, paged_attention

pytestmark = pytest.mark.skipif(not triton_attention.available(), reason="triton is in requirements-dev.txt")


def reference(q, k_cache, v_cache, items):
    """SDPA per item over its gathered keys, causal to each query's position: (N, H, hd) in fp32."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    bs = k_cache.shape[2]
    for row, n, pos, table in items:
        length = pos + n
        blocks = torch.tensor(table[: -(-length // bs)])
        k = k_cache[blocks].transpose(0, 1).flatten(1, 2)[:, :length].float()  # (kvh, length, hd)
        v = v_cache[blocks].transpose(0, 1).flatten(1, 2)[:, :length].float()
        qi = q[row : row + n].transpose(0, 1).float()  # (H, n, hd)
        mask = torch.arange(length)[None] <= torch.arange(pos, length)[:, None]
        o = F.scaled_dot_product_attention(qi[None], k[None], v[None], attn_mask=mask, enable_gqa=True)
        out[row : row + n] = o[0].transpose(0, 1)
    return out


def random_step(lengths, bs, kv_heads, group, head_dim, dtype, seed=0):
    """Items (row, queries, first position, table) over shuffled blocks of a random pool; decodes first."""
    gen = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    need = sum(-(-(pos + n) // bs) for n, pos in lengths) + 3
    order = list(range(need))
    rnd.shuffle(order)  # tables point all over the pool
    k_cache = torch.randn(need, kv_heads, bs, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(need, kv_heads, bs, head_dim, generator=gen).to(dtype)
    items, row = [], 0
    for n, pos in sorted(lengths, key=lambda x: x[0] != 1):
        nb = -(-(pos + n) // bs)
        table, order = order[:nb], order[nb:]
        items.append((row, n, pos, table))
        row += n
    q = torch.randn(row, kv_heads * group, head_dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, items


CASES = [  # (queries, first position) per item, block size, kv heads, group, head dim, dtype
    ([(1, 0), (1, 4), (1, 40), (1, 99)], 16, 2, 1, 32, torch.float32),  # decodes, MHA
    ([(1, 7), (1, 63), (5, 0), (9, 30)], 16, 2, 4, 32, torch.float32),  # decodes and chunks, GQA 4
    ([(1, 17), (70, 0), (3, 90)], 5, 1, 8, 16, torch.float32),  # odd block size, a chunk over two tiles
    ([(1, 2), (13, 11)], 3, 3, 3, 24, torch.float32),  # group 3 (padded to 4), head dim 24 (padded to 32)
    ([(1, 130), (1, 1), (33, 65)], 16, 2, 2, 64, torch.bfloat16),
    ([(1, 50), (20, 12)], 7, 2, 4, 32, torch.float16),
]


@pytest.mark.parametrize("lengths,bs,kv_heads,group,head_dim,dtype", CASES)
def test_kernel_equals_sdpa_over_gathered_keys(lengths, bs, kv_heads, group, head_dim, dtype):
    q, k_cache, v_cache, items = random_step(lengths, bs, kv_heads, group, head_dim, dtype)
    plan = AttentionPlan.build(items, group, torch.device("cpu"))
    got = paged_attention(q, k_cache, v_cache, plan).float()
    want = reference(q, k_cache, v_cache, items)
    # fp32: the same sums in another order; bf16/fp16: the probabilities are rounded to the value dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < tol


def test_every_row_is_written_and_rows_are_independent_of_their_neighbours():
    """An item's output does not depend on which other items share the step (no tile reads another's rows)."""
    q, k_cache, v_cache, items = random_step([(1, 9), (1, 30), (20, 5)], 4, 2, 2, 16, torch.float32, seed=3)
    plan = AttentionPlan.build(items, 2, torch.device("cpu"))
    together = paged_attention(q, k_cache, v_cache, plan)
    assert torch.isfinite(together).all()
    for row, n, pos, table in items:
        alone = paged_attention(
            q[row : row + n], k_cache, v_cache, AttentionPlan.build([(0, n, pos, table)], 2, torch.device("cpu"))
        )
        assert torch.equal(alone, together[row : row + n])


def test_kernel_compiles_for_a100_and_h100_without_a_gpu():
    """Triton's compiler and ptxas turn the kernel into sm_80 and sm_90 cubins here: what the interpreter cannot
    show (types, layouts, shared memory within the GPUs' 164 and 228 KiB) is checked before any GPU runs it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
    out = subprocess.run(
        [sys.executable, "-m", "tests.triton_aot"], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 10, out.stdout
    for line in lines:
        arch, shared = line.split()[0], int(line.rsplit("=", 1)[1])
        assert shared <= {"sm_80": 164, "sm_90": 228}[arch] * 1024, line
