"""Our Llama-2 against transformers' LlamaForCausalLM on the same weights (fp32, CPU)."""

import pytest
import torch

from presets.llama2.checkpoint import load_model, read_args
from presets.llama2.engine import LlamaEngine
from presets.llama2.hf_convert import to_hf
from presets.llama2.tokenizer import Tokenizer


def load_pair(ckpt):
    tok = Tokenizer(f"{ckpt}/tokenizer.model")
    ours = load_model(ckpt, tok, 0, 1, torch.device("cpu"), torch.float32)
    state = torch.load(f"{ckpt}/consolidated.00.pth", weights_only=True)
    return tok, ours, to_hf(read_args(ckpt, tok), state)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(params=["tiny_ckpt", "gqa_ckpt"], ids=["mha", "gqa"])
def pair(request):
    return load_pair(request.getfixturevalue(request.param))


PROMPT = "Simply put, the theory of relativity states that "


def test_logits_match_transformers(pair):
    tok, ours, hf = pair
    ids = tok.encode(PROMPT, bos=True, eos=False)
    ours.setup_caches(1, 64)
    with torch.inference_mode():
        logits = ours(torch.tensor([ids]), torch.tensor([0]), torch.tensor([0]), last_only=False)
        ref = hf(torch.tensor([ids])).logits
    assert logits.shape == ref.shape == (1, len(ids), tok.n_words)
    assert rel_err(logits, ref) < 1e-4


def test_greedy_tokens_match_transformers_generate(pair):
    tok, ours, hf = pair
    ids = tok.encode(PROMPT, bos=True, eos=False)
    engine = LlamaEngine(ours, max_batch_size=2, max_seq_len=64)
    got = [int(engine.prefill(1, ids).argmax())]
    while len(got) < 24:
        got.append(int(engine.decode([1], [got[-1]], [len(ids) + len(got) - 1]).argmax()))
    hf.generation_config.eos_token_id = None  # generate a fixed count, as ignore_eos does
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert got == ref[0, len(ids) :].tolist()


def test_cached_decode_equals_full_forward(pair):
    tok, ours, _ = pair
    ids = tok.encode(PROMPT, bos=True, eos=False)
    ours.setup_caches(2, 64)
    with torch.inference_mode():
        full = ours(torch.tensor([ids]), torch.tensor([0]), torch.tensor([0]), last_only=False)[0]
        ours(torch.tensor([ids[:5]]), torch.tensor([1]), torch.tensor([0]))
        stepped = [
            ours(torch.tensor([[t]]), torch.tensor([1]), torch.tensor([p]))[0] for p, t in enumerate(ids) if p >= 5
        ]
    assert rel_err(torch.stack(stepped), full[5:]) < 1e-5


def test_batched_decode_at_different_positions_equals_single(pair):
    tok, ours, _ = pair
    a = tok.encode(PROMPT, bos=True, eos=False)
    b = tok.encode("Hello", bos=True, eos=False)
    engine = LlamaEngine(ours, max_batch_size=4, max_seq_len=64)
    engine.prefill(3, a)
    engine.prefill(0, b)
    batched = engine.decode([3, 0], [7, 9], [len(a), len(b)])
    single_a = engine.decode([3], [7], [len(a)])  # rewrites the same cache position: same result
    single_b = engine.decode([0], [9], [len(b)])
    assert rel_err(batched, torch.cat([single_a, single_b])) < 1e-5
