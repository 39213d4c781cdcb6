"""Tool calling on /v1/chat/completions: the request's tools checked (each error a 400 naming its field), rendered
as transformers renders them, the model's text parsed into tool_calls (whole and streamed, per template family),
and forced calls (tool_choice required or named) always valid against their schemas, on random weights."""

import json

import jsonschema
import pytest
from transformers import AutoTokenizer

from presets.api.chat import openai_messages, render
from presets.api.tool_parsers import PARSERS, parser_for
from presets.api.tools import CallStream, for_model, parse_tools, plan_for_template
from presets.errors import ApiError
from presets.models.chat_template import load_chat_template
from tests.conftest import real_client
from tests.test_chat_template import CHATML_TOKENS, write_folder

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "now",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"type": "integer", "minimum": -12, "maximum": 14}},
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

# A ChatML template that takes tools as Qwen 2.5's does (written for this test): tools in the system turn, calls
# in <tool_call> blocks with their arguments as JSON objects, results in user turns.
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}You may call these functions:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Call one as <tool_call>
{"name": <name>, "arguments": <arguments>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'system' %}
{%- elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% elif m.tool_calls is defined %}<|im_start|>assistant
{% if m.content %}{{ m.content }}
{% endif %}{% for c in m.tool_calls %}<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% if not loop.last %}
{% endif %}{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# Llama 3.1's JSON tool calling, in the shape of its template (written for this test): tools in the first user
# turn, a call as {"name", "parameters"}, results in "ipython" turns.
LLAMA31_TEMPLATE = """{{ bos_token }}
{%- for m in messages %}
{%- if m.role == 'user' and tools and loop.index0 == (1 if messages[0].role == 'system' else 0) %}
<|start_header_id|>user<|end_header_id|>

Given the following functions, respond with a JSON for a function call with its proper arguments.
{% for t in tools %}{{ t | tojson(indent=4) }}

{% endfor %}{{ m.content | trim }}<|eot_id|>
{%- elif m.tool_calls is defined %}
<|start_header_id|>assistant<|end_header_id|>

{% for c in m.tool_calls %}
{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}{% endfor %}<|eot_id|>
{%- elif m.role == 'tool' %}
<|start_header_id|>ipython<|end_header_id|>

{{ m.content }}<|eot_id|>
{%- else %}
<|start_header_id|>{{ m.role }}<|end_header_id|>

{{ m.content | trim }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

# Mistral's v3 tool format, in the shape of its template (written for this test).
MISTRAL_TEMPLATE = """{{ bos_token }}
{%- if tools %}[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}
{%- for m in messages %}
{%- if m.role == 'user' or m.role == 'system' %}[INST] {{ m.content }}[/INST]
{%- elif m.tool_calls is defined %}[TOOL_CALLS] [
{%- for c in m.tool_calls %}{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
{%- if not loop.last %}, {% endif %}{% endfor %}]{{ eos_token }}
{%- elif m.role == 'tool' %}[TOOL_RESULTS] {"content": {{ m.content | tojson }}}[/TOOL_RESULTS]
{%- else %}{{ m.content }}{{ eos_token }}
{%- endif %}
{%- endfor %}"""

TOOL_TEMPLATES = {  # name: (template, named special tokens, added tokens, the parser its text implies)
    "hermes": (
        None,  # HERMES_TEMPLATE, below
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        CHATML_TOKENS,
        "hermes",
    ),
    "llama3.1": (
        LLAMA31_TEMPLATE,
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"],
        "llama3_json",
    ),
    "mistral": (
        MISTRAL_TEMPLATE,
        {"bos_token": "<s>", "eos_token": "</s>"},
        ["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"],
        "mistral",
    ),
}

# A conversation with a call and its result, as an OpenAI client sends it (arguments as a JSON string).
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "user", "content": "And now?"},
]

# Recorded model outputs per family: (text, content, [(name, arguments)]).
RECORDED = {
    "hermes": [
        (
            "Let me look.\n<tool_call>\n"
            '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>',
            "Let me look.",
            [("get_weather", {"city": "Paris", "unit": "C"})],
        ),
        (
            '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\n'
            '<tool_call>\n{"name": "now", "arguments": {"tz": 2}}\n</tool_call>',
            None,
            [("now", {}), ("now", {"tz": 2})],
        ),
        ("Plain text, no call <tool", "Plain text, no call <tool", []),
        ('<tool_call>\n{"name": "now", "arguments": {broken\n</tool_call>', None, []),  # malformed: all content
    ],
    "llama3_json": [
        (
            '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "F"}}',
            None,
            [("get_weather", {"city": "Oslo", "unit": "F"})],
        ),
        (
            '{"name": "now", "parameters": {}}; {"name": "now", "parameters": {"tz": 1}}',
            None,
            [("now", {}), ("now", {"tz": 1})],
        ),
        ("The answer is 42.", "The answer is 42.", []),
        ('{"not": "a call"}', None, []),
    ],
    "mistral": [
        ('[TOOL_CALLS] [{"name": "now", "arguments": {"tz": 3}}]', None, [("now", {"tz": 3})]),
        (
            ' [{"name": "now", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}]',
            None,
            [("now", {}), ("get_weather", {"city": "Rome", "unit": "C"})],
        ),
        ("No tools needed.", "No tools needed.", []),
    ],
}


def plan(family: str = "hermes", **body):
    p = parse_tools({"tools": TOOLS, **body})
    p.parser = PARSERS[family]
    return p


def calls_of(tool_calls: list[dict]) -> list[tuple]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in tool_calls]


@pytest.mark.parametrize("family,case", [(f, c) for f, cases in RECORDED.items() for c in cases])
def test_recorded_outputs_parse_into_content_and_calls(family, case):
    text, content, calls = case
    got_content, got_calls = plan(family).split(text)
    want_content = text if not calls else content
    assert (got_content, calls_of(got_calls)) == (want_content, calls)
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in got_calls)


@pytest.mark.parametrize("step", [1, 2, 5, 13])
@pytest.mark.parametrize("family,case", [(f, c) for f, cases in RECORDED.items() for c in cases])
def test_streamed_pieces_add_up_to_the_whole_answer(family, case, step):
    text, _, _ = case
    stream = CallStream(plan(family))
    sent = "".join(stream.feed(text[i : i + step]) for i in range(0, len(text), step))
    rest, calls = stream.finish()
    content, whole = plan(family).split(text)
    assert (sent + rest, calls_of(calls)) == (content or "", calls_of(whole))


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = RECORDED["hermes"][1][0]
    assert calls_of(plan(parallel_tool_calls=False).split(text)[1]) == [("now", {})]


def test_the_parser_follows_the_template_or_the_flag():
    assert parser_for(HERMES_TEMPLATE, True).name == "hermes"
    assert parser_for("{{ '[TOOL_CALLS]' }}{{ tools }}", True).name == "mistral"
    assert parser_for("<|python_tag|>{{ tools }} ipython", True).name == "llama3_json"
    assert parser_for(None, False).name == "hermes"  # described to the model in the hermes format
    assert parser_for(HERMES_TEMPLATE, True, "llama3_json").name == "llama3_json"


BAD = [
    ({"tools": {"a": 1}}, "tools"),
    ({"tools": []}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
        "tools[0].function.parameters",
    ),
    (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"n": {"maximum": 2**70}}},
                    },
                }
            ]
        },
        "tools",
    ),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
]


@pytest.mark.parametrize("body,param", BAD)
def test_invalid_tools_are_400s_naming_the_field(body, param):
    with pytest.raises(ApiError) as e:
        parse_tools(body)
    assert (e.value.status, e.value.param) == (400, param)


def test_tool_choice_none_shows_no_tools_and_none_of_tools_is_none():
    assert parse_tools({"tools": TOOLS, "tool_choice": "none"}) is None
    assert parse_tools({}) is None


@pytest.fixture(scope="module")
def tool_folders(tmp_path_factory):
    made = {}
    for name, (template, special, added, _) in TOOL_TEMPLATES.items():
        made[name] = write_folder(tmp_path_factory.mktemp(name), template or HERMES_TEMPLATE, special, added)
    return made


def as_templates_take_them(messages: list[dict]) -> list[dict]:
    """The history with each call's arguments as an object, as a client of transformers passes it."""
    out = []
    for m in messages:
        calls = [
            c | {"function": c["function"] | {"arguments": json.loads(c["function"]["arguments"])}}
            for c in m.get("tool_calls", [])
        ]
        out.append(m | ({"tool_calls": calls} if calls else {}))
    return out


@pytest.mark.parametrize("name", TOOL_TEMPLATES)
def test_history_with_calls_and_results_renders_as_transformers_does(tool_folders, name):
    template = load_chat_template(tool_folders[name])
    assert template.takes_tools
    p = plan_for_template(parse_tools({"tools": TOOLS}), template, "auto")
    assert p.parser.name == TOOL_TEMPLATES[name][3]
    history = HISTORY[1:] if name == "mistral" else HISTORY
    ours = render(template, for_model(openai_messages(history, tools=True), p, True), p.template_tools)
    hf = AutoTokenizer.from_pretrained(tool_folders[name])
    theirs = hf.apply_chat_template(
        as_templates_take_them(history), tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert ours == theirs and '{"city": "Paris", "unit": "C"}' in ours and '"get_weather"' in ours
    assert hf(ours, add_special_tokens=False).input_ids == hf(theirs, add_special_tokens=False).input_ids


def test_a_template_without_tools_gets_them_described_and_the_history_as_text():
    p = plan_for_template(parse_tools({"tools": TOOLS}), None, "auto")
    out = for_model(openai_messages(HISTORY, tools=True), p, False)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]  # user and assistant alternate
    assert out[0]["content"].startswith("Be brief.\n\n") and '"name": "get_weather"' in out[0]["content"]
    assert (
        out[2]["content"]
        == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
    )
    assert out[3]["content"] == '<tool_response>\n{"temp": 21}\n</tool_response>\n\nAnd now?'
    assert plan("hermes").split(out[2]["content"])[1]  # the model is shown calls in the format we parse


# -- the route, on random weights: forced calls always parse and satisfy their schemas ------------------------


@pytest.fixture(scope="module")
def chat(tmp_path_factory, hf_llama_dir):
    """A chat server on a tiny random HF Llama whose template takes tools (hermes, with a tokenizer.json)."""
    import shutil

    folder = tmp_path_factory.mktemp("tools-llama")
    shutil.copytree(hf_llama_dir, folder, dirs_exist_ok=True)
    (folder / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    client, rt = real_client(str(folder), "chat", openai=True, max_seq_len=2048, max_batch_size=4)
    yield client
    rt.shutdown()


def ask(client, **body):
    r = client.post("/v1/chat/completions", json={"messages": HISTORY[:2], "tools": TOOLS, "max_tokens": 200, **body})
    assert r.status_code == 200, r.text
    return r.get_json()["choices"]


@pytest.mark.parametrize("seed", range(3))
def test_a_named_choice_always_calls_that_function_with_valid_arguments(chat, seed):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    for c in ask(chat, tool_choice=choice, temperature=1.0, seed=seed, n=4):
        assert c["finish_reason"] == "tool_calls"
        ((name, args),) = calls_of(c["message"]["tool_calls"])
        assert name == "get_weather"
        jsonschema.validate(args, SCHEMAS[name])


@pytest.mark.parametrize("seed", range(3))
def test_required_calls_one_or_more_tools_with_valid_arguments(chat, seed):
    for c in ask(chat, tool_choice="required", temperature=1.0, seed=seed, parallel_tool_calls=False, n=2):
        calls = calls_of(c["message"]["tool_calls"])
        assert calls and c["finish_reason"] == "tool_calls"
        for name, args in calls:
            jsonschema.validate(args, SCHEMAS[name])


def test_a_streamed_forced_call_is_the_same_call_as_deltas(chat):
    body = {"tool_choice": "required", "temperature": 0, "parallel_tool_calls": False}
    (whole,) = ask(chat, **body)
    r = chat.post(
        "/v1/chat/completions",
        json={"messages": HISTORY[:2], "tools": TOOLS, "max_tokens": 200, "stream": True, **body},
    )
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    deltas = [d for e in events for d in e["choices"][0]["delta"].get("tool_calls", [])]
    name = "".join(d.get("function", {}).get("name", "") for d in deltas)
    args = "".join(d.get("function", {}).get("arguments", "") for d in deltas)
    assert [d["index"] for d in deltas] == [0, 0] and deltas[0]["id"].startswith("call_")
    assert (name, json.loads(args)) == calls_of(whole["message"]["tool_calls"])[0]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_history_with_tool_results_is_served(chat):
    (c,) = ask(chat, messages=HISTORY, tool_choice="auto", temperature=0, max_tokens=8)
    assert c["finish_reason"] in ("length", "stop", "tool_calls")


@pytest.mark.parametrize(
    "body,param",
    [
        ({"tool_choice": "required", "logprobs": True}, "logprobs"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
        ({"tool_choice": "required", "ignore_eos": True}, "ignore_eos"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{no"}}],
                    }
                ]
            },
            "messages[0].tool_calls[0]",
        ),
    ],
)
def test_bad_tool_requests_are_400s_on_the_route(chat, body, param):
    r = chat.post("/v1/chat/completions", json={"messages": HISTORY[:2], "tools": TOOLS, **body})
    assert r.status_code == 400 and r.get_json()["error"]["param"] == param, r.text


# -- the official openai client against a server process on SmolLM2 (its template takes no tools) --------------


@pytest.fixture(scope="module")
def smollm2_server(smollm2_dir):
    import openai

    from tests.launch import finish, free_port, running, server_cmd, start, wait_healthy

    port = free_port()
    proc = start(server_cmd("chat", smollm2_dir, port, "--max_seq_len", "2048", "--max_batch_size", "2"), "chat")
    with running(proc):
        wait_healthy(proc, f"http://127.0.0.1:{port}")
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0) as client:
            yield client
        proc.terminate()
        finish(proc)


ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris, in Celsius?"}]


def test_the_openai_client_gets_a_named_call_and_its_stream(smollm2_server):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    whole = smollm2_server.chat.completions.create(
        model="smollm2-135m-instruct", messages=ASK_WEATHER, tools=TOOLS, tool_choice=choice, temperature=0
    )
    (call,) = whole.choices[0].message.tool_calls
    assert whole.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_weather"])
    stream = smollm2_server.chat.completions.create(
        model="smollm2-135m-instruct", messages=ASK_WEATHER, tools=TOOLS, tool_choice=choice, temperature=0, stream=True
    )
    name, args, finish = "", "", None
    for chunk in stream:
        for d in chunk.choices[0].delta.tool_calls or []:
            name += d.function.name or ""
            args += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (name, json.loads(args), finish) == (call.function.name, json.loads(call.function.arguments), "tool_calls")


def test_the_openai_client_sends_the_result_back_and_gets_text(smollm2_server):
    first = smollm2_server.chat.completions.create(
        model="smollm2-135m-instruct", messages=ASK_WEATHER, tools=TOOLS, tool_choice="required", temperature=0
    )
    call = first.choices[0].message.tool_calls[0]
    history = ASK_WEATHER + [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
    ]
    answer = smollm2_server.chat.completions.create(
        model="smollm2-135m-instruct", messages=history, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=30
    )
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_a_named_choice_admits_one_call_and_required_one_or_more():
    named = plan(tool_choice={"type": "function", "function": {"name": "now"}})
    assert "call)*" not in named.grammar() and '"const": "now"' in named.grammar()
    assert '"const": "get_weather"' not in named.grammar()
    assert "call)*" in plan(tool_choice="required").grammar()
    assert "call)*" not in plan(tool_choice="required", parallel_tool_calls=False).grammar()


def test_a_call_of_an_undeclared_function_is_content():
    text = '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'
    assert plan().split(text) == (text, [])
    json_answer = '{"name": "Alice", "parameters": {"age": 3}}'  # a JSON answer is not a call of "Alice"
    assert plan("llama3_json").split(json_answer) == (json_answer, [])


def test_a_forced_answer_cut_by_max_tokens_keeps_its_complete_calls():
    text = RECORDED["hermes"][1][0] + '\n<tool_call>\n{"name": "now", "argu'
    forced = plan(tool_choice="required")
    assert calls_of(forced.split(text, "length")[1]) == [("now", {}), ("now", {"tz": 2})]
    assert plan().split(text, "length") == (text, [])  # auto: the model's text as it wrote it
    cut = '{"name": "now", "parameters": {}}; {"name": "get_w'
    assert calls_of(plan("llama3_json", tool_choice="required").split(cut, "length")[1]) == [("now", {})]


DEEP = "[" * 5000 + "]" * 5000
BAD_ON_THE_ROUTE = [
    ({"messages": [{"role": [], "content": "s"}]}, "messages[0].role"),
    ({"messages": [{"role": {"a": 1}, "content": "s"}]}, "messages[0].role"),
    (
        {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": DEEP}}],
                }
            ]
        },
        "messages[0].tool_calls[0]",
    ),
    ({"tool_choice": "required", "stop": ["city"]}, "stop"),
]


@pytest.mark.parametrize("body,param", BAD_ON_THE_ROUTE)
def test_malformed_messages_and_forced_stops_are_400s(chat, body, param):
    r = chat.post("/v1/chat/completions", json={"messages": HISTORY[:2], "tools": TOOLS, **body})
    assert r.status_code == 400 and r.get_json()["error"]["param"] == param, r.text


def test_parameters_nested_past_the_templates_reach_are_a_400(tool_folders):
    deep = {"type": "object"}
    for _ in range(5000):  # deeper than the template's tojson can walk
        deep = {"not": deep}
    tools = [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": deep}}}}
    ]
    with pytest.raises(ApiError) as e:
        render(load_chat_template(tool_folders["hermes"]), [{"role": "user", "content": "hi"}], tools)
    assert e.value.status == 400 and "RecursionError" in e.value.detail


def test_forced_calls_of_schemas_with_defs_and_of_functions_without_parameters(chat):
    place = {
        "type": "object",
        "properties": {"where": {"$ref": "#/$defs/Place"}},
        "required": ["where"],
        "additionalProperties": False,
        "$defs": {
            "Place": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 12}},
                "required": ["city"],
                "additionalProperties": False,
            }
        },
    }
    tools = [
        {"type": "function", "function": {"name": "go", "parameters": place}},
        {"type": "function", "function": {"name": "ping"}},
    ]
    for name in ("go", "ping"):
        choice = {"type": "function", "function": {"name": name}}
        for c in ask(chat, tools=tools, tool_choice=choice, temperature=1.0, n=3):
            ((called, args),) = calls_of(c["message"]["tool_calls"])
            assert called == name
            jsonschema.validate(args, place if name == "go" else {"type": "object", "maxProperties": 0})


def test_required_parallel_calls_on_the_route_all_parse(chat):
    for c in ask(chat, tool_choice="required", temperature=1.0, seed=7, n=3, max_tokens=300):
        calls = calls_of(c["message"]["tool_calls"])
        assert calls and c["finish_reason"] == "tool_calls"
        for name, args in calls:
            jsonschema.validate(args, SCHEMAS[name])


def test_meta_format_serves_a_history_with_tool_calls_and_results(tiny_ckpt):
    client, rt = real_client(tiny_ckpt, "chat", openai=True, max_seq_len=1024, max_batch_size=2)
    try:
        body = {"messages": HISTORY, "tools": TOOLS, "max_tokens": 4, "temperature": 0}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
    finally:
        rt.shutdown()
