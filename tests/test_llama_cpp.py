"""The llm-api family: a tiny GGUF written from our tiny checkpoint, served by llama.cpp.

Reference: our PyTorch Llama (and transformers' LlamaForCausalLM) on the same weights.
"""

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from gguf import GGUFReader

from presets.engine.params import SamplingParams
from presets.engine.scheduler import PlanItem, StepPlan
from presets.models.llama.checkpoint import merge_shards
from presets.models.llama.hf_convert import to_hf
from presets.models.llama.load import read_args
from presets.models.llama.tokenizer import Tokenizer
from presets.models.llamacpp.engine import LlamaCppEngine
from presets.servers.llm_api import build_app
from presets.servers.llm_api_config import ConfigError, load_config
from presets.tools.gguf_export import export
from presets.tools.tiny_checkpoint import write_checkpoint
from tests.conftest import TINY, real_client
from tests.launch import ROOT, finish, free_port, get, post, running
from tests.live_client import LiveClient, error_message

ENTRY = os.path.join(ROOT, "presets", "inference", "llama-cpp", "inference_api.py")
PROMPTS = ["What is the capital of France?", "Hello world", "the quick brown fox", "Once upon a time, "]
GREEDY = {"temp": 0, "repeat_penalty": 1.0}
LLM_API_GENERATE = """{
    "prompt": "What is the capital of paris",
    "params": {
        "n_predict": 300,
        "temp": 0.1,
        "top_k": 40,
        "top_p": 0.95,
        "stop": ["\\Q"],
        "repeat_penalty": 1.3
    }
}"""  # llm-api's README example, verbatim: "\Q" is not a JSON escape


@pytest.fixture(scope="module")
def models_dir(tiny_ckpt, tmp_path_factory):
    """models_dir holding the tiny checkpoint as GGUF under llm-api's name for family llama, name tiny."""
    path = tmp_path_factory.mktemp("models")
    export(tiny_ckpt, str(path / "ggml-llama-tiny-q4.bin"))
    return str(path)


def write_config(folder, models_dir: str, **extra) -> str:
    cfg = {
        "models_dir": models_dir,
        "model_family": "llama",
        "model_name": "tiny",
        "setup_params": {"convert": False, "migrate": False},
        "model_params": {
            "ctx_size": 128,
            "seed": -1,
            "n_threads": 2,
            "n_batch": 64,
            "n_parts": -1,
            "last_n_tokens_size": 16,
        },
    } | extra
    path = os.path.join(folder, "config.yaml")
    with open(path, "w") as f:
        json.dump(cfg, f)  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def llm(models_dir, tmp_path_factory):
    """A test client of the llm-api app, model loaded and warmed up (4 sequences at once)."""
    cfg = load_config(write_config(tmp_path_factory.mktemp("cfg"), models_dir), environ={})
    app = build_app(cfg, cfg.model_file, start=False)
    rt = app.extensions["runtime"]
    rt.start(background=False)
    yield LiveClient(app)
    rt.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    """Our PyTorch Llama on the same checkpoint: (runtime, SentencePiece tokenizer)."""
    client, rt = real_client(tiny_ckpt, "completion", max_seq_len=128, max_batch_size=4)
    yield rt, rt.tokenizer
    rt.shutdown()


def continuation(tok: Tokenizer, prompt_ids: list[int], out: list[int]) -> str:
    """The text `out` adds after the prompt (prompt + it = the whole text), by SentencePiece."""
    whole, head = tok.decode(prompt_ids + out), tok.decode(prompt_ids)
    assert whole.startswith(head)
    return whole[len(head) :]


@contextlib.contextmanager
def serving(ckpt: str, folder, name: str, **export_options):
    """An app (model loaded) on `ckpt` exported with `export_options` as model `name` in folder/models."""
    models = folder / "models"
    models.mkdir()
    export(ckpt, str(models / f"ggml-llama-{name}-q4.bin"), **export_options)
    cfg = load_config(write_config(folder, str(models), model_name=name), environ={})
    app = build_app(cfg, cfg.model_file, start=False)
    rt = app.extensions["runtime"]
    rt.start(background=False)
    try:
        yield app, rt
    finally:
        rt.shutdown()


def reference_greedy(reference, prompt: str, n: int) -> tuple[list[int], str]:
    """Our PyTorch Llama's greedy output: (token ids, text by SentencePiece)."""
    rt, tok = reference
    ids = tok.encode(prompt, bos=True, eos=False)
    (seq,) = rt.generate([ids], SamplingParams(temperature=0, max_tokens=n))
    return seq.output, continuation(tok, ids, seq.output)


def generate(client, prompt: str, **params):
    r = client.post("/generate", json={"prompt": prompt, "params": params})
    return r.status_code, r.get_json()


def sse_text(raw: str) -> tuple[str, list[str]]:
    """Concatenated data of the message events of an event stream (data lines joined by \\n), and error events."""
    text, errors = "", []
    for block in raw.split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln]
        if not lines:
            continue
        data = "\n".join(ln[len("data: ") :] for ln in lines if ln.startswith("data: "))
        if any(ln == "event: error" for ln in lines):
            errors.append(data)
        else:
            text += data
    return text, errors


# -- the GGUF file and llama.cpp against the references ---------------------------------------------


def test_gguf_logits_match_transformers(tiny_ckpt, models_dir):
    tok = Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))
    hf = to_hf(read_args(tiny_ckpt, tok), merge_shards(tiny_ckpt))
    engine = LlamaCppEngine(os.path.join(models_dir, "ggml-llama-tiny-q4.bin"), 64, 2, 2, 16)
    try:
        ids = tok.encode("The capital of France is a city of light", True, False)
        assert len(ids) > 16  # the prompt spans several llama_decode chunks of n_batch 16
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0, -1]
        got = engine.run(StepPlan([PlanItem(0, 0, ids, [], True)]))[0]
        rel = ((got - ref).abs().max() / ref.abs().max()).item()
        assert rel < 5e-3, rel  # llama.cpp keeps the KV cache in f16
        assert got.argmax() == ref.argmax()
    finally:
        engine.free()


def test_slot_keeps_the_prompt_prefix_it_holds(tiny_ckpt, models_dir):
    """llama.cpp's prompt reuse: a prompt that starts with what slot 0 already holds computes only the
    rest (the last token always), with the logits of computing it all; a chunked prompt matches too."""
    tok = Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))
    engine = LlamaCppEngine(os.path.join(models_dir, "ggml-llama-tiny-q4.bin"), 64, 2, 2, 16)
    try:
        base = tok.encode("The capital of France is a city of light", True, False)
        longer = base + tok.encode(" and of art", False, False)
        fresh = engine.run(StepPlan([PlanItem(1, 0, longer, [], True)]))[0]
        engine.run(StepPlan([PlanItem(0, 0, base, [], True)]))
        assert engine.reused_tokens == 0
        reused = engine.run(StepPlan([PlanItem(0, 0, longer, [], True)]))[0]
        assert engine.reused_tokens == len(base)
        assert ((reused - fresh).abs().max() / fresh.abs().max()).item() < 1e-4
        engine.run(StepPlan([PlanItem(1, 0, [tok.bos_id, 5], [], True)]))  # slot 1 now holds something else
        chunks = [PlanItem(1, 0, longer[:7], [], False)], [PlanItem(1, 7, longer[7:], [], True)]
        chunked = [engine.run(StepPlan(c)) for c in chunks][1][0]
        assert ((chunked - fresh).abs().max() / fresh.abs().max()).item() < 1e-4
    finally:
        engine.free()


def test_sharded_checkpoint_exports_the_same_model(tmp_path):
    """Two model-parallel shards are joined as Meta split them: the same file content as one shard."""
    one = write_checkpoint(str(tmp_path / "one"), TINY, shards=1)
    two = write_checkpoint(str(tmp_path / "two"), TINY, shards=2)
    a, b = merge_shards(one), merge_shards(two)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    files = [GGUFReader(export(ckpt, str(tmp_path / f"{i}.gguf"))) for i, ckpt in enumerate((one, two))]
    tensors = [{t.name: np.array(t.data) for t in f.tensors} for f in files]
    assert len(tensors[0]) == 2 + 9 * TINY.n_layers + 1 and tensors[0].keys() == tensors[1].keys()
    assert all(np.array_equal(tensors[0][k], tensors[1][k]) for k in tensors[0])


def test_llama_cpp_tokenizes_as_sentencepiece(tiny_ckpt, models_dir):
    tok = Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))
    engine = LlamaCppEngine(os.path.join(models_dir, "ggml-llama-tiny-q4.bin"), 64, 1, 1, 64)
    try:
        for text in [*PROMPTS, "  two  spaces\nand lines\n", "digits 12345, ünïcödé and 😀", ""]:
            assert engine.tokenizer.encode(text) == tok.encode(text, True, False), text
    finally:
        engine.free()


def test_greedy_generate_equals_our_pytorch_llama(llm, reference):
    rt = llm.application.extensions["runtime"]
    for prompt in PROMPTS:
        status, text = generate(llm, prompt, n_predict=24, **GREEDY)
        assert status == 200 and isinstance(text, str)
        ids, sp_text = reference_greedy(reference, prompt, 24)
        (seq,) = rt.generate([rt.tokenizer.encode(prompt)], SamplingParams(temperature=0, max_tokens=24))
        assert seq.output == ids, prompt  # token for token
        assert text == rt.tokenizer.decode(ids), prompt
        if "\ufffd" not in sp_text:  # random weights emit stray bytes, which the two decoders replace differently
            assert text == sp_text, prompt


def test_concurrent_requests_equal_sequential(llm):
    """Requests decoded together (llama.cpp sequences in one batch) give what they give one at a time."""
    prompts = PROMPTS * 2
    alone = [generate(llm, p, n_predict=20, **GREEDY)[1] for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: generate(llm, p, n_predict=20, **GREEDY)[1], prompts))
    assert together == alone


def test_agenerate_chunks_concatenate_to_generate(llm):
    for params in (dict(n_predict=30, **GREEDY), dict(n_predict=30, temp=0.8, seed=7, stop=["e"])):
        _, whole = generate(llm, "Once upon a time", **params)
        r = llm.post("/agenerate", json={"prompt": "Once upon a time", "params": params})
        assert r.status_code == 200 and r.mimetype == "text/event-stream"
        text, errors = sse_text(r.get_data(as_text=True))
        assert not errors and text == whole
    assert "e" not in whole  # the stop string ended the text, which stops before it


def test_sampling_is_reproducible_with_a_seed_and_respects_stop(llm):
    params = {"n_predict": 40, "temp": 0.9, "top_k": 20, "top_p": 0.9, "seed": 1234}
    first, second = generate(llm, "Hello", **params), generate(llm, "Hello", **params)
    assert first == second and first[0] == 200
    assert generate(llm, "Hello", **{**params, "seed": 99})[1] != first[1]
    # A stop string from the middle of the greedy text: the answer is the text before its first occurrence.
    _, full = generate(llm, "Hello", n_predict=40, **GREEDY)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3 and stop.strip(), full
    status, cut = generate(llm, "Hello", n_predict=40, stop=[stop], **GREEDY)
    assert status == 200 and cut == full[: full.index(stop)], (full, stop, cut)


def test_embeddings_are_the_models_mean_hidden_state(llm, tiny_ckpt):
    r1 = llm.post("/embeddings", json={"text": "What is the capital of France?"})
    r2 = llm.post("/embeddings", json={"text": "What is the capital of France?"})
    r3 = llm.post("/embeddings", json={"text": "Something else entirely"})
    v1, v2, v3 = r1.get_json(), r2.get_json(), r3.get_json()
    assert r1.status_code == 200 and len(v1) == TINY.dim and all(isinstance(x, float) for x in v1)
    assert v1 == v2 and v1 != v3
    tok = Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))
    hf = to_hf(read_args(tiny_ckpt, tok), merge_shards(tiny_ckpt))
    with torch.no_grad():
        hidden = hf(
            torch.tensor([tok.encode("What is the capital of France?", True, False)]), output_hidden_states=True
        )
    mean = hidden.hidden_states[-1][0].mean(0)  # after the final norm
    np.testing.assert_allclose(v1, (mean / mean.norm()).numpy(), atol=2e-3)


def test_a_failed_engine_call_fails_its_request_only(llm):
    from presets.errors import ApiError

    rt = llm.application.extensions["runtime"]
    with pytest.raises(ApiError) as e:
        rt.call(lambda: 1 / 0)
    assert e.value.status == 500 and "ZeroDivisionError" in e.value.detail
    assert rt.call(lambda: 42) == 42 and generate(llm, "Hello", n_predict=3, **GREEDY)[0] == 200


def test_model_params_seed_makes_unseeded_sampling_repeat_across_restarts():
    """model_params.seed seeds the sequence of per-request seeds (as llama.cpp seeded its sampler); -1: random."""
    from presets.api.llm_api import LlmApiSettings

    first, again = LlmApiSettings(None, None, 64, 1337), LlmApiSettings(None, None, 64, 1337)
    assert [first.next_seed() for _ in range(3)] == [again.next_seed() for _ in range(3)]
    assert len({first.next_seed() for _ in range(3)}) == 3  # each request its own seed
    assert LlmApiSettings(None, None, 64, -1).next_seed() is None


def test_embeddings_between_generations_leave_them_unchanged(llm):
    expected = [generate(llm, p, n_predict=16, **GREEDY)[1] for p in PROMPTS]

    def one(i):
        if i % 2:
            return llm.post("/embeddings", json={"text": PROMPTS[i // 2 % 4]}).status_code
        return generate(llm, PROMPTS[i // 2], n_predict=16, **GREEDY)[1]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert results[0::2] == expected and results[1::2] == [200] * 4


# -- the API: documented shapes, bad input, shared routes -------------------------------------------------


def test_llm_apis_documented_request_verbatim(llm):
    r = llm.post("/generate", data=LLM_API_GENERATE, content_type="application/json")
    assert r.status_code == 200 and isinstance(r.get_json(), str)
    r = llm.post("/agenerate", data=LLM_API_GENERATE, content_type="application/json")
    assert r.status_code == 200 and not sse_text(r.get_data(as_text=True))[1]
    assert llm.post("/embeddings", json={"text": "What is the capital of France?"}).status_code == 200
    assert llm.get("/check").get_json() == "Ok"
    assert llm.get("/healthz").status_code == 200


BAD = [
    ("/generate", {"params": {}}, "prompt"),
    ("/generate", {"prompt": 5}, "prompt"),
    ("/generate", {"prompt": "x", "params": []}, "params"),
    ("/generate", {"prompt": "x", "params": {"n_predicts": 3}}, "n_predicts"),
    ("/generate", {"prompt": "x", "params": {"temp": -1}}, "params.temp"),
    ("/generate", {"prompt": "x", "params": {"temp": 1e308}}, "params.temp"),
    ("/generate", {"prompt": "x", "params": {"temp": 0.5, "repeat_penalty": 1e-300}}, "params.repeat_penalty"),
    ("/generate", {"prompt": "x", "params": {"temp": "hot"}}, "params.temp"),
    ("/generate", {"prompt": "x", "params": {"top_k": 1.5}}, "params.top_k"),
    ("/generate", {"prompt": "x", "params": {"top_p": 0}}, "params.top_p"),
    ("/generate", {"prompt": "x", "params": {"n_predict": 0}}, "params.n_predict"),
    ("/generate", {"prompt": "x", "params": {"n_predict": True}}, "params.n_predict"),
    ("/generate", {"prompt": "x", "params": {"stop": [1]}}, "params.stop"),
    ("/generate", {"prompt": "x", "params": {"repeat_penalty": 0}}, "params.repeat_penalty"),
    ("/generate", {"prompt": "x", "params": {"seed": -5}}, "params.seed"),
    ("/generate", {"prompt": "x", "extra": 1}, "extra"),
    ("/generate", {"prompt": "hello " * 200}, "ctx_size is 128"),
    ("/agenerate", {"prompt": "x", "params": {"top_k": -1}}, "params.top_k"),
    ("/embeddings", {"prompt": "x"}, "prompt"),
    ("/embeddings", {"text": ["x"]}, "text"),
    ("/embeddings", {"text": "hello " * 200}, "ctx_size is 128"),
]


@pytest.mark.parametrize("route,body,named", BAD)
def test_bad_input_is_a_400_naming_the_problem(llm, route, body, named):
    r = llm.post(route, json=body)
    assert r.status_code == 400 and named in error_message(r), r.get_json()
    assert generate(llm, "Hello", n_predict=4, **GREEDY)[0] == 200  # and the server still works


def test_not_json_is_a_400(llm):
    r = llm.post("/generate", data="{not json", content_type="application/json")
    assert r.status_code == 400 and "JSON" in r.get_json()["detail"]
    for route, key in (("/generate", "prompt"), ("/embeddings", "text"), ("/v1/completions", "prompt")):
        r = llm.post(route, data=f'{{"{key}": "a\\ud800b"}}', content_type="application/json")  # a lone surrogate
        assert r.status_code == 400 and "not valid Unicode" in error_message(r)
    deep = '{"prompt": ' + "[" * 100000 + "]" * 100000 + "}"
    for route in ("/generate", "/v1/completions"):
        r = llm.post(route, data=deep, content_type="application/json")
        assert r.status_code == 400 and "nested too deeply" in error_message(r)


def test_body_encodings(llm):
    """JSON's own encoding detection: UTF-8 with a BOM and UTF-16 parse; bytes that are no Unicode are a 400."""
    body = {"prompt": "café", "params": {"n_predict": 2, **GREEDY}}
    plain = llm.post("/generate", json=body).get_json()
    for data in (b"\xef\xbb\xbf" + json.dumps(body).encode(), json.dumps(body).encode("utf-16")):
        r = llm.post("/generate", data=data, content_type="application/json")
        assert r.status_code == 200 and r.get_json() == plain
    r = llm.post("/generate", data='{"prompt": "caf\xe9"}'.encode("latin-1"), content_type="application/json")
    assert r.status_code == 400 and "valid JSON" in r.get_json()["detail"]


def test_event_stream_lines():
    """Every kind of line break in a piece becomes a data line (SSE cannot carry a carriage return)."""
    from presets.api.llm_api import _event

    assert sse_text(_event("a\r\nb\rc\nd") + _event(" e")) == ("a\nb\nc\nd e", [])


def test_empty_prompt_of_a_model_without_bos_is_a_400(tiny_ckpt, tmp_path):
    with serving(tiny_ckpt, tmp_path, "nobos", add_bos=False) as (app, _):
        client = LiveClient(app)
        for route, body in (
            ("/generate", {"prompt": ""}),
            ("/agenerate", {"prompt": ""}),
            ("/embeddings", {"text": ""}),
            ("/v1/completions", {"prompt": ""}),
        ):
            r = client.post(route, json=body)
            assert r.status_code == 400 and "empty" in error_message(r), route
        assert client.post("/generate", json={"prompt": "Hello", "params": {"n_predict": 3}}).status_code == 200


def test_openai_routes_on_llama_cpp(llm):
    _, text = generate(llm, "Hello world", n_predict=12, **GREEDY)
    r = llm.post("/v1/completions", json={"prompt": "Hello world", "max_tokens": 12, "temperature": 0})
    body = r.get_json()
    assert r.status_code == 200 and body["model"] == "llama-tiny" and body["choices"][0]["text"] == text
    r = llm.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "chat template" in error_message(r)  # the tiny file has none
    metrics = llm.get("/metrics").get_data(as_text=True)
    assert "vllm:generation_tokens_total" in metrics


# -- configuration --------------------------------------------------------------------------------


def test_environment_overrides_the_file(tmp_path):
    path = write_config(tmp_path, "/from/file", model_name="7b", port=8000)
    env = {
        "LLM_API_MODELS_DIR": "/models",
        "LLM_API_PORT": "9001",
        "LLM_API_MODEL_PARAMS__CTX_SIZE": "4096",
        "LLM_API_SETUP_PARAMS__REPO_ID": "user/repo",
        "LLM_API_SETUP_PARAMS__FILENAME": "m.gguf",
        "UNRELATED": "1",
    }
    cfg = load_config(str(path), env)
    assert (cfg.models_dir, cfg.port, cfg.model_name) == ("/models", 9001, "7b")
    assert cfg.model_params["ctx_size"] == 4096 and cfg.model_params["n_threads"] == 2  # the rest of the file stays
    assert cfg.setup_params == {"convert": False, "migrate": False, "repo_id": "user/repo", "filename": "m.gguf"}
    assert cfg.model_file == "/models/ggml-llama-7b-q4.bin"
    assert cfg.llama_params()["n_ctx"] == 4096
    whole = load_config(str(path), {"LLM_API_MODEL_PARAMS": '{"ctx_size": 512}'})
    assert whole.model_params == {"ctx_size": 512}  # the whole mapping is replaced, as llm-api did
    octal = load_config(str(path), {"LLM_API_SETUP_PARAMS__REPO_ID": "a/b", "LLM_API_SETUP_PARAMS__FILENAME": "0123"})
    assert octal.setup_params["filename"] == "0123"  # a string key keeps the text as written
    only_env = {"LLM_API_MODEL_FAMILY": "vicuna", "LLM_API_MODEL_NAME": "13b"}
    assert load_config(str(tmp_path / "absent.yaml"), only_env).model_family == "vicuna"


@pytest.mark.parametrize(
    "extra,env,named",
    [
        ({"model_famly": "llama"}, {}, "model_famly: unknown key"),
        ({"model_family": "gptq_llama"}, {}, "model_family: 'gptq_llama' is not served"),
        ({"model_name": ""}, {}, "model_name: required"),
        ({"port": "eighty"}, {}, "port: must be an integer"),
        ({"model_params": {"ctx_size": "big"}}, {}, "model_params.ctx_size: must be an integer"),
        ({"model_params": {"ctx_size": 2}}, {}, "model_params.ctx_size: must be >= 8"),
        ({"model_params": {"n_gpu": 1}}, {}, "model_params.n_gpu: unknown key"),
        ({"setup_params": {"convert": True}}, {}, "setup_params.convert: true is not supported"),
        ({"setup_params": {"migrate": "yes"}}, {}, "setup_params.migrate: must be true or false"),
        ({"setup_params": {"repo_id": "a/b"}}, {}, "setup_params.repo_id: needs setup_params.filename"),
        ({}, {"LLM_API_MODEL_PARAMS__N_THREADZ": "4"}, "model_params.n_threadz: unknown key"),
        ({}, {"LLM_API_PORTT": "1"}, "portt: unknown key"),
        ({}, {"LLM_API_MODEL_PARAMS": "[1, 2]"}, "LLM_API_MODEL_PARAMS: must be a mapping"),
        ({}, {"LLM_API_HOST__X": "1"}, "only setup_params and model_params have nested keys"),
        ({"model_params": {"n_batch": 4}}, {}, "model_params.n_batch: must be more than max_batch_size (4)"),
        ({"max_batch_size": 300}, {}, "max_batch_size: at most 255"),
        ({"max_request_bytes": -1}, {}, "max_request_bytes: must be >= 1024"),
        ({"model_name": "../../etc"}, {}, "model_name: '../../etc' must be a plain file name part"),
        ({"setup_params": {"repo_id": "a/b", "filename": "/etc/passwd"}}, {}, "setup_params.filename: '/etc/passwd'"),
    ],
)
def test_bad_config_is_refused_naming_the_key(tmp_path, extra, env, named):
    path = write_config(tmp_path, "/models", **extra)
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
        load_config(str(path), env)


def test_model_file_under_its_own_name_in_models_dir(tmp_path, models_dir):
    """setup_params.filename alone names a file already in models_dir; llm-api's derived name comes first."""
    from presets.servers.llm_api_model_file import resolve

    cfg = load_config(
        write_config(tmp_path, models_dir, model_name="other", setup_params={"filename": "ggml-llama-tiny-q4.bin"}),
        environ={},
    )
    assert resolve(cfg) == os.path.join(models_dir, "ggml-llama-tiny-q4.bin")
    cfg = load_config(write_config(tmp_path, models_dir, setup_params={"filename": "absent.gguf"}), environ={})
    assert resolve(cfg) == os.path.join(models_dir, "ggml-llama-tiny-q4.bin")


def run_server(folder, env=None, timeout=30):
    proc = subprocess.Popen(
        [sys.executable, ENTRY],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    return proc


@pytest.mark.parametrize(
    "extra,env,message",
    [
        ({"model_params": {"n_ctx": 1}}, {}, "config error: model_params.n_ctx: unknown key"),
        (
            {"model_name": "missing", "setup_params": {"repo_id": "user/repo", "filename": "model.gguf"}},
            {"HF_HUB_OFFLINE": "1"},
            "error: cannot download model.gguf from user/repo: the HuggingFace Hub cannot be reached here",
        ),
        ({"model_name": "missing"}, {}, "error: model file not found:"),
        ({"model_name": "notgguf"}, {}, "is not a GGUF file"),
    ],
)
def test_start_errors_are_one_clear_line(tmp_path, models_dir, extra, env, message):
    with open(os.path.join(models_dir, "ggml-llama-notgguf-q4.bin"), "wb") as f:
        f.write(b"ggjt" + bytes(64))  # an old ggml file
    write_config(tmp_path, models_dir, **extra)
    with running(run_server(tmp_path, env)) as (proc,):
        code, out = finish(proc)
    assert code != 0 and message in out and "Traceback" not in out, out


def test_real_server_process(tmp_path, models_dir):
    """inference_api.py in a folder with config.yaml, as the image runs it; the port from LLM_API_PORT."""
    port = free_port()
    params = {"ctx_size": 2048, "seed": -1, "n_threads": 2, "n_batch": 64, "last_n_tokens_size": 16}
    write_config(tmp_path, models_dir, host="127.0.0.1", model_params=params)  # room for long generations
    url = f"http://127.0.0.1:{port}"
    with running(run_server(tmp_path, {"LLM_API_PORT": str(port)})) as (proc,):
        from tests.launch import wait_healthy

        wait_healthy(proc, url)
        assert get(f"{url}/check") == (200, "Ok")
        status, text = post(f"{url}/generate", {"prompt": "Hello", "params": {"n_predict": 8, **GREEDY}})
        assert status == 200 and isinstance(text, str)
        assert post(f"{url}/embeddings", {"text": "Hello"})[0] == 200
        eight = {"prompt": "Hello", "params": {"n_predict": 8, "ignore_eos": True, **GREEDY}}
        streamed = requests.post(f"{url}/agenerate", json=eight, timeout=30)
        assert streamed.status_code == 200 and streamed.text.startswith("data: ")
        chunked = requests.post(
            f"{url}/generate",
            data=iter([b'{"prompt": "', b"x" * (2 << 20), b'"}']),
            timeout=30,
            headers={"Content-Type": "application/json"},
        )
        assert chunked.status_code == 413  # a chunked body over max_request_bytes, as with a Content-Length
        busy = {"prompt": "Hello " * 60, "params": {"n_predict": -1, "ignore_eos": True, **GREEDY}}
        with ThreadPoolExecutor(12) as pool:  # shutdown while requests generate and wait in the queue
            calls = [
                pool.submit(post, f"{url}/{route}", body)
                for route, body in [("generate", busy)] * 8 + [("embeddings", {"text": "Hello " * 60})] * 4
            ]
            # A generous deadline (it only ends a failing test), polled gently: each scrape logs a line into the
            # server's stdout, a pipe read only when it exits
            deadline = time.monotonic() + 60
            while "vllm:num_requests_running 0.0" in requests.get(f"{url}/metrics", timeout=10).text:
                assert time.monotonic() < deadline, "the requests never started"
                time.sleep(0.2)
            assert post(f"{url}/shutdown", None) == (200, {})
            answers = [c.result() for c in calls]  # every one is answered before the server exits
        code, out = finish(proc)
    assert code == 0, out
    assert all(s in (200, 503) for s, _ in answers) and any(s == 503 for s, _ in answers), answers
    assert all("shutting down" in body["detail"] for s, body in answers if s == 503), answers
    assert "POST /generate 200 sequences=1" in out and out.count("serving HTTP on") == 1  # never restarted
    # a stream's log line is written when it ends, with the tokens it sent
    assert re.search(r"POST /agenerate 200 sequences=1 prompt_tokens=\d+ generated_tokens=8 ", out), out


LLAMA2_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'].strip() }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'].strip() }} {{ eos_token }}"
    "{% else %}{{ raise_exception('roles must alternate user/assistant') }}{% endif %}{% endfor %}"
)


# Jinja features every server must render alike: loop controls, tojson, strftime_now, a role order of its own.
TOOLED_TEMPLATE = (
    "{% for m in messages %}{% if loop.index > 3 %}{% break %}{% endif %}"
    "{{ m['role'] | upper }}: {{ m['content'] | tojson }}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT ({{ strftime_now('%Y') }}):{% endif %}"
)


def test_a_chat_template_renders_to_the_same_ids_on_every_server(tiny_ckpt, tmp_path):
    """One template, three servers: the Llama server (a tokenizer with the template), the Falcon/HF server's
    /chat messages and llm-api's GGUF file all render through api/chat.py and give the same ids."""
    from presets.api.chat import encode_dialog
    from presets.api.kaito_falcon import prompt_text
    from presets.models.chat_template import ChatTemplate

    dialog = [
        {"role": "user", "content": "Hi"},
        {"role": "user", "content": 'Say "yes"'},  # two user turns: the template, not a rule of ours, decides
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "cut by {% break %}"},
    ]
    sp = Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))
    sp.chat_template = ChatTemplate(TOOLED_TEMPLATE, {})
    llama_ids = encode_dialog(sp, dialog)
    text, special = prompt_text({"messages": dialog}, ChatTemplate(TOOLED_TEMPLATE, {}))
    assert not special and sp.encode(text, bos=False, eos=False) == llama_ids
    assert text.startswith('USER: "Hi"\nUSER: "Say \\"yes\\""\nASSISTANT: "Yes."\nASSISTANT (') and "cut by" not in text
    with serving(tiny_ckpt, tmp_path, "chat", chat_template=TOOLED_TEMPLATE) as (app, rt):
        assert app.extensions["openai_model"].encode_messages(dialog) == llama_ids
        r = LiveClient(app).post("/v1/chat/completions", json={"messages": dialog, "max_tokens": 2})
        assert r.status_code == 200 and r.get_json()["usage"]["prompt_tokens"] == len(llama_ids), r.get_data()


def test_chat_uses_the_files_chat_template(tiny_ckpt, tmp_path):
    """A GGUF with Llama-2's chat template: /v1/chat/completions sends exactly Meta's chat token ids."""
    from presets.api.chat import encode_dialog

    with serving(tiny_ckpt, tmp_path, "chat", chat_template=LLAMA2_TEMPLATE) as (app, rt):
        dialog = [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is the capital of France?"},
        ]
        expected = encode_dialog(Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model")), dialog)
        assert app.extensions["openai_model"].encode_messages(dialog) == expected
        client = LiveClient(app)
        r = client.post("/v1/chat/completions", json={"messages": dialog, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.get_json()["usage"]["prompt_tokens"] == len(expected)
        (seq,) = rt.generate([expected], SamplingParams(temperature=0, max_tokens=8))
        assert r.get_json()["choices"][0]["message"]["content"] == rt.tokenizer.decode(seq.output)
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}]})
        assert r.status_code == 400 and "roles must alternate" in error_message(r)


# -- CPUs with AMX: llama.cpp's AMX matmul crashes (requirements-llama-cpp.cmake) ----------------------------


def test_our_llama_cpp_build_compiles_no_amx_kernels(tmp_path):
    """requirements-llama-cpp.cmake's flags, as CMake hands them to the compiler, remove AMX even from a
    -march that has it (what -march=native gives on an AMX Xeon), and keep the AVX-512 it is built with."""
    (tmp_path / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.14)\nproject(probe C CXX)\n"
        f'include("{ROOT}/requirements-llama-cpp.cmake")\nmessage(STATUS "FLAGS=${{CMAKE_CXX_FLAGS}}")\n'
    )
    out = subprocess.run(["cmake", "-S", tmp_path, "-B", tmp_path / "build"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    flags = next(line for line in out.stdout.splitlines() if "FLAGS=" in line).split("FLAGS=", 1)[1].split()
    for order in ([*flags, "-march=sapphirerapids"], ["-march=sapphirerapids", *flags]):
        macros = subprocess.run(
            ["c++", *order, "-dM", "-E", "-x", "c++", "/dev/null"], capture_output=True, text=True, check=True
        ).stdout
        assert "__AVX512VNNI__" in macros and "__AVX512BF16__" in macros
        assert "__AMX_INT8__" not in macros and "__AMX_TILE__" not in macros, order


def test_installed_llama_cpp_has_no_amx_kernels():
    import llama_cpp

    llama_cpp.llama_backend_init()
    info = llama_cpp.llama_print_system_info().decode()
    assert "AVX2 = 1" in info and "AMX_INT8 = 1" not in info, info


def test_weights_are_repacked_except_where_amx_kernels_meet_an_amx_cpu():
    from presets.models.llamacpp.engine import extra_buffers_safe

    built_with_amx = "CPU : AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 |"
    built_without = "CPU : AVX2 = 1 | AVX512 = 1 | REPACK = 1 |"
    xeon, epyc = frozenset({"avx512f", "amx_tile", "amx_int8", "amx_bf16"}), frozenset({"avx2", "avx512f"})
    assert not extra_buffers_safe(built_with_amx, xeon)
    assert extra_buffers_safe(built_with_amx, epyc)  # a build with AMX on a CPU without: never selected
    assert extra_buffers_safe(built_without, xeon) and extra_buffers_safe(built_without, epyc)
