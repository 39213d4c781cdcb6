"""POST /tokenize and /detokenize (vLLM's shapes) on every family: the Llama server on Meta's SentencePiece layout,
a HuggingFace Llama folder on our engine, tiny Falcon on transformers' generate and a GGUF on llama.cpp. A prompt's
ids are the completion route's, messages' ids the chat route's; ids come back as text; bad input is a 400 naming
its field; the routes sit behind the API key and are logged like the others."""

import copy
import logging
import os

import pytest
from transformers import AutoTokenizer

from presets.api.chat import encode_dialog
from presets.api.routes import OPENAI_ROUTES
from presets.engine.runtime import Runtime
from presets.http.app import create_app
from presets.models.llama.tokenizer import Tokenizer
from presets.servers.llama import LlamaModel, build_runtime
from presets.tools.tiny_hf import LLAMA2_CHAT_TEMPLATE
from tests.conftest import hf_client, settings_for
from tests.live_client import LiveClient
from tests.test_llama_cpp import serving

TEXT = "The quick brown fox, said the king of France."
DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Spain?"},
]


def client_for(rt, m, keys=()) -> LiveClient:
    """The routes every server mounts (OPENAI_ROUTES) over runtime `rt` and OpenAIModel `m`."""
    app = create_app(rt, OPENAI_ROUTES, api_keys=keys)
    app.extensions["openai_model"] = m
    return LiveClient(app)


@pytest.fixture(scope="module")
def meta(tiny_ckpt):
    """The Llama chat server on Meta's layout (SentencePiece, Meta's Llama-2 chat format): (client, model)."""
    settings = settings_for(tiny_ckpt, max_seq_len=512, max_batch_size=4)  # room for tools
    rt = build_runtime(settings)
    rt.start(background=False)
    m = LlamaModel(rt, settings, "chat")
    yield client_for(rt, m), m
    rt.shutdown()


@pytest.fixture(scope="module")
def hf_llama(hf_llama_dir):
    """A HuggingFace Llama folder (tokenizer.json, Llama-2 chat template) on our engine."""
    client, rt = hf_client(hf_llama_dir)
    yield client
    rt.shutdown()


@pytest.fixture(scope="module")
def gguf(tiny_ckpt, tmp_path_factory):
    """llm-api on the tiny checkpoint as a GGUF with Llama-2's chat template."""
    with serving(tiny_ckpt, tmp_path_factory.mktemp("gguf"), "tok", chat_template=LLAMA2_CHAT_TEMPLATE) as (app, rt):
        yield LiveClient(app)


def tokenize(client, **body) -> dict:
    r = client.post("/tokenize", json=body)
    assert r.status_code == 200, r.get_data()
    out = r.get_json()
    assert list(out) == ["count", "max_model_len", "tokens", "token_strs"] and out["count"] == len(out["tokens"])
    return out


def detokenize(client, tokens) -> str:
    r = client.post("/detokenize", json={"tokens": tokens})
    assert r.status_code == 200, r.get_data()
    assert list(r.get_json()) == ["prompt"]
    return r.get_json()["prompt"]


def greedy(client, route: str, **body) -> tuple[str, int]:
    """(text, prompt_tokens) of a greedy request to a /v1 route."""
    r = client.post(f"/v1/{route}", json={"temperature": 0, "max_tokens": 6, **body})
    assert r.status_code == 200, r.get_data()
    out = r.get_json()
    choice = out["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"], out["usage"]["prompt_tokens"]


# -- SentencePiece (Meta's layout) and llama.cpp: BOS on and off ----------------------------------------------


@pytest.mark.parametrize("family, bos_text, context", [("meta", "<s>", 512), ("gguf", "<s> ", 128)])
def test_prompt_round_trips_and_add_special_tokens_adds_bos(family, bos_text, context, request):
    """llama.cpp writes a space after <s>; the context is --max_seq_len, llm-api's ctx_size."""
    client = request.getfixturevalue(family)
    client = client[0] if family == "meta" else client
    plain = tokenize(client, prompt=TEXT, add_special_tokens=False)
    with_bos = tokenize(client, prompt=TEXT)  # vLLM's default: add_special_tokens true
    assert with_bos["tokens"] == [1] + plain["tokens"] and plain["count"] == len(plain["tokens"]) > 5
    assert with_bos["max_model_len"] == context and with_bos["token_strs"] is None
    assert detokenize(client, plain["tokens"]) == TEXT
    assert detokenize(client, with_bos["tokens"]) == bos_text + TEXT  # BOS written as text
    assert detokenize(client, []) == ""


def test_prompt_ids_are_the_ids_completions_runs(meta):
    client, _ = meta
    ids = tokenize(client, prompt=TEXT)["tokens"]
    text, prompt_tokens = greedy(client, "completions", prompt=TEXT)
    assert prompt_tokens == len(ids) and greedy(client, "completions", prompt=ids) == (text, len(ids))


def test_token_strs_are_the_vocabulary_pieces(meta, gguf, tiny_ckpt):
    sp = Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))
    for client in (meta[0], gguf):
        out = tokenize(client, prompt=TEXT, return_token_strs=True)
        assert out["token_strs"] == ["<s>"] + [sp.sp.id_to_piece(i) for i in sp.encode(TEXT, bos=False, eos=False)]
        assert "".join(out["token_strs"][1:]).replace("▁", " ") == " " + TEXT


# -- chat messages are the chat route's ids -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["meta", "hf_llama", "gguf"])
def test_messages_tokenize_to_the_ids_the_chat_route_runs(family, request, tiny_ckpt):
    client = request.getfixturevalue(family)
    client = client[0] if family == "meta" else client
    out = tokenize(client, messages=DIALOG)
    if family != "hf_llama":  # the same checkpoint's SentencePiece, in Meta's format (the GGUF's template writes it)
        assert out["tokens"] == encode_dialog(Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model")), DIALOG)
    text, prompt_tokens = greedy(client, "chat/completions", messages=DIALOG)
    assert prompt_tokens == out["count"]
    assert greedy(client, "completions", prompt=out["tokens"]) == (text, out["count"])  # the same ids, the same answer
    assert tokenize(client, messages=DIALOG, add_generation_prompt=True, continue_final_message=False) == out


WEATHER = {
    "type": "function",
    "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
TOOL_DIALOG = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "Sunny."},  # last: Meta's format alternates user/assistant
]


@pytest.mark.parametrize("family", ["meta", "hf_llama"])
def test_tools_and_tool_messages_tokenize_as_the_chat_route_renders_them(family, request):
    client = request.getfixturevalue(family)
    client = client[0] if family == "meta" else client
    with_tools = tokenize(client, messages=TOOL_DIALOG, tools=[WEATHER])
    without = tokenize(client, messages=TOOL_DIALOG)
    assert with_tools["count"] > without["count"]  # the tools are described to the model
    for tools, out in (([WEATHER], with_tools), (None, without)):
        r = client.post(
            "/v1/chat/completions", json={"messages": TOOL_DIALOG, "tools": tools, "max_tokens": 1, "temperature": 0}
        )
        assert r.status_code == 200 and r.get_json()["usage"]["prompt_tokens"] == out["count"], r.get_data()
    assert "weather" in detokenize(client, with_tools["tokens"]) and "Sunny." in detokenize(client, without["tokens"])


def test_chat_ids_detokenize_to_the_rendered_template(hf_llama, hf_llama_dir):
    """transformers' own rendering of the folder's template is the text of the chat ids, special tokens included;
    token_strs are transformers' tokens."""
    reference = AutoTokenizer.from_pretrained(hf_llama_dir)
    assert reference.chat_template == LLAMA2_CHAT_TEMPLATE
    out = tokenize(hf_llama, messages=DIALOG, return_token_strs=True)
    rendered = reference.apply_chat_template(DIALOG, tokenize=False, add_generation_prompt=True)
    assert detokenize(hf_llama, out["tokens"]) == rendered and rendered.count("<s>") == 2
    assert out["tokens"] == reference(rendered, add_special_tokens=False).input_ids
    assert out["token_strs"] == reference.convert_ids_to_tokens(out["tokens"])
    plain = tokenize(hf_llama, prompt=TEXT, add_special_tokens=False)
    assert plain["tokens"] == reference(TEXT, add_special_tokens=False).input_ids
    assert detokenize(hf_llama, plain["tokens"]) == TEXT and plain["max_model_len"] == 512


def test_transformers_family(falcon_client, falcon_dir):
    """Falcon on generate: its tokenizer's ids and text, BOS as its tokenizer adds it; no chat template: the chat
    route's 400."""
    reference = AutoTokenizer.from_pretrained(falcon_dir)
    for special in (True, False):
        out = tokenize(falcon_client, prompt=TEXT, add_special_tokens=special, return_token_strs=True)
        assert out["tokens"] == reference(TEXT, add_special_tokens=special).input_ids
        assert out["token_strs"] == reference.convert_ids_to_tokens(out["tokens"])
    assert detokenize(falcon_client, out["tokens"] + [reference.eos_token_id]) == TEXT + "<|endoftext|>"
    r = falcon_client.post("/tokenize", json={"messages": DIALOG})
    assert r.status_code == 400 and "no chat template" in r.get_json()["error"]["message"]


# -- errors -----------------------------------------------------------------------------------------------------

USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "route, body, param",
    [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": ["a", "b"]}, "prompt"),
        ("/tokenize", {"prompt": [1, 2]}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": USER}, "prompt"),
        ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens"),
        ("/tokenize", {"prompt": "a", "return_token_strs": 1}, "return_token_strs"),
        ("/tokenize", {"prompt": "a", "add_generation_prompt": True}, "add_generation_prompt"),  # a chat field
        ("/tokenize", {"prompt": "a", "max_tokens": 3}, "max_tokens"),
        ("/tokenize", {"messages": []}, "messages"),
        ("/tokenize", {"messages": "hi"}, "messages"),
        ("/tokenize", {"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
        ("/tokenize", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ("/tokenize", {"messages": [{"role": "user", "content": "x", "name": "a"}]}, "messages[0].name"),
        ("/tokenize", {"messages": USER, "chat_template": "{{ messages }}"}, "chat_template"),
        ("/tokenize", {"messages": USER, "chat_template_kwargs": {"x": 1}}, "chat_template_kwargs"),
        ("/tokenize", {"messages": USER, "tools": "weather"}, "tools"),
        ("/tokenize", {"messages": USER, "tools": [WEATHER], "tool_choice": "required"}, "tool_choice"),
        ("/tokenize", {"messages": USER, "mm_processor_kwargs": {"a": 1}}, "mm_processor_kwargs"),
        ("/tokenize", {"messages": USER, "add_generation_prompt": False}, "add_generation_prompt"),
        ("/tokenize", {"messages": USER, "add_generation_prompt": "no"}, "add_generation_prompt"),
        ("/tokenize", {"messages": USER, "continue_final_message": True}, "continue_final_message"),
        (
            "/tokenize",
            {"messages": USER, "continue_final_message": True, "add_generation_prompt": False},
            "continue_final_message",
        ),
        ("/tokenize", {"messages": USER, "add_special_tokens": True}, "add_special_tokens"),
        ("/tokenize", {"messages": USER, "return_token_strs": "true"}, "return_token_strs"),
        ("/tokenize", {"messages": USER, "echo": True}, "echo"),
        ("/detokenize", {}, "tokens"),
        ("/detokenize", {"tokens": "1 2"}, "tokens"),
        ("/detokenize", {"tokens": [1, "2"]}, "tokens"),
        ("/detokenize", {"tokens": [1, 2.0]}, "tokens"),
        ("/detokenize", {"tokens": [True]}, "tokens"),
        ("/detokenize", {"tokens": [1, -1]}, "tokens"),
        ("/detokenize", {"tokens": [512]}, "tokens"),  # the tiny vocabulary is 0..511
        ("/detokenize", {"tokens": [2**70]}, "tokens"),
        ("/detokenize", {"tokens": [1], "prompt": "x"}, "prompt"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(meta, route, body, param):
    r = meta[0].post(route, json=body)
    assert r.status_code == 400, r.get_data()
    error = r.get_json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert param.split("[")[0].split(".")[0] in error["message"]


@pytest.mark.parametrize("family", ["meta", "gguf"])
def test_out_of_vocabulary_ids_never_reach_the_tokenizer(family, request):
    client = request.getfixturevalue(family)
    client = client[0] if family == "meta" else client
    for bad in (512, 2**31, 2**63, -(2**31)):
        r = client.post("/detokenize", json={"tokens": [1, bad]})
        assert r.status_code == 400 and "tokens[1]" in r.get_json()["error"]["message"]
    assert detokenize(client, [511, 0, 2]) is not None  # the edges of the vocabulary decode


def test_special_tags_are_refused_as_by_the_chat_route(meta):
    body = {"messages": [{"role": "user", "content": "[INST] hi"}]}
    for route in ("/tokenize", "/v1/chat/completions"):
        r = meta[0].post(route, json=body)
        assert r.status_code == 400 and "special tags" in r.get_json()["error"]["message"]


def test_other_models_are_404_and_adapters_are_served(meta):
    client, m = meta
    for route, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        r = client.post(route, json={**body, "model": "gpt-4"})
        assert r.status_code == 404 and r.get_json()["error"]["code"] == "model_not_found"
        assert r.get_json()["error"]["param"] == "model"
        assert client.post(route, json={**body, "model": m.name}).status_code == 200
    with_adapter = copy.copy(m)
    with_adapter.adapters = ["sql-lora"]
    lora = client_for(m.rt, with_adapter)
    assert tokenize(lora, prompt=TEXT, model="sql-lora") == tokenize(client, prompt=TEXT)


# -- the API key, readiness, the request log --------------------------------------------------------------------


def test_the_api_key_is_required_when_set(meta):
    _, m = meta
    client = client_for(m.rt, m, keys=["s3cret"])
    for route, body in (("/tokenize", {"prompt": TEXT}), ("/detokenize", {"tokens": [1, 2]})):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = client.post(route, json=body, headers=headers)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", r.get_data()
            assert r.get_json()["error"]["type"] == "authentication_error"
        assert client.post(route, json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_a_server_not_ready_answers_503():
    rt = Runtime(lambda progress: None, max_seq_len=64, max_batch_size=1, max_waiting=1)  # never started: loading
    client = client_for(rt, None)
    for route, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        r = client.post(route, json=body)
        assert r.status_code == 503 and r.headers["Retry-After"], r.get_data()


def test_requests_are_logged_with_their_token_count(meta, caplog):
    caplog.set_level(logging.INFO, logger="presets.requests")
    n = tokenize(meta[0], prompt=TEXT)["count"]
    detokenize(meta[0], [1, 2, 3])
    meta[0].post("/tokenize", json={"prompt": 1})
    lines = [r.getMessage() for r in caplog.records if r.name == "presets.requests"]
    assert any(line.startswith(f"POST /tokenize 200 sequences=0 prompt_tokens={n} ") for line in lines), lines
    assert any(line.startswith("POST /detokenize 200 sequences=0 prompt_tokens=3 ") for line in lines), lines
    assert any(line.startswith("POST /tokenize 400 ") for line in lines), lines
