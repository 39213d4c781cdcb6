"""Compile the Triton attention kernel for NVIDIA GPUs without one (Triton's own ptxas, no device): run by
tests/test_triton_attention.py in a process without TRITON_INTERPRET, so the kernel is a real JIT function.

    python -m tests.triton_aot   -> one line per (arch, dtype, group, rows): its shared memory in bytes
"""

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from presets.models.llama import triton_attention as ta

POINTERS = {"TABLES", "ITEM_ROW", "ITEM_LEN", "ITEM_POS", "TILE_ITEM", "TILE_Q0"}


def compile_kernel(arch: int, dtype: str, group: int, rows: int, head_dim: int = 128):
    fn = ta._paged_attention
    consts = dict(HEAD_DIM=head_dim, HD=head_dim, G=group, G_PAD=ta._pow2(group), ROWS=rows, BN=ta.BLOCK_N)
    consts["WIDEN"] = dtype == "fp32"
    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in ("Q", "K", "V", "Out"):
            signature[name] = f"*{dtype}"
        elif name in POINTERS:
            signature[name] = "*i32"
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    src = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32))


if __name__ == "__main__":
    for arch in (80, 90):  # A100; H100 and H200
        for dtype, group, rows in [
            ("bf16", 1, ta.decode_rows(1)),
            ("bf16", 8, ta.decode_rows(8)),
            ("bf16", 4, ta.chunk_rows(4)),
            ("fp16", 1, ta.chunk_rows(1)),
            ("fp32", 1, ta.decode_rows(1)),
        ]:
            kernel = compile_kernel(arch, dtype, group, rows)
            print(f"sm_{arch} {dtype} group={group} rows={rows} shared={kernel.metadata.shared}", flush=True)
