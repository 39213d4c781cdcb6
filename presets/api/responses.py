"""OpenAI's Responses API, stateless: POST /v1/responses.

A request is read into the chat route's terms (`chat_body`: instructions and input items as messages, function
tools, text.format as response_format) and runs through the same path as /v1/chat/completions (its template,
tool plan, grammar and runner); the answer is written back as output items: a message with output_text, and a
function_call item per call. Streamed, it is OpenAI's event sequence (response.created ... response.completed).
Nothing is stored: `store: true`, `previous_response_id` and `background` are 400s that say so.
"""

import uuid

from quart import Blueprint, Response, jsonify, request

from presets.api.chat import openai_message
from presets.api.openai import encode_chat, model, served_name, with_grammar
from presets.api.openai_request import parse_request
from presets.api.responses_stream import ResponseEvents
from presets.api.validation import json_body
from presets.errors import ApiError
from presets.http.app import logged_stream, record_counts, runtime

responses = Blueprint("responses", __name__, url_prefix="/v1")

FIELDS = {
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "stream",
    "store",
    "user",
    "metadata",
    "previous_response_id",
    "background",
    "truncation",
    "seed",
}
# The chat route's name of a field, where it differs: its errors are told in the Responses API's names.
CHAT_NAMES = {"max_output_tokens": "max_tokens", "text.format": "response_format", "input": "messages"}


def chat_body(body: dict) -> dict:
    """The request in /v1/chat/completions' fields."""
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise ApiError(400, f"unsupported field(s) {unknown}; this server supports {sorted(FIELDS)}", param=unknown[0])
    _stateless(body)
    copied = ("model", "max_output_tokens", "temperature", "top_p", "user", "seed")
    chat = {CHAT_NAMES.get(k, k): body.get(k) for k in copied}
    chat = {k: v for k, v in chat.items() if v is not None}
    chat["messages"] = _instructions(body.get("instructions")) + input_messages(body.get("input"))
    chat["stream"] = body.get("stream", False)
    if body.get("tools"):  # an empty list: no tools, as OpenAI's API takes it
        chat["tools"] = [_tool(t, i) for i, t in enumerate(_listed(body["tools"], "tools"))]
    for key in ("tool_choice", "parallel_tool_calls"):
        if body.get(key) is not None:
            chat[key] = _tool_choice(body[key]) if key == "tool_choice" else body[key]
    fmt = _text_format(body.get("text"))
    return chat | ({"response_format": fmt} if fmt else {})


def _stateless(body: dict) -> None:
    if body.get("store") not in (None, False):
        raise ApiError(400, "store: this server keeps no responses; send store: false (or leave it out)", param="store")
    if body.get("previous_response_id") is not None:
        raise ApiError(
            400,
            "previous_response_id: this server keeps no responses to continue; send the conversation in input",
            param="previous_response_id",
        )
    if body.get("background") not in (None, False):
        raise ApiError(400, "background: this server answers in the request only", param="background")
    if body.get("truncation") not in (None, "disabled"):
        raise ApiError(400, "truncation: only 'disabled' (a prompt over the context is a 400)", param="truncation")
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        raise ApiError(400, "metadata must be an object", param="metadata")


def _listed(v, where: str) -> list:
    if not isinstance(v, list):
        raise ApiError(400, f"{where} must be a list", param=where)
    return v


def _instructions(text) -> list[dict]:
    if text is None:
        return []
    if not isinstance(text, str):
        raise ApiError(400, "instructions must be a string", param="instructions")
    return [{"role": "system", "content": text}]


def input_messages(items) -> list[dict]:
    """`input` (a string, or message, function_call and function_call_output items) as chat messages, each item
    checked where it is (its errors name input[i])."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    for i, item in enumerate(_listed(items, "input")):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            content = _content(item.get("content"), where)
            message = {k: v for k, v in item.items() if k not in ("type", "id", "status")} | {"content": content}
            messages.append(openai_message(message, where, tools=False))
        elif kind == "function_call":
            call = {"id": _text_field(item, "call_id", where), "type": "function"}
            call["function"] = {
                "name": _text_field(item, "name", where),
                "arguments": _text_field(item, "arguments", where),
            }
            try:
                openai_message({"role": "assistant", "tool_calls": [call]}, where, tools=True)
            except ApiError:
                raise ApiError(400, f"{where}.arguments must be a JSON object", param=f"{where}.arguments") from None
            if messages and messages[-1].get("tool_calls"):  # calls in a row are one assistant turn
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = _content(item.get("output"), f"{where}.output")
            output = "".join(p["text"] for p in output) if isinstance(output, list) else output
            if not isinstance(output, str):
                raise ApiError(400, f"{where}.output must be a string or input_text parts", param=f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": _text_field(item, "call_id", where), "content": output})
        else:
            raise ApiError(
                400, f"{where}.type must be message, function_call or function_call_output", param=f"{where}.type"
            )
    if not messages:
        raise ApiError(400, "input must be a string or a non-empty list of items", param="input")
    return messages


def _text_field(item: dict, key: str, where: str) -> str:
    if not isinstance(item.get(key), str):
        raise ApiError(400, f"{where}.{key} must be a string", param=f"{where}.{key}")
    return item[key]


def _content(content, where: str):
    """A message's content: a string, or input_text/output_text parts (as chat text parts)."""
    if not isinstance(content, list):
        return content
    parts = []
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") in ("input_text", "output_text")):
            raise ApiError(
                400, f"{where}.content[{j}] must be an input_text part (this server reads text only)", param=where
            )
        if not isinstance(part.get("text"), str):
            raise ApiError(400, f"{where}.content[{j}].text must be a string", param=f"{where}.content[{j}].text")
        parts.append({"type": "text", "text": part["text"]})
    return parts


def _tool(tool, i: int) -> dict:
    """A Responses function tool ({"type": "function", "name", ...}) in the chat route's form."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise ApiError(400, f"tools[{i}]: only function tools are served", param=f"tools[{i}].type")
    function = {k: v for k, v in tool.items() if k != "type"}
    return {"type": "function", "function": function}


def _tool_choice(choice):
    if isinstance(choice, dict) and choice.get("type") == "function" and set(choice) == {"type", "name"}:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _text_format(text) -> dict | None:
    """`text.format` as response_format."""
    if text is None:
        return None
    if isinstance(text, dict) and text.get("verbosity") not in (None, "medium"):
        raise ApiError(400, "text.verbosity: only medium (the model writes as it writes)", param="text.verbosity")
    fmt = text.get("format") if isinstance(text, dict) and set(text) <= {"format", "verbosity"} else ...
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise ApiError(400, 'text must be {"format": {...}}', param="text")
    if fmt.get("type") == "json_schema":
        spec = {k: v for k, v in fmt.items() if k != "type"}
        return {"type": "json_schema", "json_schema": spec}
    return fmt


def _renamed(e: ApiError) -> ApiError:
    """A chat-route error in the Responses API's field names."""
    param, detail = e.param, e.detail
    for ours, theirs in CHAT_NAMES.items():
        if param and param.split("[")[0].split(".")[0] == theirs:
            param, detail = ours + param[len(theirs) :], detail.replace(theirs, ours)
    if param and param.startswith("tools[") and ".function." in param:
        param, detail = param.replace(".function.", "."), detail.replace(".function.", ".")
    if param and param.startswith("text.format"):
        param, detail = param.replace("text.format.json_schema", "text.format"), detail.replace(".json_schema", "")
    return ApiError(e.status, detail, e.headers, param, e.code)


@responses.post("/responses")
async def create_response():
    """A model response: output items from the input, stateless."""
    body = await json_body(request)
    runtime().require_ready()
    m = model()
    try:
        chat = chat_body(body)
        prompt, plan = encode_chat(chat, m)
        params, opt = parse_request(chat, [prompt], None, True, m, runtime().max_waiting)
        params = await with_grammar(params, plan)
    except ApiError as e:
        raise _renamed(e) from None
    out = ResponseEvents(f"resp_{uuid.uuid4().hex}", served_name(m, params), body, plan)
    if opt.stream:
        usage = {"sequences": 0, "prompt_tokens": 0, "completion_tokens": 0}
        pieces = m.runner.stream([prompt], params, 1, [], usage)
        first = await anext(pieces, None)  # a full queue is still a 503 here, not mid-stream
        events = out.stream(first, pieces, usage)
        return Response(
            logged_stream(events, usage), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    ((text, finish, completion, _),) = await m.runner.generate([prompt], params, 1, [])
    record_counts(1, len(prompt), completion)
    return jsonify(out.whole(text, finish, len(prompt), completion))
