"""Structured output (response_format json_object / json_schema) on the real SmolLM2 model: every constrained
answer parses and validates, in batches that mix constrained and free, greedy and sampled requests, and the
free ones are what they are alone; schemas the grammar engine cannot follow, and engines that cannot
constrain, are a 400 naming why. The same on a SentencePiece tokenizer: test_structured_sentencepiece.py."""

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

from tests.conftest import hf_client, real_client

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0},
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
ASK = [{"role": "user", "content": "Describe a person who lives in a big city, as JSON."}]


@pytest.fixture(scope="module")
def chat(smollm2_dir):
    client, rt = real_client(smollm2_dir, "chat", openai=True, max_seq_len=512, max_batch_size=8, max_queue_size=64)
    yield client, rt
    rt.shutdown()


def ask(client, **body):
    r = client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 96, **body})
    assert r.status_code == 200, r.text
    return r.get_json()["choices"]


def mixed_batch(client, questions, ask) -> list[dict]:
    """Constrained requests (greedy and sampled, n=2) batched with free ones (`questions`): the free ones give
    exactly what they give alone, and the 4 constrained choices (returned) stop with schema-valid JSON."""
    free = [{"temperature": 0, "messages": [{"role": "user", "content": q}]} for q in questions]
    alone = [ask(client, **f)[0]["message"]["content"] for f in free]
    constrained = [
        {"temperature": 0, "response_format": SCHEMA},
        {"temperature": 0.8, "seed": 1, "n": 2, "response_format": SCHEMA},
        {"temperature": 1.0, "seed": 7, "response_format": SCHEMA},
    ]
    bodies = constrained[:2] + free[:1] + constrained[2:] + free[1:]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: ask(client, **b), bodies))
    assert [answers[2][0]["message"]["content"], answers[4][0]["message"]["content"]] == alone
    choices = [c for i in (0, 1, 3) for c in answers[i]]
    assert len(choices) == 4
    for choice in choices:
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
    return choices


def test_a_batch_mixing_constrained_and_free_requests(chat):
    choices = mixed_batch(chat[0], ("What is the capital of France?", "Name three colours."), ask)
    assert len({c["message"]["content"] for c in choices[1:]}) > 1  # sampled ones differ: the mask is per row


def test_json_object_and_a_streamed_schema(chat):
    client, _ = chat
    question = [{"role": "user", "content": "Reply with a JSON object whose key 'sum' is 2+2."}]
    (obj,) = ask(client, temperature=0, max_tokens=200, response_format={"type": "json_object"}, messages=question)
    assert obj["finish_reason"] == "stop" and isinstance(json.loads(obj["message"]["content"]), dict)
    (whole,) = ask(client, temperature=0, response_format=SCHEMA)
    stream = client.post(
        "/v1/chat/completions",
        json={"messages": ASK, "max_tokens": 96, "temperature": 0, "response_format": SCHEMA, "stream": True},
    ).text
    events = [json.loads(e[6:]) for e in stream.split("\n\n") if e.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == whole["message"]["content"]
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize(
    "response_format, message",
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?=a)b"}}},
            "look-around",
        ),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strange"}}}, "unsupported schema"),
        ({"type": "json_schema", "json_schema": {"schema": PERSON}}, "needs a string name"),
        ({"type": "yaml"}, "response_format type 'yaml' is not supported"),
    ],
)
def test_a_schema_the_grammar_engine_cannot_follow_is_a_400_naming_it(chat, response_format, message):
    client, _ = chat
    r = client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 8, "response_format": response_format})
    assert r.status_code == 400 and message in r.get_json()["error"]["message"], r.text
    assert r.get_json()["error"]["param"].startswith("response_format")


def test_grammars_are_checked_once_and_ignore_eos_is_refused(chat):
    client, rt = chat
    ask(client, temperature=0, max_tokens=4, response_format=SCHEMA)
    checked = dict(rt.structured._verdicts)
    ask(client, temperature=0, max_tokens=4, response_format=SCHEMA)
    assert rt.structured._verdicts == checked and "" in checked.values()  # the schema's verdict, cached once
    r = client.post("/v1/chat/completions", json={"messages": ASK, "response_format": SCHEMA, "ignore_eos": True})
    assert r.status_code == 400 and r.get_json()["error"]["param"] == "ignore_eos"


def test_an_engine_that_cannot_constrain_says_so(hf_llama_dir):
    """transformers' generate: a 400, never unconstrained text. (SentencePiece models are constrained:
    test_structured_sentencepiece.py.)"""
    hf, hf_rt = hf_client(hf_llama_dir, engine="transformers")
    try:
        r = hf.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "response_format": SCHEMA})
        error = r.get_json()["error"]
        assert r.status_code == 400 and error["param"] == "response_format" and "grammar" in error["message"]
    finally:
        hf_rt.shutdown()
