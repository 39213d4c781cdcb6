"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

Shared by the model families on the step engine: a family hands the app an adapter (`OpenAIModel`)
that says its name and context length, and how to turn a prompt or chat messages into token ids
and ids back into text. Fields OpenAI defines that we do not support answer 400, never silently
ignored. `stream: true` sends server-sent events whose text concatenates to the non-streamed text.
"""

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

from quart import Blueprint, Response, current_app, jsonify, request

from presets.api.chat import openai_messages
from presets.api.openai_request import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    Options,
    parse_request,
    prompt_ids,
    reject_unsupported,
)
from presets.api.validation import adapter_slot, json_body
from presets.engine.params import SamplingParams
from presets.errors import ApiError, openai_error
from presets.http.app import logged_stream, record_counts, runtime

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

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """Validated messages (api/chat.py) as prompt ids; ApiError(400) when the model cannot chat."""


def model() -> OpenAIModel:
    return current_app.extensions["openai_model"]


async def _run(prompts, body, default_max, chat: bool, echoes=None):
    """Generate for validated token-id `prompts`; `echoes`: the prompts' text, for echo."""
    m = model()
    params, opt = parse_request(body, prompts, default_max, chat, m, runtime().max_waiting)
    if params.grammar is not None:
        structured = runtime().structured
        if structured is None:
            raise ApiError(
                400,
                "response_format json_object/json_schema needs decoding by a grammar, which this server "
                "cannot do for this model (docs/api.md: structured output)",
                param="response_format",
            )
        await structured.check(params.grammar)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    echoes = echoes if opt.echo else None
    if opt.stream:
        usage = {"sequences": 0, "prompt_tokens": 0, "completion_tokens": 0}
        pieces = m.runner.stream(prompts, params, opt.n, opt.stops, usage)
        return await _stream(rid, served_name(m, params), pieces, opt, len(prompts), chat, usage, echoes)
    results = await m.runner.generate(prompts, params, opt.n, opt.stops)
    prompt_tokens, completion = sum(map(len, prompts)), sum(r[2] for r in results)
    record_counts(len(results), prompt_tokens, completion)  # the request's log line
    decode = runtime().tokenizer.decode
    choices = []
    for i, (text, finish, _, lps) in enumerate(results):
        if chat:
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                    "logprobs": _logprobs_object(lps, chat, decode),
                }
            )
        else:
            text = echoes[i // opt.n] + text if echoes else text
            choices.append(
                {"index": i, "text": text, "finish_reason": finish, "logprobs": _logprobs_object(lps, chat, decode)}
            )
    return jsonify(
        id=rid,
        object="chat.completion" if chat else "text_completion",
        created=int(time.time()),
        model=served_name(m, params),
        choices=choices,
        usage=_usage(prompt_tokens, completion),
    )


def _logprobs_object(entries, chat: bool, text):
    """OpenAI's logprobs of a choice (or of a chunk's tokens) from (token id, (logprob, top), text offset)
    entries; None without them. A token is shown as its own decoded text (a piece of a character that
    byte-level BPE splits shows as U+FFFD)."""
    if entries is None:
        return None
    if chat:

        def item(t, lp):
            return {"token": text([t]), "logprob": lp, "bytes": list(text([t]).encode())}

        return {
            "content": [item(t, lp) | {"top_logprobs": [item(a, v) for a, v in top]} for t, (lp, top), _ in entries]
        }
    return {
        "tokens": [text([t]) for t, _, _ in entries],
        "token_logprobs": [lp for _, (lp, _), _ in entries],
        "top_logprobs": [{text([a]): v for a, v in top} for _, (_, top), _ in entries],
        "text_offset": [offset for _, _, offset in entries],
    }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def served_name(m: OpenAIModel, params: SamplingParams) -> str:
    """The model a request ran on, as its answer names it: the base model's name or its LoRA adapter's."""
    return m.adapters[params.adapter - 1] if params.adapter else m.name


async def _stream(rid, name: str, pieces, opt: Options, n_prompts: int, chat: bool, usage: dict, echoes):
    """Server-sent events from the runner's (index, text, finish_reason, logprobs) pieces, then [DONE]; an error
    after the stream began (the engine stopped, request_timeout) is a last event {"error": ...}. The request's
    log line is written when the stream ends, with the tokens it got (the runner counts them in `usage`)."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    first = await anext(pieces, None)  # starts the generation: a full queue is still a 503 here, not mid-stream
    n_choices = opt.n * n_prompts
    extra = {"usage": None} if opt.include_usage else {}
    decode = runtime().tokenizer.decode  # (the events are sent outside the request's context)

    def event(choices, **more):
        body = {"id": rid, "object": kind, "created": int(time.time()), "model": name, "choices": choices}
        return f"data: {json.dumps(body | extra | more, ensure_ascii=False)}\n\n"

    def chunk(i, text=None, finish=None, lps=None, role=False):
        lp = _logprobs_object(lps, chat, decode)
        if chat:
            delta = {"role": "assistant"} if role else ({"content": text} if text is not None else {})
            return event([{"index": i, "delta": delta, "finish_reason": finish, "logprobs": lp}])
        return event([{"index": i, "text": text or "", "finish_reason": finish, "logprobs": lp}])

    async def events():
        try:
            if chat:
                yield "".join(chunk(i, role=True) for i in range(n_choices))
            if echoes:
                yield "".join(chunk(i, echoes[i // opt.n]) for i in range(n_choices))
            if first is not None:
                yield chunk(*first)
            async for piece in pieces:
                yield chunk(*piece)
            if opt.include_usage:
                yield event([], usage=_usage(usage["prompt_tokens"], usage["completion_tokens"]))
            yield "data: [DONE]\n\n"
        except ApiError as e:
            usage["end"] = f"error_{e.status}"
            yield f"data: {json.dumps(openai_error(e.status, e.detail, e.param, e.code))}\n\n"
        finally:
            await pieces.aclose()

    return Response(logged_stream(events(), usage), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})


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


@openai.post("/chat/completions")
async def chat_completions():
    """OpenAI chat completion: messages in the model family's chat format."""
    body = await json_body(request)
    runtime().require_ready()
    reject_unsupported(body, CHAT_FIELDS)
    return await _run([model().encode_messages(openai_messages(body.get("messages")))], body, None, chat=True)
