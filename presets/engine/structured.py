"""Structured output: OpenAI's response_format (json_object, json_schema) enforced while decoding, by llguidance.

Why llguidance: a CPU wheel (abi3, no torch or compiler needed), a mask for a 50k vocabulary in about a
millisecond, JSON schemas compiled lazily (no up-front compile per schema), and it is maintained by
Microsoft and used by llama.cpp and vLLM. Each constrained sequence has its own matcher: before sampling,
its row of the logits keeps only the tokens the grammar allows; after, the matcher takes the token. Other
sequences of the same step are untouched. Grammars are checked on a worker thread (never the engine's)
and the verdicts are cached.
"""

import asyncio
import json
import threading

from presets.engine.token_table import TokenTable
from presets.errors import ApiError

MAX_SCHEMA_BYTES = 64 << 10
# JSON without free whitespace between its tokens: whitespace carries nothing, and a model allowed it can pad an
# answer with newlines until max_tokens (small models do) instead of writing the object.
COMPACT = {"whitespace_flexible": False}


def grammar_for(response_format) -> str | None:
    """The llguidance grammar of an OpenAI response_format; None for plain text. 400 for a malformed one."""
    if response_format is None or response_format == {"type": "text"}:
        return None
    from llguidance import LLMatcher

    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_object":
        if set(response_format) != {"type"}:
            raise ApiError(400, "response_format json_object takes no other field", param="response_format")
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=COMPACT)
    if kind != "json_schema":
        raise ApiError(
            400,
            f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
            param="response_format.type",
        )
    spec = response_format.get("json_schema")
    if set(response_format) != {"type", "json_schema"} or not isinstance(spec, dict):
        raise ApiError(
            400,
            'response_format json_schema must be {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}',
            param="response_format",
        )
    unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if unknown or not isinstance(spec.get("name"), str) or not isinstance(spec.get("schema", {}), dict):
        extra = f"; unknown field(s) {unknown}" if unknown else ""
        raise ApiError(
            400,
            f"response_format.json_schema needs a string name and an object schema{extra}",
            param="response_format.json_schema",
        )
    if spec.get("strict") not in (None, True, False):
        raise ApiError(400, "response_format.json_schema.strict must be true or false", param="response_format")
    schema = spec.get("schema", {"type": "object"})
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise ApiError(400, f"response_format schema is over {MAX_SCHEMA_BYTES} bytes", param="response_format")
    where = oversized_integer(schema, "schema")
    if where:
        raise ApiError(
            400,
            f"response_format: {where} is an integer outside -2**63 .. 2**64-1, which the grammar engine cannot hold",
            param="response_format.json_schema.schema",
        )
    try:
        return LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT)
    except ValueError as e:  # what llguidance cannot take that the walk above does not foresee
        raise ApiError(400, f"response_format: unsupported schema: {str(e)[:300]}", param="response_format") from e


INT_RANGE = (-(2**63), 2**64 - 1)  # llguidance reads JSON integers as i64 or u64


def oversized_integer(value, path: str) -> str:
    """The path of an integer in `value` that llguidance cannot read ("" when none); a loop, not recursion:
    a schema may nest as deep as JSON lets it."""
    todo = [(value, path)]
    while todo:
        value, path = todo.pop()
        if isinstance(value, int) and not isinstance(value, bool):
            if not INT_RANGE[0] <= value <= INT_RANGE[1]:
                return path
        elif isinstance(value, dict):
            todo += [(item, f"{path}.{key}") for key, item in value.items()]
        elif isinstance(value, list):
            todo += [(item, f"{path}[{i}]") for i, item in enumerate(value)]
    return ""


class StructuredOutput:
    """Matchers for one model's tokenizer (the path of its tokenizer.json, or its TokenTable) and vocabulary
    (the logits' width)."""

    def __init__(self, tokenizer: str | TokenTable, vocab_size: int, eos_ids):
        self.source, self.vocab_size, self.eos_ids = tokenizer, vocab_size, list(eos_ids)
        self._tokenizer = None
        self._verdicts: dict[str, str] = {}  # grammar -> "" (fine) or the reason it cannot be used
        self._lock = threading.Lock()

    def tokenizer(self):
        """llguidance's view of the tokenizer (built once, about 0.2 s for a 50k vocabulary)."""
        with self._lock:
            if self._tokenizer is None:
                from llguidance import LLTokenizer

                if isinstance(self.source, TokenTable):
                    self._tokenizer = self.source.lltokenizer(self.vocab_size, self.eos_ids)
                else:
                    with open(self.source, encoding="utf-8") as f:
                        self._tokenizer = LLTokenizer(f.read(), n_vocab=self.vocab_size, eos_token=self.eos_ids)
            return self._tokenizer

    def _check(self, grammar: str) -> str:
        from llguidance import LLMatcher

        verdict = self._verdicts.get(grammar)
        if verdict is None:
            ok, warnings = LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer())
            verdict = "" if ok else "; ".join(warnings)
            if ok:  # a JSON schema's parts (regular expressions...) compile when first used: use it once
                probe = LLMatcher(self.tokenizer(), grammar)
                probe.compute_bitmask()
                verdict = probe.get_error() if probe.is_error() else ""
            self._verdicts[grammar] = verdict = verdict[:500]
        return verdict

    async def check(self, grammar: str) -> None:
        """400 naming what the schema uses that the grammar engine does not support (checked off the event
        loop and the engine thread, once per distinct schema)."""
        why = self._verdicts.get(grammar)
        if why is None:
            why = await asyncio.to_thread(self._check, grammar)
        if why:
            raise ApiError(400, f"response_format: unsupported schema: {why}", param="response_format")

    def matcher(self, grammar: str):
        """A fresh matcher for one sequence (a checked grammar)."""
        from llguidance import LLMatcher

        return LLMatcher(self.tokenizer(), grammar)


def allowed_tokens(matcher, vocab: int):
    """The matcher's next-token mask as booleans (vocab,): llguidance gives bits, little-endian in 32-bit words."""
    import numpy as np
    import torch

    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    return torch.from_numpy(bits[:vocab].astype(bool))


def constrain(logits, seqs) -> None:
    """Keep, in each constrained sequence's row of `logits` (B, V), only the tokens its grammar allows now."""
    for i, seq in enumerate(seqs):
        if seq.matcher is not None:
            allowed = allowed_tokens(seq.matcher, logits.shape[-1]).to(logits.device)
            logits[i].masked_fill_(~allowed, float("-inf"))


def advance(seqs, tokens: list[int]) -> None:
    """Each constrained sequence's matcher takes the token sampled for it."""
    for seq, token in zip(seqs, tokens):
        if seq.matcher is not None and not seq.matcher.is_stopped():
            seq.matcher.consume_token(token)
