"""Kaito's preset API for Llama: POST /generate (text completion) and POST /chat."""

import dataclasses

from quart import Blueprint, current_app, jsonify, request

from presets.api.chat import UNSAFE_ERROR, encode_dialog, kaito_dialog, refused
from presets.api.validation import adapter_slot, boolean, integer, json_body, number, reject_unknown, string_list
from presets.engine.params import MAX_TEMPERATURE, SamplingParams
from presets.errors import ApiError
from presets.http.app import record, runtime

completion = Blueprint("llama2_completion", __name__)
chat = Blueprint("llama2_chat", __name__)

COMPLETION_MAX_GEN_LEN = 64  # Meta's example_text_completion default
# Chat's default max_gen_len is None: all the room left in max_seq_len, as in Meta's chat_completion.
ADAPTER_FIELDS = ("adapter", "model")  # beside the prompts: the LoRA adapter to answer with (ours; optional)

# Server settings that clients sometimes send as parameters (Kaito's preset docs list them with the
# request parameters); they are fixed when the server starts.
SERVER_SETTINGS = ("max_seq_len", "max_batch_size")


def kaito_sampling(
    params, where: str, default_max_gen_len: int | None, max_seq_len: int | None = None
) -> SamplingParams:
    """Parse the `parameters` object of Kaito's preset API: temperature, top_p, max_gen_len, ignore_eos, seed.

    The same ranges as the OpenAI routes: temperature in [0, 2], and a max_gen_len over `max_seq_len`
    (room no prompt could leave) is a 400; up to it, max_gen_len is capped to the room the prompt
    leaves, as Meta's generate does ("bounded by max_seq_len")."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ApiError(400, f"{where} must be a JSON object")
    for key in SERVER_SETTINGS:
        if key in params:
            raise ApiError(400, f"{where}.{key} is a server setting (--{key} at start), not a request parameter")
    reject_unknown(params, ("temperature", "top_p", "max_gen_len", "ignore_eos", "seed"), where)
    return SamplingParams(
        temperature=number(params, "temperature", where, SamplingParams.temperature, lo=0, hi=MAX_TEMPERATURE),
        top_p=number(params, "top_p", where, SamplingParams.top_p, lo=0, hi=1, lo_open=True),
        max_tokens=integer(params, "max_gen_len", where, default_max_gen_len, lo=1, hi=max_seq_len),
        ignore_eos=boolean(params, "ignore_eos", where, False),
        seed=integer(params, "seed", where, None, lo=0, hi=2**63 - 1),
    )


def with_adapter(params: SamplingParams, body: dict, rt) -> SamplingParams:
    """`params` for the LoRA adapter the body names by `adapter` (or `model`, as the OpenAI routes take it)."""
    named = [k for k in ADAPTER_FIELDS if body.get(k) is not None]
    if len(named) > 1:
        raise ApiError(400, "adapter and model both name a model; send one", param="adapter")
    if not named:
        return params
    base = current_app.extensions.get("openai_model")
    slot = adapter_slot(body[named[0]], base.name if base else None, rt.adapters, named[0])
    return dataclasses.replace(params, adapter=slot)


@completion.post("/generate")
async def generate():
    """Complete each of `prompts`: {"results": [{"prompt", "response"}, ...]}."""
    body = await json_body(request)
    reject_unknown(body, ("prompts", "parameters", *ADAPTER_FIELDS), "body")
    rt = runtime()
    rt.require_ready()
    prompts = string_list(body.get("prompts"), "prompts", rt.max_waiting)
    params = kaito_sampling(body.get("parameters"), "parameters", COMPLETION_MAX_GEN_LEN, rt.max_seq_len)
    params = with_adapter(params, body, rt)
    ids = [rt.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    seqs = await rt.agenerate(ids, params)
    record(seqs)
    results = [{"prompt": p, "response": rt.tokenizer.decode(s.output)} for p, s in zip(prompts, seqs)]
    return jsonify(results=results)


@chat.post("/chat")
async def chat_completion():
    """Answer each dialog of input_data.input_string: {"results": [[messages..., Assistant], ...]}."""
    body = await json_body(request)
    reject_unknown(body, ("input_data", "parameters", *ADAPTER_FIELDS), "body")
    data = body.get("input_data")
    if not isinstance(data, dict):
        raise ApiError(400, "input_data must be an object with input_string (a list of dialogs)")
    reject_unknown(data, ("input_string", "parameters"), "input_data")
    rt = runtime()
    rt.require_ready()
    dialogs = data.get("input_string")
    if not isinstance(dialogs, list) or not dialogs:
        raise ApiError(400, "input_data.input_string must be a non-empty list of dialogs")
    if len(dialogs) > rt.max_waiting:
        raise ApiError(400, f"input_data.input_string has {len(dialogs)} dialogs; at most {rt.max_waiting} per request")
    dialogs = [kaito_dialog(d, f"input_data.input_string[{i}]") for i, d in enumerate(dialogs)]
    # `parameters` may sit inside input_data or beside it (Kaito's docs show both); inside wins.
    where = "input_data.parameters" if data.get("parameters") is not None else "parameters"
    raw = data.get("parameters") if data.get("parameters") is not None else body.get("parameters")
    params = with_adapter(kaito_sampling(raw, where, None, rt.max_seq_len), body, rt)

    safe = [i for i, d in enumerate(dialogs) if not refused(rt.tokenizer, d)]
    prompts = [encode_dialog(rt.tokenizer, dialogs[i], f"input_data.input_string[{i}]") for i in safe]
    seqs = await rt.agenerate(prompts, params) if safe else []
    record(seqs)
    answers = {i: rt.tokenizer.decode(s.output) for i, s in zip(safe, seqs)}
    results = [
        [{"role": m["role"].capitalize(), "content": m["content"]} for m in d]
        + [{"role": "Assistant", "content": answers.get(i, UNSAFE_ERROR)}]
        for i, d in enumerate(dialogs)
    ]
    return jsonify(results=results)
