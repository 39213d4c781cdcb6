"""Tool calling on /v1/chat/completions (and the Responses API): `tools`, `tool_choice` and `parallel_tool_calls`
checked once into a ToolPlan, which

- renders: the tools go to the model's chat template as its `tools` variable (as transformers passes them); a
  template that takes no tools (or Meta's Llama-2 format) gets them described in a system message, and the
  conversation's tool calls and results as text in the format that message asks for;
- constrains: tool_choice "required" or a named function forces a well-formed call of the allowed functions whose
  arguments satisfy their JSON schemas (a grammar, engine/structured.py), so the call always parses;
- parses: the model's text into `tool_calls` (api/tool_parsers.py), whole or as a stream (`CallStream`).
"""

import json
import re
import uuid
from dataclasses import dataclass

from presets.api.tool_parsers import Call, Parser, parser_for
from presets.engine.structured import MAX_SCHEMA_BYTES, oversized_integer
from presets.errors import ApiError

MAX_TOOLS = 128  # as OpenAI's API allows
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")


@dataclass
class ToolPlan:
    functions: list[dict]  # {"name", "description"?, "parameters"?} of each tool
    choice: str  # "auto", "required" or a function's name ("none" never makes a plan)
    parallel: bool
    parser: Parser | None = None  # set for the model's template (plan_for_template)
    template_tools: list[dict] | None = None  # what the chat template's `tools` gets (None: described in a message)

    @property
    def forced(self) -> bool:
        return self.choice != "auto"

    def grammar(self) -> str | None:
        """The grammar of a forced call (None for auto: the model decides whether to call)."""
        if not self.forced:
            return None
        allowed = (
            self.functions if self.choice == "required" else [f for f in self.functions if f["name"] == self.choice]
        )
        # a named function is called once, as OpenAI's API does; "required" calls one or more when parallel
        return self.parser.grammar(allowed, self.parallel and self.choice == "required")

    def split(self, text: str, finish: str | None = None) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) of a whole answer: OpenAI's message fields. Calls of functions the request did
        not declare are content (a JSON answer that happens to have a "name" is not a call); a forced answer
        that max_tokens cut (`finish` "length") keeps the complete calls before the cut."""
        parsed = self.parser.parse(text, cut=self.forced and finish == "length")
        names = {f["name"] for f in self.functions}
        if parsed is None or any(c.name not in names for c in parsed[1]):
            return text, []
        content, calls = parsed
        if not self.parallel:
            calls = calls[:1]
        return content or None, [self._tool_call(c) for c in calls]

    def _tool_call(self, call: Call) -> dict:
        args = json.dumps(call.arguments, ensure_ascii=False)
        return {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call.name, "arguments": args},
        }


def parse_tools(body: dict) -> ToolPlan | None:
    """The request's tools, checked (each error a 400 naming the field); None when it sends none or tool_choice
    is "none" (the model then answers in text, and the tools are not shown to it)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ApiError(400, "parallel_tool_calls must be true or false", param="parallel_tool_calls")
    if tools is None:
        if choice not in (None, "none"):
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        return None
    functions = _functions(tools)
    choice = _choice(choice, [f["name"] for f in functions])
    return None if choice == "none" else ToolPlan(functions, choice, parallel)


def _functions(tools) -> list[dict]:
    if not isinstance(tools, list) or not 1 <= len(tools) <= MAX_TOOLS:
        raise ApiError(400, f"tools must be a list of 1 to {MAX_TOOLS} function tools", param="tools")
    functions, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or set(tool) - {"type", "function"}:
            raise ApiError(400, f'{where} must be {{"type": "function", "function": {{...}}}}', param=where)
        f = tool.get("function")
        if not isinstance(f, dict) or set(f) - {"name", "description", "parameters", "strict"}:
            raise ApiError(
                400, f"{where}.function must be an object of name, description, parameters, strict", param=where
            )
        if not isinstance(f.get("name"), str) or not NAME.fullmatch(f["name"]):
            raise ApiError(
                400, f"{where}.function.name must be 1-64 letters, digits, _ or -", param=f"{where}.function.name"
            )
        if f["name"] in names:
            raise ApiError(400, f"{where}.function.name {f['name']!r} is given twice", param=f"{where}.function.name")
        names.add(f["name"])
        if f.get("description") is not None and not isinstance(f["description"], str):
            raise ApiError(400, f"{where}.function.description must be a string", param=f"{where}.function.description")
        params = f.get("parameters")
        if params is not None and not (isinstance(params, dict) and params.get("type", "object") == "object"):
            raise ApiError(
                400,
                f"{where}.function.parameters must be a JSON schema of an object",
                param=f"{where}.function.parameters",
            )
        functions.append({k: v for k, v in f.items() if k != "strict" and v is not None})
    _check_schemas(functions)
    return functions


def _check_schemas(functions: list[dict]) -> None:
    """The limits response_format's schemas have (engine/structured.py): the grammar engine compiles them."""
    if len(json.dumps(functions)) > MAX_SCHEMA_BYTES:
        raise ApiError(400, f"tools' schemas are over {MAX_SCHEMA_BYTES} bytes", param="tools")
    for i, f in enumerate(functions):
        where = oversized_integer(f.get("parameters"), f"tools[{i}].function.parameters")
        if where:
            raise ApiError(
                400,
                f"{where} is an integer outside -2**63 .. 2**64-1, which the grammar engine cannot hold",
                param="tools",
            )


def _choice(choice, names: list[str]) -> str:
    if choice is None:
        return "auto"
    if choice in ("none", "auto", "required"):
        return choice
    named = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = named.get("name") if isinstance(named, dict) else None
    if not isinstance(name, str):
        raise ApiError(
            400,
            'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if name not in names:
        raise ApiError(400, f"tool_choice names {name!r}, which is not among the tools {names}", param="tool_choice")
    return name


def plan_for_template(plan: ToolPlan, template, flag: str) -> ToolPlan:
    """The plan's parser and rendering for the model's chat template (None: Meta's Llama-2 format)."""
    takes = template is not None and template.takes_tools
    plan.parser = parser_for(template.source if template else None, takes, flag)
    plan.template_tools = [{"type": "function", "function": f} for f in plan.functions] if takes else None
    return plan


def describe(functions: list[dict]) -> str:
    """The system message that offers the tools to a model whose template takes none (the hermes format)."""
    listed = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
    return (
        "You may call one or more functions to answer. The functions, as JSON schemas:\n"
        f"<tools>\n{listed}\n</tools>\n"
        "To call a function, reply with one block per call:\n"
        '<tool_call>\n{"name": "<function name>", "arguments": {<arguments as JSON>}}\n</tool_call>'
    )


def for_model(messages: list[dict], plan: ToolPlan | None, takes_tools: bool) -> list[dict]:
    """The conversation as the model reads it. A template that takes tools gets it as it is; otherwise the tools
    are described in the system message, and past calls and results are written as text in the format described."""
    if takes_tools or not (plan or any(m["role"] == "tool" or "tool_calls" in m for m in messages)):
        return messages
    out: list[dict] = []
    for m in messages:
        if m["role"] == "tool":
            text = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("results"):  # results of one turn's calls are one user message
                out[-1] = out[-1] | {"content": out[-1]["content"] + "\n" + text}
            else:
                out.append({"role": "user", "content": text, "results": True})
        elif "tool_calls" in m:
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in m["tool_calls"]]
            blocks = [f"<tool_call>\n{json.dumps(c, ensure_ascii=False)}\n</tool_call>" for c in calls]
            out.append({"role": "assistant", "content": "\n".join(([m["content"]] if m["content"] else []) + blocks)})
        elif m["role"] == "user" and out and out[-1].get("results"):  # one user turn: Meta's format alternates
            out[-1] = {"role": "user", "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append(m)
    out = [{"role": m["role"], "content": m["content"]} for m in out]
    if plan is not None:
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + describe(plan.functions)}
        else:
            out.insert(0, {"role": "system", "content": describe(plan.functions)})
    return out


class CallStream:
    """One streamed choice's text split as it comes: content is sent until a call may begin, then held; at the end
    the held text is either calls or, when it does not parse, content after all."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.text, self.sent = plan, "", 0

    def feed(self, piece: str) -> str:
        """The content that can be sent now."""
        self.text += piece
        if self.plan.forced:
            return ""
        at = self.plan.parser.start(self.text)
        end = at if at >= 0 else len(self.text) - _partial_open(self.text, self.plan.parser)
        end = max(len(self.text[:end].rstrip()), self.sent)  # whitespace before a call is not content
        piece, self.sent = self.text[self.sent : end], end
        return piece

    def finish(self, reason: str | None = None) -> tuple[str, list[dict]]:
        """(content not sent yet, tool calls) once the choice has ended."""
        content, calls = self.plan.split(self.text, reason)
        if not calls:
            return self.text[self.sent :], []
        return (content or "")[self.sent :], calls


def _partial_open(text: str, parser: Parser) -> int:
    """How many characters at the end of `text` could be the start of a call's opening text (held back)."""
    if parser.leading_json and not text.strip():
        return len(text)
    for n in range(min(len(parser.open), len(text)), 0, -1):
        if parser.open.startswith(text[-n:]):
            return n
    return 0
