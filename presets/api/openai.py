"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

Shared by the model families on the step engine: a family hands the app an adapter (`OpenAIModel`)
that says its name and context length, and how to turn a prompt or chat messages into token ids
and ids back into text. Fields OpenAI defines that we do not support answer 400, never silently
ignored. `stream: true` sends server-sent events whose text concatenates to the non-streamed text.
"""

import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from quart import Blueprint, Response, current_app, jsonify, request

from presets.api.chat import openai_messages
from presets.api.errors import ApiError, openai_error
from presets.api.validation import boolean, integer, json_body, number
from presets.engine.params import MAX_TEMPERATURE, SamplingParams, room_left
from presets.engine.structured import grammar_for
from presets.http.app import logged_stream, runtime

openai = Blueprint("openai", __name__, url_prefix="/v1")

# The fields each route takes. Fields of OpenAI's API not listed are a 400 that names them, never ignored.
COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "user",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "response_format",
}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "best_of"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
MAX_N = 16
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
    runner: Runner

    def context(self) -> int:
        """The longest prompt + generation, in tokens."""

    def vocab_size(self) -> int:
        """The number of token ids (token-id prompts and logit_bias are checked against it)."""

    def encode_prompt(self, text: str) -> list[int]: ...

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """Validated messages (api/chat.py) as prompt ids; ApiError(400) when the model cannot chat."""


@dataclass
class Options:
    """A validated request's options beyond the sampling parameters."""

    n: int
    stops: list[str]
    stream: bool
    include_usage: bool = False
    echo: bool = False


def model() -> OpenAIModel:
    return current_app.extensions["openai_model"]


def _reject_unsupported(body: dict, allowed: set) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unsupported field(s) {unknown}; this server supports {sorted(allowed)}", param=unknown[0])


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not 1 <= len(stops) <= 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a non-empty string or a list of 1 to 4 non-empty strings", param="stop")
    return stops


def _neutral(body: dict, key: str, neutral: tuple, why: str) -> None:
    """A field we accept only at its neutral values (those that change nothing); others are a 400 saying why."""
    value = body.get(key)

    def same(n) -> bool:  # (0 == False in Python: logprobs 0 is not logprobs false)
        if n is None or isinstance(n, bool):
            return value is n
        return value == n and not isinstance(value, bool)

    if not any(same(n) for n in neutral):
        raise ApiError(400, f"{key}={body[key]!r} is not supported: {why}", param=key)


MAX_LOGIT_BIAS = 300  # entries, as OpenAI's API allows
_TOKEN_ID = re.compile(r"0|[1-9][0-9]{0,9}")  # one spelling per id: ASCII digits, no leading zeros


def _logit_bias(body: dict, vocab: int | None) -> tuple:
    """(token id, bias) pairs: at most 300, one per token, each bias in [-100, 100]."""
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise ApiError(400, "logit_bias must be an object mapping token ids to numbers", param="logit_bias")
    if len(bias) > MAX_LOGIT_BIAS:
        raise ApiError(400, f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS}", param="logit_bias")
    pairs = []
    for key in bias:
        if not (_TOKEN_ID.fullmatch(key) and (vocab is None or int(key) < vocab)):
            raise ApiError(
                400,
                f"logit_bias: {key[:20]!r} is not a token id of this model (0 to "
                f"{vocab and vocab - 1}, in decimal digits without leading zeros)",
                param="logit_bias",
            )
        pairs.append((int(key), number(bias, key, "logit_bias", 0.0, lo=-100, hi=100)))
    return tuple(pairs)


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives to return with each token's log probability; None: no log probabilities.
    Completions: logprobs 0-5 (OpenAI's limit); chat: logprobs true, top_logprobs 0-20."""
    if not chat:
        return integer(body, "logprobs", "", None, lo=0, hi=5) if body.get("logprobs") is not False else None
    top = integer(body, "top_logprobs", "", None, lo=0, hi=20)
    if not boolean(body, "logprobs", "", False):
        if top:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return None
    return top or 0


def _request(body: dict, prompts: list[list[int]], default_max: int | None, chat: bool):
    """(SamplingParams, Options) of a validated request; the context check gives the numbers."""
    m = model()
    if body.get("model") not in (None, m.name):
        raise ApiError(404, f"model {body.get('model')!r} not found; this server serves {m.name!r}", param="model")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ApiError(400, "user must be a string", param="user")
    n = integer(body, "n", "", 1, lo=1, hi=MAX_N)
    _neutral(body, "best_of", (None, 1, n), "this server returns every choice it generates (n)")
    grammar = grammar_for(body.get("response_format"))
    if grammar is not None and body.get("ignore_eos"):
        raise ApiError(
            400,
            "ignore_eos cannot be combined with a response_format: the text ends where the grammar does",
            param="ignore_eos",
        )
    for key in m.unsupported:
        neutral = (None, False) if key == "logprobs" else (None, 0, 0.0, {})  # logprobs 0 asks for them
        _neutral(body, key, neutral, f"the {m.engine} engine that runs this model does not implement it")
    logprobs = _logprobs(body, chat)
    if logprobs is not None and boolean(body, "echo", "", False):
        raise ApiError(
            400,
            "logprobs with echo is not supported (the prompt's log probabilities are not computed)",
            param="logprobs",
        )
    if len(prompts) * n > runtime().max_waiting:
        raise ApiError(
            400,
            f"{len(prompts)} prompt(s) x n={n} is more than the {runtime().max_waiting} "
            "sequences this server queues; split the request",
            param="n",
        )
    if any(not p for p in prompts):
        raise ApiError(400, "prompt is empty: it has no tokens for this model")
    longest = max(len(p) for p in prompts)
    context = m.context()
    room = room_left(context, longest, "this model's maximum context length", "the longest prompt")
    max_tokens = integer(body, "max_tokens", "", default_max, lo=1)
    newer = integer(body, "max_completion_tokens", "", None, lo=1)  # OpenAI's newer name for it
    if newer is not None and body.get("max_tokens") not in (None, newer):
        raise ApiError(400, "max_tokens and max_completion_tokens differ; send one", param="max_completion_tokens")
    max_tokens = newer or max_tokens or room
    if max_tokens > room:  # OpenAI's rule: a 400, not a shorter answer as the Kaito routes give
        raise ApiError(
            400,
            f"this model's maximum context length is {context} tokens; the request has {longest} prompt "
            f"tokens plus max_tokens {max_tokens} = {longest + max_tokens}",
            param="max_tokens",
        )
    stream = boolean(body, "stream", "", False)
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise ApiError(
            400, 'stream_options must be {"include_usage": true|false}, with stream: true', param="stream_options"
        )
    params = SamplingParams(
        temperature=number(body, "temperature", "", 1.0, lo=0, hi=MAX_TEMPERATURE),
        top_p=number(body, "top_p", "", 1.0, lo=0, hi=1, lo_open=True),
        max_tokens=max_tokens,
        ignore_eos=boolean(body, "ignore_eos", "", False),
        seed=integer(body, "seed", "", None, lo=0, hi=2**63 - 1 - MAX_N),
        presence_penalty=number(body, "presence_penalty", "", 0.0, lo=-2, hi=2),
        frequency_penalty=number(body, "frequency_penalty", "", 0.0, lo=-2, hi=2),
        logit_bias=_logit_bias(body, m.vocab_size()),
        logprobs=logprobs,
        grammar=grammar,
    )
    include_usage = boolean(options or {}, "include_usage", "stream_options", False)
    return params, Options(n, _stops(body), stream, include_usage, boolean(body, "echo", "", False))


def _is_ids(p) -> bool:
    return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)


def prompt_ids(prompt, vocab: int | None) -> list[list[int]] | None:
    """Token-id prompts ([1, 306, ...] or a list of such lists), or None when `prompt` is text."""
    if _is_ids(prompt):
        lists = [prompt]
    elif isinstance(prompt, list) and prompt and all(map(_is_ids, prompt)):
        lists = prompt
    else:
        lists = None
    if lists is not None and vocab is not None and any(not 0 <= t < vocab for p in lists for t in p):
        raise ApiError(400, f"prompt has token ids outside this model's 0..{vocab - 1}", param="prompt")
    return lists


async def _run(prompts, body, default_max, chat: bool, echoes=None):
    """Generate for validated token-id `prompts`; `echoes`: the prompts' text, for echo."""
    params, opt = _request(body, prompts, default_max, chat)
    if params.grammar is not None:
        structured = runtime().structured
        if structured is None:
            raise ApiError(
                400,
                "response_format json_object/json_schema needs a model with a tokenizer.json on our "
                "engine; this one cannot follow a grammar",
                param="response_format",
            )
        await structured.check(params.grammar)
    m = model()
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    echoes = echoes if opt.echo else None
    if opt.stream:
        usage = {"sequences": 0, "prompt_tokens": 0, "completion_tokens": 0}
        pieces = m.runner.stream(prompts, params, opt.n, opt.stops, usage)
        return await _stream(rid, m, pieces, opt, len(prompts), chat, usage, echoes)
    results = await m.runner.generate(prompts, params, opt.n, opt.stops)
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
    completion = sum(r[2] for r in results)
    return jsonify(
        id=rid,
        object="chat.completion" if chat else "text_completion",
        created=int(time.time()),
        model=m.name,
        choices=choices,
        usage=_usage(sum(len(p) for p in prompts), completion),
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


async def _stream(rid, m: OpenAIModel, pieces, opt: Options, n_prompts: int, chat: bool, usage: dict, echoes):
    """Server-sent events from the runner's (index, text, finish_reason, logprobs) pieces, then [DONE]; an error
    after the stream began (the engine stopped, request_timeout) is a last event {"error": ...}. The request's
    log line is written when the stream ends, with the tokens it got (the runner counts them in `usage`)."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    first = await anext(pieces, None)  # starts the generation: a full queue is still a 503 here, not mid-stream
    n_choices = opt.n * n_prompts
    extra = {"usage": None} if opt.include_usage else {}
    decode = runtime().tokenizer.decode  # (the events are sent outside the request's context)

    def event(choices, **more):
        body = {"id": rid, "object": kind, "created": int(time.time()), "model": m.name, "choices": choices}
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
            yield f"data: {json.dumps(openai_error(e.status, e.detail, e.param))}\n\n"
        finally:
            await pieces.aclose()

    return Response(logged_stream(events(), usage), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})


@openai.get("/models")
def models():
    """The one model this server serves."""
    return jsonify(object="list", data=[_card()])


@openai.get("/models/<path:model_id>")
def model_card(model_id: str):
    """The model `model_id`, when it is the one this server serves."""
    if model_id != model().name:
        raise ApiError(404, f"model {model_id!r} not found; this server serves {model().name!r}", param="model")
    return jsonify(_card())


def _card() -> dict:
    return {"id": model().name, "object": "model", "created": STARTED, "owned_by": "presets", "engine": model().engine}


@openai.post("/completions")
async def completions():
    """OpenAI text completion: prompt (a string, a list of strings, token ids or a list of token-id lists)."""
    body = await json_body(request)
    rt = runtime()
    rt.require_ready()
    _reject_unsupported(body, COMPLETION_FIELDS)
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
    _reject_unsupported(body, CHAT_FIELDS)
    return await _run([model().encode_messages(openai_messages(body.get("messages")))], body, None, chat=True)
