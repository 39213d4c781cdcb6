"""Load a local HuggingFace folder (never a hub): model, tokenizer, and clear errors when it is incomplete."""

import glob
import os

import torch


class HFFolderError(Exception):
    """A model folder that cannot be served; the message says what is missing."""


WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_folder(path: str) -> None:
    if not os.path.isdir(path):
        raise HFFolderError(f"model folder not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise HFFolderError(f"config.json not found in {path}: not a HuggingFace model folder")
    if not any(glob.glob(os.path.join(path, pattern)) for pattern in WEIGHT_PATTERNS):
        raise HFFolderError(f"no weights (*.safetensors or pytorch_model*.bin) in {path}")
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise HFFolderError(f"no tokenizer ({', '.join(TOKENIZER_FILES)}) in {path}")


def resolve_dtype(name: str, cuda: bool) -> torch.dtype:
    if name == "auto":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    return getattr(torch, name)


def load(path: str, torch_dtype: str, device_map: str, trust_remote_code: bool, progress):
    """(model, tokenizer) from local files only; left padding for batched generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_folder(path)
    cuda = torch.cuda.is_available()
    dtype = resolve_dtype(torch_dtype, cuda)
    progress(f"loading {path} ({dtype}, {'device_map ' + device_map if cuda else 'cpu'})")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(
        path,
        local_files_only=True,
        trust_remote_code=trust_remote_code,
        dtype=dtype,
        device_map=device_map if cuda and device_map != "none" else None,
    )
    return model.eval(), tokenizer
