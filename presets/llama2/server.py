"""Assemble and launch a Llama-2 server (text completion or chat) from command-line settings."""

import logging
import sys

from presets.llama2.checkpoint import CheckpointError, check_layout, load_model
from presets.llama2.engine import LlamaEngine
from presets.llama2.routes import chat, completion
from presets.llama2.tokenizer import Tokenizer
from presets.serving import device, distributed
from presets.serving.app import create_app
from presets.serving.runtime import Runtime
from presets.serving.server import exit_gunicorn, serve
from presets.serving.settings import Settings, parse_settings

ROUTES = {"completion": completion, "chat": chat}


def build_runtime(settings: Settings) -> Runtime:
    """A Runtime whose loader reads this rank's shard of the checkpoint onto the chosen device."""

    def load(progress):
        rank, _, local_rank = distributed.world()
        dev, dtype = device.resolve(settings.device, settings.dtype, local_rank)
        progress(f"device {dev}, dtype {dtype}")
        distributed.init_model_parallel(settings.model_parallel_size, dev)
        tokenizer = Tokenizer(settings.tokenizer_path)
        model = load_model(settings.ckpt_dir, tokenizer, rank, settings.model_parallel_size, dev, dtype, progress)
        return LlamaEngine(model, settings.max_batch_size, settings.max_seq_len), tokenizer

    return Runtime(load, settings.max_seq_len, settings.max_batch_size, settings.max_queue_size)


def build_app(settings: Settings, kind: str, shutdown=lambda: None):
    """The Flask app for `kind` ("completion" or "chat"); starts loading the model in the background."""
    rt = build_runtime(settings)
    app = create_app(rt, [ROUTES[kind]], shutdown, settings.max_request_bytes)
    rt.on_failure = lambda: exit_gunicorn(1)
    rt.start()
    return app


def main(kind: str, argv=None) -> None:
    """Entry point of presets/inference/llama2-<kind>/inference_api.py."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = parse_settings(argv, f"Llama-2 {kind} server")
    _, world_size, _ = distributed.world()
    if world_size > 1:
        sys.exit(f"error: {world_size} ranks were launched; this server runs as a single rank for now")
    try:
        check_layout(settings.ckpt_dir, settings.tokenizer_path, settings.model_parallel_size)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    serve(
        lambda: build_app(settings, kind, shutdown=exit_gunicorn), settings.host, settings.port, settings.http_threads
    )
