"""Decode steps replayed from per-bucket static buffers (cuda_graphs.py), on the CPU: the capture seam is
given a function that calls the step again instead of replaying a CUDA graph, so what a graph would read
(the static buffers, the padding rows, the scratch block) is exactly what is checked, in Triton's
interpreter. The result must equal the same engine without graphs, step by step and token by token."""

import pytest
import torch

from presets.engine.params import SamplingParams
from presets.engine.scheduler import Sequence
from presets.engine.step_loop import EngineLoop
from presets.models.llama import triton_attention
from presets.models.llama.cuda_graphs import buckets
from presets.models.llama.engine import CacheSettings, LlamaEngine, choose_attention
from presets.models.llama.load import load_model
from presets.models.llama.tokenizer import Tokenizer
from tests.paged import blocks, item, run

pytestmark = pytest.mark.skipif(not triton_attention.available(), reason="triton is in requirements-dev.txt")


def call_again(fn):
    """A stand-in for CUDA graph capture: warm up once, then every replay runs fn on the static buffers."""
    fn()
    return fn


def engine(ckpt, graphs: bool, max_batch: int = 6) -> LlamaEngine:
    tok = Tokenizer(f"{ckpt}/tokenizer.model")
    model = load_model(ckpt, tok, 0, 1, torch.device("cpu"), torch.float32)
    settings = CacheSettings(128, max_batch, 16, attention="triton")
    return LlamaEngine(model, settings, cpu_packed=False, capture=call_again if graphs else None)


def test_buckets_cover_every_batch_size_up_to_the_largest():
    assert buckets(1) == [1]
    assert buckets(6) == [1, 2, 4, 6]
    assert buckets(20) == [1, 2, 4, 8, 16, 20]
    assert buckets(256)[-3:] == [240, 248, 256]


def test_graphs_need_the_triton_kernel(tiny_ckpt):
    assert choose_attention("auto", torch.device("cpu"), cpu_packed=True) == "c"
    tok = Tokenizer(f"{tiny_ckpt}/tokenizer.model")
    model = load_model(tiny_ckpt, tok, 0, 1, torch.device("cpu"), torch.float32)
    plain = LlamaEngine(model, CacheSettings(64, 2, 16, attention="sdpa"), cpu_packed=False, capture=call_again)
    assert plain.graphs is None and plain.attention == "sdpa"


@pytest.mark.parametrize("ckpt", ["tiny_ckpt", "gqa_ckpt"])
def test_decode_steps_through_the_buckets_equal_the_eager_steps(ckpt, request):
    path = request.getfixturevalue(ckpt)
    graphed, eager = engine(path, graphs=True), engine(path, graphs=False)
    assert eager.graphs is None and graphed.graphs is not None
    assert graphed.model.layers[0].attention.cache.k.shape[0] == graphed.kv_config.num_blocks + 1  # the scratch
    prompts = {s: [1] + [(7 * s + 3 * i) % 500 + 2 for i in range(5 + 9 * s)] for s in range(5)}
    for e in (graphed, eager):  # prompts, eager in both
        run(e, *(item(s, 0, p) for s, p in prompts.items()))
    lengths = {s: len(p) for s, p in prompts.items()}
    for step, live in enumerate([[0, 1, 2, 3, 4], [0, 2, 4], [3], [1, 3], [0, 1, 2, 3, 4]]):  # buckets 6, 4, 1, 2, 6
        items = [item(s, lengths[s], [(11 * s + step) % 500 + 2]) for s in live]
        before = graphed.graphs.replays
        got, want = run(graphed, *items), run(eager, *items)
        assert graphed.graphs.replays == before + 1
        assert got.shape == want.shape == (len(live), 512)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for s in live:
            lengths[s] += 1
    # the padding rows only ever wrote the scratch block: every sequence's cache equals the eager engine's
    for s in prompts:
        for g_layer, e_layer in zip(graphed.model.layers, eager.model.layers):
            table = blocks(s, lengths[s])
            for name in ("k", "v"):
                g, e = (getattr(layer.attention.cache, name)[table] for layer in (g_layer, e_layer))
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_a_prompt_chunk_in_the_step_runs_eagerly(tiny_ckpt):
    graphed = engine(tiny_ckpt, graphs=True)
    run(graphed, item(0, 0, [1, 5, 6, 7]))
    before = graphed.graphs.replays
    run(graphed, item(0, 4, [8]), item(1, 0, [1, 9, 10]))  # a decode beside a prompt
    run(graphed, item(0, 5, [8], sample=False))  # an item that does not sample
    assert graphed.graphs.replays == before


def test_greedy_generation_with_graphs_equals_without(gqa_ckpt):
    tok = Tokenizer(f"{gqa_ckpt}/tokenizer.model")
    prompts = [tok.encode(f"Question {i}: what comes next in {'ab' * i}?", bos=True, eos=False) for i in range(5)]
    outputs = []
    for graphs in (True, False):
        e = engine(gqa_ckpt, graphs, max_batch=4)  # five sequences over four slots: steps of 1..4
        loop = EngineLoop(e, tok.eos_id, 4, 16)
        loop.start()
        seqs = [Sequence(p, SamplingParams(temperature=0, ignore_eos=True), 12) for p in prompts]
        loop.submit(seqs)
        assert all(s.done.wait(120) for s in seqs)
        loop.stop()
        outputs.append([s.output for s in seqs])
        if graphs:
            assert e.graphs.replays > 0
    assert outputs[0] == outputs[1]


def test_auto_attention_takes_triton_on_ampere_and_newer_only(monkeypatch):
    """Triton's bf16 needs sm_80: a T4 (7.5) or V100 (7.0) gets SDPA, an A100 (8.0) or H100 (9.0) the kernel."""
    gpu = torch.device("cuda", 0)
    for capability, expected in [((7, 0), "sdpa"), ((7, 5), "sdpa"), ((8, 0), "triton"), ((9, 0), "triton")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert choose_attention("auto", gpu, cpu_packed=True) == expected
    with pytest.raises(ValueError, match="compute capability >= 8.0"):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
        monkeypatch.delenv("TRITON_INTERPRET")
        choose_attention("triton", gpu, cpu_packed=True)
