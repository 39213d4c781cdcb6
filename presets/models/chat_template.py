"""Our renderer of a model folder's Jinja chat template: the text transformers' `apply_chat_template` gives.

Templates from the Hub are untrusted code, so they run in jinja2's immutable sandbox."""

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.meta
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from presets.models.llama.json_files import read_json


class ChatTemplateError(Exception):
    """A chat template that cannot be loaded or rendered; the message says why."""


def _raise_exception(message):
    """The `raise_exception` templates call to refuse a conversation (e.g. roles that do not alternate)."""
    raise ChatTemplateError(str(message))


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """A `tojson` filter that, unlike jinja2's, does not escape HTML characters (prompts are not HTML)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; a prompt keeps the text."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag])
_ENV.filters["tojson"] = _tojson
_ENV.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))


class ChatTemplate:
    """A compiled chat template with the tokenizer's special-token strings (`bos_token`, `eos_token`, ...)."""

    def __init__(self, source: str, special_tokens: dict[str, str]):
        try:
            self._template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template syntax error on line {e.lineno}: {e.message}") from None
        self.source = source
        self.takes_tools = "tools" in jinja2.meta.find_undeclared_variables(_ENV.parse(source))
        self.special_tokens = dict(special_tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """The prompt text for `messages` (and `tools`: OpenAI's function tools, which the template reads as its
        `tools`); a template's `raise_exception(msg)` becomes ChatTemplateError(msg)."""
        # transformers drops None-valued keys (OpenAI clients send content=None), which templates handle as missing
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._template.render(
                **self.special_tokens,
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                documents=None,
            )
        # Sandbox refusals (SecurityError), undefined values, and the template's own bugs (e.g. 1 + 'a')
        # RecursionError: a value nested deeper than the template's filters (tojson) can walk
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, ArithmeticError, RecursionError) as e:
            raise ChatTemplateError(f"chat template error: {type(e).__name__}: {e}") from e


def _read_tokens(path: Path) -> tuple[dict, dict[str, str]]:
    """A tokenizer JSON file's object and its `*_token` strings (given as strings or {"content": ...} objects)."""
    config = read_json(str(path), ChatTemplateError, required=False)
    extra = config.get("extra_special_tokens")  # transformers 5 also names tokens there (e.g. image_token)
    items = [*config.items(), *(extra.items() if isinstance(extra, dict) else ())]
    tokens = {k: v.get("content") if isinstance(v, dict) else v for k, v in items if k.endswith("_token")}
    return config, {k: v for k, v in tokens.items() if isinstance(v, str)}


def special_tokens(folder: str) -> dict[str, str]:
    """A tokenizer folder's special-token strings (bos_token, eos_token, ...)."""
    # Older folders may keep special tokens only in special_tokens_map.json; tokenizer_config.json wins over it
    return {
        **_read_tokens(Path(folder, "special_tokens_map.json"))[1],
        **_read_tokens(Path(folder, "tokenizer_config.json"))[1],
    }


def load_chat_template(folder: str) -> ChatTemplate | None:
    """The chat template of a HuggingFace model folder, or None when it has none."""
    config, _ = _read_tokens(Path(folder, "tokenizer_config.json"))
    special = special_tokens(folder)
    jinja_file = Path(folder, "chat_template.jinja")  # what transformers 5 saves; it wins over the config's
    try:
        source = jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else config.get("chat_template")
    except (OSError, ValueError) as e:
        raise ChatTemplateError(f"cannot read {jinja_file}: {e}") from e
    if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = [t for t in source if isinstance(t, dict)]
        source = next((t.get("template") for t in named if t.get("name") == "default"), None)
        if source is None:
            raise ChatTemplateError("tokenizer_config.json has named chat templates but none named 'default'")
    return ChatTemplate(source, special) if source else None
