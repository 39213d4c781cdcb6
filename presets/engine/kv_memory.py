"""How big the KV-cache pool is: --kv_cache_memory, or the defaults, checked before anything is allocated. No torch."""

import logging
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB', '1000000' -> bytes; '' or '0' -> 0 (the default applies)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "0")
    if not m or m.group(2).lower() not in UNITS:
        raise ValueError(f"kv_cache_memory={text!r} is not a size such as 2GiB, 512MiB or 1000000000")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


CPU_DEFAULT_CAP = 4 * 2**30  # without --kv_cache_memory, a CPU pool holds at most this many bytes


@dataclass
class KVPool:
    num_blocks: int
    block_size: int
    bytes_per_token: int

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def bytes(self) -> int:
        return self.tokens * self.bytes_per_token

    def describe(self, max_seq_len: int) -> str:
        fit = self.tokens // max_seq_len
        return (
            f"KV cache: {self.num_blocks} blocks of {self.block_size} tokens = {self.tokens} tokens, "
            f"{human(self.bytes)}; {fit} sequences of max_seq_len {max_seq_len} fit"
        )


def size_pool(
    bytes_per_token: int,
    block_size: int,
    max_seq_len: int,
    max_batch_size: int,
    requested: int,
    available: int | None,
    default: int | None = None,
) -> KVPool:
    """The pool for `requested` bytes (--kv_cache_memory), else `default` bytes, else what max_batch_size slots
    of max_seq_len held (the slot cache's size) up to CPU_DEFAULT_CAP; an error naming the flags when it is too
    small or too big."""
    per_block = bytes_per_token * block_size
    if requested:
        budget, source = requested, f"--kv_cache_memory {human(requested)}"
    elif default is not None:
        budget, source = default, f"{human(default)} of device memory (--gpu_memory_utilization)"
    else:
        budget = max_batch_size * max_seq_len * bytes_per_token
        source = f"--max_batch_size {max_batch_size} x --max_seq_len {max_seq_len} positions"
        if budget > CPU_DEFAULT_CAP:  # max_batch_size bounds running sequences; memory is --kv_cache_memory's
            budget = CPU_DEFAULT_CAP
            source = f"{source}, capped at {human(CPU_DEFAULT_CAP)} (--kv_cache_memory sets another size)"
    pool = KVPool(budget // per_block, block_size, bytes_per_token)
    need = -(-max_seq_len // block_size)
    if not requested and default is None and pool.num_blocks < need:
        pool.num_blocks = need  # one block more at most, so one max_seq_len sequence fits
    if pool.num_blocks < need:
        raise ValueError(
            f"the KV cache from {source} is {pool.num_blocks} blocks of {block_size} tokens ({pool.tokens} tokens, "
            f"{bytes_per_token} bytes each); one sequence of --max_seq_len {max_seq_len} needs {need} blocks "
            f"({human(need * per_block)}): raise --kv_cache_memory or lower --max_seq_len"
        )
    if available is not None and pool.bytes > available:
        raise ValueError(
            f"the KV cache from {source} needs {pool.bytes} bytes ({human(pool.bytes)}), but only {available} "
            f"bytes ({human(available)}) are available: lower --kv_cache_memory, --max_batch_size or --max_seq_len"
        )
    return pool


def available_cpu_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
