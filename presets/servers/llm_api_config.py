"""llm-api's configuration: config.yaml, each key overridable by an LLM_API_-prefixed environment variable.

    models_dir: /models          # LLM_API_MODELS_DIR
    model_family: llama          # LLM_API_MODEL_FAMILY: llama | alpaca | vicuna (all GGUF on llama.cpp)
    model_name: 7b               # LLM_API_MODEL_NAME
    setup_params:                # LLM_API_SETUP_PARAMS='{"repo_id": ...}' replaces the whole mapping,
      repo_id: user/repo_id      # LLM_API_SETUP_PARAMS__REPO_ID=... sets one key in it
      filename: model-q4_0.gguf
    model_params:                # the same two forms: LLM_API_MODEL_PARAMS__CTX_SIZE=2048
      ctx_size: 2000

Environment values are read as YAML scalars (2048 is a number, false a boolean). A key this server
does not know, a value of the wrong type or out of range is refused at start, naming the key.
"""

import logging
import os
from dataclasses import dataclass, field, fields

import yaml

from presets.process.settings import HttpSettings

log = logging.getLogger(__name__)

ENV_PREFIX = "LLM_API_"
FAMILIES = ("llama", "alpaca", "vicuna")
SECTIONS = ("setup_params", "model_params")


class ConfigError(Exception):
    """A configuration that cannot be served; the message names the key and the reason."""


# setup_params: key -> type. convert/migrate are accepted only as false (see _check_setup).
SETUP_PARAMS = {"repo_id": str, "filename": str, "revision": str, "convert": bool, "migrate": bool}

# model_params: key -> (type, lowest value or None, llama.cpp's name or None when not passed on).
# Aliases: llm-api's code read num_threads and batch_size where its README says n_threads and n_batch.
MODEL_PARAMS = {
    "ctx_size": (int, 8, "n_ctx"),
    "seed": (int, -1, "seed"),  # -1: a random seed for each request without one
    "n_threads": (int, 1, "n_threads"),
    "num_threads": (int, 1, "n_threads"),
    "n_batch": (int, 1, "n_batch"),
    "batch_size": (int, 1, "n_batch"),
    "n_parts": (int, -1, None),  # pre-GGUF multi-part files; a GGUF file is one part
    "last_n_tokens_size": (int, 0, "last_n_tokens_size"),  # the window repeat_penalty looks back over
    "use_mmap": (bool, None, "use_mmap"),
    "use_mlock": (bool, None, "use_mlock"),
    "f16_kv": (bool, None, None),  # llama.cpp keeps the cache in f16 (older llm-api configs set it)
}


@dataclass
class LlmApiConfig(HttpSettings):
    model_family: str = ""
    model_name: str = ""
    models_dir: str = "./models"
    setup_params: dict = field(default_factory=dict)
    model_params: dict = field(default_factory=dict)
    host: str = "0.0.0.0"
    port: int = 8000
    log_level: str = "info"
    # This server's own keys (not in llm-api): concurrency, limits, the /v1 routes' model id, API keys.
    max_batch_size: int = 4  # sequences generated together (llama.cpp sequences sharing the context)
    max_queue_size: int = 256
    served_model_name: str = ""  # default <model_family>-<model_name>
    tool_call_parser: str = "auto"  # how the model writes tool calls: hermes, llama3_json, mistral; auto: its template
    api_key: str = ""
    api_key_file: str = ""

    @property
    def model_file(self) -> str:
        """The local file llm-api names a model by (a GGUF file under llm-api's old ggml name)."""
        return os.path.join(self.models_dir, f"ggml-{self.model_family}-{self.model_name}-q4.bin")

    def llama_params(self) -> dict:
        """model_params under llama.cpp's names, with this server's defaults."""
        out = {
            "n_ctx": 2000,
            "seed": 1337,
            "n_threads": os.cpu_count() or 1,
            "n_batch": 2048,
            "last_n_tokens_size": 64,
            "use_mmap": True,
            "use_mlock": False,
        }
        for key, value in self.model_params.items():
            name = MODEL_PARAMS[key][2]
            if name:
                out[name] = value
        return out


def _scalar(text: str):
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _from_environment(environ) -> tuple[dict, dict]:
    """The LLM_API_ variables: ({key: value}, {section: {key: value}} from the nested form)."""
    flat: dict = {}
    nested: dict = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        section, _, sub = key.partition("__")
        if sub:
            if section not in SECTIONS:
                raise ConfigError(f"{name}: only {' and '.join(SECTIONS)} have nested keys")
            raw = environ[name]  # a string key keeps the text as written (a filename 0123 is not octal 83)
            nested.setdefault(section, {})[sub] = raw if SETUP_PARAMS.get(sub) is str else _scalar(raw)
        elif key in SECTIONS:
            value = _scalar(environ[name])
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: must be a mapping, e.g. '{{\"ctx_size\": 2048}}'")
            flat[key] = value
        else:
            flat[key] = environ[name]
    return flat, nested


def _typed(key: str, value, kind, lo=None):
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, str):
            value = _scalar(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        if lo is not None and value < lo:
            raise ConfigError(f"{key}: must be >= {lo}, got {value}")
        return value
    if kind is float:
        if isinstance(value, str):
            value = _scalar(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        return float(value)
    if kind is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return str(value)
    if kind is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping of key: value, got {value!r}")
        return value
    raise AssertionError(kind)


def _check_setup(params: dict) -> dict:
    out = {}
    for key, value in params.items():
        if key not in SETUP_PARAMS:
            raise ConfigError(f"setup_params.{key}: unknown key; known: {', '.join(SETUP_PARAMS)}")
        out[key] = _typed(f"setup_params.{key}", value, SETUP_PARAMS[key])
    for key in ("convert", "migrate"):
        if out.get(key):
            raise ConfigError(
                f"setup_params.{key}: true is not supported: it rewrote pre-GGUF ggml files, and llama.cpp now "
                "reads GGUF only. Convert the model to GGUF with llama.cpp's convert_hf_to_gguf.py (or download "
                f"a .gguf file) and set {key}: false"
            )
    if "repo_id" in out and "filename" not in out:
        raise ConfigError("setup_params.repo_id: needs setup_params.filename, the file to download from the repo")
    return out


def _check_model(params: dict) -> dict:
    out = {}
    for key, value in params.items():
        if key not in MODEL_PARAMS:
            raise ConfigError(f"model_params.{key}: unknown key; known: {', '.join(MODEL_PARAMS)}")
        kind, lo, _ = MODEL_PARAMS[key]
        out[key] = _typed(f"model_params.{key}", value, kind, lo)
    if "n_threads" in out and "num_threads" in out:
        raise ConfigError("model_params: give n_threads or num_threads, not both")
    if "n_batch" in out and "batch_size" in out:
        raise ConfigError("model_params: give n_batch or batch_size, not both")
    return out


def load_config(path: str = "config.yaml", environ=None) -> LlmApiConfig:
    """The configuration from `path` (optional) with LLM_API_ variables over it; ConfigError when bad."""
    data = _read(path, os.environ if environ is None else environ)
    known = {f.name: f.type for f in fields(LlmApiConfig)}
    values = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(
                f"{key}: unknown key (from {path} or {ENV_PREFIX}{key.upper()}); known: {', '.join(known)}"
            )
        values[key] = _typed(key, value, known[key])
    cfg = LlmApiConfig(**values)
    cfg.setup_params = _check_setup(cfg.setup_params)
    cfg.model_params = _check_model(cfg.model_params)
    _check(cfg)
    return cfg


def _read(path: str, environ) -> dict:
    """The file's keys with the LLM_API_ variables over them, untyped."""
    data: dict = {}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot be read as YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: must be a mapping of key: value at the top level")
    else:
        log.warning("no config file at %s: using defaults and %s variables", path, ENV_PREFIX)
    flat, nested = _from_environment(environ)
    data.update(flat)  # LLM_API_MODEL_PARAMS replaces the file's whole mapping, as llm-api did
    for section, values in nested.items():  # LLM_API_MODEL_PARAMS__CTX_SIZE sets one key in it
        current = data.get(section) or {}
        if not isinstance(current, dict):
            raise ConfigError(f"{section}: must be a mapping of key: value, got {current!r}")
        data[section] = {**current, **values}

    return data


def _check(cfg: LlmApiConfig) -> None:
    """The rules between keys, and the ranges of this server's own keys."""
    if not cfg.model_family:
        raise ConfigError(f"model_family: required; one of {', '.join(FAMILIES)}")
    if cfg.model_family not in FAMILIES:
        raise ConfigError(
            f"model_family: {cfg.model_family!r} is not served here; this server runs GGUF models of the "
            f"Llama family on llama.cpp: {', '.join(FAMILIES)}"
        )
    if not cfg.model_name:
        raise ConfigError(f"model_name: required (it names the local model file, {cfg.model_file})")
    for key, value in (("model_name", cfg.model_name), ("setup_params.filename", cfg.setup_params.get("filename"))):
        if value and ("/" in value or "\\" in value or value in (".", "..")):
            raise ConfigError(f"{key}: {value!r} must be a plain file name part, without a folder")
    if cfg.max_batch_size > 255:
        raise ConfigError(
            f"max_batch_size: at most 255 (llama.cpp runs 256 sequences, one is for embeddings), "
            f"got {cfg.max_batch_size}"
        )
    n_batch = cfg.llama_params()["n_batch"]
    if n_batch <= cfg.max_batch_size:
        key = "batch_size" if "batch_size" in cfg.model_params else "n_batch"
        raise ConfigError(
            f"model_params.{key}: must be more than max_batch_size ({cfg.max_batch_size}): llama.cpp "
            f"decodes one token of every running sequence in one batch; got {n_batch}"
        )
    for key, rule, ok in cfg.http_rules():
        if not ok:
            raise ConfigError(f"{key}: must be {rule}, got {getattr(cfg, key)}")
    if not 0 <= cfg.port < 65536:
        raise ConfigError(f"port: must be 0..65535, got {cfg.port}")
    for key in ("max_batch_size", "max_queue_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {getattr(cfg, key)}")
    if cfg.log_level.lower() not in ("critical", "error", "warning", "info", "debug"):
        raise ConfigError(f"log_level: one of critical, error, warning, info, debug; got {cfg.log_level!r}")
