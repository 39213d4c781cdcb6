"""Our Llama-2 against transformers' LlamaForCausalLM on the same weights (fp32, CPU), and against
itself: cached decode, packed prefill, batched decode (also in bf16 and fp16)."""

import pytest
import torch

from presets.llama2.checkpoint import load_model, read_args
from presets.llama2.engine import LlamaEngine
from presets.llama2.hf_convert import to_hf
from presets.llama2.model import Decode, Prefill
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
        logits = ours(*Prefill.build([0], [ids], "cpu"), all_logits=True)
        ref = hf(torch.tensor([ids])).logits
    assert logits.shape == ref.shape == (1, len(ids), tok.n_words)
    assert rel_err(logits, ref) < 1e-4


def test_greedy_tokens_match_transformers_generate(pair):
    tok, ours, hf = pair
    ids = tok.encode(PROMPT, bos=True, eos=False)
    engine = LlamaEngine(ours, max_batch_size=2, max_seq_len=64)
    got = [int(engine.prefill([1], [ids]).argmax())]
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
        full = ours(*Prefill.build([0], [ids], "cpu"), all_logits=True)[0]
        ours(*Prefill.build([1], [ids[:5]], "cpu"))
        steps = [(t, Decode.build([1], [p], "cpu", torch.float32)) for p, t in enumerate(ids) if p >= 5]
        stepped = [ours(torch.tensor([[t]]), step)[0] for t, step in steps]
    assert rel_err(torch.stack(stepped), full[5:]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_batched_decode_equals_full_forward(gqa_ckpt, dtype):
    """The decode mask is in the model's dtype and hides stale keys: a batch at three positions gives
    each sequence's own last-token logits from a full forward of its whole prompt, in bf16 and fp16."""
    tok = Tokenizer(f"{gqa_ckpt}/tokenizer.model")
    engine = LlamaEngine(load_model(gqa_ckpt, tok, 0, 1, torch.device("cpu"), dtype), max_batch_size=3, max_seq_len=64)
    assert Decode.build([0, 1], [3, 5], "cpu", dtype).mask.dtype == dtype
    prompts = [tok.encode(t, bos=True, eos=False) for t in (PROMPT, "Hello there", "The river flows past the old mill")]
    engine.prefill([1], [prompts[0] + prompts[2]])  # slot 1 keeps stale keys beyond the short prompt
    engine.prefill([0, 1, 2], [p[:-1] for p in prompts])
    batched = engine.decode([0, 1, 2], [p[-1] for p in prompts], [len(p) - 1 for p in prompts])
    full = torch.cat([engine.prefill([s], [p]) for s, p in enumerate(prompts)])
    assert batched.shape == (3, tok.n_words)
    assert rel_err(batched, full) < 1e-2


def test_packed_prefill_equals_one_prompt_at_a_time(pair):
    tok, ours, _ = pair
    prompts = [tok.encode(t, bos=True, eos=False) for t in (PROMPT, "Hello", "The river flows past the old mill")]
    engine = LlamaEngine(ours, max_batch_size=4, max_seq_len=64)
    packed = engine.prefill([2, 0, 3], prompts)
    packed_next = engine.decode([0, 2, 3], [5, 5, 5], [len(prompts[1]), len(prompts[0]), len(prompts[2])])
    single = torch.cat([engine.prefill([s], [p]) for s, p in zip([2, 0, 3], prompts)])
    single_next = engine.decode([0, 2, 3], [5, 5, 5], [len(prompts[1]), len(prompts[0]), len(prompts[2])])
    assert packed.shape == (3, tok.n_words)
    assert rel_err(packed, single) < 1e-5 and rel_err(packed_next, single_next) < 1e-5


@pytest.mark.parametrize("slots", [[3, 0], [1, 2]], ids=["gathered-slots", "consecutive-slots"])
def test_batched_decode_at_different_positions_equals_single(pair, slots):
    tok, ours, _ = pair
    a = tok.encode(PROMPT, bos=True, eos=False)
    b = tok.encode("Hello", bos=True, eos=False)
    engine = LlamaEngine(ours, max_batch_size=4, max_seq_len=64)
    engine.prefill(slots, [a, b])
    batched = engine.decode(slots, [7, 9], [len(a), len(b)])
    single_a = engine.decode(slots[:1], [7], [len(a)])  # rewrites the same cache position: same result
    single_b = engine.decode(slots[1:], [9], [len(b)])
    assert rel_err(batched, torch.cat([single_a, single_b])) < 1e-5
