"""Load a Llama checkpoint folder of either layout: Meta's (checkpoint.py) or HuggingFace's (hf_checkpoint.py)."""

import logging
import os

from presets.models.llama.checkpoint import check_meta_shards, load_meta_model, read_meta_args
from presets.models.llama.hf_checkpoint import check_split, load_hf_model, read_hf_args, weight_files
from presets.models.llama.layout import CheckpointError, is_hf_folder
from presets.models.llama.model import ModelArgs, Transformer
from presets.models.llama.tokenizer import TokenizerError, find_tokenizer, load_tokenizer

log = logging.getLogger(__name__)


def check_layout(ckpt_dir: str, tokenizer_path: str, mp_size: int, max_seq_len: int | None = None) -> None:
    """Cheap checks before loading: every file is there, the config is one we run, the shards fit the ranks."""
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
    check_meta_shards(ckpt_dir, mp_size)


def read_args(ckpt_dir: str, tokenizer, max_seq_len: int | None = None) -> ModelArgs:
    """ModelArgs from params.json (vocab_size -1 resolved to the tokenizer's size) or an HF config.json."""
    if is_hf_folder(ckpt_dir):
        args = read_hf_args(ckpt_dir, max_seq_len)
        if tokenizer.n_words > args.vocab_size:  # a model may have more rows than tokens (padding), never fewer
            raise CheckpointError(
                f"vocab mismatch: config.json has vocab_size {args.vocab_size}, "
                f"the tokenizer has {tokenizer.n_words} tokens"
            )
        return args
    return read_meta_args(ckpt_dir, tokenizer)


def load_model(ckpt_dir, tokenizer, mp_rank, mp_size, device, dtype, progress=log.info) -> Transformer:
    """Build the model for rank `mp_rank` and fill it from its shard or its slice of the safetensors."""
    args = read_args(ckpt_dir, tokenizer)
    if is_hf_folder(ckpt_dir):
        return load_hf_model(ckpt_dir, args, mp_rank, mp_size, device, dtype, progress)
    return load_meta_model(ckpt_dir, args, mp_rank, mp_size, device, dtype, progress)
