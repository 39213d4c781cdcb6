"""Assemble and launch the HuggingFace (Falcon) server from command-line settings."""

import logging
import os
import sys
from dataclasses import dataclass

from presets.hf import loader
from presets.hf.engine import HFEngine, HFJob
from presets.hf.openai_runner import HFRunner
from presets.hf.params import DEFAULTS, EXTRAS
from presets.hf.routes import chat, render_messages
from presets.serving import auth, server
from presets.serving.app import create_app
from presets.serving.batch_loop import BatchLoop, Job
from presets.serving.openai_api import OpenAIModel, openai
from presets.serving.runtime import Runtime
from presets.serving.settings import HttpSettings, parse_settings


@dataclass
class HFSettings(HttpSettings):
    model_id: str = "weights/"  # a local HuggingFace folder
    torch_dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float16 | float32
    device_map: str = "auto"  # accelerate's placement over this node's GPUs; "none" for one device
    trust_remote_code: bool = False
    host: str = "0.0.0.0"
    port: int = 5000
    max_batch_size: int = 8
    max_queue_size: int = 256
    served_model_name: str = ""  # the model id of the /v1 routes; default the folder's name
    api_key: str = ""
    api_key_file: str = ""

    def __post_init__(self):
        if self.torch_dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"invalid setting: torch_dtype={self.torch_dtype!r}")
        if self.max_batch_size < 1 or self.max_queue_size < 1:
            raise ValueError("max_batch_size and max_queue_size must be >= 1")
        if self.http_errors():
            raise ValueError(f"invalid setting(s): {', '.join(self.http_errors())}")


def build_runtime(settings: HFSettings) -> Runtime:
    def load(progress):
        model, tokenizer = loader.load(
            settings.model_id, settings.torch_dtype, settings.device_map, settings.trust_remote_code, progress
        )
        return HFEngine(model, tokenizer), tokenizer

    def make_loop(engine: HFEngine, tokenizer):
        rt.engine = engine
        warm = DEFAULTS | EXTRAS | {"do_sample": False}
        ids = tokenizer("Hello").input_ids or [engine.pad_id]
        return BatchLoop(
            engine.run_batch, settings.max_batch_size, settings.max_queue_size,
            warm_up_job=lambda: Job(None, HFJob("Hello", ids, warm, 1)),
        )  # fmt: skip

    rt = Runtime(load, 0, settings.max_batch_size, settings.max_queue_size, make_loop=make_loop)
    return rt


def create_hf_app(settings: HFSettings, rt: Runtime, shutdown=lambda: None):
    """The app: the seed /chat route and the OpenAI routes over `rt`."""
    keys = auth.load_keys(settings.api_key, settings.api_key_file)
    app = create_app(rt, [chat, openai], shutdown, keys)
    name = settings.served_model_name or os.path.basename(os.path.normpath(settings.model_id))
    app.extensions["openai_model"] = OpenAIModel(
        name, lambda: rt.engine.context or 2048, lambda text: rt.tokenizer(text).input_ids,
        lambda messages: rt.tokenizer(render_messages(messages, rt.tokenizer), add_special_tokens=False).input_ids,
        HFRunner(rt),
    )  # fmt: skip
    return app


def build_app(settings: HFSettings, exit):
    """The app, with the model loading in the background; `exit(code)` ends the process."""
    rt = build_runtime(settings)
    app = create_hf_app(settings, rt, lambda: exit(0))
    rt.on_failure = lambda: exit(1)
    rt.start()
    return app


def main(argv=None) -> None:
    """Entry point of presets/inference/falcon/inference_api.py."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = parse_settings(argv, "HuggingFace causal LM server (Falcon)", HFSettings)
    try:
        loader.check_folder(settings.model_id)
        auth.load_keys(settings.api_key, settings.api_key_file)
    except (loader.HFFolderError, ValueError) as e:
        sys.exit(f"error: {e}")
    server.run(lambda exit: build_app(settings, exit), settings, settings.host, settings.port)
