"""The step engine on the tiny Llama with each paged-cache feature forced on: greedy tokens equal
transformers' and the path without the feature; the pool is whole again after every run."""

import re
import threading
import time

import pytest
import torch

from presets.engine.kv_memory import CPU_DEFAULT_CAP, size_pool
from presets.engine.params import SamplingParams
from presets.engine.scheduler import Sequence
from presets.models.llama import triton_attention
from presets.models.llama.hf_convert import to_hf
from presets.models.llama.load import read_args
from presets.models.llama.tokenizer import Tokenizer
from presets.servers.llama import build_runtime
from tests.conftest import settings_for

SYSTEM = "You are a helpful assistant. Answer in one short sentence, and be precise about the facts. "
QUESTIONS = [
    f"Question {i}: what is {w}?"
    for i, w in enumerate(
        "the sun,a river,the moon,an old mill,the sea,a city,the wind,a bridge,art,a song,a tree,rain,a map,"
        "a clock,the sky,a stone".split(",")
    )
]
NEW = 20
GREEDY = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
TOKENS_PER_BLOCK_BYTES = 16 * 1024  # tiny model: 2 layers x (k, v) x 4 heads x 16 x 4 bytes = 1 KiB a token


@pytest.fixture(scope="module")
def prompts(tiny_ckpt):
    tok = Tokenizer(f"{tiny_ckpt}/tokenizer.model")
    return [tok.encode(SYSTEM + q, bos=True, eos=False) for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(tiny_ckpt, prompts):
    """transformers' greedy continuation of each prompt."""
    tok = Tokenizer(f"{tiny_ckpt}/tokenizer.model")
    hf = to_hf(read_args(tiny_ckpt, tok), torch.load(f"{tiny_ckpt}/consolidated.00.pth", weights_only=True))
    hf.generation_config.eos_token_id = None
    with torch.inference_mode():
        outs = [hf.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, pad_token_id=0) for p in prompts]
    return [out[0, len(p) :].tolist() for out, p in zip(outs, prompts)]


def started(ckpt, **kw):
    rt = build_runtime(settings_for(ckpt, **{"max_seq_len": 128, "max_batch_size": 16, **kw}))
    rt.start(background=False)
    return rt


def metric(rt, name: str) -> float:
    return float(re.search(rf"^{re.escape(name)} (\S+)$", rt.metrics.render().decode(), re.M).group(1))


def concurrently(rt, prompts, params=GREEDY) -> list[list[int]]:
    out = [None] * len(prompts)

    def one(i):
        out[i] = rt.generate([prompts[i]], params)[0].output

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def assert_pool_whole(rt):
    sched = rt.loop.scheduler
    deadline = time.time() + 5
    while (sched.running or sched.waiting) and time.time() < deadline:
        time.sleep(0.01)
    assert sched.blocks.num_free == sched.config.num_blocks and not sched.running
    assert metric(rt, "vllm:kv_cache_usage_perc") == 0.0


@pytest.mark.parametrize("caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_shared_system_prompt_hits_the_cache_and_gives_transformers_tokens(tiny_ckpt, prompts, reference, caching):
    rt = started(tiny_ckpt, no_prefix_caching=not caching)
    try:
        assert rt.generate([prompts[0]], GREEDY)[0].output == reference[0]
        assert concurrently(rt, prompts[1:]) == reference[1:]
        shared = (len(Tokenizer(f"{tiny_ckpt}/tokenizer.model").encode(SYSTEM, bos=True, eos=False)) // 16) * 16
        hits = metric(rt, "vllm:prefix_cache_hits_total")
        assert (hits >= 15 * shared > 0) if caching else hits == 0
        assert metric(rt, "vllm:prefix_cache_queries_total") >= sum(map(len, prompts))
        assert_pool_whole(rt)
    finally:
        rt.shutdown()


def test_prompts_longer_than_the_step_budget_are_chunked(tiny_ckpt, prompts, reference):
    rt = started(tiny_ckpt, max_num_batched_tokens=8, no_prefix_caching=True)  # every prompt takes 4+ steps
    try:
        assert min(map(len, prompts)) > 4 * 8
        assert concurrently(rt, prompts[:6]) == reference[:6]
        assert_pool_whole(rt)
    finally:
        rt.shutdown()


def test_tiny_pool_preempts_under_16_concurrent_requests_and_loses_nothing(tiny_ckpt, prompts, reference):
    rt = started(tiny_ckpt, kv_cache_memory=str(8 * TOKENS_PER_BLOCK_BYTES), max_num_batched_tokens=64)
    try:
        assert rt.loop.scheduler.config.num_blocks == 8  # 128 positions: two of these sequences at most
        assert concurrently(rt, prompts) == reference
        assert metric(rt, "vllm:num_preemptions_total") > 0
        assert_pool_whole(rt)
    finally:
        rt.shutdown()


def test_choices_of_one_prompt_share_its_blocks(tiny_ckpt, prompts, reference):
    rt = started(tiny_ckpt)
    try:
        seqs = rt.run([Sequence(prompts[2], GREEDY, NEW) for _ in range(3)])
        assert [s.output for s in seqs] == [reference[2]] * 3
        assert metric(rt, "vllm:prefix_cache_hits_total") == 2 * ((len(prompts[2]) - 1) // 16) * 16
        assert_pool_whole(rt)
    finally:
        rt.shutdown()


def test_cancelled_sequences_give_their_blocks_back(tiny_ckpt, prompts):
    rt = started(tiny_ckpt, kv_cache_memory=str(16 * TOKENS_PER_BLOCK_BYTES))
    try:
        seqs = [Sequence(p, SamplingParams(temperature=0, ignore_eos=True), 60) for p in prompts[:8]]
        rt.submit(seqs)
        while sum(len(s.output) for s in seqs) < 10:
            time.sleep(0.005)
        rt.loop.cancel(seqs)
        for s in seqs:
            assert s.done.wait(5) and s.error == "cancelled: the client disconnected"
        assert_pool_whole(rt)
        assert rt.generate([prompts[0]], GREEDY)[0].output  # and it still serves
    finally:
        rt.shutdown()


def test_pool_too_small_for_one_sequence_is_a_start_error_with_the_numbers(tiny_ckpt):
    rt = build_runtime(settings_for(tiny_ckpt, max_seq_len=128, kv_cache_memory="64KiB"))
    rt.start(background=False)
    assert rt.state == "failed"
    assert (
        "the KV cache from --kv_cache_memory 64.0 KiB is 4 blocks of 16 tokens (64 tokens, 1024 bytes each); one "
        "sequence of --max_seq_len 128 needs 8 blocks (128.0 KiB)"
    ) in rt.progress


def test_pool_larger_than_memory_is_a_start_error_before_allocating(tiny_ckpt):
    rt = build_runtime(settings_for(tiny_ckpt, kv_cache_memory="1TiB"))
    rt.start(background=False)
    assert rt.state == "failed"
    assert "the KV cache from --kv_cache_memory 1024.0 GiB needs 1099511627776 bytes" in rt.progress
    assert "lower --kv_cache_memory, --max_batch_size or --max_seq_len" in rt.progress


def test_cpu_default_pool_is_max_batch_size_sequences_up_to_4gib():
    per_token = 2**20  # Llama-2-7B in fp32: 32 layers x keys and values x 4096 x 4 bytes
    pool = size_pool(per_token, 16, 512, 4, requested=0, available=None)
    assert pool.tokens == 4 * 512  # a slot cache's worth
    pool = size_pool(per_token, 16, 512, 32, requested=0, available=None)
    assert pool.bytes == CPU_DEFAULT_CAP and pool.tokens // 512 == 8  # not 32 x 512 positions (16 GiB)
    assert size_pool(per_token, 16, 8192, 32, requested=0, available=None).tokens == 8192  # one sequence fits
    capped = r"capped at 4.0 GiB \(--kv_cache_memory sets another size\) needs 4294967296 bytes"
    with pytest.raises(ValueError, match=capped):
        size_pool(per_token, 16, 512, 32, requested=0, available=2**30)
    assert size_pool(per_token, 16, 512, 32, requested=8 * 2**30, available=None).bytes == 8 * 2**30  # the flag wins


@pytest.mark.skipif(not triton_attention.available(), reason="triton is in requirements-dev.txt")
@pytest.mark.parametrize(
    "kw",
    [{}, {"max_num_batched_tokens": 24, "kv_cache_memory": str(12 * TOKENS_PER_BLOCK_BYTES)}],
    ids=["prefix-cache", "chunked-and-preempted"],
)
def test_triton_attention_gives_transformers_tokens(tiny_ckpt, prompts, reference, kw):
    """CUDA's attention path (the Triton kernel over block tables, run here in Triton's interpreter) under the
    scheduler: cached prefixes, prompt chunks after them, decodes beside chunks, preemption."""
    rt = started(tiny_ckpt, attention="triton", **kw)
    try:
        assert rt.loop.engine.attention == "triton"
        assert concurrently(rt, prompts[:8]) == reference[:8]
        assert metric(rt, "vllm:prefix_cache_hits_total") > 0
        if kw:
            assert metric(rt, "vllm:num_preemptions_total") > 0
        assert_pool_whole(rt)
    finally:
        rt.shutdown()
