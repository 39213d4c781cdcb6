"""Process groups: torch.distributed and fairscale's model-parallel groups, set up in one place."""

import datetime
import os

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel.initialize import initialize_model_parallel, model_parallel_is_initialized


def world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment, or a single process."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_model_parallel(mp_size: int, device: torch.device, timeout_s: float = 1800) -> dist.ProcessGroup | None:
    """Join the job (gloo on CPU, nccl on CUDA) and make fairscale's groups of `mp_size` ranks.

    Returns a gloo group over all ranks for the step messages (None with a single rank): control
    traffic stays on the CPU even when the model's collectives run over nccl.
    """
    if model_parallel_is_initialized():
        return None
    _, world_size, _ = world()
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if world_size == 1:
            # No peers: an in-memory store needs no free port and no torchrun.
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        else:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    if dist.get_world_size() != mp_size:
        raise RuntimeError(f"model_parallel_size {mp_size} must equal the number of ranks {dist.get_world_size()}")
    initialize_model_parallel(mp_size)
    if world_size == 1:
        return None
    return dist.new_group(backend="gloo", timeout=timeout) if device.type == "cuda" else dist.group.WORLD


def min_over_ranks(value: int, group) -> int:
    """The smallest `value` any rank holds (every rank calls this with its own)."""
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t)
