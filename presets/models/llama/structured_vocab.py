"""What structured output (engine/structured.py) reads of our tokenizers: a tokenizer.json's path, or a
SentencePiece vocabulary (Meta's tokenizer.model) as a TokenTable (engine/token_table.py).

A piece's bytes are its text within a text: "▁foo" is b" foo" (SentencePiece writes a space as "▁"), a
byte-fallback piece "<0x0A>" is the one byte 0x0A (Llama's vocabulary has no piece for a newline, "{" or
most CJK: they are spelt in UTF-8 bytes); control, unknown and unused pieces (<s>, </s>, <unk>) are
special tokens, named by their piece. SentencePiece puts a space before a whole text ("foo" is "▁foo");
text inside a generation has none, so it is tokenized by a copy of the model with that flag off.
"""

import logging

from presets.engine.structured import StructuredOutput
from presets.engine.token_table import PROBE, TokenTable
from presets.models.llama.tokenizer import HFTokenizer, Tokenizer

log = logging.getLogger(__name__)

# A ModelProto field appended to a serialized SentencePiece model: normalizer_spec (field 3) =
# {add_dummy_prefix (field 3): false}. Protobuf merges a repeated message field into the first one, so
# this changes that flag and nothing else.
NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


def sentencepiece_table(sp) -> TokenTable:
    """The TokenTable of a sentencepiece.SentencePieceProcessor."""
    from sentencepiece import SentencePieceProcessor

    tokens, special = [], []
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            tokens.append(bytes([int(piece[3:-1], 16)]))  # "<0xAB>"
            continue
        tokens.append(piece.replace("\u2581", " ").encode("utf-8"))
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            special.append(i)
    within = SentencePieceProcessor(model_proto=sp.serialized_model_proto() + NO_DUMMY_PREFIX)
    return TokenTable(tokens, special, within.encode)


def structured_output(tokenizer: Tokenizer | HFTokenizer, vocab_size: int) -> StructuredOutput | None:
    """Structured output for a model of `vocab_size` logits with this tokenizer; None (requests asking for it
    answer 400) for a SentencePiece model whose pieces do not spell its text (a normalizing one)."""
    if isinstance(tokenizer, HFTokenizer):
        return StructuredOutput(tokenizer.path, vocab_size, tokenizer.eos_ids)
    table = sentencepiece_table(tokenizer.sp)
    if not table.spells(PROBE):
        log.warning("structured output is off: this tokenizer.model's pieces do not spell the text they encode")
        return None
    return StructuredOutput(table, vocab_size, tokenizer.eos_ids)
