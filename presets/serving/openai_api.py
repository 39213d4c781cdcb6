"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

Shared by the model families on the step engine: a family hands the app an adapter (`OpenAIModel`)
that says its name and context length, and how to turn a prompt or chat messages into token ids
and ids back into text. Fields OpenAI defines that we do not support answer 400, never silently
ignored. `stream: true` sends server-sent events whose text concatenates to the non-streamed text.
"""

import json
import time
import uuid
from dataclasses import dataclass

from quart import Blueprint, Response, current_app, jsonify, request

from presets.serving.app import record, runtime
from presets.serving.errors import ApiError
from presets.serving.flag import Flag
from presets.serving.params import SamplingParams, room_left
from presets.serving.streaming import StreamedText, cut_at_stop
from presets.serving.validation import boolean, integer, json_body, number

openai = Blueprint("openai", __name__, url_prefix="/v1")

COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "user", "ignore_eos"}
COMPLETION_FIELDS = COMMON | {"prompt"}
CHAT_FIELDS = COMMON | {"messages"}
MAX_N = 16
STARTED = int(time.time())


@dataclass
class OpenAIModel:
    """What a model family tells the OpenAI routes (callables: the model may still be loading)."""

    name: str
    context: object  # () -> the longest prompt + generation, in tokens
    encode_prompt: object  # (text) -> ids
    encode_messages: object  # (messages) -> ids; raises ApiError(400) when the model cannot chat
    runner: object  # generate(prompts, params, n, stops) and stream(...): see StepRunner
    engine: str = "presets"  # what runs the model: our engine, or "transformers" (generate)


def model() -> OpenAIModel:
    return current_app.extensions["openai_model"]


def _reject_unsupported(body: dict, allowed: set) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unsupported field(s) {unknown}; this server supports {sorted(allowed)}")


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not 1 <= len(stops) <= 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a non-empty string or a list of 1 to 4 non-empty strings")
    return stops


def _request(body: dict, prompts: list[list[int]], default_max: int | None):
    """(params, n, stops, stream, prompts) after validation; the context check gives the numbers."""
    m = model()
    if body.get("model") not in (None, m.name):
        raise ApiError(404, f"model {body.get('model')!r} not found; this server serves {m.name!r}")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ApiError(400, "user must be a string")
    n = integer(body, "n", "", 1, lo=1, hi=MAX_N)
    if len(prompts) * n > runtime().max_waiting:
        raise ApiError(400, f"{len(prompts)} prompt(s) x n={n} is more than the {runtime().max_waiting} "
                       "sequences this server queues; split the request")  # fmt: skip
    if any(not p for p in prompts):
        raise ApiError(400, "prompt is empty: it has no tokens for this model")
    longest = max(len(p) for p in prompts)
    context = m.context()
    room = room_left(context, longest, "this model's maximum context length", "the longest prompt")
    max_tokens = integer(body, "max_tokens", "", default_max, lo=1)
    if max_tokens is None:
        max_tokens = room
    if max_tokens > room:  # OpenAI's rule: a 400, not a shorter answer as the seed routes give
        raise ApiError(
            400,
            f"this model's maximum context length is {context} tokens; the request has {longest} prompt "
            f"tokens plus max_tokens {max_tokens} = {longest + max_tokens}",
        )
    params = SamplingParams(
        temperature=number(body, "temperature", "", 1.0, lo=0, hi=2),
        top_p=number(body, "top_p", "", 1.0, lo=0, hi=1, lo_open=True),
        max_tokens=max_tokens,
        ignore_eos=boolean(body, "ignore_eos", "", False),
        seed=integer(body, "seed", "", None, lo=0, hi=2**63 - 1 - MAX_N),
    )
    return params, n, _stops(body), boolean(body, "stream", "", False)


class StepRunner:
    """Runs OpenAI (and llm-api) requests on a step engine (EngineLoop): real streaming, stop strings end
    sequences."""

    def __init__(self, rt):
        self.rt = rt

    def decode(self, ids: list[int]) -> str:
        return self.rt.tokenizer.decode(ids)

    async def generate(self, prompts, params, n, stops) -> list[tuple[str, str, int]]:
        """(text, finish_reason, completion tokens) per choice."""
        seqs = await self.rt.arun(self.rt.sequences(prompts, params, n, stops))
        record(seqs)
        return [(cut_at_stop(self.decode(s.output), stops)[0], s.finish_reason, len(s.output)) for s in seqs]

    async def stream(self, prompts, params, n, stops):
        """Yield (choice index, new text or None, finish_reason or None) as tokens come out."""
        seqs = self.rt.sequences(prompts, params, n, stops)
        notify = Flag()
        for seq in seqs:
            seq.notify = notify
        deadline = self.rt.submit(seqs)  # 503 now, before the stream starts, if the queue is full
        texts = [StreamedText(self.decode, stops) for _ in seqs]
        finished = [False] * len(seqs)
        try:
            while not all(finished):
                await self.rt.wait(seqs[0], deadline, flag=notify)
                notify.clear()
                for i, seq in enumerate(seqs):
                    if finished[i]:
                        continue
                    done = seq.done.is_set()
                    if done and seq.error:
                        raise ApiError(seq.error_status, seq.error)
                    piece = texts[i].update(list(seq.output), done)
                    if piece:
                        yield i, piece, None
                    if done:
                        finished[i] = True
                        yield i, None, seq.finish_reason
        finally:
            self.rt.cancel(seqs)  # a client that left, or a request past its time, frees its slots


async def _run(prompts, body, default_max, chat: bool):
    params, n, stops, stream = _request(body, prompts, default_max)
    m = model()
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    if stream:
        return await _stream(rid, m, m.runner.stream(prompts, params, n, stops), n * len(prompts), chat)
    results = await m.runner.generate(prompts, params, n, stops)
    choices = []
    for i, (text, finish, _) in enumerate(results):
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "finish_reason": finish, "logprobs": None})  # fmt: skip
        else:
            choices.append({"index": i, "text": text, "finish_reason": finish, "logprobs": None})
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(tokens for _, _, tokens in results)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
    return jsonify(
        id=rid, object="chat.completion" if chat else "text_completion", created=int(time.time()),
        model=m.name, choices=choices, usage=usage,
    )  # fmt: skip


async def _stream(rid: str, m: OpenAIModel, pieces, n_choices: int, chat: bool) -> Response:
    """Server-sent events from the runner's (index, text, finish_reason) pieces, then [DONE]; an error
    after the stream began (the engine stopped, request_timeout) is a last event {"error": ...}."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    first = await anext(pieces, None)  # starts the generation: a full queue is still a 503 here, not mid-stream

    def chunk(i, text=None, finish=None, role=False):
        if chat:
            delta = {"role": "assistant"} if role else ({"content": text} if text is not None else {})
            choice = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}
        body = {"id": rid, "object": kind, "created": int(time.time()), "model": m.name, "choices": [choice]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def events():
        try:
            if chat:
                yield "".join(chunk(i, role=True) for i in range(n_choices))
            if first is not None:
                yield chunk(*first)
            async for piece in pieces:
                yield chunk(*piece)
            yield "data: [DONE]\n\n"
        except ApiError as e:
            yield f"data: {json.dumps({'error': {'message': e.detail, 'code': e.status}})}\n\n"
        finally:
            await pieces.aclose()

    return Response(events(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})


@openai.get("/models")
def models():
    """The one model this server serves."""
    card = {"id": model().name, "object": "model", "created": STARTED, "owned_by": "presets", "engine": model().engine}
    return jsonify(object="list", data=[card])


@openai.post("/completions")
async def completions():
    """OpenAI text completion: prompt (a string or a list of strings)."""
    body = await json_body(request)
    runtime().require_ready()
    _reject_unsupported(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, "prompt must be a string or a non-empty list of strings")
    return await _run([model().encode_prompt(p) for p in prompts], body, 16, chat=False)


@openai.post("/chat/completions")
async def chat_completions():
    """OpenAI chat completion: messages in the model family's chat format."""
    body = await json_body(request)
    runtime().require_ready()
    _reject_unsupported(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects")
    return await _run([model().encode_messages(messages)], body, None, chat=True)
