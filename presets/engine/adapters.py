"""LoRA adapters in PEFT's folder format: which are served, what a folder holds, and why one cannot be served.

A folder is what PEFT's `save_pretrained` writes and Kaito mounts at /mnt/adapter/<name>/:
`adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules, use_rslora, rank_pattern,
alpha_pattern, ...) and `adapter_model.safetensors`, whose keys are
`base_model.model.<module path>.lora_A.weight` (r x in) and `...lora_B.weight` (out x r). A module's
output gains scaling * B(A x), scaling = alpha / r (alpha / sqrt(r) with use_rslora), times the adapter's
strength. Which adapters: `--lora_modules name=path ...` and every subfolder of `--adapters_dir`, the
strength of those from the environment variable named after the adapter (Kaito sets `<name>=<strength>`).
Model families map the module paths onto their own layers (models/llama/lora.py).
"""

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

KAITO_ADAPTERS_DIR = "/mnt/adapter"
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class AdapterError(ValueError):
    """An adapter that cannot be served: the message names it and the reason."""


@dataclass
class AdapterSpec:
    name: str
    path: str
    strength: float = 1.0


@dataclass
class LoraAdapter:
    """One adapter's weights: per module path (`model.layers.0.self_attn.q_proj`) its A (r, in) and B (out, r)
    in float32, B already multiplied by the module's scaling and the adapter's strength."""

    name: str
    path: str
    rank: int  # the largest rank of its modules
    strength: float
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def adapter_specs(lora_modules: Sequence[str], adapters_dir: str, environ=os.environ) -> list[AdapterSpec]:
    """The adapters to serve: `name=path` pairs (each argument may hold several, comma separated), then the
    folders of `adapters_dir` ("auto": Kaito's /mnt/adapter when it exists; "": none)."""
    specs = []
    for pair in ",".join(lora_modules).replace(",", " ").split():
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise AdapterError(f"--lora_modules takes name=path pairs; got {pair!r}")
        specs.append(AdapterSpec(name, path))
    directory = KAITO_ADAPTERS_DIR if adapters_dir == "auto" else adapters_dir
    if adapters_dir == "auto" and not os.path.isdir(directory):
        directory = ""
    if directory:
        if not os.path.isdir(directory):
            raise AdapterError(f"--adapters_dir {directory}: no such folder")
        for name in sorted(os.listdir(directory)):
            # not a volume's lost+found, nor the ..data folders of a ConfigMap or Secret mount
            if os.path.isdir(os.path.join(directory, name)) and not name.startswith(".") and name != "lost+found":
                specs.append(AdapterSpec(name, os.path.join(directory, name), _strength(name, environ)))
    names = [s.name for s in specs]
    for s in specs:
        if not NAME.match(s.name):
            raise AdapterError(f"adapter name {s.name!r}: letters, digits, '.', '_' and '-' only, at most 128")
        if names.count(s.name) > 1:
            raise AdapterError(f"adapter {s.name!r} is named twice")
    return specs


def _strength(name: str, environ) -> float:
    text = environ.get(name)
    if text is None:
        return 1.0
    try:
        value = float(text)
    except ValueError:
        raise AdapterError(
            f"adapter {name!r}: its strength (environment variable {name}) is {text!r}, not a number"
        ) from None
    if not math.isfinite(value):
        raise AdapterError(f"adapter {name!r}: its strength {text!r} is not finite")
    return value


def _refusal(spec: AdapterSpec):
    def refuse(reason: str) -> AdapterError:
        return AdapterError(f"adapter {spec.name!r} ({spec.path}): {reason}")

    return refuse


def check_folder(spec: AdapterSpec, max_rank: int) -> dict:
    """Its adapter_config.json once checked: a LoRA we serve, with its weights in safetensors, no rank over
    max_rank (PEFT's rank_pattern included); AdapterError naming the adapter and the reason otherwise."""
    refuse = _refusal(spec)
    config_path = os.path.join(spec.path, "adapter_config.json")
    weights_path = os.path.join(spec.path, "adapter_model.safetensors")
    if not os.path.isdir(spec.path):
        raise refuse("no such folder")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise refuse("no adapter_config.json (a PEFT LoRA folder has one)") from None
    except (OSError, ValueError) as e:
        raise refuse(f"cannot read adapter_config.json: {e}") from None
    if not isinstance(config, dict):
        raise refuse("adapter_config.json is not a JSON object")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise refuse(f"peft_type is {config.get('peft_type')!r}; only LORA adapters are served")
    for flag, why in (
        ("use_dora", "DoRA adapters are not served"),
        ("fan_in_fan_out", "fan_in_fan_out (Conv1D layers) adapters are not served"),
    ):
        if config.get(flag):
            raise refuse(why)
    if config.get("bias", "none") != "none":
        raise refuse(f"bias {config.get('bias')!r}: adapters that train biases are not served")
    if config.get("modules_to_save"):
        raise refuse(f"modules_to_save {config['modules_to_save']}: adapters that replace whole modules are not served")
    if not os.path.isfile(weights_path):
        bins = os.path.isfile(os.path.join(spec.path, "adapter_model.bin"))
        hint = " (it has adapter_model.bin: save it with safe_serialization=True)" if bins else ""
        raise refuse(f"no adapter_model.safetensors{hint}")
    ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and r >= 1 for r in ranks):
        raise refuse(f"ranks {ranks} are not positive integers")
    if max(ranks) > max_rank:
        raise refuse(f"rank {max(ranks)} is over --max_lora_rank {max_rank}")
    return config


def read_adapter(spec: AdapterSpec, max_rank: int, modules: set[str]) -> LoraAdapter:
    """Read and check one PEFT folder; `modules` are the module paths of the base model it may target."""
    refuse = _refusal(spec)
    config = check_folder(spec, max_rank)
    weights_path = os.path.join(spec.path, "adapter_model.safetensors")
    try:
        from safetensors.torch import load_file

        tensors = load_file(weights_path)
    except Exception as e:  # safetensors raises its own error type for a truncated or foreign file
        raise refuse(f"cannot read adapter_model.safetensors: {type(e).__name__}: {e}") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise refuse(f"unexpected tensor {key!r} (LoRA A and B weights only)")
        if m["module"] not in modules:
            raise refuse(f"targets {m['module']!r}, which the base model does not have or we cannot adapt")
        pairs.setdefault(m["module"], {})[m["ab"]] = t
    if not pairs:
        raise refuse("adapter_model.safetensors holds no LoRA weights")
    out = LoraAdapter(spec.name, spec.path, 0, spec.strength)
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise refuse(f"{module} has lora_{'A' if 'A' in ab else 'B'} without its pair")
        a, b = ab["A"].float(), ab["B"].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise refuse(f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not pair")
        rank = a.shape[0]
        if rank > max_rank:
            raise refuse(f"{module} has rank {rank}, over --max_lora_rank {max_rank}")
        alpha = _pattern(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        out.modules[module] = (a, b * (scaling * spec.strength))
        out.rank = max(out.rank, rank)
    return out


def _pattern(patterns, module: str, default):
    """PEFT's per-module override: the value of the first pattern that matches the end of the module path."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            return value
    return default
