"""POST /v1/responses, stateless, with the official openai client against a server process on a tiny random HF
Llama whose template takes tools: text as the chat route gives it, OpenAI's stream events (the SDK's stream
helper assembles them), function calls as output items, text.format schemas, and each refusal a 400 naming
the field in the Responses API's own names."""

import json
import shutil

import jsonschema
import openai
import pytest
import requests

from tests.launch import finish, free_port, running, server_cmd, start, wait_healthy
from tests.test_tools import HERMES_TEMPLATE, SCHEMAS

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": SCHEMAS["get_weather"],
}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, hf_llama_dir):
    folder = tmp_path_factory.mktemp("responses-llama")
    shutil.copytree(hf_llama_dir, folder, dirs_exist_ok=True)
    (folder / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    config = json.loads((folder / "config.json").read_text())  # room for the tools' JSON in the prompt
    (folder / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 2048}))
    port = free_port()
    proc = start(server_cmd("chat", str(folder), port, "--max_seq_len", "2048", "--max_batch_size", "4"), "chat")
    url = f"http://127.0.0.1:{port}"
    with running(proc):
        wait_healthy(proc, url)
        yield url, folder.name
        proc.terminate()
        finish(proc)


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server[0]}/v1", api_key="none", max_retries=0) as c:
        yield c


def test_text_is_what_the_chat_route_answers(server, client):
    r = client.responses.create(
        model=server[1], instructions="Be brief.", input="Hello there", max_output_tokens=12, temperature=0
    )
    chat = client.chat.completions.create(
        model=server[1],
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        max_tokens=12,
        temperature=0,
    )
    assert r.output_text == chat.choices[0].message.content and r.object == "response"
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    assert r.status in ("completed", "incomplete") and (r.status == "incomplete") == (r.usage.output_tokens == 12)
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text"


def test_the_stream_is_openais_event_sequence_with_the_same_text(server, client):
    ask = {"model": server[1], "input": "Tell me a story", "max_output_tokens": 16, "temperature": 0}
    whole = client.responses.create(**ask)
    with client.responses.stream(**ask) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    last = events[-1].response  # 16 random tokens reach no EOS: the response ends incomplete, as OpenAI's does
    assert deltas == whole.output_text == last.output[0].content[0].text and last.status == "incomplete"
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.incomplete"
    assert kinds[2:5] == ["response.output_item.added", "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_the_sdks_stream_helper_gives_the_final_response(server, client):
    ask = {"model": server[1], "input": "A person", "temperature": 0, "max_output_tokens": 200}
    ask["text"] = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    whole = client.responses.create(**ask)
    with client.responses.stream(**ask) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == whole.output_text
    jsonschema.validate(json.loads(final.output_text), PERSON)


def test_a_named_function_is_a_function_call_item_valid_against_its_schema(server, client):
    r = client.responses.create(
        model=server[1],
        input=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        temperature=1.0,
    )
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_weather"])
    # The call and its result sent back as input items: a text answer follows.
    follow = client.responses.create(
        model=server[1],
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'},
        ],
        tools=[WEATHER],
        tool_choice="none",
        max_output_tokens=8,
        temperature=0,
    )
    assert follow.output[0].type == "message" and follow.output_text


def test_a_streamed_function_call_comes_as_its_events(server, client):
    ask = {
        "model": server[1],
        "input": "Weather?",
        "tools": [WEATHER],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "temperature": 0,
    }
    whole = client.responses.create(**ask)
    with client.responses.stream(**ask) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    (call,) = [o for o in final.output if o.type == "function_call"]
    assert (call.name, json.loads(call.arguments)) == (whole.output[0].name, json.loads(whole.output[0].arguments))
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"


def test_text_format_json_schema_is_followed(server, client):
    r = client.responses.create(
        model=server[1],
        input="A person as JSON",
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}},
        temperature=1.0,
        max_output_tokens=200,
    )
    jsonschema.validate(json.loads(r.output_text), PERSON)


@pytest.mark.parametrize(
    "body,param",
    [
        ({"store": True}, "store"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"background": True}, "background"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": [{"type": "reasoning"}]}, "input[0].type"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].name"),
        ({"tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER]}, "tool_choice"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"instructions": "x", "input": [{"role": "user", "content": 5}]}, "input[0].content"),
        ({"input": [{"role": [], "content": "hi"}]}, "input[0].role"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{no"}]}, "input[0].arguments"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": 5}]}, "input[0].output"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": []}}}, "text.format"),
        ({"text": {"verbosity": "high"}}, "text.verbosity"),
    ],
)
def test_refusals_are_400s_naming_the_field(server, body, param):
    r = requests.post(f"{server[0]}/v1/responses", json={"model": server[1], "input": "hi", **body}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def generated(url: str) -> float:
    lines = requests.get(f"{url}/metrics", timeout=10).text.splitlines()
    return float(next(x.split()[1] for x in lines if x.startswith("vllm:generation_tokens_total ")))


def test_responses_count_in_the_metrics_like_chat_requests(server, client):
    before = generated(server[0])
    r = client.responses.create(model=server[1], input="Count me", max_output_tokens=5, temperature=0)
    with client.responses.stream(model=server[1], input="Count me", max_output_tokens=4, temperature=0) as stream:
        list(stream)
    assert generated(server[0]) - before == r.usage.output_tokens + 4 == 9


def test_model_names_the_served_model_or_is_a_404(server):
    r = requests.post(f"{server[0]}/v1/responses", json={"model": "nope", "input": "hi"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_agent_sdk_shapes_are_accepted(server, client):
    """An empty tools list, text.verbosity medium, and a function_call_output given as input_text parts."""
    r = client.responses.create(
        model=server[1],
        tools=[],
        text={"verbosity": "medium"},
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": [{"type": "input_text", "text": "cold"}]},
        ],
        max_output_tokens=4,
        temperature=0,
    )
    assert r.status == "incomplete" and r.output_text
