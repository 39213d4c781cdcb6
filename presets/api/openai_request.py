"""The OpenAI routes' requests: a body's fields checked once into SamplingParams and Options, each failure a 400 that
names the field (OpenAI's error object). Fields OpenAI defines that we do not support answer 400, never silently
ignored."""

import re
from dataclasses import dataclass

from presets.api.tools import TOOL_FIELDS
from presets.api.validation import adapter_slot, boolean, integer, number
from presets.engine.params import MAX_TEMPERATURE, SamplingParams, room_left
from presets.engine.structured import grammar_for
from presets.errors import ApiError

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
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", *TOOL_FIELDS}
MAX_N = 16


@dataclass
class Options:
    """A validated request's options beyond the sampling parameters."""

    n: int
    stops: list[str]
    stream: bool
    include_usage: bool = False
    echo: bool = False


def reject_unsupported(body: dict, allowed: set) -> None:
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


def _logit_bias(body: dict, vocab: int) -> tuple:
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
        if not (_TOKEN_ID.fullmatch(key) and int(key) < vocab):
            raise ApiError(
                400,
                f"logit_bias: {key[:20]!r} is not a token id of this model (0 to {vocab - 1}, in decimal digits "
                "without leading zeros)",
                param="logit_bias",
            )
        pairs.append((int(key), number(bias, key, "logit_bias", 0.0, lo=-100, hi=100)))
    return tuple(pairs)


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives to return with each token's log probability; None: no log probabilities.
    Completions: logprobs 0-5 (OpenAI's limit), not with echo; chat: logprobs true, top_logprobs 0-20."""
    if not chat:
        if body.get("logprobs") is None or body.get("logprobs") is False:
            return None
        if boolean(body, "echo", "", False):
            raise ApiError(
                400,
                "logprobs with echo is not supported (the prompt's log probabilities are not computed)",
                param="logprobs",
            )
        return integer(body, "logprobs", "", None, lo=0, hi=5)
    top = integer(body, "top_logprobs", "", None, lo=0, hi=20)
    if not boolean(body, "logprobs", "", False):
        if top:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return None
    return top or 0


def parse_request(body: dict, prompts: list[list[int]], default_max: int | None, chat: bool, m, max_waiting: int):
    """(SamplingParams, Options) of a request to model `m` (api/openai.py OpenAIModel), checked once; the context
    check gives the numbers."""
    adapter = adapter_slot(body.get("model"), m.name, list(m.adapters), "model")
    _check_user(body)
    n = integer(body, "n", "", 1, lo=1, hi=MAX_N)
    _neutral(body, "best_of", (None, 1, n), "this server returns every choice it generates (n)")
    for key in m.unsupported:
        neutral = (None, False) if key == "logprobs" else (None, 0, 0.0, {})  # logprobs 0 asks for them
        _neutral(body, key, neutral, f"the {m.engine} engine that runs this model does not implement it")
    if len(prompts) * n > max_waiting:
        raise ApiError(
            400,
            f"{len(prompts)} prompt(s) x n={n} is more than the {max_waiting} sequences this server queues; "
            "split the request",
            param="n",
        )
    if any(not p for p in prompts):
        raise ApiError(400, "prompt is empty: it has no tokens for this model")
    stream = boolean(body, "stream", "", False)
    params = SamplingParams(
        temperature=number(body, "temperature", "", 1.0, lo=0, hi=MAX_TEMPERATURE),
        top_p=number(body, "top_p", "", 1.0, lo=0, hi=1, lo_open=True),
        max_tokens=_max_tokens(body, max(len(p) for p in prompts), m.context(), default_max),
        ignore_eos=boolean(body, "ignore_eos", "", False),
        seed=integer(body, "seed", "", None, lo=0, hi=2**63 - 1 - MAX_N),
        presence_penalty=number(body, "presence_penalty", "", 0.0, lo=-2, hi=2),
        frequency_penalty=number(body, "frequency_penalty", "", 0.0, lo=-2, hi=2),
        logit_bias=_logit_bias(body, m.vocab_size()),
        logprobs=_logprobs(body, chat),
        grammar=_grammar(body),
        adapter=adapter,
    )
    echo = boolean(body, "echo", "", False)
    return params, Options(n, _stops(body), stream, _include_usage(body, stream), echo)


def _check_user(body: dict) -> None:
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ApiError(400, "user must be a string", param="user")


def _grammar(body: dict) -> str | None:
    grammar = grammar_for(body.get("response_format"))
    if grammar is not None and body.get("ignore_eos"):
        raise ApiError(
            400,
            "ignore_eos cannot be combined with a response_format: the text ends where the grammar does",
            param="ignore_eos",
        )
    return grammar


def _max_tokens(body: dict, longest: int, context: int, default_max: int | None) -> int:
    """max_tokens (or OpenAI's newer max_completion_tokens), by default the room the longest prompt leaves."""
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
    return max_tokens


def _include_usage(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise ApiError(
            400, 'stream_options must be {"include_usage": true|false}, with stream: true', param="stream_options"
        )
    return boolean(options or {}, "include_usage", "stream_options", False)


def _is_ids(p) -> bool:
    return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)


def prompt_ids(prompt, vocab: int) -> list[list[int]] | None:
    """Token-id prompts ([1, 306, ...] or a list of such lists), or None when `prompt` is text."""
    if _is_ids(prompt):
        lists = [prompt]
    elif isinstance(prompt, list) and prompt and all(map(_is_ids, prompt)):
        lists = prompt
    else:
        lists = None
    if lists is not None and any(not 0 <= t < vocab for p in lists for t in p):
        raise ApiError(400, f"prompt has token ids outside this model's 0..{vocab - 1}", param="prompt")
    return lists
