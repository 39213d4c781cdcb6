"""Chat messages to prompt ids (api/chat.py): Meta's Llama-2 format (ids, role order, special tags), validation, and
one renderer of chat templates for every server."""

import pytest

from presets.api.chat import encode_dialog, has_special_tags, kaito_dialog
from presets.errors import ApiError
from presets.models.llama.tokenizer import Tokenizer

DIALOG = [
    {"role": "system", "content": "Always answer with Haiku"},
    {"role": "user", "content": "I am going to Paris, what should I see?"},
    {"role": "assistant", "content": " Paris, the capital of France. "},
    {"role": "user", "content": "What is so great about its art?"},
]


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return Tokenizer(f"{tiny_ckpt}/tokenizer.model")


def test_chat_format_token_ids(tok):
    ids = encode_dialog(tok, kaito_dialog(DIALOG, "d"))
    first = "[INST] <<SYS>>\nAlways answer with Haiku\n<</SYS>>\n\nI am going to Paris, what should I see? [/INST]"
    expected = tok.encode(first + " Paris, the capital of France. ", bos=True, eos=True) + tok.encode(
        "[INST] What is so great about its art? [/INST]", bos=True, eos=False
    )
    assert ids == expected
    # The exchange is wrapped BOS ... EOS and the open last turn starts with BOS: exactly two of each shape.
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 2 and ids.count(tok.eos_id) == 1
    eos_at = ids.index(tok.eos_id)
    assert tok.decode(ids[1:eos_at]) == first + " Paris, the capital of France. "
    assert tok.decode(ids[eos_at + 2 :]) == "[INST] What is so great about its art? [/INST]"


def test_chat_format_golden_ids(tok):
    # Pinned ids for the tiny tokenizer (trained from presets/tools/corpus.txt): a format change shows here.
    ids = encode_dialog(tok, [{"role": "user", "content": "hi"}])
    assert tok.decode(ids) == "[INST] hi [/INST]"
    assert ids[0] == 1 and tok.sp.id_to_piece(ids[1:]) == [
        "▁",
        "<0x5B>",
        "I",
        "N",
        "S",
        "T",
        "<0x5D>",
        "▁h",
        "i",
        "▁",
        "<0x5B>",
        "/",
        "I",
        "N",
        "S",
        "T",
        "<0x5D>",
    ]


@pytest.mark.parametrize(
    "roles",
    [
        ["assistant"],
        ["user", "user"],
        ["system"],
        ["user", "assistant"],
        ["system", "assistant", "user"],
        ["user", "system", "user"],
        ["user", "assistant", "assistant"],
    ],
)
def test_wrong_role_order_is_rejected_in_metas_format(tok, roles):
    dialog = kaito_dialog([{"role": r, "content": "x"} for r in roles], "input_string[3]")
    with pytest.raises(ApiError, match="input_string\\[3\\]: roles must") as e:
        encode_dialog(tok, dialog, "input_string[3]")
    assert e.value.status == 400


@pytest.mark.parametrize(
    "dialog, message",
    [
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        ([{"role": "bot", "content": "x"}], "role must be one of"),
        ([{"role": "user", "content": 5}], "content must be a string"),
        (["hi"], "must be an object"),
    ],
)
def test_malformed_dialogs(dialog, message):
    with pytest.raises(ApiError, match=message):
        kaito_dialog(dialog, "d")


def test_special_tags_detected():
    assert has_special_tags([{"role": "user", "content": "Unsafe [/INST] prompt using [INST] special tags"}])
    assert has_special_tags([{"role": "system", "content": "<<SYS>>"}, {"role": "user", "content": "x"}])
    assert not has_special_tags([{"role": "user", "content": "[inst] lower case is text"}])
