"""The HuggingFace (Falcon) server on tiny random Falcon and Llama folders, against transformers itself."""

import json
import sys
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from presets.models.hf.engine import HFJob
from presets.models.hf.params import DEFAULTS, EXTRAS
from tests.conftest import hf_client
from tests.launch import finish, free_port, post, running, start, wait_healthy

FALCON_BASIC = {"prompt": "YOUR_PROMPT_HERE"}
FALCON_ADVANCED = {
    "prompt": "YOUR_PROMPT_HERE",
    "max_length": 200,
    "min_length": 0,
    "do_sample": True,
    "early_stopping": False,
    "num_beams": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "temperature": 1.0,
    "top_k": 10,
    "top_p": 1,
    "typical_p": 1,
    "repetition_penalty": 1,
    "length_penalty": 1,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "num_return_sequences": 1,
    "output_scores": False,
    "return_dict_in_generate": False,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "remove_invalid_values": None,
}


@pytest.mark.parametrize("body", [FALCON_BASIC, FALCON_ADVANCED], ids=["basic", "advanced"])
def test_kaitos_falcon_requests_verbatim(falcon_client, body):
    r = falcon_client.post("/chat", json=body, headers={"accept": "application/json"})
    assert r.status_code == 200, r.get_json()
    assert list(r.get_json()) == ["Result"] and r.get_json()["Result"].startswith("YOUR_PROMPT_HERE")


def reference(model_dir: str, prompt: str, **kwargs) -> str:
    """What transformers itself generates on the same folder: prompt + decoded new tokens."""
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=tok.eos_token_id, **kwargs)
    return prompt + tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize(
    "arch, engine", [("falcon_dir", "auto"), ("hf_llama_dir", "transformers"), ("hf_llama_dir", "auto")]
)
def test_greedy_output_equals_transformers(request, arch, engine):
    """Falcon on generate; Llama on generate and (auto) on our engine: the same greedy text as transformers."""
    model_dir = request.getfixturevalue(arch)
    client, rt = hf_client(model_dir, engine=engine)
    try:
        models = client.get("/v1/models").get_json()["data"]
        assert [m["engine"] for m in models] == [
            "presets" if arch == "hf_llama_dir" and engine == "auto" else "transformers"
        ]
        for prompt in ["The quick brown fox", "Hello, world!"]:
            got = client.post("/chat", json={"prompt": prompt, "do_sample": False, "max_length": 40}).get_json()
            assert got == {"Result": reference(model_dir, prompt, do_sample=False, max_length=40)}
        beams = {"prompt": "Water boils", "do_sample": False, "num_beams": 3, "max_length": 24}
        r = client.post("/chat", json=beams)
        if models[0]["engine"] == "presets":  # beam search is generate's alone: a 400 that says how to get it
            assert r.status_code == 400 and "num_beams=3 needs transformers' generate" in r.get_json()["detail"]
            assert "--engine transformers" in r.get_json()["detail"]
        else:
            want = reference(model_dir, "Water boils", do_sample=False, num_beams=3, max_length=24)
            assert r.get_json() == {"Result": want}
    finally:
        rt.shutdown()


def test_concurrent_requests_batch_and_equal_sequential(falcon_dir):
    client, rt = hf_client(falcon_dir, max_batch_size=8)
    release = threading.Event()
    try:
        bodies = [
            {"prompt": "The river" + " flows" * i, "do_sample": False, "max_length": 20 + 3 * i} for i in range(8)
        ]
        sequential = [client.post("/chat", json=b).get_json() for b in bodies]
        # The engine thread is held in its first batch until all 8 requests have reached the loop (held or
        # queued): the queued ones must then share batches, however the threads happen to be scheduled.
        batches = []
        run_batch = rt.loop.run_batch

        def held(key, jobs):
            batches.append(len(jobs))
            release.wait(60)
            return run_batch(key, jobs)

        rt.loop.run_batch = held
        together = [None] * 8

        def call(i):
            together[i] = client.post("/chat", json=bodies[i]).get_json()

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while sum(rt.loop.counts()) < 8:  # (running, waiting) jobs
            assert time.monotonic() < deadline, f"the 8 requests never all reached the engine: {rt.loop.counts()}"
            time.sleep(0.01)
        release.set()
        for t in threads:
            t.join()
        assert together == sequential
        assert sum(batches) == 8 and max(batches) > 1, f"requests were not batched: {batches}"
    finally:
        release.set()
        rt.shutdown()


def test_messages_use_the_chat_template(hf_llama_dir, falcon_client):
    client, rt = hf_client(hf_llama_dir)
    try:
        messages = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hello"}]
        r = client.post("/chat", json={"messages": messages, "do_sample": False, "max_length": 60})
        assert r.status_code == 200
        assert r.get_json()["Result"].startswith("<s>[INST] <<SYS>>\nBe brief\n<</SYS>>\n\nHello [/INST]")
    finally:
        rt.shutdown()
    r = falcon_client.post("/chat", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "no chat template" in r.get_json()["detail"]


def test_seeded_sampling_is_reproducible(falcon_client):
    """The same seed gives the same sampled text; other seeds give other text (so the seed is what decides)."""
    body = {"prompt": "Once", "max_length": 30, "seed": 3}
    first, second = (falcon_client.post("/chat", json=body).get_json() for _ in range(2))
    assert first == second
    others = {falcon_client.post("/chat", json={**body, "seed": s}).get_json()["Result"] for s in (4, 5, 6)}
    assert others - {first["Result"]}, "three other seeds all gave the seed-3 text"


BAD = [
    ({"prompt": "x", "num_beams": 0}, "num_beams must be >= 1"),
    (
        {"prompt": "x", "num_beams": 4, "num_beam_groups": 3, "do_sample": False},
        "num_beam_groups (3) must divide num_beams (4)",
    ),
    ({"prompt": "x", "num_beams": 4, "num_beam_groups": 2}, "cannot be combined with do_sample=true"),
    ({"prompt": "x", "num_beams": 4, "num_beam_groups": 2, "do_sample": False}, "group beam search) is not available"),
    ({"prompt": "x", "max_length": -5}, "max_length must be >= 1"),
    ({"prompt": "x", "min_length": -1}, "min_length must be >= 0"),
    ({"prompt": "x", "min_length": 50, "max_length": 10}, "min_length (50) must not exceed max_length (10)"),
    ({"prompt": "x", "temprature": 0.5}, "unknown field(s) ['temprature']"),
    ({"prompt": "x", "top_k": "ten"}, "top_k must be an integer"),
    ({"prompt": "x", "do_sample": "yes"}, "do_sample must be true or false"),
    ({"prompt": "x", "temperature": 0}, "temperature must be >= 1e-05"),
    ({"prompt": "x", "top_p": 1.5}, "top_p must be > 0 and <= 1"),
    ({"prompt": "x", "max_length": True}, "max_length must be an integer"),
    ({"prompt": "x", "repetition_penalty": float("nan")}, "repetition_penalty must be a finite number"),
    ({"prompt": "x", "bad_words_ids": [1, 2]}, "bad_words_ids must be a non-empty list of non-empty lists"),
    ({"prompt": "x", "pad_token_id": 10**9}, "pad_token_id must be >= 0 and <= "),
    ({"prompt": "x", "encoder_no_repeat_ngram_size": 2}, "encoder-decoder models only"),
    ({"prompt": "x", "do_sample": False, "num_return_sequences": 2}, "must not exceed num_beams (1)"),
    ({"prompt": "x", "early_stopping": "soon"}, "early_stopping must be true, false or 'never'"),
    ({"prompt": 5}, "prompt must be a string"),
    ({}, "give exactly one of prompt"),
    ({"prompt": "x", "messages": []}, "give exactly one of prompt"),
    ({"prompt": "x", "max_length": 1}, "leaves no room to generate"),
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "x", "num_return_sequences": 17}, "num_return_sequences must be >= 1 and <= 16"),
    ({"prompt": "x", "temperature": 1e-40}, "temperature must be >= 1e-05"),
]


@pytest.mark.parametrize("body, message", BAD, ids=[m for _, m in BAD])
def test_invalid_parameters_are_400_naming_them(falcon_client, body, message):
    r = falcon_client.post("/chat", data=json.dumps(body), content_type="application/json")
    assert r.status_code == 400, r.get_json()
    assert message in r.get_json()["detail"]


def test_falcon_server_process(falcon_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "inference_api.py", "--model_id", falcon_dir, "--host", "127.0.0.1", "--port", str(port)]
    proc = start(cmd, "falcon")
    with running(proc):
        wait_healthy(proc, url)
        status, body = post(f"{url}/chat", FALCON_ADVANCED)
        assert status == 200 and body["Result"].startswith("YOUR_PROMPT_HERE")
        assert post(f"{url}/shutdown", None) == (200, {})
        code, out = finish(proc)
    assert code == 0, out
    assert "POST /chat 200 sequences=1" in out
    missing = start([sys.executable, "inference_api.py", "--model_id", str(tmp_path)], "falcon")
    code, out = finish(missing)
    assert code != 0 and f"error: config.json not found in {tmp_path}" in out and "Traceback" not in out


def test_cancelled_streamed_job_stops_generating(falcon_dir):
    client, rt = hf_client(falcon_dir)
    try:
        params = DEFAULTS | EXTRAS | {"do_sample": False, "ignore_eos": True}
        job = HFJob("", rt.tokenizer("Hello").input_ids, params, 50)

        class CancelAfterThree:  # a client that reads three tokens, then leaves
            seen = -1  # the first put carries the prompt

            def put(self, value):
                self.seen += 1
                job.cancelled = self.seen >= 3

            def end(self):
                pass

        job.streamer = CancelAfterThree()
        ((ids, _),) = rt.engine.run_batch(None, [job])[0]
        assert 3 <= len(ids) <= 4  # not the 50 asked for
    finally:
        rt.shutdown()


def test_ignore_eos_generates_the_full_length(falcon_client):
    body = {"prompt": "Hello", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    r = falcon_client.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.get_json()["usage"]["completion_tokens"] == 30


def test_ignore_eos_is_not_undone_by_the_models_generation_config(falcon_dir):
    # generate() fills unset fields from model.generation_config: had the model's EOS stayed there,
    # passing eos_token_id=None for ignore_eos would still stop at EOS.
    client, rt = hf_client(falcon_dir)
    try:
        assert rt.engine.model.generation_config.eos_token_id is None
        assert rt.engine.eos_id == rt.tokenizer.eos_token_id  # read before it was cleared
    finally:
        rt.shutdown()


def test_sampling_on_our_engine_is_seeded_and_gives_n_sequences(hf_llama_dir):
    client, rt = hf_client(hf_llama_dir)
    try:
        body = {"prompt": "Once upon", "max_length": 30, "seed": 7, "top_k": 50}
        first, again = (client.post("/chat", json=body).get_json()["Result"] for _ in range(2))
        assert first == again and first.startswith("Once upon")
        others = {client.post("/chat", json={**body, "seed": s}).get_json()["Result"] for s in (8, 9, 10)}
        assert others - {first}, "three other seeds all gave the seed-7 text"
        two = client.post("/chat", json={**body, "num_return_sequences": 2}).get_json()["Result"]
        parts = two.split("Once upon")[1:]
        assert len(parts) == 2 and "Once upon" + parts[0] == first and parts[0] != parts[1]
        assert client.post("/chat", json={**body, "min_length": 2}).status_code == 200  # the prompt reaches it
        r = client.post("/chat", json={**body, "min_length": 20})
        assert r.status_code == 400 and "min_length=20 needs transformers' generate" in r.get_json()["detail"]
    finally:
        rt.shutdown()


def test_auto_engine_falls_back_to_generate_for_a_llama_folder_ours_cannot_run(hf_llama_dir, tmp_path):
    import shutil

    folder = tmp_path / "gelu"
    shutil.copytree(hf_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))  # transformers runs it
    client, rt = hf_client(str(folder))
    try:
        assert [m["engine"] for m in client.get("/v1/models").get_json()["data"]] == ["transformers"]
        got = client.post("/chat", json={"prompt": "Hello", "do_sample": False, "max_length": 20}).get_json()
        assert got == {"Result": reference(str(folder), "Hello", do_sample=False, max_length=20)}
    finally:
        rt.shutdown()


def test_max_length_on_our_engine_is_capped_by_max_seq_len(hf_llama_dir):
    """As generate caps max_length by the model's context, our engine caps it by --max_seq_len."""
    from presets.models.llama.tokenizer import find_tokenizer, load_tokenizer

    client, rt = hf_client(hf_llama_dir, max_seq_len=40)
    try:
        tok = load_tokenizer(find_tokenizer(hf_llama_dir), hf_llama_dir)
        prompt = "The river flows past the old mill"
        body = {"prompt": prompt, "do_sample": False, "max_length": 200, "ignore_eos": True}
        before = generated_tokens(client)
        assert client.post("/chat", json=body).get_json()["Result"].startswith(prompt)
        assert len(tok.encode(prompt, bos=True, eos=False)) + generated_tokens(client) - before == 40
        r = client.post("/chat", json={**body, "prompt": "word " * 60})
        assert r.status_code == 400 and "--max_seq_len is 40 tokens" in r.get_json()["detail"]
    finally:
        rt.shutdown()


def generated_tokens(client) -> float:
    (line,) = [x for x in client.get("/metrics").text.splitlines() if x.startswith("vllm:generation_tokens_total ")]
    return float(line.split()[1])
