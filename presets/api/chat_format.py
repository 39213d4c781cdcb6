"""Chat prompts: the model's own chat template when its folder has one, else Meta's Llama-2 format ([INST] ...
[/INST] turns, <<SYS>> merged into the first user turn) with the special-tags rule of Kaito's Llama-2 chat API."""

import unicodedata

from presets.api.chat_template import ChatTemplateError
from presets.api.errors import ApiError

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."
ROLES = ("system", "user", "assistant")


def check_dialog(dialog, where: str) -> list[dict]:
    """Validate one dialog's shape and role order; raise ApiError naming `where` otherwise."""
    if not isinstance(dialog, list) or not dialog:
        raise ApiError(400, f"{where} must be a non-empty list of messages")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict):
            raise ApiError(400, f"{where}[{i}] must be an object with 'role' and 'content'")
        if msg.get("role") not in ROLES:
            raise ApiError(400, f"{where}[{i}].role must be one of {list(ROLES)}, got {msg.get('role')!r}")
        if not isinstance(msg.get("content"), str):
            raise ApiError(400, f"{where}[{i}].content must be a string")
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if [m["role"] for m in turns] != expected or len(turns) % 2 == 0:
        raise ApiError(
            400,
            f"{where}: roles must be an optional 'system' first, then 'user' and 'assistant' "
            f"alternating, starting and ending with 'user'; got {[m['role'] for m in dialog]}",
        )
    return dialog


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
    return getattr(tokenizer, "chat_template", None) is None and has_special_tags(dialog, tokenizer)


def encode_dialog(tokenizer, dialog: list[dict]) -> list[int]:
    """Token ids of a checked dialog, ending where the assistant's answer starts."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        return encode_llama2(tokenizer, dialog)
    try:
        text = template.render(dialog, add_generation_prompt=True)
    except ChatTemplateError as e:
        raise ApiError(400, f"the model's chat template refused the dialog: {e}") from e
    return tokenizer.encode(text, bos=False, eos=False)  # the template writes BOS itself where the model wants it


def encode_llama2(tokenizer, dialog: list[dict]) -> list[int]:
    """Token ids of a checked dialog in Llama-2 chat format, ending in the open last user turn."""
    if dialog[0]["role"] == "system":
        first = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
        dialog = [{"role": "user", "content": first}] + dialog[2:]
    ids: list[int] = []
    for user, answer in zip(dialog[::2], dialog[1::2]):
        text = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
        ids += tokenizer.encode(text, bos=True, eos=True)
    ids += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return ids
