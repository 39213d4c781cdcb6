"""llm-api's routes: POST /generate, POST /agenerate (server-sent events), POST /embeddings, GET /check.

    POST /generate   {"prompt": "...", "params": {"n_predict": 300, "temp": 0.1, ...}}  -> "generated text"
    POST /agenerate  the same body -> text/event-stream, one `data:` event per new piece of text
    POST /embeddings {"text": "..."} -> [0.0123, ...] (n_embd floats)

The generated text continues the prompt (prompt + text is the whole text, so it may start with a
space). Parameters and defaults are llm-api's; unknown ones are a 400 that names them.
"""

import random
import re
import threading

from quart import Blueprint, Response, current_app, jsonify, request

from presets.api.validation import boolean, integer, json_body, number, reject_unknown
from presets.engine.params import SamplingParams, room_left
from presets.errors import ApiError
from presets.http.app import logged_stream, record_counts, runtime

llm_api = Blueprint("llm_api", __name__)

# llm-api's defaults for Llama/Alpaca/Vicuna.
DEFAULTS = {"n_predict": 300, "temp": 0.1, "top_k": 40, "top_p": 0.95, "stop": [], "repeat_penalty": 1.3}
PARAMS = (*DEFAULTS, "repeat_last_n", "seed", "ignore_eos")
MAX_STOPS = 16


async def _body(allowed) -> dict:
    data = await json_body(request, lenient_escapes=True)
    reject_unknown(data, allowed, "body")
    return data


def _stops(value) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, f"params.stop must be a string or a list of at most {MAX_STOPS} strings")
    return [s for s in stops if s]


def parse(body: dict, settings) -> tuple[list[int], SamplingParams, list[str]]:
    """(prompt ids, sampling parameters, stop strings) of a /generate or /agenerate body."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string")
    params = body.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ApiError(400, "params must be a JSON object")
    reject_unknown(params, PARAMS, "params")
    n_predict = integer(params, "n_predict", "params", DEFAULTS["n_predict"], lo=-1)
    if n_predict == 0:
        raise ApiError(400, "params.n_predict must be >= 1, or -1 for as many as the context holds")
    seed = integer(params, "seed", "params", None, lo=0, hi=2**63 - 1)
    sampling = SamplingParams(
        temperature=number(params, "temp", "params", DEFAULTS["temp"], lo=0, hi=100),
        top_p=number(params, "top_p", "params", DEFAULTS["top_p"], lo=0, hi=1, lo_open=True),
        top_k=integer(params, "top_k", "params", DEFAULTS["top_k"], lo=0),
        repeat_penalty=number(params, "repeat_penalty", "params", DEFAULTS["repeat_penalty"], lo=0.01, hi=100),
        repeat_last_n=integer(params, "repeat_last_n", "params", settings.repeat_last_n, lo=0),
        max_tokens=None if n_predict == -1 else n_predict,
        ignore_eos=boolean(params, "ignore_eos", "params", False),
        seed=settings.next_seed() if seed is None else seed,
    )
    ids = settings.encode(prompt)
    if not ids:
        raise ApiError(400, "prompt is empty: it has no tokens for this model (whose file adds no BOS)")
    return ids, sampling, _stops(params.get("stop", DEFAULTS["stop"]))


async def _prepared():
    body = await _body(("prompt", "params"))
    rt = runtime()
    rt.require_ready()
    ids, params, stops = parse(body, current_app.extensions["llm_api"])
    room_left(rt.max_seq_len, len(ids), "ctx_size")  # before a stream starts; Runtime.sequences caps n_predict to it
    return ids, params, stops


@llm_api.post("/generate")
async def generate():
    """The generated text, as a JSON string."""
    ids, params, stops = await _prepared()
    ((text, _, generated, _),) = await current_app.extensions["llm_api"].runner.generate([ids], params, 1, stops)
    record_counts(1, len(ids), generated)
    return jsonify(text)


def _event(text: str, event: str | None = None) -> str:
    """One server-sent event; a multi-line text is several data lines, which a client joins with \\n
    (SSE has no way to send a carriage return: one arrives as a line break)."""
    head = f"event: {event}\n" if event else ""
    return head + "".join(f"data: {line}\n" for line in re.split(r"\r\n|\r|\n", text)) + "\n"


@llm_api.post("/agenerate")
async def agenerate():
    """Server-sent events, one per new piece of text; their data concatenates to /generate's text."""
    ids, params, stops = await _prepared()
    usage = {"sequences": 0, "prompt_tokens": 0, "completion_tokens": 0}
    pieces = current_app.extensions["llm_api"].runner.stream([ids], params, 1, stops, usage)
    first = await anext(pieces, None)  # starts generating: a full queue is still a 503 here, not mid-stream

    async def events():
        try:
            if first is not None and first[1]:
                yield _event(first[1])
            async for _, text, *_ in pieces:
                if text:
                    yield _event(text)
        except ApiError as e:
            usage["end"] = f"error_{e.status}"
            yield _event(e.detail, "error")
        finally:
            await pieces.aclose()

    return Response(logged_stream(events(), usage), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})


@llm_api.post("/embeddings")
async def embeddings():
    """The text's embedding: the mean of the model's final (normalized) hidden states, L2-normalized."""
    body = await _body(("text",))
    text = body.get("text")
    if not isinstance(text, str):
        raise ApiError(400, "text must be a string")
    rt = runtime()
    rt.require_ready()
    ids = current_app.extensions["llm_api"].encode(text)
    if not ids:
        raise ApiError(400, "text is empty: it has no tokens for this model (whose file adds no BOS)")
    if len(ids) > rt.max_seq_len:
        raise ApiError(400, f"text is {len(ids)} tokens; ctx_size is {rt.max_seq_len}")
    vector = await rt.acall(lambda: rt.engine.embed(ids))
    record_counts(1, len(ids), 0)
    return jsonify([float(x) for x in vector])


@llm_api.get("/check")
def check():
    """llm-api's status route (the server is up; /healthz says whether the model is ready)."""
    return jsonify("Ok")


class LlmApiSettings:
    """What the routes need from the server: the tokenizer, the runner, the default window and random seed."""

    def __init__(self, rt, runner, repeat_last_n: int, seed: int):
        self.rt = rt
        self.runner = runner
        self.repeat_last_n = repeat_last_n
        self._seeds = None if seed < 0 else random.Random(seed)
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        return self.rt.tokenizer.encode(text)

    def next_seed(self) -> int | None:
        """A request without a seed: from the server's seeded sequence (model_params.seed), or random (-1)."""
        if self._seeds is None:
            return None
        with self._lock:
            return self._seeds.randrange(2**63 - 1)
