"""The OpenAI routes' answers as they are sent: log probabilities and usage in OpenAI's shapes, and a streamed
answer's server-sent events (chunks, tool-call deltas, the usage chunk, [DONE], an error as a last event)."""

import json
import time

from quart import Response

from presets.api.openai_request import Options
from presets.api.tools import CallStream
from presets.errors import ApiError, openai_error
from presets.http.app import logged_stream, runtime


def logprobs_object(entries, chat: bool, text):
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


def usage_object(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Events:
    """The server-sent events of one streamed answer: chunks in OpenAI's shape for its route."""

    def __init__(self, rid: str, name: str, chat: bool, include_usage: bool, tools, n_choices: int):
        self.rid, self.name, self.chat = rid, name, chat
        self.kind = "chat.completion.chunk" if chat else "text_completion"
        self.extra = {"usage": None} if include_usage else {}
        self.decode = runtime().tokenizer.decode  # (the events are sent outside the request's context)
        self.calls = {i: CallStream(tools) for i in range(n_choices)} if tools else {}

    def event(self, choices, **more) -> str:
        body = {
            "id": self.rid,
            "object": self.kind,
            "created": int(time.time()),
            "model": self.name,
            "choices": choices,
        }
        return f"data: {json.dumps(body | self.extra | more, ensure_ascii=False)}\n\n"

    def chunk(self, i, text=None, finish=None, lps=None, role=False) -> str:
        lp = logprobs_object(lps, self.chat, self.decode)
        if self.chat:
            delta = {"role": "assistant"} if role else ({"content": text} if text is not None else {})
            return self.event([{"index": i, "delta": delta, "finish_reason": finish, "logprobs": lp}])
        return self.event([{"index": i, "text": text or "", "finish_reason": finish, "logprobs": lp}])

    def piece(self, i, text=None, finish=None, lps=None) -> str:
        """A runner's piece as events; a choice with tools sends content until a call may begin, and its calls
        once it ends: per call, a delta with its id and name, then one with its arguments."""
        if i not in self.calls:
            return self.chunk(i, text, finish, lps)
        out = self.chunk(i, sent) if (sent := self.calls[i].feed(text or "")) else ""
        if finish is None:
            return out
        rest, made = self.calls[i].finish(finish)
        out += self.chunk(i, rest) if rest else ""
        for k, c in enumerate(made):
            head = {"index": k, "id": c["id"], "type": "function", "function": c["function"] | {"arguments": ""}}
            tail = {"index": k, "function": {"arguments": c["function"]["arguments"]}}
            out += "".join(
                self.event([{"index": i, "delta": {"tool_calls": [d]}, "finish_reason": None}]) for d in (head, tail)
            )
        return out + self.event([{"index": i, "delta": {}, "finish_reason": "tool_calls" if made else finish}])


async def stream_answer(
    rid, name: str, pieces, opt: Options, n_prompts: int, chat: bool, usage: dict, echoes, tools=None
):
    """Server-sent events from the runner's (index, text, finish_reason, logprobs) pieces, then [DONE]; an error
    after the stream began (the engine stopped, request_timeout) is a last event {"error": ...}. The request's
    log line is written when the stream ends, with the tokens it got (the runner counts them in `usage`)."""
    first = await anext(pieces, None)  # starts the generation: a full queue is still a 503 here, not mid-stream
    n_choices = opt.n * n_prompts
    out = Events(rid, name, chat, opt.include_usage, tools, n_choices)

    async def events():
        try:
            if chat:
                yield "".join(out.chunk(i, role=True) for i in range(n_choices))
            if echoes:
                yield "".join(out.chunk(i, echoes[i // opt.n]) for i in range(n_choices))
            if first is not None:
                yield out.piece(*first)
            async for piece in pieces:
                yield out.piece(*piece)
            if opt.include_usage:
                yield out.event([], usage=usage_object(usage["prompt_tokens"], usage["completion_tokens"]))
            yield "data: [DONE]\n\n"
        except ApiError as e:
            usage["end"] = f"error_{e.status}"
            yield f"data: {json.dumps(openai_error(e.status, e.detail, e.param, e.code))}\n\n"
        finally:
            await pieces.aclose()

    return Response(logged_stream(events(), usage), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})
