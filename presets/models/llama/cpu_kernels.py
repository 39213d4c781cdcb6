"""Faster inference on CPU: the model's linear layers repacked once, and a decode attention kernel.

A bf16 model (--dtype bfloat16, or auto on a CPU with AVX512-BF16 or AMX: process/device.py) packs each
weight in oneDNN's blocked bf16 layout ("onednn-bf16"): bf16 products, fp32 sums, on the CPU's bf16
instructions. An fp32 model packs each weight into the first form that applies:
1. bf16 panels read by `linear_bf16` of cpu_kernels.c, when every weight is exactly a bf16 value (Meta's
   checkpoints are bf16, so their fp32 upcasts are): the same fp32 math over half the bytes. A decode
   step streams every weight once for a few rows, so halving the bytes is most of its time.
2. oneDNN's blocked fp32 layout (PyTorch's own ops for frozen weights, not public API, so guarded):
   at decode sizes MKL's plain sgemm streams the weights poorly, worst on AMD EPYC.
3. the plain fp32 weight and F.linear.
The model stacks the projections that read the same input (wq|wk|wv, w1|w3: fewer, wider calls are
about 10% faster per decode step). Each layer is replaced by a PackedParallelLinear module when the
engine starts; the packed copy replaces the original weight (same memory or less), and state_dict()
still gives the checkpoint's weights.

cpu_kernels.c also has `decode_attention`, which reads each sequence's own cache blocks only. The C file
is compiled on first use with the system's C compiler (`cc`, or $CC) into a cache folder and loaded with
ctypes; where that is not possible (no compiler, a CPU without AVX2/FMA, PRESETS_CPU_KERNELS=0) the
engine logs why and uses forms 2 and 3 and PyTorch's attention.
"""

import ctypes
import functools
import hashlib
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import get_model_parallel_group, get_model_parallel_world_size
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region

from presets.models.llama.kv_cache import PagedKVCache, PagedStep
from presets.models.llama.model import Attention

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared"]
PANEL = 16  # output rows per bf16 panel (NB in cpu_kernels.c)
KERNEL_CACHE_DTYPES = (torch.float32, torch.bfloat16)  # the KV caches decode_attention reads


def _cache_dirs() -> list[str]:
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [os.path.join(home, "presets"), os.path.join(tempfile.gettempdir(), f"presets-{os.getuid()}")]


def _private_dir(folder: str) -> None:
    """Create `folder` for this user only; refuse one that others could write (a library is loaded from it)."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    st = os.stat(folder)
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise OSError(f"{folder} is not private to this user")


def _compile() -> str:
    """Path of the compiled library, built once per source and flags (a file per version, written atomically)."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise OSError(f"no C compiler '{cc}' on PATH")
    tag = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *CFLAGS]).encode()).hexdigest()[:16]
    errors = []
    for folder in _cache_dirs():
        path = os.path.join(folder, f"cpu_kernels-{tag}.so")
        try:
            _private_dir(folder)
            if os.path.exists(path):
                return path
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
        except OSError as e:
            errors.append(str(e))
            continue
        try:
            cmd = [cc, *CFLAGS, str(SOURCE), "-o", tmp, "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise OSError(f"{cc} failed: {done.stderr.strip()[-2000:]}")
            os.replace(tmp, path)  # another process may have won the race: same bytes
            return path
        except subprocess.TimeoutExpired as e:
            raise OSError(f"{cc} took over {e.timeout} s") from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise OSError(f"no private writable cache folder: {'; '.join(errors)}")


@functools.cache
def native() -> ctypes.CDLL | None:
    """cpu_kernels.c compiled and loaded, or None where it cannot run here (the reason is logged once)."""
    if os.environ.get("PRESETS_CPU_KERNELS", "1") == "0":
        log.info("CPU kernels off (PRESETS_CPU_KERNELS=0)")
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        log.info("CPU kernels need x86-64 AVX2 and FMA; this CPU offers %s", torch.backends.cpu.get_cpu_capability())
        return None
    try:
        lib = ctypes.CDLL(_compile())
    except OSError as e:
        log.warning("CPU kernels unavailable, using oneDNN's matmuls and PyTorch's attention: %s", e)
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.linear_bf16.argtypes = [ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]
    for fn in (lib.decode_attention, lib.decode_attention_bf16):
        fn.argtypes = [ptr] * 5 + [i64] * 6 + [ctypes.c_float, ptr, ptr, ctypes.c_int]
    return lib


def onednn_available() -> bool:
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


def is_bf16(weight: torch.Tensor) -> bool:
    """Whether every fp32 value is exactly a bf16 value (its low 16 bits are zero), as Meta's weights are."""
    return bool((weight.view(torch.int32) & 0xFFFF).eq(0).all())


def bf16_panels(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (ceil(N/16), K, 16) bf16: panel p holds output rows 16p..16p+15, k-major, zero-padded."""
    n, k = weight.shape
    w = weight.to(torch.bfloat16)
    if n % PANEL:
        w = F.pad(w, (0, 0, 0, PANEL - n % PANEL))
    return w.view(-1, PANEL, k).transpose(1, 2).contiguous()


def linear_bf16(x: torch.Tensor, panels: torch.Tensor, out_features: int) -> torch.Tensor:
    """x (..., K) fp32 times the weight packed by bf16_panels, transposed: (..., out_features) fp32."""
    if x.dtype != torch.float32 or x.shape[-1] != panels.shape[1] or panels.dtype != torch.bfloat16:
        raise ValueError(f"linear_bf16: x {x.dtype} (..., {x.shape[-1]}) does not fit panels {tuple(panels.shape)}")
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty(rows.shape[0], out_features, dtype=torch.float32, device="cpu")
    native().linear_bf16(
        rows.data_ptr(),
        rows.shape[0],
        rows.shape[1],
        panels.data_ptr(),
        out_features,
        y.data_ptr(),
        torch.get_num_threads(),
    )
    return y.view(*x.shape[:-1], out_features)


class PackedLinear:
    """The weight of a linear layer in the fastest form available for its dtype (module docstring)."""

    def __init__(self, weight: torch.Tensor, batch_hint: int):
        self.out_features, self.in_features, self.kind = weight.shape[0], weight.shape[1], "plain"
        self.dtype = weight.dtype  # what it computes in: its input's and output's dtype
        if weight.dtype == torch.bfloat16:
            if onednn_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():  # else bf16 in software
                self.weight, self.kind = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint), "onednn-bf16"
            else:
                self.weight = weight.contiguous()
        elif native() is not None and is_bf16(weight):
            self.weight, self.kind = bf16_panels(weight), "bf16"
        elif onednn_available():
            self.weight, self.kind = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint), "onednn"
        else:
            self.weight = weight.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "bf16":
            return linear_bf16(x, self.weight, self.out_features)
        if self.kind in ("onednn", "onednn-bf16"):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        return F.linear(x, self.weight)

    def unpacked(self) -> torch.Tensor:
        """The (N, K) weight again, exactly: the product with the identity (each sum is w * 1 plus zeros)."""
        return self(torch.eye(self.in_features, dtype=self.dtype)).T.contiguous()


class PackedParallelLinear(torch.nn.Module):
    """A fairscale Column- or RowParallelLinear (no bias) whose weight is packed; the inference half of
    fairscale's forward (its autograd wrappers, identities on the way forward, cost more than the math at
    decode sizes). state_dict() gives the plain weight back, and load_state_dict() packs a new one."""

    def __init__(self, linear, batch_hint: int):
        super().__init__()
        self.column, self.batch_hint = isinstance(linear, ColumnParallelLinear), batch_hint
        self.gather_output = self.column and linear.gather_output
        self.packed = PackedLinear(linear.weight.detach(), batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.packed(x)
        if self.gather_output:
            return gather_from_model_parallel_region(y)
        if not self.column and get_model_parallel_world_size() > 1:
            dist.all_reduce(y, group=get_model_parallel_group())
        return y

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.packed.unpacked()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        weight = state_dict.get(prefix + "weight")
        if weight is None:
            missing_keys.append(prefix + "weight")
        elif weight.shape != (self.packed.out_features, self.packed.in_features):
            shape = (self.packed.out_features, self.packed.in_features)
            errors.append(f"{prefix}weight: shape {tuple(weight.shape)}, not {shape}")
        else:
            self.packed = PackedLinear(weight.detach().to(self.packed.dtype), self.batch_hint)


def _packable(m: torch.nn.Module) -> bool:
    column = isinstance(m, ColumnParallelLinear)
    if not (column or isinstance(m, RowParallelLinear)) or m.weight.device.type != "cpu":
        return False
    return m.weight.dtype in (torch.float32, torch.bfloat16) and m.bias is None and (column or m.input_is_parallel)


FORMS = {  # what each packed form computes with, for the log
    "bf16": "fp32 math over bf16 weights, cpu_kernels.c",
    "onednn": "fp32, oneDNN",
    "onednn-bf16": "bf16 products with fp32 sums, oneDNN",
    "plain": "PyTorch's F.linear",
}


def pack_linears(model: torch.nn.Module, batch_hint: int) -> dict[str, list[str]]:
    """Replace every fp32 or bf16 CPU parallel linear layer of `model` by a PackedParallelLinear; returns
    {form: names of its layers}."""
    forms: dict[str, list[str]] = {}
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if _packable(child):
                packed = PackedParallelLinear(child, batch_hint)
                setattr(parent, name, packed)  # the original weight goes with the old module
                forms.setdefault(packed.packed.kind, []).append(f"{parent_name}.{name}".lstrip("."))
    return forms


def describe_forms(forms: dict[str, list[str]]) -> str:
    """ "121 layers as onednn-bf16 (bf16 products..., oneDNN): layers.*.attention.wqkv, ..., output"; layer
    numbers are folded into * so the line names each kind of layer once."""
    parts = []
    for form, names in forms.items():
        kinds = dict.fromkeys(re.sub(r"(^|\.)\d+\.", r"\1*.", n) for n in names)
        parts.append(f"{len(names)} layers as {form} ({FORMS[form]}): {', '.join(kinds)}")
    return "; ".join(parts) or "none"


def decode_attention(cache: PagedKVCache, step: PagedStep, q: torch.Tensor) -> torch.Tensor:
    """PagedStep.attend_singles by cpu_kernels.c: q (B, H, D) -> (B, H, D), each over its own blocks.
    The cache is fp32 or bf16 (read as fp32); the math is fp32, the output in q's dtype."""
    B, H, D = q.shape
    n_blocks, kv_heads, bs, _ = cache.k.shape
    tables = step.single_tables.to(torch.int64).contiguous()
    positions = step.single_positions.to(torch.int64).contiguous()
    M = tables.shape[1]
    # The kernel trusts its indices and buffers: check them here (a bad one would read outside the cache).
    if tables.shape[0] != B or positions.shape != (B,) or D != cache.k.shape[3] or H % kv_heads:
        raise ValueError(
            f"decode_attention: q {tuple(q.shape)}, tables {tuple(tables.shape)}, cache {tuple(cache.k.shape)}"
        )
    bad_pos = int(positions.min()) < 0 or int(positions.max()) >= M * bs
    if bad_pos or int(tables.min()) < 0 or int(tables.max()) >= n_blocks:
        raise IndexError(
            f"decode step outside the cache: positions {positions.tolist()} over {M} blocks of {bs}, "
            f"block ids {tables.min()}..{tables.max()} of {n_blocks}"
        )
    for t in (cache.k, cache.v):
        if t.dtype not in KERNEL_CACHE_DTYPES or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(
                f"decode_attention works on contiguous fp32 or bf16 CPU caches, not {t.dtype} on {t.device}"
            )
    q32 = q.to(torch.float32).contiguous()
    out = torch.empty(B, H, D, dtype=torch.float32, device="cpu")
    threads = torch.get_num_threads()
    scratch = torch.empty(threads, M * bs, dtype=torch.float32, device="cpu")
    kernel = native().decode_attention_bf16 if cache.k.dtype == torch.bfloat16 else native().decode_attention
    kernel(
        q32.data_ptr(),
        cache.k.data_ptr(),
        cache.v.data_ptr(),
        tables.data_ptr(),
        positions.data_ptr(),
        B,
        H,
        kv_heads,
        bs,
        D,
        M,
        1 / math.sqrt(D),
        out.data_ptr(),
        scratch.data_ptr(),
        threads,
    )
    return out.to(q.dtype)


def attach_decode_attention(model: torch.nn.Module) -> int:
    """Route every fp32 or bf16 CPU cache's one-token items through decode_attention; returns how many caches."""
    n = 0
    for m in model.modules():
        if isinstance(m, Attention) and m.cache is not None:
            c = m.cache
            if c.k.device.type == "cpu" and c.k.dtype in KERNEL_CACHE_DTYPES and m.head_dim % 8 == 0 and native():
                c.decode_kernel = decode_attention
                n += 1
    return n
