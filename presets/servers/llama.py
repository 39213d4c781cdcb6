"""Assemble and launch a Llama-2 server (text completion or chat) from command-line settings.

Under torchrun with several ranks, global rank 0 serves HTTP and drives the engine; every other
rank loads its own shard and follows rank 0's steps; a node's local rank 0 answers the probes.
"""

import logging
import os
import signal
import sys

from presets.api.chat import encode_dialog, refused
from presets.api.kaito_llama import chat, completion
from presets.api.lora_admin import lora_admin
from presets.api.routes import OPENAI_ROUTES
from presets.api.tool_parsers import check_parser_flag
from presets.engine.adapters import LoraAdapter, read_adapter
from presets.engine.kv_memory import parse_bytes
from presets.engine.runner import StepRunner
from presets.engine.runtime import Runtime
from presets.errors import ApiError
from presets.http import auth
from presets.http.app import create_app
from presets.models.llama.engine import CacheSettings, LlamaEngine
from presets.models.llama.layout import CheckpointError, is_hf_folder
from presets.models.llama.load import check_layout, load_model, read_args
from presets.models.llama.lora import check_shapes, module_paths
from presets.models.llama.structured_vocab import structured_output
from presets.models.llama.tokenizer import find_tokenizer, load_tokenizer
from presets.process import device, distributed, logs, server
from presets.process.probe_server import start_probe_server
from presets.process.ranks import FollowerState, LeaderEngine, StepChannel, follow, heartbeat_interval
from presets.process.settings import Settings, parse_settings

log = logging.getLogger(__name__)

ROUTES = {"completion": completion, "chat": chat}
TORCHRUN_DRAIN = 25  # seconds: torchrun sends SIGKILL 30 s after SIGTERM


def read_adapters(settings: Settings, args) -> list[LoraAdapter]:
    """Every served adapter read and checked against the base model (AdapterError names what is wrong)."""
    adapters = [read_adapter(s, settings.max_lora_rank, module_paths(args.n_layers)) for s in settings.adapters()]
    for adapter in adapters:
        check_shapes(adapter, args)
    return adapters


def load_engine(settings: Settings, progress=log.info):
    """(engine, tokenizer, control group) for this rank: its shard of the checkpoint on its device."""
    rank, _, local_rank = distributed.world()
    dev, dtype = device.resolve(settings.device, settings.dtype, local_rank)
    progress(f"rank {rank}: {device.describe(dev, dtype, settings.dtype)}")
    group = distributed.init_model_parallel(settings.model_parallel_size, dev, settings.dist_timeout)
    tokenizer = load_tokenizer(find_tokenizer(settings.ckpt_dir, settings.tokenizer_path), settings.ckpt_dir)
    model = load_model(settings.ckpt_dir, tokenizer, rank, settings.model_parallel_size, dev, dtype, progress)
    cache = CacheSettings(
        settings.max_seq_len,
        settings.max_batch_size,
        settings.kv_block_size,
        parse_bytes(settings.kv_cache_memory),
        settings.gpu_memory_utilization,
        not settings.no_prefix_caching,
        batched_tokens(settings, dev),
        settings.attention,
        settings.cuda_graphs,
        settings.max_loras,
    )
    agree = None if group is None else lambda n: distributed.min_over_ranks(n, group)
    adapters = read_adapters(settings, model.args)
    if adapters:
        progress(f"LoRA adapters: {', '.join(f'{a.name} (rank {a.rank})' for a in adapters)}")
    return LlamaEngine(model, cache, agree=agree, adapters=adapters), tokenizer, group


def batched_tokens(settings: Settings, dev) -> int:
    """--max_num_batched_tokens, or its default: 2048 on CPU (a step of about a second at 7B), 8192 on CUDA
    (prompt chunks large enough to keep the GPU's matmuls efficient, a step still well under a second)."""
    return settings.max_num_batched_tokens or (8192 if dev.type == "cuda" else 2048)


def build_runtime(settings: Settings) -> Runtime:
    """A Runtime whose loader reads rank 0's shard; with several ranks its steps are broadcast."""

    def load(progress):
        engine, tokenizer, group = load_engine(settings, progress)
        rt.structured = structured_output(tokenizer, engine.model.args.vocab_size)
        return (engine if group is None else LeaderEngine(engine, StepChannel(group))), tokenizer

    multi = distributed.world()[1] > 1
    rt = Runtime(
        load,
        settings.max_seq_len,
        settings.max_batch_size,
        settings.max_queue_size,
        heartbeat_s=heartbeat_interval(settings.dist_timeout) if multi else None,
    )
    rt.adapters = [s.name for s in settings.adapters()]
    rt.metrics.lora.names, rt.metrics.lora.max_lora = rt.adapters, settings.max_loras
    return rt


class LlamaModel:
    """The Llama family as the OpenAI routes see it (api/openai.py OpenAIModel)."""

    engine = "presets"
    unsupported = ()

    def __init__(self, rt: Runtime, settings: Settings, kind: str):
        self.rt, self.max_seq_len = rt, settings.max_seq_len
        self.adapters = rt.adapters
        self.allow_runtime_lora, self.max_lora_rank = settings.allow_runtime_lora, settings.max_lora_rank
        self.runner = StepRunner(rt)
        self.tool_call_parser = check_parser_flag(settings.tool_call_parser)
        self.name = settings.served_model_name or f"llama2-{kind}"
        if is_hf_folder(settings.ckpt_dir) and not settings.served_model_name:  # its folder name, as the HF server
            self.name = os.path.basename(os.path.normpath(settings.ckpt_dir))

    def context(self) -> int:
        return self.max_seq_len

    def vocab_size(self) -> int:
        return self.rt.tokenizer.n_words

    def encode_prompt(self, text: str, special: bool = True) -> list[int]:
        return self.rt.tokenizer.encode(text, bos=special, eos=False)

    def decode(self, ids: list[int]) -> str:
        return self.rt.tokenizer.decode(ids, special=True)

    def token_strs(self, ids: list[int]) -> list[str]:
        return self.rt.tokenizer.token_strs(ids)

    def encode_messages(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        if refused(self.rt.tokenizer, messages):
            raise ApiError(400, "messages: special tags ([INST], [/INST], <<SYS>>, <</SYS>>) are not allowed")
        return encode_dialog(self.rt.tokenizer, messages, tools=tools)

    def chat_template(self):
        return self.rt.tokenizer.chat_template


def build_app(settings: Settings, kind: str, exit=lambda code: None):
    """The app for `kind` ("completion" or "chat"); starts loading the model in the background.
    `exit(code)` ends the process (POST /shutdown: 0, a fatal error: 1)."""
    rt = build_runtime(settings)
    keys = auth.load_keys(settings.api_key, settings.api_key_file)
    app = create_app(rt, [ROUTES[kind], *OPENAI_ROUTES, lora_admin], lambda: exit(0), keys)
    app.extensions["openai_model"] = LlamaModel(rt, settings, kind)
    rt.on_failure = lambda: exit(1)
    rt.start()
    return app


def watch_sigterm(rank: int, local_rank: int) -> None:
    """SIGTERM on a rank other than 0. On rank 0's node torchrun sends it to every rank: this one ignores
    it and keeps following while rank 0 drains, until rank 0 says exit. On another node only this pod is
    going away: the job cannot go on without the rank, so it stops at once and loudly (exit 1), as a rank
    failure does (Python runs the handler when the main thread leaves a collective: within a heartbeat)."""
    if rank == local_rank:  # torchrun numbers node 0's ranks 0..nproc-1
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ignored outright: no system call is cut short
        return

    def on_sigterm(signum, frame):
        log.error("rank %d: SIGTERM on a worker node: stopping the job (it cannot go on without this rank)", rank)
        logging.shutdown()
        os._exit(1)

    signal.signal(signal.SIGTERM, on_sigterm)
    # Restart the system calls the signal lands in (Python's default is to interrupt them with EINTR,
    # which a collective's socket read need not survive).
    signal.siginterrupt(signal.SIGTERM, False)


def run_follower(settings: Settings) -> None:
    """A rank other than 0: load this rank's shard, run rank 0's steps until it says exit."""
    rank, _, local_rank = distributed.world()
    watch_sigterm(rank, local_rank)
    state = FollowerState(stale_after_s=2 * heartbeat_interval(settings.dist_timeout) + 1)
    if local_rank == 0:  # the first rank of a node without rank 0 answers that pod's probes
        start_probe_server(settings.host, settings.port, state.health)
    try:
        engine, _, group = load_engine(settings)
        state.state = "following"
        follow(engine, StepChannel(group), state.touch)
    except Exception:
        log.exception("rank %d failed; exiting so that the job restarts", rank)
        logging.shutdown()
        os._exit(1)  # a broken process group must not hang this process on exit
    log.info("rank %d: rank 0 asked to exit", rank)
    logging.shutdown()
    os._exit(0)


def main(kind: str, argv=None) -> None:
    """Entry point of presets/inference/llama2-<kind>/inference_api.py."""
    logs.setup()
    settings = parse_settings(argv, f"Llama-2 {kind} server")
    try:
        check_layout(settings.ckpt_dir, settings.tokenizer_path, settings.model_parallel_size, settings.max_seq_len)
        auth.load_keys(settings.api_key, settings.api_key_file)
        tokenizer = load_tokenizer(find_tokenizer(settings.ckpt_dir, settings.tokenizer_path), settings.ckpt_dir)
        read_adapters(settings, read_args(settings.ckpt_dir, tokenizer))  # a folder we cannot serve: a start error
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    rank, world_size, _ = distributed.world()
    if rank != 0:
        run_follower(settings)
    if world_size > 1 and os.environ.get("TORCHELASTIC_RUN_ID") and settings.drain_timeout > TORCHRUN_DRAIN:
        # torchrun kills its ranks 30 s after it forwards SIGTERM: drain in time for them to exit cleanly.
        log.warning(
            "drain_timeout %gs is over torchrun's limit; draining for %ds", settings.drain_timeout, TORCHRUN_DRAIN
        )
        settings.drain_timeout = TORCHRUN_DRAIN
    server.run(lambda exit: build_app(settings, kind, exit), settings, settings.host, settings.port)
