"""What a structured-output token mask costs per token: a 32k SentencePiece vocabulary read through our token
table (models/llama/structured_vocab.py) against SmolLM2's tokenizer.json (49k, read by llguidance), in the
same run, on the same JSON answers.

    python -m presets.tools.bench_mask [--model_dir .cache/smollm2-135m-instruct] [--answers 40]

The SentencePiece model is a Llama-2-style BPE (32000 pieces, byte fallback, identity normalization)
trained here on 8 MB of the Python standard library's source, as no Llama-2 tokenizer.model can be
fetched (the test corpus is too small for 32k natural pieces). Each answer is a JSON person (the schema of
bench_structured) written by json.dumps; a matcher steps through its tokens and each step's mask is timed:
llguidance's compute_bitmask alone, and the row the sampler uses (engine/structured.py allowed_tokens).
"""

import argparse
import io
import json
import os
import random
import statistics
import sysconfig
import time

from presets.tools.bench_structured import SCHEMA


def train_sentencepiece(size: int = 8_000_000) -> bytes:
    """A 32000-piece BPE SentencePiece model in Llama-2's settings, trained on the standard library's code."""
    import sentencepiece as spm

    lines, total = [], 0
    root = sysconfig.get_paths()["stdlib"]
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(f for f in files if f.endswith(".py")):
            with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                lines += [s.strip() for s in f if s.strip()]
            total = sum(map(len, lines))
            if total > size:
                break
        if total > size:
            break
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        vocab_size=32000,
        model_type="bpe",
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    return out.getvalue()


def answers(n: int, seed: int = 0) -> list[str]:
    """n JSON persons of the bench schema, some with non-ASCII names."""
    rng = random.Random(seed)
    names = ["Ada Lovelace", "Zoë Šťastná", "李小龙", "Jean-Luc Picard", "Ngozi Okonjo", "O'Brien", "José Ñúñez"]
    cities = ["Paris", "London", "Tokyo", "São Paulo", "Kraków", "New York"]
    return [
        json.dumps(
            {"name": rng.choice(names), "age": rng.randrange(1, 100), "city": rng.choice(cities)}, ensure_ascii=False
        )
        for _ in range(n)
    ]


def time_masks(structured, grammar: str, docs: list[list[int]], vocab: int) -> tuple[list[float], list[float]]:
    """Seconds of each step's compute_bitmask, and of each step's allowed_tokens row, over all docs."""
    from presets.engine.structured import allowed_tokens

    bitmask, row = [], []
    for ids in docs:
        for timed in (bitmask, row):
            m = structured.matcher(grammar)
            for token in ids:
                t0 = time.perf_counter()
                m.compute_bitmask() if timed is bitmask else allowed_tokens(m, vocab)
                timed.append(time.perf_counter() - t0)
                if not m.consume_token(token):
                    raise RuntimeError(f"the grammar refused token {token}: {m.get_error()}")
    return bitmask, row


def main(argv=None):
    from presets.engine.structured import StructuredOutput, grammar_for
    from presets.models.llama.structured_vocab import structured_output
    from presets.models.llama.tokenizer import HFTokenizer, Tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", default=".cache/smollm2-135m-instruct")
    ap.add_argument("--answers", type=int, default=40)
    a = ap.parse_args(argv)
    sp_path = os.path.join(".cache", "bench-mask-sp32k.model")
    if not os.path.isfile(sp_path):
        os.makedirs(".cache", exist_ok=True)
        with open(sp_path, "wb") as f:
            f.write(train_sentencepiece())
    sp = Tokenizer(sp_path)
    hf = HFTokenizer(os.path.join(a.model_dir, "tokenizer.json"), a.model_dir)
    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    texts = answers(a.answers)
    sp_structured = structured_output(sp, sp.n_words)
    table_encode = sp_structured.source.encode  # text within a generation: no dummy-prefix space
    cases = {
        "SentencePiece 32k, token table": (sp_structured, [table_encode(t) for t in texts], sp.n_words),
        f"tokenizer.json {hf.n_words}, SmolLM2": (
            StructuredOutput(hf.path, hf.n_words, hf.eos_ids),
            [hf.encode(t, bos=False, eos=False) for t in texts],
            hf.n_words,
        ),
    }
    for structured, docs, vocab in cases.values():  # build the tokenizers and warm the grammar up
        time_masks(structured, grammar, docs[:2], vocab)
    print(f"{a.answers} JSON persons; per token, p50 / p90 in microseconds")
    for label, (structured, docs, vocab) in cases.items():
        bitmask, row = time_masks(structured, grammar, docs, vocab)
        q = {k: statistics.quantiles(v, n=10) for k, v in (("bitmask", bitmask), ("row", row))}
        print(
            f"{label}: {len(bitmask)} tokens; compute_bitmask {statistics.median(bitmask) * 1e6:.0f} / "
            f"{q['bitmask'][8] * 1e6:.0f}; sampler's row {statistics.median(row) * 1e6:.0f} / {q['row'][8] * 1e6:.0f}"
        )


if __name__ == "__main__":
    main()
