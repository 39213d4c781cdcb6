"""Llama-2 chat prompt format: [INST] ... [/INST] turns, <<SYS>> merged into the first user turn."""

from presets.serving.errors import ApiError

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


def has_special_tags(dialog: list[dict]) -> bool:
    return any(tag in msg["content"] for msg in dialog for tag in SPECIAL_TAGS)


def encode_dialog(tokenizer, dialog: list[dict]) -> list[int]:
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
