"""What kind of checkpoint folder this is, and the facts every loader shares: the leaf of the loading modules
(checkpoint.py reads Meta's layout, hf_checkpoint.py HuggingFace's, load.py picks between them)."""

import glob
import os

import torch


class CheckpointError(Exception):
    """A checkpoint folder that cannot be served; the message says what is wrong."""


# How Meta splits each weight over model-parallel ranks: dim 0 for column-parallel layers,
# dim 1 for row-parallel layers and the embedding; None means every shard holds it whole.
SPLIT_DIM = {
    "tok_embeddings": 1,
    "output": 0,
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "wo": 1,
    "w1": 0,
    "w3": 0,
    "w2": 1,
}


def split_dim(key: str) -> int | None:
    """The dimension along which Meta's shards split the weight `key` (None: each shard has it whole)."""
    return SPLIT_DIM.get(key.split(".")[-2] if key.endswith(".weight") else key)


def shard_paths(ckpt_dir: str) -> list[str]:
    """Meta's consolidated.NN.pth shards of a folder, in rank order."""
    return sorted(glob.glob(os.path.join(ckpt_dir, "consolidated.*.pth")))


def is_hf_folder(ckpt_dir: str) -> bool:
    """A HuggingFace model folder (config.json) rather than Meta's layout (params.json)."""
    return os.path.isfile(os.path.join(ckpt_dir, "config.json")) and not os.path.isfile(
        os.path.join(ckpt_dir, "params.json")
    )


def transfer_rate(n_bytes: int, seconds: float, device) -> str:
    """How the weights got there: a rate when they were copied; on the CPU in their own dtype they stay mapped."""
    if torch.device(device).type == "cpu":
        return "on the CPU: memory-mapped where the dtype is the file's, read as first used"
    return f"{n_bytes / 1e9 / max(seconds, 1e-9):.2f} GB/s from the file"
