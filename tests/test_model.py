"""Our Llama-2 against transformers' LlamaForCausalLM on the same weights (fp32, CPU), and against
itself over the paged cache: cached decode, packed and chunked prefill, shared prefix blocks, batched
decode (also in bf16 and fp16)."""

import pytest
import torch

from presets.models.llama.hf_convert import to_hf
from presets.models.llama.load import load_model, read_args
from presets.models.llama.tokenizer import Tokenizer
from tests.paged import engine_for, item, run


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
OTHERS = ("Hello there", "The river flows past the old mill")


def test_logits_match_transformers(pair):
    tok, ours, hf = pair
    ids = tok.encode(PROMPT, bos=True, eos=False)
    engine = engine_for(ours)
    logits = run(engine, item(0, 0, ids), all_logits=True)
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits
    assert logits.shape == ref.shape == (1, len(ids), tok.n_words)
    assert rel_err(logits, ref) < 1e-4


def test_greedy_tokens_match_transformers_generate(pair):
    tok, ours, hf = pair
    ids = tok.encode(PROMPT, bos=True, eos=False)
    engine = engine_for(ours)
    got = [int(run(engine, item(1, 0, ids)).argmax())]
    while len(got) < 24:
        got.append(int(run(engine, item(1, len(ids) + len(got) - 1, [got[-1]])).argmax()))
    hf.generation_config.eos_token_id = None  # generate a fixed count, as ignore_eos does
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert got == ref[0, len(ids) :].tolist()


def test_cached_decode_equals_full_forward(pair):
    tok, ours, _ = pair
    ids = tok.encode(PROMPT, bos=True, eos=False)
    engine = engine_for(ours)
    full = run(engine, item(0, 0, ids), all_logits=True)[0]
    run(engine, item(1, 0, ids[:5]))
    stepped = [run(engine, item(1, p, [t]))[0] for p, t in enumerate(ids) if p >= 5]
    assert rel_err(torch.stack(stepped), full[5:]) < 1e-5


@pytest.mark.parametrize("cuts", [[7, 20], [16, 32], [1, 2, 3]], ids=["unaligned", "block-aligned", "tiny"])
def test_chunked_prefill_equals_whole_prompt(pair, cuts):
    """A prompt computed in chunks (each attending to the cached positions before it) gives the whole
    prompt's logits at every position, and the same next decode step."""
    tok, ours, _ = pair
    ids = tok.encode(PROMPT + OTHERS[1], bos=True, eos=False)
    engine = engine_for(ours)
    whole = run(engine, item(0, 0, ids), all_logits=True)[0]
    bounds = [0, *cuts, len(ids)]
    parts = [run(engine, item(1, a, ids[a:b]), all_logits=True)[0] for a, b in zip(bounds, bounds[1:])]
    assert rel_err(torch.cat(parts), whole) < 1e-5
    nxt = [run(engine, item(s, len(ids), [5]))[0] for s in (0, 1)]
    assert rel_err(nxt[1], nxt[0]) < 1e-5


def test_shared_prefix_blocks_equal_own_computation(pair):
    """Sequence 1 reuses sequence 0's first two blocks (32 cached positions) and computes only its own
    rest, in the same step as sequence 0 writes them and in a later step: its logits are the same."""
    tok, ours, _ = pair
    shared = tok.encode(PROMPT * 3, bos=True, eos=False)[:32]
    a, b = shared + tok.encode(OTHERS[0], bos=False, eos=False), shared + tok.encode(OTHERS[1], bos=False, eos=False)
    engine = engine_for(ours)
    own = run(engine, item(2, 0, b), all_logits=True)[0]
    table_b = [0, 1, *range(8, 8 + 2)]  # sequence 0's blocks 0-1, then its own
    same_step = run(engine, item(0, 0, a), item(1, 32, b[32:], table=table_b), all_logits=True)[0]
    assert rel_err(same_step[len(a) :], own[32:]) < 1e-5
    later = run(engine, item(1, 32, b[32:], table=table_b), all_logits=True)[0]
    assert rel_err(later, own[32:]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_batched_decode_equals_full_forward(gqa_ckpt, dtype):
    """The decode mask is in the model's dtype and hides stale keys: a batch at three positions gives
    each sequence's own last-token logits from a full forward of its whole prompt, in bf16 and fp16."""
    tok = Tokenizer(f"{gqa_ckpt}/tokenizer.model")
    engine = engine_for(load_model(gqa_ckpt, tok, 0, 1, torch.device("cpu"), dtype))
    prompts = [tok.encode(t, bos=True, eos=False) for t in (PROMPT, *OTHERS)]
    run(engine, item(1, 0, prompts[0] + prompts[2]))  # sequence 1's blocks keep stale keys beyond its prompt
    run(engine, *(item(s, 0, p[:-1]) for s, p in enumerate(prompts)))
    batched = run(engine, *(item(s, len(p) - 1, p[-1:]) for s, p in enumerate(prompts)))
    full = torch.cat([run(engine, item(s, 0, p)) for s, p in enumerate(prompts)])
    assert batched.shape == (3, tok.n_words)
    assert rel_err(batched, full) < 1e-2


def test_packed_prefill_equals_one_prompt_at_a_time(pair):
    tok, ours, _ = pair
    prompts = [tok.encode(t, bos=True, eos=False) for t in (PROMPT, "Hello", OTHERS[1])]
    seqs = [2, 0, 3]
    engine = engine_for(ours)

    def next_step():  # one more token for each sequence, all in one step
        return run(engine, *(item(s, len(p), [5]) for s, p in zip(seqs, prompts)))

    packed = run(engine, *(item(s, 0, p) for s, p in zip(seqs, prompts)))
    packed_next = next_step()
    single = torch.cat([run(engine, item(s, 0, p)) for s, p in zip(seqs, prompts)])
    single_next = next_step()
    assert packed.shape == (3, tok.n_words)
    assert rel_err(packed, single) < 1e-5 and rel_err(packed_next, single_next) < 1e-5


def test_mixed_step_of_decodes_and_prompt_chunks_equals_separate_steps(pair):
    """One step holding two decodes, a chunk that does not sample and a prompt that does: each row is
    what the same work gives run alone."""
    tok, ours, _ = pair
    a, b, c = (tok.encode(t, bos=True, eos=False) for t in (PROMPT, *OTHERS))
    engine = engine_for(ours)
    run(engine, item(0, 0, a), item(1, 0, b))
    work = [item(2, 0, c), item(0, len(a), [7]), item(3, 0, a[:9], sample=False), item(1, len(b), [9])]
    mixed = run(engine, *work)
    alone = torch.cat([run(engine, w) for w in work if w.sample])
    assert mixed.shape == (3, tok.n_words) and rel_err(mixed, alone) < 1e-5


def test_batched_decode_at_different_positions_equals_single(pair):
    tok, ours, _ = pair
    a = tok.encode(PROMPT, bos=True, eos=False)
    b = tok.encode("Hello", bos=True, eos=False)
    engine = engine_for(ours)
    run(engine, item(3, 0, a), item(0, 0, b))
    batched = run(engine, item(3, len(a), [7]), item(0, len(b), [9]))
    single_a = run(engine, item(3, len(a), [7]))  # rewrites the same cache position: same result
    single_b = run(engine, item(0, len(b), [9]))
    assert rel_err(batched, torch.cat([single_a, single_b])) < 1e-5
