"""A vocabulary as structured output's grammar engine (llguidance) reads it when there is no tokenizer.json:
each token's bytes, the ids that stand for no text, and how text continuing a generation tokenizes.

llguidance reads a HuggingFace tokenizer.json itself; any other tokenizer (Meta's SentencePiece
tokenizer.model, models/llama/sentencepiece_table.py) is handed to it as a TokenTable. A table is trusted
only once it spells PROBE back byte for byte (TokenTable.spells): a tokenizer whose normalization changes
text (NFKC, collapsed spaces) cannot be described by bytes per token, and is left without structured output.
"""

from collections.abc import Callable
from dataclasses import dataclass

# Spaces (leading, in runs), newlines, a tab, accents, CJK and an emoji (byte-fallback pieces in Llama's
# vocabulary), a ligature and full-width letters (which NFKC would rewrite), JSON.
PROBE = ' Ünïcode ﬁ ＡＢ “quotes” 世界 🙂\n\t{"key": [1, -2.5e3, true, null], "k2": "  two  spaces"}\n\n'


@dataclass
class TokenTable:
    """`tokens[i]`: token i's bytes within a text; `special`: the ids that stand for no text (BOS, EOS,
    unknown: a JSON grammar never yields them, and EOS only ends it); `encode`: text that continues a
    text, as ids (no leading space added)."""

    tokens: list[bytes]
    special: list[int]
    encode: Callable[[str], list[int]]

    def spells(self, text: str) -> bool:
        """Whether `text`'s ids, read through the table, are its UTF-8 bytes with no special token among them."""
        ids = self.encode(text)
        return not set(ids) & set(self.special) and b"".join(self.tokens[i] for i in ids) == text.encode()

    def lltokenizer(self, vocab_size: int, eos_ids):
        """llguidance's tokenizer of this table, `vocab_size` wide (the logits'), ended by eos_ids[0]
        (llguidance takes one EOS from a table: SentencePiece has one)."""
        from llguidance import LLTokenizer, TokenizerWrapper

        return LLTokenizer(TokenizerWrapper(_Vocabulary(self, vocab_size, list(eos_ids)[0])))


class _Vocabulary:
    """A TokenTable in the shape llguidance's TokenizerWrapper reads: its tokens padded with empty ones to
    the logits' width (ids no grammar allows), and called on bytes to tokenize them."""

    bos_token_id = None  # only an unconstrained prompt starts with BOS; a grammar never sees it

    def __init__(self, table: TokenTable, vocab_size: int, eos_id: int):
        self.tokens = table.tokens + [b""] * (vocab_size - len(table.tokens))
        self.special_token_ids, self.eos_token_id, self._encode = table.special, eos_id, table.encode

    def __call__(self, text: bytes) -> list[int]:
        return self._encode(text.decode("utf-8"))  # llguidance hands over only whole UTF-8 characters
