"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

Shared by the model families on the step engine: a family hands the app an adapter (`OpenAIModel`)
that says its name and context length, and how to turn a prompt or chat messages into token ids
and ids back into text. Fields OpenAI defines that we do not support answer 400, never silently
ignored. `stream: true` sends server-sent events whose text concatenates to the non-streamed text.
"""

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

from quart import Blueprint, current_app, jsonify, request

from presets.api.chat import openai_messages
from presets.api.openai_answer import logprobs_object, stream_answer, usage_object
from presets.api.openai_request import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    parse_request,
    prompt_ids,
    reject_unsupported,
)
from presets.api.tools import ToolPlan, for_model, parse_tools, plan_for_template
from presets.api.validation import adapter_slot, json_body
from presets.engine.params import SamplingParams
from presets.errors import ApiError
from presets.http.app import record_counts, runtime

openai = Blueprint("openai", __name__, url_prefix="/v1")

STARTED = int(time.time())


class Runner(Protocol):
    """Runs a request's prompts: engine/runner.py StepRunner on the step engine, models/hf/runner.py HFRunner on
    transformers' generate."""

    async def generate(self, prompts: list[list[int]], params: SamplingParams, n: int, stops: list[str]) -> list:
        """(text, finish_reason, completion tokens, log probabilities or None) per choice."""

    def stream(
        self, prompts: list[list[int]], params: SamplingParams, n: int, stops: list[str], usage: dict | None = None
    ) -> AsyncIterator[tuple]:
        """(choice index, new text or None, finish_reason or None, log probabilities or None) as tokens come."""


class OpenAIModel(Protocol):
    """What a model family tells the OpenAI routes (servers/llama.py, hf.py, llm_api.py each have one). The
    methods read the model, so they are called only once it has loaded."""

    name: str  # the model id of /v1/models
    engine: str  # what runs the model: "presets" (our engines) or "transformers" (generate)
    unsupported: tuple[str, ...]  # fields this engine cannot honour: a 400 naming them unless neutral
    adapters: list[str]  # LoRA adapters served besides the base model; a request's `model` may name one
    tool_call_parser: str  # how the model writes tool calls (api/tool_parsers.py), or "auto": from its template
    runner: Runner

    def context(self) -> int:
        """The longest prompt + generation, in tokens."""

    def vocab_size(self) -> int:
        """The number of token ids (token-id prompts and logit_bias are checked against it)."""

    def encode_prompt(self, text: str, special: bool = True) -> list[int]:
        """special: with what the tokenizer adds to a prompt (BOS); false: the text's own tokens only."""

    def decode(self, ids: list[int]) -> str:
        """The text of ids (each below vocab_size()), special tokens written as text (POST /detokenize)."""

    def token_strs(self, ids: list[int]) -> list[str]:
        """Each id's string in the vocabulary ("▁Paris"), as transformers' convert_ids_to_tokens."""

    def encode_messages(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Validated messages (api/chat.py) as prompt ids, with `tools` for a template that takes them;
        ApiError(400) when the model cannot chat."""

    def chat_template(self):
        """The model's ChatTemplate (models/chat_template.py), or None (Meta's Llama-2 format, or none)."""


def model() -> OpenAIModel:
    return current_app.extensions["openai_model"]


async def _run(prompts, body, default_max, chat: bool, echoes=None, tools: ToolPlan | None = None):
    """Generate for validated token-id `prompts`; `echoes`: the prompts' text, for echo; `tools`: the chat
    request's tool plan."""
    m = model()
    params, opt = parse_request(body, prompts, default_max, chat, m, runtime().max_waiting)
    if tools is not None and tools.forced and opt.stops:
        raise ApiError(400, "stop cannot be combined with a forced tool call: it would cut the call", param="stop")
    params = await with_grammar(params, tools)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    echoes = echoes if opt.echo else None
    if opt.stream:
        usage = {"sequences": 0, "prompt_tokens": 0, "completion_tokens": 0}
        pieces = m.runner.stream(prompts, params, opt.n, opt.stops, usage)
        return await stream_answer(rid, served_name(m, params), pieces, opt, len(prompts), chat, usage, echoes, tools)
    results = await m.runner.generate(prompts, params, opt.n, opt.stops)
    prompt_tokens, completion = sum(map(len, prompts)), sum(r[2] for r in results)
    record_counts(len(results), prompt_tokens, completion)  # the request's log line
    decode = runtime().tokenizer.decode
    choices = []
    for i, (text, finish, _, lps) in enumerate(results):
        logprobs = logprobs_object(lps, chat, decode)
        if chat:
            content, calls = tools.split(text, finish) if tools else (text, [])
            message = {"role": "assistant", "content": content} | ({"tool_calls": calls} if calls else {})
            finish = "tool_calls" if calls else finish
            choices.append({"index": i, "message": message, "finish_reason": finish, "logprobs": logprobs})
        else:
            text = echoes[i // opt.n] + text if echoes else text
            choices.append({"index": i, "text": text, "finish_reason": finish, "logprobs": logprobs})
    return jsonify(
        id=rid,
        object="chat.completion" if chat else "text_completion",
        created=int(time.time()),
        model=served_name(m, params),
        choices=choices,
        usage=usage_object(prompt_tokens, completion),
    )


async def with_grammar(params: SamplingParams, tools: ToolPlan | None) -> SamplingParams:
    """`params` with the grammar a forced tool call needs, and any grammar checked against the model."""
    param = "response_format"
    if tools is not None:
        if params.logprobs is not None:
            raise ApiError(400, "logprobs cannot be combined with tools (unless tool_choice is none)", param="logprobs")
        if params.grammar is not None:
            raise ApiError(
                400,
                "response_format cannot be combined with tools (unless tool_choice is none)",
                param="response_format",
            )
        if tools.forced and params.ignore_eos:
            raise ApiError(400, "ignore_eos cannot be combined with a forced tool call", param="ignore_eos")
        if tools.forced:
            params, param = dataclasses.replace(params, grammar=tools.grammar()), "tool_choice"
    if params.grammar is None:
        return params
    structured = runtime().structured
    if structured is None:
        asked = "required or a named function" if param == "tool_choice" else "json_object/json_schema"
        raise ApiError(
            400,
            f"{param} {asked} needs decoding by a grammar: this server cannot follow a grammar for this model "
            "(docs/api.md, structured output)",
            param=param,
        )
    try:
        await structured.check(params.grammar)
    except ApiError as e:
        if param == "tool_choice":  # the error quotes the grammar built from the tools: say which part
            why = e.detail.split("\n")[0].removeprefix("response_format: unsupported schema: ")[:200]
            raise ApiError(
                400, f"tools: a function's parameters cannot be followed by the grammar engine: {why}", param="tools"
            ) from None
        raise
    return params


def served_name(m: OpenAIModel, params: SamplingParams) -> str:
    """The model a request ran on, as its answer names it: the base model's name or its LoRA adapter's."""
    return m.adapters[params.adapter - 1] if params.adapter else m.name


@openai.get("/models")
def models():
    """The base model, then each LoRA adapter with the base as its parent (as vLLM lists them)."""
    m = model()
    adapters = [_card(a, parent=m.name) for a in m.adapters if a]  # an unloaded one leaves a None
    return jsonify(object="list", data=[_card(m.name)] + adapters)


@openai.get("/models/<path:model_id>")
def model_card(model_id: str):
    """The model `model_id`: the base model or one of its adapters."""
    m = model()
    slot = adapter_slot(model_id, m.name, list(m.adapters), "model")
    return jsonify(_card(model_id, parent=m.name if slot else None))


def _card(name: str, parent: str | None = None) -> dict:
    card = {"id": name, "object": "model", "created": STARTED, "owned_by": "presets", "engine": model().engine}
    return {**card, "parent": parent}


@openai.post("/completions")
async def completions():
    """OpenAI text completion: prompt (a string, a list of strings, token ids or a list of token-id lists)."""
    body = await json_body(request)
    rt = runtime()
    rt.require_ready()
    reject_unsupported(body, COMPLETION_FIELDS)
    m = model()
    prompt = body.get("prompt")
    ids = prompt_ids(prompt, m.vocab_size())
    if ids is None:
        texts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(texts, list) or not texts or not all(isinstance(p, str) for p in texts):
            raise ApiError(
                400,
                "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids",
                param="prompt",
            )
        ids = [m.encode_prompt(p) for p in texts]
    else:
        texts = [rt.tokenizer.decode(p) for p in ids] if body.get("echo") else None
    return await _run(ids, body, 16, chat=False, echoes=texts)


def encode_chat(body: dict, m: OpenAIModel) -> tuple[list[int], ToolPlan | None]:
    """(prompt ids, tool plan) of a chat request's messages and tools, as the model's template takes them."""
    messages = openai_messages(body.get("messages"), tools=True)
    plan, template = parse_tools(body), m.chat_template()
    takes_tools = template is not None and template.takes_tools
    if plan is not None:
        plan_for_template(plan, template, m.tool_call_parser)
    return m.encode_messages(for_model(messages, plan, takes_tools), tools=plan and plan.template_tools), plan


@openai.post("/chat/completions")
async def chat_completions():
    """OpenAI chat completion: messages in the model family's chat format, with tools (api/tools.py)."""
    body = await json_body(request)
    runtime().require_ready()
    reject_unsupported(body, CHAT_FIELDS)
    prompt, plan = encode_chat(body, model())
    return await _run([prompt], body, None, chat=True, tools=plan)
