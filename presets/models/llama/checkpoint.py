"""Load Meta's Llama-2 checkpoint layout: params.json, consolidated.NN.pth (one per rank), tokenizer.model.

A HuggingFace folder (config.json, safetensors) is recognised here and loaded by hf_checkpoint.py."""

import glob
import json
import logging
import os

import torch

from presets.models.llama.model import ModelArgs, Transformer

log = logging.getLogger(__name__)

# Keys Meta's files carry that the model does not use (it recomputes the rotary table).
IGNORED_KEYS = {"rope.freqs"}

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


class CheckpointError(Exception):
    """A checkpoint folder that cannot be served; the message says what is wrong."""


def shard_paths(ckpt_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(ckpt_dir, "consolidated.*.pth")))


def check_layout(ckpt_dir: str, tokenizer_path: str, mp_size: int, max_seq_len: int | None = None) -> None:
    """Cheap checks before loading: every file is there, the config is one we run, the shards fit the ranks."""
    from presets.models.llama.hf_checkpoint import check_split, is_hf_folder, weight_files
    from presets.models.llama.tokenizer import TokenizerError, find_tokenizer, load_tokenizer

    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint folder not found: {ckpt_dir}")
    hf = is_hf_folder(ckpt_dir)
    if not hf and not os.path.isfile(os.path.join(ckpt_dir, "params.json")):
        raise CheckpointError(f"neither params.json (Meta's layout) nor config.json (HuggingFace's) in {ckpt_dir}")
    try:
        tokenizer = load_tokenizer(find_tokenizer(ckpt_dir, tokenizer_path), ckpt_dir)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from e
    if hf:
        check_split(read_args(ckpt_dir, tokenizer, max_seq_len), mp_size)
        weight_files(ckpt_dir)
        return
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


def read_args(ckpt_dir: str, tokenizer, max_seq_len: int | None = None) -> ModelArgs:
    """ModelArgs from params.json (vocab_size -1 resolved to the tokenizer's size) or an HF config.json."""
    from presets.models.llama.hf_checkpoint import is_hf_folder, read_hf_args

    if is_hf_folder(ckpt_dir):
        args = read_hf_args(ckpt_dir, max_seq_len)
        if tokenizer.n_words > args.vocab_size:  # a model may have more rows than tokens (padding), never fewer
            raise CheckpointError(
                f"vocab mismatch: config.json has vocab_size {args.vocab_size}, "
                f"the tokenizer has {tokenizer.n_words} tokens"
            )
        return args
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


def load_model(ckpt_dir, tokenizer, mp_rank, mp_size, device, dtype, progress=log.info) -> Transformer:
    """Build the model for rank `mp_rank` and fill it from its shard, strictly, without copies to spare
    (Meta's layout here; a HuggingFace folder in hf_checkpoint.py)."""
    from presets.models.llama.hf_checkpoint import is_hf_folder, load_hf_model

    args = read_args(ckpt_dir, tokenizer)
    if is_hf_folder(ckpt_dir):
        return load_hf_model(ckpt_dir, args, mp_rank, mp_size, device, dtype, progress)
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
    state, done = {}, 0
    for i, (key, shape) in enumerate(expected.items()):
        t = shard[key]
        if t.shape != shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(t.shape)}, params.json and {mp_size} rank(s) imply {tuple(shape)}"
            )
        state[key] = t.to(device=device, dtype=dtype)
        done += t.numel() * t.element_size()
        if i % 16 == 15 or i == len(expected) - 1:
            progress(f"loaded {done / 1e6:.1f} of {total / 1e6:.1f} MB from {os.path.basename(path)}")
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
