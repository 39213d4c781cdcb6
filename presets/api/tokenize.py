"""vLLM's tokenizer routes, at the root as vLLM serves them (not under /v1), on every server:

- POST /tokenize: a `prompt` (the ids /v1/completions runs for it) or chat `messages` (the ids
  /v1/chat/completions runs for them) -> {count, max_model_len, tokens, token_strs}.
- POST /detokenize: `tokens` -> {prompt}: their text, special tokens written as text.

Errors are OpenAI's error object naming the field, as vLLM answers them. Fields vLLM defines that these routes
do not implement are a 400 naming them unless their value changes nothing; fields vLLM does not define are a
400 too. Messages and `tools` are rendered by the chat route's own path (openai.encode_chat). `model`, when given,
must name the served model or one of its LoRA adapters (they share its tokenizer).
"""

from quart import Blueprint, jsonify, request

from presets.api.openai import OpenAIModel, encode_chat, model
from presets.api.openai_request import reject_unsupported
from presets.api.validation import adapter_slot, boolean, json_body
from presets.errors import ApiError, openai_error
from presets.http.app import record_counts, runtime

tokenizer_routes = Blueprint("tokenize", __name__)

PROMPT_FIELDS = {"model", "prompt", "add_special_tokens", "return_token_strs"}
# vLLM's chat fields that change nothing at these values (None, or empty); any other value is a 400 saying why
NEUTRAL_ONLY = {
    "chat_template": "the model's own chat template is used (a request cannot bring its own)",
    "chat_template_kwargs": "the chat template takes no arguments from requests",
    "mm_processor_kwargs": "these models read text only",
    "media_io_kwargs": "these models read text only",
}
CHAT_FIELDS = {
    "model",
    "messages",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "return_token_strs",
    "tools",
    *NEUTRAL_ONLY,
}
# The chat route's prompt: its generation prompt, the final message closed, the template's own special tokens. A
# request may ask for these values only (the chat rendering takes no other yet).
CHAT_ROUTE = {"continue_final_message": False, "add_generation_prompt": True, "add_special_tokens": False}


@tokenizer_routes.errorhandler(ApiError)
def _error(e: ApiError):
    """OpenAI's error object (with `param`) for every error of these routes, the API key's 401 included."""
    return jsonify(openai_error(e.status, e.detail, e.param, e.code)), e.status, e.headers


def _check_model(m: OpenAIModel, body: dict) -> None:
    adapter_slot(body.get("model"), m.name, list(m.adapters), "model")  # a 404 naming what is served


@tokenizer_routes.post("/tokenize")
async def tokenize():
    """A prompt or chat messages as the ids the completion or chat route would run."""
    body = await json_body(request)
    runtime().require_ready()
    m = model()
    if "messages" in body:
        ids = _chat_ids(m, body)
    elif "prompt" in body:
        ids = _prompt_ids(m, body)
    else:
        raise ApiError(400, "send a prompt (a string) or messages (a list of chat messages)", param="prompt")
    record_counts(0, len(ids), 0)  # the request's log line
    strs = m.token_strs(ids) if boolean(body, "return_token_strs", "", False) else None
    return jsonify(count=len(ids), max_model_len=m.context(), tokens=ids, token_strs=strs)


def _prompt_ids(m: OpenAIModel, body: dict) -> list[int]:
    reject_unsupported(body, PROMPT_FIELDS)
    _check_model(m, body)
    special = boolean(body, "add_special_tokens", "", True)
    boolean(body, "return_token_strs", "", False)  # checked before the work
    prompt = body["prompt"]
    if not isinstance(prompt, str):
        raise ApiError(400, f"prompt must be a string, got {type(prompt).__name__}", param="prompt")
    return m.encode_prompt(prompt, special)


def _chat_ids(m: OpenAIModel, body: dict) -> list[int]:
    if "prompt" in body:
        raise ApiError(400, "send a prompt or messages, not both", param="prompt")
    reject_unsupported(body, CHAT_FIELDS)
    _check_model(m, body)
    for key, why in NEUTRAL_ONLY.items():
        if body.get(key) not in (None, "", {}, []):
            raise ApiError(400, f"{key} is not supported: {why}", param=key)
    values = {key: boolean(body, key, "", default) for key, default in CHAT_ROUTE.items()}
    if values["add_generation_prompt"] and values["continue_final_message"]:
        raise ApiError(
            400, "continue_final_message and add_generation_prompt cannot both be true", param="continue_final_message"
        )
    for key, value in values.items():
        if value != CHAT_ROUTE[key]:
            raise ApiError(
                400,
                f"{key}={str(value).lower()} is not supported: /tokenize gives the ids /v1/chat/completions runs "
                f"({', '.join(f'{k}={str(v).lower()}' for k, v in CHAT_ROUTE.items())})",
                param=key,
            )
    boolean(body, "return_token_strs", "", False)
    return encode_chat(body, m)[0]  # as /v1/chat/completions with tool_choice "auto": tools are shown to the model


@tokenizer_routes.post("/detokenize")
async def detokenize():
    """Token ids as text, special tokens written as text; each id checked against the vocabulary first."""
    body = await json_body(request)
    runtime().require_ready()
    reject_unsupported(body, {"model", "tokens"})
    m = model()
    _check_model(m, body)
    tokens, vocab = body.get("tokens"), m.vocab_size()
    if not isinstance(tokens, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in tokens):
        raise ApiError(400, "tokens must be a list of token ids (integers)", param="tokens")
    for i, t in enumerate(tokens):
        if not 0 <= t < vocab:
            raise ApiError(
                400, f"tokens[{i}] = {str(t)[:24]} is not a token id of this model (0 to {vocab - 1})", param="tokens"
            )
    record_counts(0, len(tokens), 0)
    return jsonify(prompt=m.decode(tokens))
