"""Assemble and launch the HuggingFace (Falcon) server from command-line settings.

A LlamaForCausalLM folder runs on our engine (continuous batching over the paged KV cache) unless
--engine transformers; other architectures run on transformers' generate in static batches."""

import logging
import os
import sys
from dataclasses import dataclass

from presets.api.chat import render
from presets.api.kaito_falcon import chat, engine_chat
from presets.api.routes import OPENAI_ROUTES
from presets.api.tool_parsers import check_parser_flag
from presets.engine.adapters import check_folder
from presets.engine.batch_loop import BatchLoop, Job
from presets.engine.runtime import Runtime
from presets.http import auth
from presets.http.app import create_app
from presets.models.chat_template import ChatTemplate, ChatTemplateError, load_chat_template
from presets.models.hf import loader
from presets.models.hf.engine import HFEngine, HFJob
from presets.models.hf.params import DEFAULTS, EXTRAS
from presets.models.hf.runner import HFRunner
from presets.models.llama.hf_checkpoint import read_config
from presets.models.llama.layout import CheckpointError
from presets.models.llama.load import check_layout
from presets.process import logs, server
from presets.process.settings import HttpSettings, LoraSettings, Settings, parse_settings
from presets.servers import llama as llama_server

log = logging.getLogger(__name__)


@dataclass
class HFSettings(HttpSettings, LoraSettings):
    model_id: str = "weights/"  # a local HuggingFace folder
    torch_dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float16 | float32
    device_map: str = "auto"  # accelerate's placement over this node's GPUs; "none" for one device
    trust_remote_code: bool = False
    # auto: our engine (continuous batching, paged KV cache) for a LlamaForCausalLM folder, transformers'
    # generate for other architectures; presets or transformers to choose.
    engine: str = "auto"
    max_seq_len: int = 0  # our engine: tokens per sequence (prompt + answer); 0: max_position_embeddings, at most 4096
    host: str = "0.0.0.0"
    port: int = 5000
    max_batch_size: int = 32  # sequences generated at once, as for Llama
    max_queue_size: int = 256
    served_model_name: str = ""  # the model id of the /v1 routes; default the folder's name
    tool_call_parser: str = "auto"  # how the model writes tool calls: hermes, llama3_json, mistral; auto: its template
    api_key: str = ""
    api_key_file: str = ""

    def __post_init__(self):
        if self.torch_dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"invalid setting: torch_dtype={self.torch_dtype!r}")
        if self.engine not in ("auto", "presets", "transformers"):
            raise ValueError(f"invalid setting: engine={self.engine!r} (auto, presets or transformers)")
        if self.max_batch_size < 1 or self.max_queue_size < 1:
            raise ValueError("max_batch_size and max_queue_size must be >= 1")
        if self.http_errors() + self.lora_errors():
            raise ValueError(f"invalid setting(s): {', '.join(self.http_errors() + self.lora_errors())}")


def runs_on_our_engine(settings: HFSettings) -> bool:
    """Whether our engine runs this folder: --engine presets (a folder it cannot run is a start error), or auto
    and a folder our engine can run (a LlamaForCausalLM config we implement, safetensors, a tokenizer)."""
    if settings.engine == "transformers":
        return False
    try:
        ours = llama_settings(settings)
        check_layout(ours.ckpt_dir, ours.tokenizer_path, 1, ours.max_seq_len)
    except CheckpointError as e:
        if settings.engine == "presets":
            raise
        log.info("transformers' generate runs this model: %s", e)
        return False
    return True


def llama_settings(settings: HFSettings) -> Settings:
    """The Llama servers' settings for running this folder on our engine."""
    if settings.max_seq_len:
        max_seq_len = settings.max_seq_len
    else:
        max_seq_len = min(read_config(settings.model_id).get("max_position_embeddings") or 4096, 4096)
    return Settings(
        ckpt_dir=settings.model_id,
        max_seq_len=max_seq_len,
        max_batch_size=settings.max_batch_size,
        max_queue_size=settings.max_queue_size,
        dtype=settings.torch_dtype,
        model_parallel_size=1,
        served_model_name=settings.served_model_name,
        tool_call_parser=settings.tool_call_parser,
        request_timeout=settings.request_timeout,
        **settings.lora_settings(),
    )


def folder_chat_template(folder: str) -> ChatTemplate | None:
    """The folder's chat template for generate's path; None (and a warning) when it has none or it is broken."""
    try:
        return load_chat_template(folder)
    except ChatTemplateError as e:
        log.warning("the model's chat template cannot be used: %s", e)
        return None


def build_runtime(settings: HFSettings) -> Runtime:
    specs = settings.adapters()

    def load(progress):
        model, tokenizer = loader.load(
            settings.model_id, settings.torch_dtype, settings.device_map, settings.trust_remote_code, progress
        )
        model = loader.load_adapters(model, specs, settings.max_lora_rank, progress)
        names = [s.name for s in specs]
        return HFEngine(model, tokenizer, folder_chat_template(settings.model_id), names), tokenizer

    def make_loop(engine: HFEngine, tokenizer):
        rt.engine = engine
        warm = DEFAULTS | EXTRAS | {"do_sample": False}
        ids = tokenizer("Hello").input_ids or [engine.pad_id]
        return BatchLoop(
            engine.run_batch,
            settings.max_batch_size,
            settings.max_queue_size,
            warm_up_job=lambda: Job(None, HFJob("Hello", ids, warm, 1)),
            cancel_payload=HFJob.cancel,
            kv=(lambda: engine.kv_tokens, engine.kv_budget(settings.max_batch_size)),  # /metrics: no block pool
        )

    rt = Runtime(load, None, settings.max_batch_size, settings.max_queue_size, make_loop=make_loop)
    rt.adapters = [s.name for s in specs]
    return rt


class TransformersModel:
    """A HuggingFace model on transformers' generate as the OpenAI routes see it (api/openai.py OpenAIModel)."""

    engine = "transformers"
    # generate's penalties are defined otherwise; its scores are not kept for log probabilities
    unsupported = ("presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs")

    def __init__(self, rt: Runtime, settings: HFSettings):
        self.rt, self.runner = rt, HFRunner(rt)
        self.adapters = rt.adapters  # LoRA adapters through PEFT, a batch per adapter
        self.name = settings.served_model_name or os.path.basename(os.path.normpath(settings.model_id))
        self.tool_call_parser = check_parser_flag(settings.tool_call_parser)

    def context(self) -> int:
        return self.rt.engine.context or 2048

    def vocab_size(self) -> int:
        return len(self.rt.tokenizer)

    def encode_prompt(self, text: str, special: bool = True) -> list[int]:
        return self.rt.tokenizer(text, add_special_tokens=special).input_ids

    def decode(self, ids: list[int]) -> str:
        return self.rt.tokenizer.decode(ids, skip_special_tokens=False)

    def token_strs(self, ids: list[int]) -> list[str]:
        return self.rt.tokenizer.convert_ids_to_tokens(ids)

    def encode_messages(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        text = render(self.rt.engine.chat_template, messages, tools)
        return self.rt.tokenizer(text, add_special_tokens=False).input_ids  # the template writes them itself

    def chat_template(self):
        return self.rt.engine.chat_template


def create_hf_app(settings: HFSettings, rt: Runtime, shutdown=lambda: None):
    """The app: Kaito's /chat route and the OpenAI routes over `rt`."""
    keys = auth.load_keys(settings.api_key, settings.api_key_file)
    app = create_app(rt, [chat, *OPENAI_ROUTES], shutdown, keys)
    app.extensions["openai_model"] = TransformersModel(rt, settings)
    return app


def create_engine_app(settings: HFSettings, shutdown=lambda: None):
    """(app, runtime) with our engine running the folder: the same /chat route and the Llama servers' OpenAI
    routes (continuous batching); the model starts loading when the runtime starts."""
    ours = llama_settings(settings)
    rt = llama_server.build_runtime(ours)
    app = create_app(
        rt, [engine_chat, *OPENAI_ROUTES], shutdown, auth.load_keys(settings.api_key, settings.api_key_file)
    )
    app.extensions["openai_model"] = llama_server.LlamaModel(rt, ours, "chat")
    return app, rt


def build_app(settings: HFSettings, exit):
    """The app, with the model loading in the background; `exit(code)` ends the process."""
    if runs_on_our_engine(settings):
        app, rt = create_engine_app(settings, lambda: exit(0))
    else:
        rt = build_runtime(settings)
        app = create_hf_app(settings, rt, lambda: exit(0))
    rt.on_failure = lambda: exit(1)
    rt.start()
    return app


def main(argv=None) -> None:
    """Entry point of presets/inference/falcon/inference_api.py."""
    logs.setup()
    settings = parse_settings(argv, "HuggingFace causal LM server (Falcon)", HFSettings)
    try:
        loader.check_folder(settings.model_id)
        auth.load_keys(settings.api_key, settings.api_key_file)
        for spec in settings.adapters():
            check_folder(spec, settings.max_lora_rank)  # a folder we cannot serve: a start error
        settings.engine = "presets" if runs_on_our_engine(settings) else "transformers"  # decided once
    except (loader.HFFolderError, CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    server.run(lambda exit: build_app(settings, exit), settings, settings.host, settings.port)
