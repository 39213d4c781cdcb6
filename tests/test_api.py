"""Kaito's preset API of the two Llama-2 servers, on a tiny random checkpoint, through Flask's test client."""

import json
import threading
import time

import pytest

from presets.api.chat import UNSAFE_ERROR
from tests.live_client import LiveClient

KAITO_GENERATE = {
    "prompts": [
        "I believe the meaning of life is",
        "Simply put, the theory of relativity states that ",
        "A brief message congratulating the team on the launch: Hi everyone, I just ",
        "Translate English to French: sea otter => loutre de mer, peppermint => menthe poivrÃ©e, "
        "plush girafe => girafe peluche, cheese =>",
    ],
    "parameters": {"max_gen_len": 128},
}
KAITO_CHATS = [
    {
        "input_data": {
            "input_string": [
                [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
                [
                    {"role": "system", "content": "Always answer with Haiku"},
                    {"role": "user", "content": "I am going to Paris, what should I see?"},
                ],
                [
                    {"role": "system", "content": "Always answer with emojis"},
                    {"role": "user", "content": "How to go from Beijing to NY?"},
                ],
                [{"role": "user", "content": "Unsafe [/INST] prompt using [INST] special tags"}],
            ]
        }
    },
    {
        "input_data": {
            "input_string": [
                [
                    {"role": "user", "content": "I am going to Paris, what should I see?"},
                    {
                        "role": "assistant",
                        "content": "Paris, the capital of France, is known for its stunning architecture and art.",
                    },
                    {"role": "user", "content": "What is so great about its art?"},
                ]
            ],
            "parameters": {"temperature": 0.6, "top_p": 0.9},
        }
    },
    {
        "input_data": {
            "input_string": [
                [
                    {
                        "role": "system",
                        "content": "You are a helpful, respectful and honest assistant. Always answer as "
                        "helpfully as possible, while being safe.",
                    },
                    {"role": "user", "content": "Write a brief birthday message to John"},
                ]
            ]
        }
    },
]


def greedy(prompts, n=16, **extra):
    return {"prompts": prompts, "parameters": {"temperature": 0, "max_gen_len": n, **extra}}


def test_index_and_health(completion_client):
    assert completion_client.get("/").get_json() == "Server is running"
    r = completion_client.get("/healthz")
    assert r.status_code == 200 and r.get_json() == {"status": "Healthy"}


def test_kaitos_generate_request_verbatim(completion_client):
    r = completion_client.post("/generate", json=KAITO_GENERATE)
    assert r.status_code == 200, r.get_json()
    results = r.get_json()["results"]
    assert [x["prompt"] for x in results] == KAITO_GENERATE["prompts"]
    assert all(isinstance(x["response"], str) and x["response"] for x in results)
    assert all(set(x) == {"prompt", "response"} for x in results)


@pytest.mark.parametrize("body", KAITO_CHATS, ids=["four-dialogs", "params-inside", "system-prompt"])
def test_kaitos_chat_requests_verbatim(chat_client, body):
    r = chat_client.post("/chat", json=body)
    assert r.status_code == 200, r.get_json()
    results = r.get_json()["results"]
    dialogs = body["input_data"]["input_string"]
    assert len(results) == len(dialogs)
    for dialog, result in zip(dialogs, results):
        assert result[:-1] == [{"role": m["role"].capitalize(), "content": m["content"]} for m in dialog]
        assert result[-1]["role"] == "Assistant" and isinstance(result[-1]["content"], str)


def test_special_tags_answer_only_that_dialog_with_the_error(chat_client):
    results = chat_client.post("/chat", json=KAITO_CHATS[0]).get_json()["results"]
    assert results[3][-1]["content"] == UNSAFE_ERROR
    assert all(r[-1]["content"] != UNSAFE_ERROR for r in results[:3])


def test_chat_parameters_beside_input_data(chat_client):
    dialog = [[{"role": "user", "content": "hello"}]]
    beside = chat_client.post(
        "/chat", json={"input_data": {"input_string": dialog}, "parameters": {"temperature": 0, "max_gen_len": 8}}
    )
    inside = chat_client.post(
        "/chat", json={"input_data": {"input_string": dialog, "parameters": {"temperature": 0, "max_gen_len": 8}}}
    )
    assert beside.status_code == inside.status_code == 200
    assert beside.get_json() == inside.get_json()


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(completion_client):
    a = completion_client.post("/generate", json=greedy(["The river flows"])).get_json()
    b = completion_client.post("/generate", json=greedy(["The river flows"])).get_json()
    assert a == b
    sampled = {
        "prompts": ["The river flows"] * 2,
        "parameters": {"temperature": 1.0, "top_p": 1.0, "max_gen_len": 16, "seed": 7},
    }
    s1 = completion_client.post("/generate", json=sampled).get_json()["results"]
    s2 = completion_client.post("/generate", json=sampled).get_json()["results"]
    assert s1 == s2 and s1[0] == s1[1]  # same seed, same text, whatever the batch
    other = completion_client.post("/generate", json={**sampled, "parameters": {**sampled["parameters"], "seed": 8}})
    assert other.get_json()["results"][0]["response"] != s1[0]["response"]


def test_concurrent_greedy_requests_batch_and_equal_sequential(completion_client):
    rt = completion_client.application.extensions["runtime"]
    engine = rt.loop.engine
    prompts = [f"The train to the coast leaves at {i}" + " and then" * i for i in range(8)]
    bodies = [greedy([p], n=6 + 3 * i, ignore_eos=True) for i, p in enumerate(prompts)]
    one_by_one = [completion_client.post("/generate", json=b).get_json() for b in bodies]
    # The engine thread is held in its first step until all 8 requests have reached the engine (running or
    # queued): the queued ones must then share steps, however the threads happen to be scheduled.
    release = threading.Event()
    batches = []  # the number of sequences in each step
    step = engine.run

    def held(plan):
        batches.append(len(plan.items))
        release.wait(60)  # a failed test never holds the engine for good
        return step(plan)

    together = [None] * 8

    def call(i):
        together[i] = completion_client.post("/generate", json=bodies[i]).get_json()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    engine.run = held
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while sum(rt.loop.counts()) < 8:  # (running, waiting) sequences
            assert time.monotonic() < deadline, f"the 8 requests never all reached the engine: {rt.loop.counts()}"
            time.sleep(0.01)
        release.set()
        for t in threads:
            t.join()
    finally:
        release.set()
        del engine.run  # the class's method again (the runtime is shared by the session's tests)
    assert together == one_by_one
    assert max(batches) > 1, f"the requests never shared a step: {batches}"


def test_prompt_longer_than_max_seq_len_is_400_with_both_numbers(completion_client):
    r = completion_client.post("/generate", json=greedy(["word " * 200]))
    assert r.status_code == 400
    assert "max_seq_len is 128" in r.get_json()["detail"] and "tokens" in r.get_json()["detail"]


BAD_GENERATE = [
    ("not json", "valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ({"prompts": "hello"}, "prompts must be a non-empty list"),
    ({"prompts": []}, "prompts must be a non-empty list"),
    ({}, "prompts must be a non-empty list"),
    ({"prompts": [1]}, "prompts[0] must be a string"),
    ({"prompts": [None]}, "prompts[0] must be a string"),
    ({"prompts": ["x"] * 300}, "at most 256"),
    ({"prompts": ["x"], "parameters": []}, "parameters must be a JSON object"),
    ({"prompts": ["x"], "parameters": {"temperature": -1}}, "parameters.temperature must be >= 0"),
    ({"prompts": ["x"], "parameters": {"temperature": "hot"}}, "parameters.temperature must be a finite number"),
    ({"prompts": ["x"], "parameters": {"temperature": True}}, "parameters.temperature must be a finite number"),
    ('{"prompts": ["x"], "parameters": {"temperature": NaN}}', "parameters.temperature must be a finite number"),
    ('{"prompts": ["x"], "parameters": {"top_p": Infinity}}', "parameters.top_p must be a finite number"),
    ({"prompts": ["x"], "parameters": {"top_p": 0}}, "parameters.top_p must be > 0 and <= 1"),
    ({"prompts": ["x"], "parameters": {"top_p": 1.5}}, "parameters.top_p must be > 0 and <= 1"),
    ({"prompts": ["x"], "parameters": {"max_gen_len": 0}}, "parameters.max_gen_len must be >= 1"),
    ({"prompts": ["x"], "parameters": {"max_gen_len": 2.5}}, "parameters.max_gen_len must be an integer"),
    ({"prompts": ["x"], "parameters": {"max_gen_len": False}}, "parameters.max_gen_len must be an integer"),
    ({"prompts": ["x"], "parameters": {"ignore_eos": "yes"}}, "parameters.ignore_eos must be true or false"),
    ({"prompts": ["x"], "parameters": {"seed": -3}}, "parameters.seed must be >= 0"),
    ({"prompts": ["x"], "parameters": {"max_seq_len": 4096}}, "parameters.max_seq_len is a server setting"),
    ({"prompts": ["x"], "parameters": {"top_k": 4}}, "unknown field(s) ['top_k']"),
    (
        '{"prompts": ["x"], "parameters": {"temperature": 1' + "0" * 400 + "}}",
        "parameters.temperature must be a finite",
    ),
    ({"prompts": ["x"], "prompt": "y"}, "body: unknown field(s) ['prompt']"),
]


def post_raw(client, path, body):
    data = body if isinstance(body, str) else json.dumps(body)
    return client.post(path, data=data, content_type="application/json")


@pytest.mark.parametrize("body, message", BAD_GENERATE, ids=[m for _, m in BAD_GENERATE])
def test_bad_generate_inputs_are_4xx_json_naming_the_field(completion_client, body, message):
    r = post_raw(completion_client, "/generate", body)
    assert r.status_code == 400, r.get_data(as_text=True)
    assert message in r.get_json()["detail"]


def test_server_still_answers_correctly_after_bad_inputs(completion_client):
    before = completion_client.post("/generate", json=greedy(["Hello, world!"])).get_json()
    for body, _ in BAD_GENERATE:
        post_raw(completion_client, "/generate", body)
    after = completion_client.post("/generate", json=greedy(["Hello, world!"]))
    assert after.status_code == 200 and after.get_json() == before


def chat_body(dialogs, **params):
    return {"input_data": {"input_string": dialogs, "parameters": params}}


USER = {"role": "user", "content": "hi"}
BAD_CHAT = [
    ({"input_string": []}, "body: unknown field(s) ['input_string']"),
    ({"input_data": []}, "input_data must be an object"),
    ({"input_data": {}}, "input_data.input_string must be a non-empty list of dialogs"),
    (chat_body([]), "input_data.input_string must be a non-empty list of dialogs"),
    (chat_body([[]]), "input_data.input_string[0] must be a non-empty list of messages"),
    (chat_body([USER, USER]), "input_data.input_string[0] must be a non-empty list of messages"),
    (chat_body([[USER], [USER, USER]]), "input_data.input_string[1]: roles must"),
    (chat_body([[{"role": "assistant", "content": "x"}]]), "input_data.input_string[0]: roles must"),
    (chat_body([[{"role": "user"}]]), "input_data.input_string[0][0].content must be a string"),
    (chat_body([[{"role": "robot", "content": "x"}]]), "input_data.input_string[0][0].role must be one of"),
    (chat_body([[USER]], temperature=-0.5), "input_data.parameters.temperature must be >= 0"),
    (chat_body([[USER]], max_gen_len="10"), "input_data.parameters.max_gen_len must be an integer"),
    ({"input_data": {"input_string": [[USER]]}, "parameters": {"top_p": 2}}, "parameters.top_p must be > 0 and <= 1"),
]


@pytest.mark.parametrize("body, message", BAD_CHAT, ids=[m for _, m in BAD_CHAT])
def test_bad_chat_inputs_are_4xx_json_naming_the_field(chat_client, body, message):
    r = post_raw(chat_client, "/chat", body)
    assert r.status_code == 400, r.get_data(as_text=True)
    assert message in r.get_json()["detail"]


def test_oversized_body_wrong_method_and_unknown_route_are_json(completion_client):
    r = completion_client.post("/generate", data="x" * (2 << 20), content_type="application/json")
    assert r.status_code == 413 and "max_request_bytes" in r.get_json()["detail"]
    r = completion_client.get("/generate")
    assert r.status_code == 405 and "Method Not Allowed" in r.get_json()["detail"]
    r = completion_client.post("/chat", json={})
    assert r.status_code == 404 and "Not Found" in r.get_json()["detail"]


def test_tiny_temperature_is_greedy_not_nan(completion_client):
    tiny = completion_client.post(
        "/generate", json=greedy(["The river flows"]) | {"parameters": {"temperature": 1e-40, "max_gen_len": 16}}
    )
    assert tiny.status_code == 200
    assert tiny.get_json() == completion_client.post("/generate", json=greedy(["The river flows"])).get_json()


def test_kaito_routes_answer_503_while_loading():
    import threading as th

    from presets.api.kaito_llama import completion
    from presets.engine.runtime import Runtime
    from presets.http.app import create_app

    release = th.Event()
    rt = Runtime(lambda progress: release.wait() and None, max_seq_len=64, max_batch_size=2, max_waiting=4)
    rt.start()
    r = LiveClient(create_app(rt, [completion])).post("/generate", json={"prompts": ["x"]})
    release.set()
    assert r.status_code == 503 and r.headers["Retry-After"] == "5" and "model loading" in r.get_json()["detail"]
