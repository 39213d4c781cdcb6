"""Write a random-weight Llama-2 checkpoint in Meta's exact layout, for tests, demos and benchmarks.

    python -m presets.tools.tiny_checkpoint OUT_DIR [--dim 64 --n_layers 2 --n_heads 4 --shards 2 ...]

OUT_DIR gets params.json, consolidated.NN.pth (one per model-parallel shard, split as Meta splits
them, bf16 like Meta's files) and a SentencePiece tokenizer.model trained on corpus.txt beside this
file. The weights are random: the text they produce is meaningless.
"""

import argparse
import io
import json
import os

import sentencepiece as spm
import torch

from presets.models.llama.layout import split_dim
from presets.models.llama.model import ModelArgs

CORPUS = os.path.join(os.path.dirname(__file__), "corpus.txt")


def train_tokenizer(vocab_size: int) -> bytes:
    """A SentencePiece BPE model of exactly `vocab_size` pieces (byte fallback, BOS 1, EOS 2)."""

    def train(filler: int) -> bytes:
        out = io.BytesIO()
        with open(CORPUS, encoding="utf-8") as f:
            lines = f.read().splitlines()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=out,
            vocab_size=vocab_size,
            model_type="bpe",
            bos_id=1,
            eos_id=2,
            unk_id=0,
            pad_id=-1,
            byte_fallback=True,
            character_coverage=1.0,
            hard_vocab_limit=False,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,  # as Llama's tokenizer was trained
            user_defined_symbols=[f"<extra_{i}>" for i in range(filler)],
            minloglevel=2,
            num_threads=1,
        )
        return out.getvalue()

    model = train(0)
    natural = spm.SentencePieceProcessor(model_proto=model).vocab_size()
    if natural < vocab_size:
        # The corpus holds too few merges for a large vocab: fill up with unused symbols.
        model = train(vocab_size - natural)
    got = spm.SentencePieceProcessor(model_proto=model).vocab_size()
    if got != vocab_size:
        raise RuntimeError(f"tokenizer has {got} pieces, wanted {vocab_size}")
    return model


def random_weights(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """Full (unsharded) random weights with Meta's key names, fp32."""
    g = torch.Generator().manual_seed(seed)

    def linear(out_dim, in_dim):
        return torch.randn(out_dim, in_dim, generator=g) / in_dim**0.5

    def norm():
        return 1 + 0.1 * torch.randn(args.dim, generator=g)

    kv = (args.n_kv_heads or args.n_heads) * args.head_dim
    hidden = args.ffn_hidden_dim
    w = {"tok_embeddings.weight": torch.randn(args.vocab_size, args.dim, generator=g)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        w[p + "attention.wq.weight"] = linear(args.dim, args.dim)
        w[p + "attention.wk.weight"] = linear(kv, args.dim)
        w[p + "attention.wv.weight"] = linear(kv, args.dim)
        w[p + "attention.wo.weight"] = linear(args.dim, args.dim)
        w[p + "feed_forward.w1.weight"] = linear(hidden, args.dim)
        w[p + "feed_forward.w2.weight"] = linear(args.dim, hidden)
        w[p + "feed_forward.w3.weight"] = linear(hidden, args.dim)
        w[p + "attention_norm.weight"] = norm()
        w[p + "ffn_norm.weight"] = norm()
    w["norm.weight"] = norm()
    w["output.weight"] = linear(args.vocab_size, args.dim)
    # Meta's files carry the rotary base frequencies; the model ignores them.
    w["rope.freqs"] = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
    return w


def shard(weights: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Split full weights into `n` model-parallel shards the way Meta's consolidated files are split."""
    shards = [{} for _ in range(n)]
    for key, t in weights.items():
        dim = split_dim(key)
        parts = t.chunk(n, dim=dim) if dim is not None else [t] * n
        for s, part in zip(shards, parts):
            s[key] = part.clone()
    return shards


def write_checkpoint(out_dir, args: ModelArgs, shards: int = 1, seed: int = 0, dtype=torch.bfloat16) -> str:
    """Write params.json, the shards and tokenizer.model into out_dir; returns out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    tok = train_tokenizer(args.vocab_size)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(tok)
    params = {k: v for k, v in vars(args).items() if v is not None and k != "rope_theta"}
    params["vocab_size"] = -1  # as Meta writes it: the tokenizer decides
    with open(os.path.join(out_dir, "params.json"), "w") as f:
        json.dump(params, f)
    full = {k: v.to(dtype) for k, v in random_weights(args, seed).items()}
    for i, part in enumerate(shard(full, shards)):
        torch.save(part, os.path.join(out_dir, f"consolidated.{i:02d}.pth"))
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--n_layers", type=int, default=2)
    ap.add_argument("--n_heads", type=int, default=4)
    ap.add_argument("--n_kv_heads", type=int, default=None)
    ap.add_argument("--vocab_size", type=int, default=512)
    ap.add_argument("--multiple_of", type=int, default=32)
    ap.add_argument("--ffn_dim_multiplier", type=float, default=None)
    ap.add_argument("--norm_eps", type=float, default=1e-5)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    a = ap.parse_args(argv)
    args = ModelArgs(
        dim=a.dim,
        n_layers=a.n_layers,
        n_heads=a.n_heads,
        n_kv_heads=a.n_kv_heads,
        vocab_size=a.vocab_size,
        multiple_of=a.multiple_of,
        ffn_dim_multiplier=a.ffn_dim_multiplier,
        norm_eps=a.norm_eps,
    )
    write_checkpoint(a.out_dir, args, a.shards, a.seed, getattr(torch, a.dtype))
    print(f"wrote a random-weight Llama-2 checkpoint ({a.shards} shard(s)) to {a.out_dir}")


if __name__ == "__main__":
    main()
