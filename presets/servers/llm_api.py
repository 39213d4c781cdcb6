"""Assemble and launch the llm-api compatible server: config.yaml (+ LLM_API_ variables) -> llama.cpp.

    cd /llm-api && python inference_api.py [--config config.yaml]

The model file is found (or downloaded) before the server starts, so a bad config or a missing
file ends the process at once with one line naming the key and the reason.
"""

import argparse
import logging
import sys

import torch

from presets.api.chat import render
from presets.api.llm_api import LlmApiSettings, llm_api
from presets.api.routes import OPENAI_ROUTES
from presets.api.tool_parsers import check_parser_flag
from presets.engine.runner import StepRunner
from presets.engine.runtime import Runtime
from presets.http import auth
from presets.http.app import create_app
from presets.models.llamacpp.engine import LlamaCppEngine
from presets.process import logs, server
from presets.servers import llm_api_model_file as model_file
from presets.servers.llm_api_config import ConfigError, LlmApiConfig, load_config

log = logging.getLogger(__name__)


def build_runtime(cfg: LlmApiConfig, path: str) -> Runtime:
    params = cfg.llama_params()

    def load(progress):
        progress(f"loading {path} with llama.cpp")
        engine = LlamaCppEngine(
            path,
            params["n_ctx"],
            cfg.max_batch_size,
            params["n_threads"],
            params["n_batch"],
            params["use_mmap"],
            params["use_mlock"],
        )
        rt.engine = engine
        return engine, engine.tokenizer

    rt = Runtime(load, params["n_ctx"], cfg.max_batch_size, cfg.max_queue_size)
    rt.context_setting = "ctx_size"  # llm-api's name for the context, in errors
    return rt


class GgufModel:
    """A GGUF model on llama.cpp as the OpenAI routes see it (api/openai.py OpenAIModel)."""

    engine = "presets"
    unsupported = ()
    adapters: list[str] = []  # no LoRA adapters: the base model only

    def __init__(self, rt: Runtime, runner: StepRunner, cfg: LlmApiConfig):
        self.rt, self.runner = rt, runner
        self.name = cfg.served_model_name or f"{cfg.model_family}-{cfg.model_name}"
        self.tool_call_parser = check_parser_flag(cfg.tool_call_parser)

    def context(self) -> int:
        return self.rt.max_seq_len

    def vocab_size(self) -> int:
        return self.rt.tokenizer.n_words

    def encode_prompt(self, text: str, special: bool = True) -> list[int]:
        return self.rt.tokenizer.encode(text, bos=special)

    def decode(self, ids: list[int]) -> str:
        return self.rt.tokenizer.detokenize(ids)

    def token_strs(self, ids: list[int]) -> list[str]:
        return self.rt.tokenizer.token_strs(ids)

    def encode_messages(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """In the GGUF file's own chat template (api/chat.py renders it)."""
        text = render(self.rt.tokenizer.chat_template, messages, tools)
        return self.rt.tokenizer.encode(text, bos=False, special=True)

    def chat_template(self):
        return self.rt.tokenizer.chat_template


def build_app(cfg: LlmApiConfig, path: str, exit=lambda code: None, start: bool = True):
    """The app, with the model loading in the background (start=False: the caller starts it);
    `exit(code)` ends the process."""
    rt = build_runtime(cfg, path)
    keys = auth.load_keys(cfg.api_key, cfg.api_key_file)
    app = create_app(rt, [llm_api, *OPENAI_ROUTES], lambda: exit(0), keys)
    runner = StepRunner(rt)
    params = cfg.llama_params()
    app.extensions["llm_api"] = LlmApiSettings(rt, runner, params["last_n_tokens_size"], params["seed"])
    app.extensions["openai_model"] = GgufModel(rt, runner, cfg)
    rt.on_failure = lambda: exit(1)
    if start:
        rt.start()
    return app


def check_gguf(path: str) -> None:
    """A clear error for a file llama.cpp cannot read (an old ggml .bin, a partial download)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ConfigError(f"cannot read the model file {path}: {e}") from e
    if magic != b"GGUF":
        raise ConfigError(
            f"{path} is not a GGUF file (it starts with {magic!r}); llama.cpp reads GGUF only: convert older "
            "ggml files with llama.cpp's tools or download the model as .gguf"
        )


def main(argv=None) -> None:
    """Entry point of presets/inference/llama-cpp/inference_api.py."""
    ap = argparse.ArgumentParser(description="llm-api compatible server: GGUF models on llama.cpp")
    ap.add_argument("--config", default="config.yaml", help="the YAML config file (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    logs.setup(cfg.log_level.upper())
    try:
        auth.load_keys(cfg.api_key, cfg.api_key_file)
        path = model_file.resolve(cfg)
        check_gguf(path)
    except (ConfigError, ValueError) as e:
        sys.exit(f"error: {e}")
    torch.set_num_threads(1)  # torch only samples here; llama.cpp's threads do the model's work
    server.run(lambda exit: build_app(cfg, path, exit), cfg, cfg.host, cfg.port)
