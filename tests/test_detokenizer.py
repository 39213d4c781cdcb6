"""Incremental detokenization: whatever the split of the ids, the pieces join to the whole decode, and no piece
carries a broken character (byte-level BPE splits emoji and CJK characters over several tokens)."""

import random

import pytest

from presets.engine.detokenizer import Detokenizer
from presets.models.llama.tokenizer import find_tokenizer, load_tokenizer

TEXTS = [
    "Llamas 🦙 and rockets 🚀🚀 fly; 日本語のテキストと中文字符。 Ünïcödé café — naïve.",
    "👩‍👩‍👧‍👦 family, 🇫🇷 flag, 한국어 문장, and plain ASCII at the end",
    "  leading spaces, tabs\tand\nnew lines\n\n 終わり",
]


@pytest.fixture(params=["smollm2", "sentencepiece"])
def tokenizer(request):
    folder = request.getfixturevalue("smollm2_dir" if request.param == "smollm2" else "tiny_ckpt")
    return load_tokenizer(find_tokenizer(folder), folder)


def stream(tokenizer, ids: list[int], sizes) -> list[str]:
    detok, pieces, at = Detokenizer(tokenizer.decode), [], 0
    for size in sizes:
        pieces.append(detok.add(ids[at : at + size]))
        at += size
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_to_the_whole_text_for_any_split(tokenizer, text):
    ids = tokenizer.encode(text, bos=False, eos=False)
    whole = tokenizer.decode(ids)
    assert "\ufffd" not in whole
    rng = random.Random(0)
    splits = [[1] * len(ids), [2] * len(ids), [3] * len(ids)]
    splits += [[rng.randint(1, 4) for _ in ids] for _ in range(5)]
    for sizes in splits:
        pieces = stream(tokenizer, ids, sizes)
        assert "".join(pieces) == whole
        assert not any("\ufffd" in p for p in pieces)


def test_a_split_character_waits_for_its_last_byte(smollm2_dir):
    tok = load_tokenizer(find_tokenizer(smollm2_dir), smollm2_dir)
    ids = tok.encode("🦙", bos=False, eos=False)
    assert len(ids) > 1  # byte-level BPE: the emoji is several byte tokens
    detok = Detokenizer(tok.decode)
    assert [detok.add([i]) for i in ids] == [""] * (len(ids) - 1) + ["🦙"]
    assert detok.update(ids + tok.encode(" ok", bos=False, eos=False)) == "🦙 ok"
