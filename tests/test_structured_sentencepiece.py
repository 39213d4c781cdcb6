"""Structured output on a SentencePiece tokenizer (Meta's tokenizer.model): the token table llguidance reads
spells exactly what we decode and tokenizes as we do, for many random texts; and on a Meta-layout checkpoint
(random weights) the routes' json_schema and json_object answers parse and validate, streamed too, in
batches mixed with free requests. The weights are random: a frequency penalty keeps them from spinning in
JSON's free whitespace, so that answers end within max_tokens."""

import json
import os
import random

import jsonschema
import pytest
import sentencepiece as spm

from presets.engine.token_table import PROBE
from presets.models.llama.structured_vocab import sentencepiece_table, structured_output
from presets.models.llama.tokenizer import Tokenizer
from presets.tools.tiny_checkpoint import CORPUS
from tests import test_structured_output as shared
from tests.conftest import real_client

PERSON, SCHEMA, ASK = shared.PERSON, shared.SCHEMA, shared.ASK
SPIN = {"frequency_penalty": 2, "max_tokens": 256}  # random weights: see the module's docstring


@pytest.fixture(scope="module")
def sp(tiny_ckpt):
    tok = Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))
    return tok, sentencepiece_table(tok.sp).lltokenizer(tok.n_words, tok.eos_ids)


def random_texts(n: int, seed: int = 0) -> list[str]:
    """ASCII, runs of spaces, newlines and tabs, accents, CJK, emoji (byte-fallback pieces), and JSON."""
    rng = random.Random(seed)
    alphabets = [
        "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ0123456789.,;:!?'\"{}[]()-_/\\@#$%^&*+=<>|`~",
        "  \n\n\t\r ",
        "éèêàçüöñßøÆŒ",
        "世界你好日本語한국어",
        "🙂🚀👍🏽∑∞→",
    ]
    texts = []
    for i in range(n):
        if i % 5 == 4:
            value = {rng.choice(["name", "a b", "ünï", "k"]): rng.choice([1, -2.5e3, "x\ny", None, [True, {}]])}
            texts.append(json.dumps(value, indent=rng.choice([None, 2]), ensure_ascii=rng.random() < 0.5))
        else:
            texts.append("".join(rng.choice(rng.choice(alphabets)) for _ in range(rng.randrange(1, 40))))
    return texts


def test_the_token_table_spells_what_we_decode_and_tokenizes_as_we_do(sp):
    """For each text: llguidance's bytes of our ids are the UTF-8 of our decode (with the space SentencePiece
    puts before a whole text), its tokenization of that text is ours, and within a text (after a token)
    both read the same."""
    tok, llt = sp
    after = tok.encode("x", bos=False, eos=False)
    for text in random_texts(400):
        ids = tok.encode(text, bos=False, eos=False)
        assert tok.decode(ids) == text
        assert llt.decode_bytes(ids) == (" " + tok.decode(ids)).encode(), text
        assert llt.tokenize_str(" " + text) == ids, text
        within = llt.tokenize_str(text)
        assert tok.decode(after + within) == tok.decode(after) + text, text
        assert llt.decode_bytes(within) == text.encode(), text


def test_random_token_sequences_read_alike(sp):
    """Any sequence of text pieces (not special, not byte-fallback: those spell only in whole characters,
    as the texts above have them) reads the same through the table as through our decode, within a text."""
    tok, llt = sp
    rng = random.Random(1)
    text_ids = [i for i in range(tok.n_words) if not (llt.is_special_token(i) or tok.sp.is_byte(i))]
    after = tok.encode("x", bos=False, eos=False)
    for _ in range(300):
        ids = rng.choices(text_ids, k=rng.randrange(1, 12))
        assert llt.decode_bytes(ids).decode() == tok.decode(after + ids)[len(tok.decode(after)) :], ids


def test_special_tokens_and_eos(sp):
    """<unk>, <s>, </s> are special; so is the byte 0xFF (llguidance's mark of a special token, and never in
    UTF-8 text); the table is as wide as the logits."""
    tok, llt = sp
    special = [i for i in range(tok.n_words) if llt.is_special_token(i)]
    assert special == sorted({tok.sp.unk_id(), tok.bos_id, tok.eos_id, tok.sp.piece_to_id("<0xFF>")})
    assert llt.eos_token == tok.eos_id and llt.vocab_size == tok.n_words
    assert sentencepiece_table(tok.sp).lltokenizer(tok.n_words + 64, tok.eos_ids).vocab_size == tok.n_words + 64


def test_a_normalizing_sentencepiece_model_has_no_structured_output(tmp_path):
    """A tokenizer.model that rewrites text (NFKC, collapsed spaces) cannot be read as bytes per token: its
    server answers 400 to a response_format instead of enforcing a wrong grammar."""
    with open(CORPUS, encoding="utf-8") as f:
        lines = f.read().splitlines()
    path = tmp_path / "tokenizer.model"
    with open(path, "wb") as out:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=out,
            vocab_size=400,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="nmt_nfkc",
            minloglevel=2,
        )
    tok = Tokenizer(str(path))
    assert not sentencepiece_table(tok.sp).spells(PROBE)
    assert structured_output(tok, tok.n_words) is None


@pytest.fixture(scope="module")
def chat(tiny_ckpt):
    """A Meta-layout checkpoint (tokenizer.model) served with the OpenAI routes."""
    client, rt = real_client(tiny_ckpt, "chat", openai=True, max_seq_len=512, max_batch_size=8, max_queue_size=64)
    yield client, rt
    rt.shutdown()


def ask(client, **body):
    r = client.post("/v1/chat/completions", json={"messages": ASK, **SPIN, **body})
    assert r.status_code == 200, r.text
    return r.get_json()["choices"]


def test_a_batch_mixing_constrained_and_free_requests(chat):
    """As on SmolLM2 (test_structured_output.py), on SentencePiece: the 4 constrained answers all differ."""
    choices = shared.mixed_batch(chat[0], ("Paris?", "Three colours."), ask)
    assert len({c["message"]["content"] for c in choices}) == 4


def test_json_object_a_streamed_schema_and_completions(chat):
    """json_object: every answer that ends is a JSON object (random weights may run past max_tokens inside an
    object; some end); a streamed schema answer is the whole one; /v1/completions is held as chat is."""
    client, _ = chat
    objects = ask(client, temperature=1.0, seed=3, n=8, response_format={"type": "json_object"})
    ended = [c["message"]["content"] for c in objects if c["finish_reason"] == "stop"]
    assert ended and all(isinstance(json.loads(text), dict) for text in ended)
    (whole,) = ask(client, temperature=0, response_format=SCHEMA)
    stream = client.post(
        "/v1/chat/completions",
        json={"messages": ASK, **SPIN, "temperature": 0, "response_format": SCHEMA, "stream": True},
    ).text
    events = [json.loads(e[6:]) for e in stream.split("\n\n") if e.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == whole["message"]["content"] and events[-1]["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(text), PERSON)
    r = client.post("/v1/completions", json={"prompt": "A person:", **SPIN, "seed": 5, "response_format": SCHEMA})
    (choice,) = r.get_json()["choices"]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["text"]), PERSON)


# The same checks as on SmolLM2's tokenizer.json, on this module's SentencePiece `chat`.
test_a_schema_the_grammar_engine_cannot_follow_is_a_400_naming_it = (
    shared.test_a_schema_the_grammar_engine_cannot_follow_is_a_400_naming_it
)
test_grammars_are_checked_once_and_ignore_eos_is_refused = (
    shared.test_grammars_are_checked_once_and_ignore_eos_is_refused
)
