"""Chat messages to prompt ids: one path for every server and route.

1. Validation: `openai_messages` (the OpenAI routes, Falcon's and llm-api's messages) and `kaito_dialog`
   (Kaito's Llama /chat dialogs) check a message list's shape once, into [{"role", "content"}] text.
2. Rendering: `render` runs the model's own chat template (chat_template.py: the same Jinja sandbox and
   helpers for Llama folders, HuggingFace models and GGUF files); the template decides which role orders
   it takes (its `raise_exception` is a 400).
3. Without a template, `encode_dialog` writes Meta's Llama-2 format ([INST] ... [/INST] turns, <<SYS>> merged
   into the first user turn), which needs alternating user/assistant turns, under the special-tags rule of
   Kaito's Llama-2 chat API (`refused`).
"""

import json
import unicodedata

from presets.api.validation import reject_unknown
from presets.errors import ApiError
from presets.models.chat_template import ChatTemplate, ChatTemplateError

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."
ROLES = ("system", "user", "assistant")
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# -- 1. validation ------------------------------------------------------------------------------------------


def openai_messages(messages, where: str = "messages", tools: bool = False) -> list[dict]:
    """OpenAI chat messages as {role, content} text: content parts joined, "developer" as "system"; with `tools`
    (the chat route), also "tool" results and assistant `tool_calls` (their arguments as objects, as templates take
    them). Anything else in a message (other fields, other part types, other roles) is a 400 naming it."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, f"{where} must be a non-empty list of {{role, content}} objects", param=where)
    return [openai_message(m, f"{where}[{i}]", tools) for i, m in enumerate(messages)]


def openai_message(m, where: str, tools: bool) -> dict:
    """One message, checked (errors name `where`)."""
    if not isinstance(m, dict):
        raise ApiError(400, f"{where} must be an object with role and content", param=where)
    roles = OPENAI_ROLES | ({"tool": "tool"} if tools else {})
    if not isinstance(m.get("role"), str) or m["role"] not in roles:
        raise ApiError(
            400, f"{where}.role must be one of {sorted(roles)}, got {m.get('role')!r}", param=f"{where}.role"
        )
    extra = {"assistant": ("tool_calls",), "tool": ("tool_call_id",)}.get(m["role"], ()) if tools else ()
    reject_unknown(m, ("role", "content", *extra), where)
    out = {"role": roles[m["role"]]}
    if m.get("tool_calls") is not None:
        out["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
        if m.get("content") is None:
            return out | {"content": None}
    if m["role"] == "tool":
        if not isinstance(m.get("tool_call_id"), str):
            raise ApiError(400, f"{where}.tool_call_id must be a string", param=f"{where}.tool_call_id")
        out["tool_call_id"] = m["tool_call_id"]
    return out | {"content": _text(m.get("content"), where)}


def _text(content, where: str) -> str:
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(
                    400,
                    f'{where}.content[{j}] must be a text part {{"type": "text", "text": ...}} (this server reads '
                    "text only)",
                    param=f"{where}.content",
                )
            reject_unknown(part, ("type", "text"), f"{where}.content[{j}]")
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise ApiError(400, f"{where}.content must be a string or a list of text parts", param=f"{where}.content")
    return content


def _tool_calls(calls, where: str) -> list[dict]:
    """An assistant message's tool calls, their JSON arguments read into objects."""
    if not isinstance(calls, list) or not calls:
        raise ApiError(400, f"{where} must be a non-empty list of tool calls", param=where)
    out = []
    for i, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        ok = isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("arguments"), str)
        if not ok or c.get("type", "function") != "function" or not isinstance(c.get("id", ""), str):
            raise ApiError(
                400,
                f'{where}[{i}] must be {{"id", "type": "function", "function": {{"name", "arguments"}}}} with '
                "arguments a JSON string",
                param=f"{where}[{i}]",
            )
        try:
            args = json.loads(f["arguments"])
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's parser goes
            args = None
        if not isinstance(args, dict):
            raise ApiError(400, f"{where}[{i}].function.arguments must be a JSON object", param=f"{where}[{i}]")
        out.append({"id": c.get("id", ""), "type": "function", "function": {"name": f["name"], "arguments": args}})
    return out


def kaito_dialog(dialog, where: str) -> list[dict]:
    """One dialog of Kaito's Llama /chat: a non-empty list of {role: system|user|assistant, content: string}."""
    if not isinstance(dialog, list) or not dialog:
        raise ApiError(400, f"{where} must be a non-empty list of messages")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict):
            raise ApiError(400, f"{where}[{i}] must be an object with 'role' and 'content'")
        if msg.get("role") not in ROLES:
            raise ApiError(400, f"{where}[{i}].role must be one of {list(ROLES)}, got {msg.get('role')!r}")
        if not isinstance(msg.get("content"), str):
            raise ApiError(400, f"{where}[{i}].content must be a string")
    return dialog


def _check_alternation(dialog: list[dict], where: str) -> None:
    """Meta's format has no other shape: an optional system message, then user and assistant alternating."""
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if [m["role"] for m in turns] != expected or len(turns) % 2 == 0:
        raise ApiError(
            400,
            f"{where}: roles must be an optional 'system' first, then 'user' and 'assistant' "
            f"alternating, starting and ending with 'user'; got {[m['role'] for m in dialog]}",
        )


# -- 2. the model's own template ----------------------------------------------------------------------------


def render(template: ChatTemplate | None, messages: list[dict], tools: list[dict] | None = None) -> str:
    """The prompt text of validated messages (and tools, for a template that takes them) in the model's chat
    template; a 400 when it has none or it refuses them."""
    if template is None:
        raise ApiError(400, "this model has no chat template: send a prompt in your own format instead of messages")
    try:
        return template.render(messages, add_generation_prompt=True, tools=tools)
    except ChatTemplateError as e:
        raise ApiError(400, f"messages do not fit the model's chat template: {e}") from e


# -- 3. Meta's Llama-2 format and Kaito's special-tags rule ---------------------------------------------------


def has_special_tags(dialog: list[dict], tokenizer=None) -> bool:
    """Whether a message holds a tag as written, or as the model would read it: a tokenizer normalizes text
    (SentencePiece's NFKC makes fullwidth `［INST］` the ids of `[INST]`), so the text its ids decode to is
    checked too."""
    for msg in dialog:
        text = msg["content"]
        seen = [text, unicodedata.normalize("NFKC", text)]
        if tokenizer is not None:
            seen.append(tokenizer.decode(tokenizer.encode(text, bos=False, eos=False)))
        if any(tag in t for t in seen for tag in SPECIAL_TAGS):
            return True
    return False


def refused(tokenizer, dialog: list[dict]) -> bool:
    """Kaito's Llama-2 chat rule: in Meta's format a dialog may not write its own [INST]/<<SYS>> tags (a template's
    model has other control tokens, which its tokenizer keeps apart from text: the rule does not apply)."""
    return tokenizer.chat_template is None and has_special_tags(dialog, tokenizer)


def encode_dialog(tokenizer, dialog: list[dict], where: str = "messages", tools: list[dict] | None = None) -> list[int]:
    """Token ids of a validated dialog, ending where the assistant's answer starts: the tokenizer's chat template
    (a Llama tokenizer's), else Meta's format."""
    if tokenizer.chat_template is None:
        return encode_llama2(tokenizer, dialog, where)
    # the template writes BOS itself where the model wants it
    return tokenizer.encode(render(tokenizer.chat_template, dialog, tools), bos=False, eos=False)


def encode_llama2(tokenizer, dialog: list[dict], where: str = "messages") -> list[int]:
    """Token ids of a dialog in Llama-2 chat format, ending in the open last user turn."""
    _check_alternation(dialog, where)
    if dialog[0]["role"] == "system":
        first = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
        dialog = [{"role": "user", "content": first}] + dialog[2:]
    ids: list[int] = []
    for user, answer in zip(dialog[::2], dialog[1::2]):
        text = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
        ids += tokenizer.encode(text, bos=True, eos=True)
    ids += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return ids
