"""Meta's Llama-2 checkpoint layout: params.json, consolidated.NN.pth (one per rank), tokenizer.model.

load.py picks this module or hf_checkpoint.py for a folder; both build on layout.py."""

import json
import logging
import os
import time

import torch

from presets.models.llama.layout import CheckpointError, shard_paths, split_dim, transfer_rate
from presets.models.llama.model import ModelArgs, Transformer

log = logging.getLogger(__name__)

# Keys Meta's files carry that the model does not use (it recomputes the rotary table).
IGNORED_KEYS = {"rope.freqs"}


def check_meta_shards(ckpt_dir: str, mp_size: int) -> None:
    """Every consolidated.NN.pth is there, numbered from 00, one per rank."""
    shards = shard_paths(ckpt_dir)
    if not shards:
        raise CheckpointError(f"no consolidated.NN.pth shard found in {ckpt_dir}")
    names = [os.path.basename(p) for p in shards]
    expected = [f"consolidated.{i:02d}.pth" for i in range(len(shards))]
    if names != expected:
        raise CheckpointError(f"shards in {ckpt_dir} are {names}; expected {expected}")
    if len(shards) != mp_size:
        raise CheckpointError(
            f"{ckpt_dir} has {len(shards)} shard(s) but the model-parallel size is {mp_size}; "
            f"run with {len(shards)} rank(s) (torchrun --nproc_per_node {len(shards)})"
        )


def read_meta_args(ckpt_dir: str, tokenizer) -> ModelArgs:
    """ModelArgs from params.json (vocab_size -1 resolved to the tokenizer's size)."""
    path = os.path.join(ckpt_dir, "params.json")
    try:
        with open(path) as f:
            params = json.load(f)
        args = ModelArgs.from_params(params)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if args.vocab_size == -1:
        args.vocab_size = tokenizer.n_words
    elif args.vocab_size != tokenizer.n_words:
        raise CheckpointError(
            f"vocab mismatch: params.json has vocab_size {args.vocab_size}, "
            f"the tokenizer has {tokenizer.n_words} tokens"
        )
    if args.dim % args.n_heads or args.n_heads % (args.n_kv_heads or args.n_heads):
        raise CheckpointError(f"{path}: dim must divide by n_heads and n_heads by n_kv_heads")
    return args


def load_meta_model(ckpt_dir, args: ModelArgs, mp_rank, mp_size, device, dtype, progress=log.info) -> Transformer:
    """Build the model for rank `mp_rank` and fill it from its shard, strictly, without copies to spare."""
    n_kv = args.n_kv_heads or args.n_heads
    if args.n_heads % mp_size or n_kv % mp_size:
        raise CheckpointError(f"n_heads {args.n_heads} / n_kv_heads {n_kv} do not split over {mp_size} ranks")
    model = Transformer(args)  # parameters are uninitialized; every one is replaced below
    expected = {k: v.shape for k, v in model.state_dict().items()}
    path = shard_paths(ckpt_dir)[mp_rank]
    progress(f"loading {path}")
    try:
        shard = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # a truncated or non-torch file: say which
        raise CheckpointError(f"cannot read {path}: {e}") from e
    keys = set(shard) - IGNORED_KEYS
    missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match params.json: missing {missing[:8]}, unexpected {unexpected[:8]}")
    total = sum(shard[k].numel() * shard[k].element_size() for k in expected)
    state, done, t0 = {}, 0, time.perf_counter()
    for i, (key, shape) in enumerate(expected.items()):
        t = shard[key]
        if t.shape != shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(t.shape)}, params.json and {mp_size} rank(s) imply {tuple(shape)}"
            )
        state[key] = t.to(device).to(dtype)  # from the mapped file to the device, converted there
        done += t.numel() * t.element_size()
        if i % 16 == 15 or i == len(expected) - 1:
            progress(f"loaded {done / 1e6:.1f} of {total / 1e6:.1f} MB from {os.path.basename(path)}")
    seconds = time.perf_counter() - t0
    progress(f"weights on {device} in {seconds:.1f} s ({transfer_rate(total, seconds, device)})")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def merge_shards(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of a checkpoint folder, its shards joined as Meta split them."""
    shards = [torch.load(p, map_location="cpu", mmap=True, weights_only=True) for p in shard_paths(ckpt_dir)]
    if not shards:
        raise CheckpointError(f"no consolidated.NN.pth shard found in {ckpt_dir}")
    full = {}
    for key in shards[0].keys() - IGNORED_KEYS:
        dim = split_dim(key)
        full[key] = shards[0][key] if dim is None or len(shards) == 1 else torch.cat([s[key] for s in shards], dim)
    return full
