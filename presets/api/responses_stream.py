"""The Responses API's answers: the response object with its output items (a message of output_text, a
function_call item per call), whole or as OpenAI's stream of events: response.created, response.in_progress,
then per item output_item.added, its content part or arguments with their deltas and done events,
output_item.done, and last response.completed (response.incomplete when max_output_tokens cut it)."""

import json
import time
import uuid

from presets.api.tools import CallStream, ToolPlan
from presets.errors import ApiError

ECHOED = ("instructions", "max_output_tokens", "user")
DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "parallel_tool_calls": True}  # the values a request runs with


class ResponseEvents:
    def __init__(self, rid: str, name: str, body: dict, plan: ToolPlan | None):
        self.rid, self.name, self.body, self.plan = rid, name, body, plan
        self.created, self.seq = int(time.time()), 0
        self.msg_id = f"msg_{uuid.uuid4().hex}"

    def response(self, status: str, output: list, usage: tuple | None = None, finish: str | None = None) -> dict:
        """The response object, with the request's settings echoed as OpenAI's API does."""
        echoed = {k: self.body.get(k) for k in ECHOED} | {
            "parallel_tool_calls": self.body.get("parallel_tool_calls", True)
        }
        text = self.body.get("text") or {"format": {"type": "text"}}
        return echoed | {
            "id": self.rid,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.name,
            "output": output,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
            "tools": self.body.get("tools") or [],
            "tool_choice": self.body.get("tool_choice") or "auto",
            "text": text,
            "store": False,
            "previous_response_id": None,
            "truncation": "disabled",
            "usage": _usage(*usage) if usage else None,
            "metadata": self.body.get("metadata") or {},
        }

    def message(self, text: str, status: str = "completed") -> dict:
        part = {"type": "output_text", "text": text, "annotations": []}
        return {"type": "message", "id": self.msg_id, "status": status, "role": "assistant", "content": [part]}

    @staticmethod
    def function_call(call: dict, arguments: str | None = None, status: str = "completed") -> dict:
        f = call["function"]
        args = f["arguments"] if arguments is None else arguments
        item = {"type": "function_call", "id": f"fc_{call['id'][5:]}", "call_id": call["id"], "name": f["name"]}
        return item | {"arguments": args, "status": status}

    def items(self, content: str | None, calls: list[dict]) -> list[dict]:
        return ([self.message(content)] if content else []) + [self.function_call(c) for c in calls]

    def whole(self, text: str, finish: str, prompt_tokens: int, completion: int) -> dict:
        content, calls = self.plan.split(text, finish) if self.plan else (text, [])
        status = "incomplete" if finish == "length" else "completed"
        return self.response(status, self.items(content, calls), (prompt_tokens, completion), finish)

    def event(self, kind: str, **data) -> str:
        self.seq += 1
        body = {"type": kind, "sequence_number": self.seq - 1, **data}
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def stream(self, first, pieces, usage: dict):
        """The events of a streamed response from the runner's (index, text, finish_reason, logprobs) pieces."""
        calls = CallStream(self.plan) if self.plan else None
        self.text, self.started, finish = "", False, None
        try:
            yield self.event("response.created", response=self.response("in_progress", []))
            yield self.event("response.in_progress", response=self.response("in_progress", []))
            async for _, piece, end, _ in _chain(first, pieces):
                yield self._text(calls.feed(piece or "") if calls else (piece or ""))
                finish = end or finish
            rest, made = calls.finish(finish) if calls else ("", [])
            yield self._text(rest)
            if self.started:
                yield self._close_message(self.text)
            for k, call in enumerate(made):
                yield self._call_events(call, int(self.started) + k)
            output = ([self.message(self.text)] if self.started else []) + [self.function_call(c) for c in made]
            status = "incomplete" if finish == "length" else "completed"
            done = self.response(status, output, (usage["prompt_tokens"], usage["completion_tokens"]), finish)
            yield self.event(f"response.{status}", response=done)
        except ApiError as e:
            usage["end"] = f"error_{e.status}"
            yield self.event("error", code=e.code or str(e.status), message=e.detail, param=e.param)
        finally:
            await pieces.aclose()

    def _text(self, piece: str) -> str:
        """The events of a piece of the answer's text ("" for none): the message opened first if it is not yet."""
        if not piece:
            return ""
        opened = "" if self.started else self._open_message()
        self.started, self.text = True, self.text + piece
        where = {"item_id": self.msg_id, "output_index": 0, "content_index": 0}
        return opened + self.event("response.output_text.delta", **where, delta=piece, logprobs=[])

    def _open_message(self) -> str:
        part = {"type": "output_text", "text": "", "annotations": []}
        added = self.event(
            "response.output_item.added", output_index=0, item=self.message("", "in_progress") | {"content": []}
        )
        return added + self.event(
            "response.content_part.added", item_id=self.msg_id, output_index=0, content_index=0, part=part
        )

    def _close_message(self, text: str) -> str:
        where = {"item_id": self.msg_id, "output_index": 0, "content_index": 0}
        out = self.event("response.output_text.done", **where, text=text, logprobs=[])
        out += self.event(
            "response.content_part.done", **where, part={"type": "output_text", "text": text, "annotations": []}
        )
        return out + self.event("response.output_item.done", output_index=0, item=self.message(text))

    def _call_events(self, call: dict, index: int) -> str:
        item = self.function_call(call, arguments="", status="in_progress")
        args = call["function"]["arguments"]
        out = self.event("response.output_item.added", output_index=index, item=item)
        out += self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=args)
        out += self.event(
            "response.function_call_arguments.done", item_id=item["id"], output_index=index, arguments=args
        )
        return out + self.event("response.output_item.done", output_index=index, item=self.function_call(call))


async def _chain(first, pieces):
    if first is not None:
        yield first
    async for piece in pieces:
        yield piece


def _usage(prompt_tokens: int, completion: int) -> dict:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + completion,
    }
