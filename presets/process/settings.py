"""Server settings from command-line flags (flag > environment PRESET_<FLAG> > default)."""

import argparse
import os
from dataclasses import dataclass, fields

from presets.engine.adapters import AdapterSpec, adapter_specs
from presets.engine.kv_memory import parse_bytes


@dataclass
class HttpSettings:
    """The HTTP layer's limits, the same on every server (docs/operations.md, "HTTP serving")."""

    max_connections: int = 4096  # open client connections; one more is answered 503 and closed
    read_timeout: float = 30.0  # seconds a request head (from its first byte) and then its body may take; else 408
    write_timeout: float = 60.0  # seconds an answer may wait for the client to read any of it; then it is closed
    max_request_bytes: int = 1 << 20  # a larger body is 413, read no further
    request_timeout: float = 0.0  # seconds a generation may run (504, or a stream's last event); 0: no limit
    drain_timeout: float = 30.0  # after SIGTERM: seconds in-flight requests may finish (Kubernetes' grace: 30 s)

    def http_rules(self) -> list[tuple[str, str, bool]]:
        """(setting, its rule, whether it holds) for each HTTP setting."""
        return [
            ("max_connections", ">= 1", self.max_connections >= 1),
            ("read_timeout", "> 0", self.read_timeout > 0),
            ("write_timeout", "> 0", self.write_timeout > 0),
            ("max_request_bytes", ">= 1024", self.max_request_bytes >= 1024),
            ("request_timeout", ">= 0 (0: no limit)", self.request_timeout >= 0),
            ("drain_timeout", ">= 0", self.drain_timeout >= 0),
        ]

    def http_errors(self) -> list[str]:
        """The HTTP settings out of range, as 'name=value'."""
        return [f"{k}={getattr(self, k)!r}" for k, _, ok in self.http_rules() if not ok]


@dataclass
class LoraSettings:
    """The LoRA adapters a server serves (docs/operations.md, "LoRA adapters"), the same on every server."""

    lora_modules: tuple = ()  # LoRA adapters: name=path ... (PEFT folders), as vLLM's --lora-modules
    adapters_dir: str = "auto"  # every subfolder a LoRA adapter (strength: env var of its name); auto: /mnt/adapter
    max_loras: int = 8  # LoRA adapters running at once
    max_lora_rank: int = 64  # the largest adapter rank served

    def lora_errors(self) -> list[str]:
        """The LoRA settings out of range, as 'name=value'."""
        return [f"{k}={getattr(self, k)!r}" for k in ("max_loras", "max_lora_rank") if getattr(self, k) < 1]

    def lora_settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(LoraSettings)}

    def adapters(self) -> list[AdapterSpec]:
        """The adapters to serve, in their slot order (1, 2, ...); AdapterError names a bad flag or folder name."""
        return adapter_specs(self.lora_modules, self.adapters_dir)


@dataclass
class Settings(HttpSettings, LoraSettings):
    ckpt_dir: str = "weights/"
    tokenizer_path: str = ""  # default: ckpt_dir's tokenizer.model, or tokenizer.json in a HuggingFace folder
    max_seq_len: int = 512
    max_batch_size: int = 32  # sequences running at once, as Kaito's preset documents (KV memory: --kv_cache_memory)
    model_parallel_size: int = int(os.environ.get("WORLD_SIZE", 1))
    host: str = "0.0.0.0"
    port: int = 5000
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    kv_block_size: int = 16  # token positions per KV-cache block
    kv_cache_memory: str = ""  # KV pool size (2GiB, 512MiB, bytes); default: see gpu_memory_utilization
    gpu_memory_utilization: float = 0.9  # CUDA: this fraction of device memory for weights, activations, KV
    max_num_batched_tokens: int = 0  # tokens computed per engine step; 0: 2048 on CPU, 8192 on CUDA
    no_prefix_caching: bool = False  # do not reuse cached KV blocks of identical prompt prefixes
    attention: str = "auto"  # auto | sdpa | triton: how steps read the paged KV cache (docs/design.md)
    cuda_graphs: bool = True  # CUDA: replay decode steps as captured graphs
    max_queue_size: int = 256  # sequences waiting for a batch slot before 503
    dist_timeout: float = 1800.0  # seconds a collective may wait before the job is declared failed
    served_model_name: str = ""  # the model id of the /v1 routes; default llama2-<completion|chat>
    tool_call_parser: str = "auto"  # how the model writes tool calls: hermes, llama3_json, mistral; auto: its template
    api_key: str = ""  # when set (or api_key_file), requests need "Authorization: Bearer <key>"
    api_key_file: str = ""  # one key per line
    allow_runtime_lora: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (one rank only)

    def __post_init__(self):
        checks = {
            "max_seq_len": self.max_seq_len >= 2,
            "max_batch_size": self.max_batch_size >= 1,
            "model_parallel_size": self.model_parallel_size >= 1,
            "port": 0 <= self.port < 65536,
            "device": self.device in ("auto", "cpu", "cuda"),
            "dtype": self.dtype in ("auto", "float32", "float16", "bfloat16"),
            "attention": self.attention in ("auto", "sdpa", "triton"),
            "kv_block_size": 1 <= self.kv_block_size <= 1024,
            "kv_cache_memory": _is_size(self.kv_cache_memory),
            "gpu_memory_utilization": 0 < self.gpu_memory_utilization <= 1,
            "max_num_batched_tokens": self.max_num_batched_tokens >= 0,
            "max_queue_size": self.max_queue_size >= 1,
            "dist_timeout": self.dist_timeout > 0,
        }
        bad = [f"{k}={getattr(self, k)!r}" for k, ok in checks.items() if not ok] + self.http_errors()
        bad += self.lora_errors()
        if bad:
            raise ValueError(f"invalid setting(s): {', '.join(bad)}")


def _is_size(text: str) -> bool:
    try:
        parse_bytes(text)
        return True
    except ValueError:
        return False


def parse_settings(argv=None, description: str = "", cls=Settings):
    """Settings (a dataclass like Settings) from flags; each default may come from PRESET_<FLAG>."""
    ap = argparse.ArgumentParser(description=description)
    for f in fields(cls):
        default = os.environ.get(f"PRESET_{f.name.upper()}", getattr(cls, f.name))
        kind = type(getattr(cls, f.name))
        if kind is bool:
            on = default if isinstance(default, bool) else default.lower() in ("1", "true", "yes")
            ap.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=on, help=f"default: {on}")
        elif kind is tuple:  # zero or more values; the environment's are split at spaces
            values = tuple(default.split()) if isinstance(default, str) else default
            ap.add_argument(f"--{f.name}", nargs="*", default=values, help=f"default: {' '.join(values) or 'none'}")
        else:
            ap.add_argument(f"--{f.name}", type=kind, default=kind(default), help=f"default: {default}")
    ns = ap.parse_args(argv)
    for f in fields(cls):
        if isinstance(getattr(cls, f.name), tuple):
            setattr(ns, f.name, tuple(getattr(ns, f.name)))
    try:
        return cls(**vars(ns))
    except ValueError as e:
        ap.error(str(e))
