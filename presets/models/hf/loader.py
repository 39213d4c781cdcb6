"""Load a local HuggingFace folder (never a hub): model, tokenizer, and clear errors when it is incomplete."""

import glob
import os
import warnings

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


def load_adapters(model, specs, max_rank: int, progress):
    """The model wrapped by PEFT with every adapter of `specs` loaded under its name, each scaled by its
    strength (AdapterError naming the adapter when PEFT cannot put it on this model); the model itself
    when there are none."""
    if not specs:
        return model
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from presets.engine.adapters import AdapterError, check_folder

    for spec in specs:
        check_folder(spec, max_rank)
    for i, spec in enumerate(specs):
        try:
            with warnings.catch_warnings():  # PEFT 0.21 reads a property transformers 5 deprecates
                warnings.simplefilter("ignore", FutureWarning)
                if i == 0:
                    model = PeftModel.from_pretrained(model, spec.path, adapter_name=spec.name, is_trainable=False)
                else:
                    model.load_adapter(spec.path, adapter_name=spec.name, is_trainable=False)
        except Exception as e:  # PEFT's own errors: a target this model lacks, shapes of another base
            raise AdapterError(f"adapter {spec.name!r} ({spec.path}): PEFT cannot load it: {e}") from e
        if spec.strength != 1.0:
            for module in model.modules():
                if isinstance(module, LoraLayer) and spec.name in module.scaling:
                    module.scaling[spec.name] *= spec.strength
        progress(f"LoRA adapter {spec.name} loaded")
    return model.eval()
