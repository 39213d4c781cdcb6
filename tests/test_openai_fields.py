"""The OpenAI fields clients send, with the official `openai` package: neutral values accepted, real features
working (token-id prompts, echo, penalties, logit_bias, content parts, the developer role, stream usage,
/v1/models/{id}), the rest a 400 in OpenAI's error object, and streamed requests counted like others."""

import logging
import time

import openai
import pytest
import requests
import torch

from presets.engine.params import SamplingParams
from presets.engine.sampling import openai_adjust
from presets.engine.scheduler import Sequence
from tests.conftest import hf_client, real_client

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def live(smollm2_dir):
    """The Llama chat server (with the OpenAI routes) on the real SmolLM2 model, and an openai client."""
    client, rt = real_client(smollm2_dir, "chat", openai=True, max_seq_len=512, max_batch_size=4)
    with openai.OpenAI(base_url=f"{client.url}/v1", api_key="none", max_retries=0) as oa:
        yield client, rt, oa
    rt.shutdown()


def metric(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_neutral_values_of_fields_clients_send_by_default_are_accepted(live):
    client, _, oa = live
    plain = oa.chat.completions.create(model="smollm2-135m-instruct", messages=CHAT, temperature=0, max_tokens=12)
    neutral = oa.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=CHAT,
        temperature=0,
        max_completion_tokens=12,
        presence_penalty=0,
        frequency_penalty=0,
        logprobs=False,
        top_logprobs=0,
        response_format={"type": "text"},
        n=1,
        logit_bias={},
    )
    assert neutral.choices[0].message.content == plain.choices[0].message.content == "The capital of France is Paris."
    text = oa.completions.create(
        model="smollm2-135m-instruct",
        prompt="The capital of France is",
        temperature=0,
        max_tokens=8,
        echo=False,
        best_of=1,
        logprobs=None,
        presence_penalty=0,
    )
    assert text.choices[0].text.startswith(" Paris")
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "n": 2, "best_of": 3, "temperature": 1})
    assert r.status_code == 400 and r.get_json()["error"]["param"] == "best_of"


@pytest.mark.parametrize(
    "extra, param, message",
    [
        ({"best_of": 1}, "best_of", "unsupported field(s) ['best_of']"),  # a completions field
        ({"response_format": {"type": "xml"}}, "response_format.type", "type 'xml' is not supported"),
        ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0].name", "unknown field"),
        ({"messages": [{"role": "function", "content": "hi"}]}, "messages[0].role", "role must be one of"),
        (
            {"messages": [{"role": "tool", "content": "hi"}]},
            "messages[0].tool_call_id",
            "tool_call_id must be a string",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content",
            "must be a text part",
        ),
        ({"stream_options": {"include_usage": True}}, "stream_options", "with stream: true"),
        ({"logit_bias": {"99999999": 5}}, "logit_bias", "is not a token id"),
        ({"presence_penalty": 3}, "presence_penalty", "must be >= -2 and <= 2"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "differ"),
        ({"functions": []}, "functions", "unsupported field(s) ['functions']"),
    ],
)
def test_other_values_are_a_400_in_openais_error_object_naming_the_field(live, extra, param, message):
    client, _, oa = live
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    error = r.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and message in error["message"], error
    with pytest.raises(openai.BadRequestError) as e:  # the SDK reads it: a typed error with the message
        rest = {k: v for k, v in extra.items() if k != "messages"}
        oa.chat.completions.create(model="smollm2-135m-instruct", messages=extra.get("messages", CHAT), extra_body=rest)
    assert message in e.value.message


def test_model_routes_and_their_errors(live):
    client, _, oa = live
    assert oa.models.retrieve("smollm2-135m-instruct").id == "smollm2-135m-instruct"
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("gpt-4")
    r = client.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"})
    error = r.get_json()["error"]  # OpenAI's own answer to an unknown model
    assert r.status_code == 404 and (error["type"], error["code"]) == ("invalid_request_error", "model_not_found")
    assert client.post("/chat", json={"input_data": {}}).get_json().keys() == {"detail"}  # Kaito routes keep theirs


def test_token_id_prompts_equal_their_text_and_echo_prepends_the_prompt(live):
    _, rt, oa = live
    texts = ["The capital of France is", "Water boils at"]
    ids = [rt.tokenizer.encode(t, bos=True, eos=False) for t in texts]
    by_text = oa.completions.create(model="smollm2-135m-instruct", prompt=texts, temperature=0, max_tokens=8)
    by_ids = oa.completions.create(model="smollm2-135m-instruct", prompt=ids, temperature=0, max_tokens=8)
    one = oa.completions.create(model="smollm2-135m-instruct", prompt=ids[0], temperature=0, max_tokens=8)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    assert one.choices[0].text == by_text.choices[0].text and by_ids.usage == by_text.usage
    echo = oa.completions.create(model="smollm2-135m-instruct", prompt=texts[0], temperature=0, max_tokens=8, echo=True)
    assert echo.choices[0].text == texts[0] + by_text.choices[0].text
    streamed = oa.completions.create(
        model="smollm2-135m-instruct", prompt=texts[0], temperature=0, max_tokens=8, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == echo.choices[0].text


def test_content_parts_and_the_developer_role_equal_strings_and_system(live):
    _, _, oa = live
    as_strings = [{"role": "system", "content": "Answer in one word."}, CHAT[0]]
    system = [{"type": "text", "text": "Answer in one "}, {"type": "text", "text": "word."}]
    as_parts = [
        {"role": "developer", "content": system},
        {"role": "user", "content": [{"type": "text", "text": CHAT[0]["content"]}]},
    ]
    a, b = (
        oa.chat.completions.create(model="smollm2-135m-instruct", messages=m, temperature=0, max_tokens=10)
        for m in (as_strings, as_parts)
    )
    assert a.choices[0].message.content == b.choices[0].message.content and a.usage == b.usage


def test_penalties_and_logit_bias_follow_openais_definitions():
    """logits[j] -= frequency_penalty * count(j in output) + presence_penalty * (count > 0), + logit_bias[j];
    the prompt's tokens are not counted."""
    logits = torch.zeros(2, 10)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((3, 4.0), (9, -100.0)))
    seq = Sequence([7, 7, 7], params, 8)
    seq.output = [5, 5, 6]
    plain = Sequence([1], SamplingParams(), 8)
    out = openai_adjust(logits, [seq, plain])
    want = torch.zeros(10)
    want[5], want[6], want[3], want[9] = -(0.25 * 2 + 0.5), -(0.25 + 0.5), 4.0, -100.0
    assert (
        torch.equal(out[0], want) and torch.equal(out[1], torch.zeros(10)) and torch.equal(logits, torch.zeros(2, 10))
    )


def test_penalties_and_logit_bias_change_what_the_model_says(live):
    _, rt, oa = live
    args = dict(model="smollm2-135m-instruct", prompt="1, 2, 3, 4, 5,", temperature=0, max_tokens=16)
    plain = oa.completions.create(**args).choices[0]
    forced = rt.tokenizer.encode(" banana", bos=False, eos=False)[0]
    biased = oa.completions.create(**args, logit_bias={str(forced): 100}).choices[0]
    assert biased.text == rt.tokenizer.decode([forced] * 16)  # greedy picks the biased token every time
    penalized = oa.completions.create(**args, logit_bias={str(forced): 3}, frequency_penalty=2).choices[0]
    assert penalized.text != biased.text and penalized.text != plain.text  # once said, the bias is paid back
    presence = oa.completions.create(**args, presence_penalty=2).choices[0]
    assert presence.text != plain.text


def test_stream_usage_and_accounting_equal_the_non_streamed_request(live, caplog):
    client, _, oa = live
    args = dict(model="smollm2-135m-instruct", messages=CHAT, temperature=0, max_tokens=20)
    before = metric(client, "vllm:generation_tokens_total")
    whole = oa.chat.completions.create(**args)
    counted = metric(client, "vllm:generation_tokens_total") - before  # (the EOS token too: it was computed)
    before += counted
    with caplog.at_level(logging.INFO, logger="presets.requests"):
        chunks = list(oa.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
        deadline = time.monotonic() + 60  # the line comes as the stream ends; the deadline ends a failing test
        while not [r for r in caplog.records if "/v1/chat/completions 200" in r.getMessage()]:
            assert time.monotonic() < deadline, "no log line for the stream"
            time.sleep(0.05)
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1) and chunks[-1].choices == []
    assert chunks[-1].usage == whole.usage
    assert metric(client, "vllm:generation_tokens_total") - before == counted >= whole.usage.completion_tokens
    (line,) = [r.getMessage() for r in caplog.records if "/v1/chat/completions" in r.getMessage()]
    assert (
        f"sequences=1 prompt_tokens={whole.usage.prompt_tokens} generated_tokens="
        f"{whole.usage.completion_tokens}" in line
    )


def test_a_cancelled_stream_counts_the_tokens_it_got(live):
    client, _, _ = live
    before = metric(client, "vllm:generation_tokens_total")
    body = {"messages": CHAT, "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
    with requests.post(f"{client.url}/v1/chat/completions", json=body, stream=True, timeout=30) as r:
        events = r.iter_lines()
        got = [next(events) for _ in range(12)]  # the role chunk and some text, then the client leaves
    assert len([e for e in got if e.startswith(b"data: {")]) >= 5
    # Counted when the server has noticed the client left (seconds on a loaded machine): the deadline only ends
    # a failing test; fewer than 400 tokens, not the clock, show that the stream was cut.
    deadline = time.monotonic() + 60
    while metric(client, "vllm:generation_tokens_total") - before < 4:
        assert time.monotonic() < deadline, "a cancelled stream's tokens were not counted"
        time.sleep(0.05)
    assert metric(client, "vllm:generation_tokens_total") - before < 400


def test_generate_engine_refuses_the_penalties_it_does_not_implement(hf_llama_dir):
    client, rt = hf_client(hf_llama_dir, engine="transformers")
    try:
        for field in ("presence_penalty", "frequency_penalty"):
            r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, field: 1.0})
            assert r.status_code == 400 and r.get_json()["error"]["param"] == field
            assert (
                "the transformers engine that runs this model does not implement it" in r.get_json()["error"]["message"]
            )
        ok = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "presence_penalty": 0})
        assert ok.status_code == 200
    finally:
        rt.shutdown()


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, local_files_only=True).eval()


def test_logprobs_are_the_log_softmax_of_the_models_logits(live, reference):
    """Chat: each greedy token's logprob and its top alternatives equal log_softmax of transformers' logits
    on the same folder at that position; completions give OpenAI's other shape with the same numbers."""
    _, rt, oa = live
    from presets.api.chat import encode_dialog

    done = oa.chat.completions.create(
        model="smollm2-135m-instruct", messages=CHAT, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3
    )
    content = done.choices[0].logprobs.content
    prompt = encode_dialog(rt.tokenizer, CHAT)
    ids = rt.tokenizer.encode(done.choices[0].message.content, bos=False, eos=False)
    with torch.inference_mode():
        ref = torch.log_softmax(reference(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 :], dim=-1)
    assert len(content) == len(ids) == done.usage.completion_tokens
    for pos, (item, token) in enumerate(zip(content, ids)):
        top = ref[pos].topk(3)
        assert item.token == rt.tokenizer.decode([token]) and abs(item.logprob - ref[pos, token].item()) < 1e-3
        assert [t.token for t in item.top_logprobs] == [rt.tokenizer.decode([i]) for i in top.indices.tolist()]
        assert all(abs(t.logprob - v) < 1e-3 for t, v in zip(item.top_logprobs, top.values.tolist()))
        assert item.top_logprobs[0].logprob == item.logprob  # greedy: the chosen token is the likeliest
    assert "".join(item.token for item in content) == done.choices[0].message.content
    text = oa.completions.create(
        model="smollm2-135m-instruct", prompt="The capital of France is", temperature=0, max_tokens=6, logprobs=2
    )
    lp = text.choices[0].logprobs
    assert "".join(lp.tokens) == text.choices[0].text and len(lp.top_logprobs[0]) == 2
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.token_logprobs[0] == max(lp.top_logprobs[0].values())


def test_streamed_logprobs_equal_the_non_streamed_ones(live):
    _, _, oa = live
    args = dict(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "Write a haiku about llamas."}],
        temperature=0,
        max_tokens=24,
        logprobs=True,
        top_logprobs=2,
        stop=["\n\n"],
    )
    whole = oa.chat.completions.create(**args).choices[0]
    chunks = [c.choices[0] for c in oa.chat.completions.create(**args, stream=True) if c.choices]
    streamed = [item for c in chunks if c.logprobs for item in c.logprobs.content]
    assert [(i.token, i.logprob) for i in streamed] == [(i.token, i.logprob) for i in whole.logprobs.content]
    assert "".join(c.delta.content or "" for c in chunks) == whole.message.content


def test_logprobs_requests_that_cannot_be_served_are_a_400(live, hf_llama_dir):
    client, _, _ = live
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "logprobs": 1, "echo": True})
    assert r.status_code == 400 and r.get_json()["error"]["param"] == "logprobs"
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "top_logprobs": 2})
    assert r.status_code == 400 and r.get_json()["error"]["param"] == "top_logprobs"
    hf, rt = hf_client(hf_llama_dir, engine="transformers")
    try:
        r = hf.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "logprobs": 0})
        assert r.status_code == 400 and r.get_json()["error"]["param"] == "logprobs"
    finally:
        rt.shutdown()
