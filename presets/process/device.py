"""Pick the device and dtype from settings, and what the CPU offers.

`--dtype auto`: on CUDA bf16 where the GPU has it, else fp16. On CPU bf16 where the CPU multiplies bf16
in hardware (AVX512-BF16 or AMX-BF16: oneDNN runs bf16 matmuls at 1.3-6x fp32's speed there, measured
in the README), else fp32 (an AVX2-only CPU converts bf16 in software; fp32 math over bf16-stored
weights, cpu_kernels.c, is its fast path).
"""

import functools

import torch

# CPU flags (as /proc/cpuinfo names them) under which oneDNN computes bf16 matmuls in hardware.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether bf16 matmuls run in hardware here: the CPU has the instructions and torch's oneDNN uses them."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_FLAGS) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def cpu_dtype(flags: frozenset[str] | None = None) -> torch.dtype:
    """What `--dtype auto` computes in on this CPU."""
    return torch.bfloat16 if cpu_has_bf16(flags) else torch.float32


def describe(dev: torch.device, dtype: torch.dtype, asked: str) -> str:
    """The log's words for the choice: "cpu, bfloat16 (auto: the CPU has avx512_bf16)"."""
    name = str(dtype).removeprefix("torch.")
    if asked != "auto" or dev.type != "cpu":
        return f"{dev}, {name}" + (" (auto)" if asked == "auto" else "")
    has = [f for f in BF16_FLAGS if f in cpu_flags()]
    why = f"the CPU has {' and '.join(has)}" if dtype == torch.bfloat16 else "no bf16 matmul instructions on this CPU"
    return f"{dev}, {name} (auto: {why})"


def resolve(device: str, dtype: str, local_rank: int = 0) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but no CUDA device is available")
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if dtype == "auto":
        if dev.type == "cpu":
            return dev, cpu_dtype()
        # bf16 where the GPU computes it (Ampere on), not where CUDA would emulate it (T4, V100)
        return dev, torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return dev, getattr(torch, dtype)
