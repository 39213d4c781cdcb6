"""How a model writes a tool call, by template family: how to find calls in its text (`parse`), where in a stream a
call may begin (`start`), and the grammar that forces a well-formed call (`grammar`) when tool_choice is
"required" or names a function.

- hermes: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call (Qwen 2.5/3, Hermes,
  SmolLM3); also the format we describe to a model whose template takes no tools (api/tools.py).
- llama3_json: `{"name": ..., "parameters": {...}}`, calls separated by "; ", optionally after `<|python_tag|>`
  (Llama 3.1-3.3's JSON tool calling).
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (Mistral's v3 tokenizer templates).
"""

import json
import re
from dataclasses import dataclass

from presets.engine.structured import COMPACT

ARGS_DEFAULT = {"type": "object", "properties": {}, "additionalProperties": False}  # no parameters: {} (OpenAI's)


@dataclass(frozen=True)
class Call:
    name: str
    arguments: dict


@dataclass(frozen=True)
class Parser:
    name: str
    args_key: str  # the key the model writes the arguments under
    open: str  # text that starts a call (or the list of calls)
    separator: str  # between two calls
    leading_json: str  # a call may also start as the text's first character (llama3: "{", mistral: "[")

    def start(self, text: str) -> int:
        """Where the first call begins in `text`, or -1 (it may still begin at a later character)."""
        head = text.lstrip()
        if self.leading_json and head.startswith(self.leading_json):
            return len(text) - len(head)
        return text.find(self.open)

    def parse(self, text: str, cut: bool = False) -> tuple[str, list[Call]] | None:
        """(content before the calls, the calls) when `text` holds well-formed calls, else None (it is all
        content: a model's malformed call is shown as it wrote it, never guessed at). `cut`: the text is a
        forced call that max_tokens cut, so the complete calls before the cut one stand."""
        at = self.start(text)
        if at < 0:
            return None
        calls = self._calls(text[at:], cut)
        return (text[:at].rstrip(), calls) if calls else None

    def _calls(self, text: str, cut: bool) -> list[Call] | None:
        if self.name == "hermes":
            bodies = [_load(b) for b in re.findall(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, flags=re.S)]
            rest = re.sub(r"<tool_call>.*?(?:</tool_call>|$)", "", text, flags=re.S)
            if cut and bodies and bodies[-1] is None and not text.rstrip().endswith("</tool_call>"):
                bodies.pop()
            return _objects(bodies, self.args_key) if not rest.strip() else None
        if self.name == "mistral":
            text = text.strip().removeprefix(self.open).strip()
            listed = _load(text)
            return _objects(listed, self.args_key) if isinstance(listed, list) else None
        values = _json_sequence(text.strip().removeprefix(self.open), ";")
        if cut and values and values[-1] is None:
            values.pop()
        return _objects(values, self.args_key)

    def grammar(self, schemas: list[dict], parallel: bool) -> str:
        """A Lark grammar (llguidance's dialect, with %json) that admits only calls of the given functions:
        one, or one or more when `parallel`. Each function is a rule of its own whose JSON schema is a whole
        document, so the references of its parameters (`#/$defs/...`) resolve."""
        rules = [f"f{i}: %json {json.dumps(self._call_schema(s))}" for i, s in enumerate(schemas)]
        one = " | ".join(f"f{i}" for i in range(len(schemas)))
        if self.name == "mistral":
            more = ' ("," " "? call)*' if parallel else ""
            start = f'start: {json.dumps(self.open)} " "? "[" call{more} "]"'
        else:
            start = f"start: call{f' ({json.dumps(self.separator)} call)*' if parallel else ''}"
        call = f'"<tool_call>\\n" ({one}) "\\n</tool_call>"' if self.name == "hermes" else one
        return "\n".join([start, f"call: {call}", *rules]) + "\n"

    def _call_schema(self, function: dict) -> dict:
        """{"name": the function, args_key: its arguments}, with the parameters' definitions at the root."""
        params = dict(function.get("parameters") or ARGS_DEFAULT)
        defs = {k: params.pop(k) for k in ("$defs", "definitions") if k in params}
        return {
            "type": "object",
            "properties": {"name": {"const": function["name"]}, self.args_key: params},
            "required": ["name", self.args_key],
            "additionalProperties": False,
            "x-guidance": COMPACT,  # no free whitespace, as response_format's JSON
            **defs,
        }


PARSERS = {
    "hermes": Parser("hermes", "arguments", "<tool_call>", "\n", ""),
    "llama3_json": Parser("llama3_json", "parameters", "<|python_tag|>", "; ", "{"),
    "mistral": Parser("mistral", "arguments", "[TOOL_CALLS]", "", "["),
}


def _load(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _json_sequence(text: str, separator: str) -> list:
    """JSON values one after another, separated by `separator` (and whitespace); a None last where something else
    follows (or the text stops inside a value)."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while at < len(text):
        try:
            value, at = decoder.raw_decode(text, at)
        except (ValueError, RecursionError):
            return [*values, None]
        values.append(value)
        rest = text[at:].lstrip()
        if rest.startswith(separator):
            rest = rest[len(separator) :].lstrip()
        at = len(text) - len(rest)
    return values


def _objects(values: list, args_key: str) -> list[Call] | None:
    """Calls from parsed JSON values of the form {"name": str, args_key: object}; None when any is not one."""
    calls = []
    for v in values or [None]:
        args = v.get(args_key, v.get("arguments")) if isinstance(v, dict) else None
        if not (isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(args, dict)):
            return None
        calls.append(Call(v["name"], args))
    return calls


def parser_for(template_source: str | None, takes_tools: bool, flag: str = "auto") -> Parser:
    """The parser a flag names, else the one the template's text shows (hermes for a template that takes no tools:
    the format api/tools.py describes to the model)."""
    if flag != "auto":
        return PARSERS[flag]
    source = template_source or ""
    if takes_tools and "[TOOL_CALLS]" in source:
        return PARSERS["mistral"]
    if takes_tools and "<tool_call>" not in source and ("<|python_tag|>" in source or "ipython" in source):
        return PARSERS["llama3_json"]
    return PARSERS["hermes"]


def check_parser_flag(value: str) -> str:
    """The --tool_call_parser value, checked at start-up."""
    if value != "auto" and value not in PARSERS:
        raise ValueError(f"tool_call_parser must be auto or one of {sorted(PARSERS)}, got {value!r}")
    return value
