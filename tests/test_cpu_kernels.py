"""cpu_kernels: the C kernels against PyTorch, and every packed form of the model against the plain layers."""

import math

import pytest
import torch

from presets.engine.scheduler import PlanItem
from presets.models.llama import cpu_kernels
from presets.models.llama.kv_cache import PagedKVCache, PagedStep
from presets.models.llama.load import load_model
from presets.models.llama.tokenizer import Tokenizer
from tests.paged import engine_for, item, run

HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def lib():
    """The C library; its tests are skipped only on CPUs it cannot run on (the fallback forms still run)."""
    if not HAS_AVX2:
        pytest.skip("cpu_kernels.c needs x86-64 with AVX2 and FMA")
    lib = cpu_kernels.native()
    assert lib is not None, "cpu_kernels.c did not compile or load here (see the log)"
    return lib


@pytest.mark.parametrize("n,k", [(48, 64), (37, 300), (512, 1536)])  # 37: a part panel; 300: a part K block
@pytest.mark.parametrize("m", [1, 5, 6, 7, 16, 97, 200])  # row tails of the 6-row kernel and 96-row blocks
def test_linear_bf16_equals_fp32_matmul(lib, m, n, k):
    g = torch.Generator().manual_seed(m * n + k)
    w = torch.randn(n, k, generator=g).bfloat16().float()  # bf16 values held in fp32, as a Meta checkpoint loads
    x = torch.randn(m, k, generator=g)
    panels = cpu_kernels.bf16_panels(w)
    assert panels.dtype == torch.bfloat16 and panels.shape == (math.ceil(n / 16), k, 16)
    got = cpu_kernels.linear_bf16(x.view(m, 1, k), panels, n)
    assert got.shape == (m, 1, n)
    assert rel_err(got[:, 0], x.double() @ w.double().t()) < 1e-5


def test_kernels_refuse_inputs_they_cannot_read(lib):
    panels = cpu_kernels.bf16_panels(torch.zeros(16, 8))
    for x in (torch.zeros(2, 9), torch.zeros(2, 8, dtype=torch.float64)):  # wrong width, wrong dtype
        with pytest.raises(ValueError, match="does not fit panels"):
            cpu_kernels.linear_bf16(x, panels, 16)
    q = torch.zeros(1, 2, 8)
    with pytest.raises(ValueError, match="fp32 or bf16 CPU caches"):
        cpu_kernels.decode_attention(PagedKVCache(2, 8, 2, 8, torch.float16, "cpu"), singles([([0], 1)], 8), q)
    cache = PagedKVCache(2, 8, 2, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="decode_attention: q"):
        cpu_kernels.decode_attention(cache, singles([([0], 1)], 8), torch.zeros(1, 2, 16))


def singles(tables_positions, block_size: int) -> PagedStep:
    """A step of one-token items, ([block ids], position) each, built as given (even outside the tables)."""
    fits = all(0 <= pos < len(table) * block_size for table, pos in tables_positions)
    if fits:  # the real builder
        items = [PlanItem(0, pos, [0], table, True) for table, pos in tables_positions]
        return PagedStep.build(items, block_size, "cpu")[1]
    (table, pos), none = tables_positions[0], torch.zeros(0, dtype=torch.long)
    return PagedStep(none[None], none, none, torch.tensor([table]), torch.tensor([pos]), [], none)


def test_weights_that_are_not_bf16_values_keep_fp32(lib):
    w = torch.randn(32, 64)  # most fp32 values lose bits in bf16: those layers must not be rounded
    assert cpu_kernels.PackedLinear(w, 4).kind in ("onednn", "plain")
    assert cpu_kernels.PackedLinear(w.bfloat16().float(), 4).kind == "bf16"


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 16), (8, 2, 8), (2, 1, 72), (4, 4, 128)])
@pytest.mark.parametrize("block_size", [16, 5])
def test_decode_attention_equals_masked_sdpa(lib, heads, kv_heads, head_dim, block_size):
    """Scattered block tables at different positions (a part block at the end, a sequence of one
    position), stale keys beyond them, grouped-query heads, head sizes that are one and several
    64-wide blocks or neither."""
    g = torch.Generator().manual_seed(head_dim)
    cache = PagedKVCache(12, block_size, kv_heads, head_dim, torch.float32, "cpu")
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))  # stale keys everywhere
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    tables = [[7], [3, 0, 11, 5], list(range(11, -1, -1))[: -(-40 // block_size)]]
    step = singles(list(zip(tables, [0, min(17, 4 * block_size - 1), 39])), block_size)
    q = torch.randn(3, heads, head_dim, generator=g)
    got = cpu_kernels.decode_attention(cache, step, q)
    ref = step.attend_singles(cache, q, gqa=heads != kv_heads)  # no kernel on this cache: SDPA with a mask
    assert got.shape == ref.shape == (3, heads, head_dim)
    assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 16), (9, 3, 64), (2, 1, 72)])
def test_decode_attention_reads_a_bf16_cache_as_its_fp32_values(lib, heads, kv_heads, head_dim):
    """The bf16 model's cache: the kernel converts each value exactly, so it equals the fp32 kernel on the
    same values bit for bit, and gives its output in q's dtype."""
    g = torch.Generator().manual_seed(head_dim)
    half = PagedKVCache(12, 5, kv_heads, head_dim, torch.bfloat16, "cpu")
    half.k.copy_(torch.randn(half.k.shape, generator=g))
    half.v.copy_(torch.randn(half.v.shape, generator=g))
    full = PagedKVCache(12, 5, kv_heads, head_dim, torch.float32, "cpu")
    full.k.copy_(half.k)
    full.v.copy_(half.v)
    step = singles(list(zip([[7], [3, 0, 11, 5], [11, 10, 9, 8, 7, 6, 5, 4]], [0, 17, 39])), 5)
    q = torch.randn(3, heads, head_dim, generator=g).bfloat16()
    got = cpu_kernels.decode_attention(half, step, q)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, cpu_kernels.decode_attention(full, step, q.float()).bfloat16())
    ref = step.attend_singles(full, q.float(), gqa=heads != kv_heads)  # SDPA in fp32 on the same values
    assert rel_err(got.float(), ref) < 1e-2  # bf16's rounding of the output


def test_decode_attention_refuses_positions_outside_the_cache(lib):
    cache = PagedKVCache(2, 8, 2, 8, torch.float32, "cpu")
    q = torch.randn(1, 2, 8)
    for table, position in (([0], 8), ([2], 1), ([-1], 1), ([0], -1)):
        with pytest.raises(IndexError, match="outside the cache"):
            cpu_kernels.decode_attention(cache, singles([(table, position)], 8), q)


def test_compile_failure_is_an_error_the_loader_reports(monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler")
    with pytest.raises(OSError, match="no C compiler 'no-such-compiler'"):
        cpu_kernels._compile()


def test_failed_compile_leaves_the_kernels_off_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_kernels.tempfile, "tempdir", str(tmp_path / "tmp"))
    cpu_kernels.native.cache_clear()
    try:
        assert cpu_kernels.native() is None
    finally:
        cpu_kernels.native.cache_clear()
    assert "CPU kernels unavailable" in caplog.text and "false failed" in caplog.text
    assert not list((tmp_path / "presets").iterdir())  # no half-written library left behind


def test_library_folder_must_be_private(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could plant a library here
    with pytest.raises(OSError, match="not private"):
        cpu_kernels._private_dir(str(shared))
    cpu_kernels._private_dir(str(tmp_path / "mine"))
    assert (tmp_path / "mine").stat().st_mode & 0o077 == 0


def _forms(monkeypatch, form):
    """Make `form` the best one available: bf16 (all there), onednn (no C kernels) or plain (neither)."""
    if form != "bf16":
        monkeypatch.setattr(cpu_kernels, "native", lambda: None)
    if form == "plain":
        monkeypatch.setattr(cpu_kernels, "onednn_available", lambda: False)


@pytest.mark.parametrize("form", ["bf16", "onednn", "plain"])
@pytest.mark.parametrize("ckpt", ["tiny_ckpt", "gqa_ckpt"], ids=["mha", "gqa"])
def test_packed_model_matches_plain_layers(request, monkeypatch, ckpt, form):
    """Every form, the oneDNN and plain ones also where the C library cannot build (they need no `lib`)."""
    if form == "bf16":
        request.getfixturevalue("lib")
    elif form == "onednn" and not cpu_kernels.onednn_available():
        pytest.skip("this torch has no oneDNN")
    ckpt = request.getfixturevalue(ckpt)
    tok = Tokenizer(f"{ckpt}/tokenizer.model")
    plain_model = load_model(ckpt, tok, 0, 1, torch.device("cpu"), torch.float32)
    plain = engine_for(plain_model, cpu_packed=False)
    _forms(monkeypatch, form)
    packed_model = load_model(ckpt, tok, 0, 1, torch.device("cpu"), torch.float32)
    packed = engine_for(packed_model)
    kernels = [layer.attention.cache.decode_kernel for layer in packed_model.layers]
    assert kernels == [cpu_kernels.decode_attention if form == "bf16" else None] * len(kernels)
    layer = packed_model.layers[0]  # wq|wk|wv and w1|w3 stacked; wo, w2 and output alone
    linears = [layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13, layer.feed_forward.w2]
    assert all(isinstance(m, cpu_kernels.PackedParallelLinear) for m in linears + [packed_model.output])
    assert {m.packed.kind for m in linears + [packed_model.output]} == {form}
    assert not any(isinstance(p, torch.nn.Parameter) and p.dim() == 2 for p in layer.parameters())  # weights replaced
    state, shard = packed_model.state_dict(), torch.load(f"{ckpt}/consolidated.00.pth", weights_only=True)
    assert state.keys() == shard.keys() - {"rope.freqs"}
    assert all(torch.equal(state[k], shard[k].float()) for k in state)  # the checkpoint's weights, exactly
    prompts = [tok.encode(t, bos=True, eos=False) for t in ("Simply put, the theory", "Hi", "The river flows past")]
    seqs = [2, 0, 1]
    for engine in (plain, packed):
        run(engine, item(2, 0, prompts[0] + prompts[2]))  # stale keys in sequence 2's blocks beyond its prompt
    first = [run(e, *(item(s, 0, p) for s, p in zip(seqs, prompts))) for e in (plain, packed)]
    assert rel_err(first[1], first[0]) < 1e-5
    for step in range(3):
        work = [item(s, len(p) + step, [5 + step]) for s, p in zip(seqs, prompts)]
        if step == 2:  # with a prompt chunk after a cached part in the same step
            work.append(item(3, 0, prompts[0], sample=False))
            work.append(item(3, len(prompts[0]), prompts[1]))
        assert rel_err(run(packed, *work), run(plain, *work)) < 1e-5


@pytest.mark.parametrize("ckpt", ["tiny_ckpt", "gqa_ckpt"], ids=["mha", "gqa"])
def test_bf16_model_packs_in_bf16_and_matches_plain_bf16_layers(request, ckpt):
    """--dtype bfloat16: oneDNN's bf16 packing (where this CPU's oneDNN has bf16) and the decode kernel on a
    bf16 cache, against PyTorch's bf16 layers and attention, prompts, decodes and a chunk after a cached part."""
    ckpt = request.getfixturevalue(ckpt)
    tok = Tokenizer(f"{ckpt}/tokenizer.model")
    plain = engine_for(load_model(ckpt, tok, 0, 1, torch.device("cpu"), torch.bfloat16), cpu_packed=False)
    packed_model = load_model(ckpt, tok, 0, 1, torch.device("cpu"), torch.bfloat16)
    packed = engine_for(packed_model)
    layer = packed_model.layers[0]
    assert layer.attention.cache.k.dtype == torch.bfloat16  # the cache follows the compute dtype
    linears = [layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13, layer.feed_forward.w2]
    bf16_onednn = cpu_kernels.onednn_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert {m.packed.kind for m in linears + [packed_model.output]} == {"onednn-bf16" if bf16_onednn else "plain"}
    want_kernel = cpu_kernels.decode_attention if cpu_kernels.native() else None
    assert [x.attention.cache.decode_kernel for x in packed_model.layers] == [want_kernel] * len(packed_model.layers)
    state, shard = packed_model.state_dict(), torch.load(f"{ckpt}/consolidated.00.pth", weights_only=True)
    assert all(torch.equal(state[k], shard[k].bfloat16()) for k in state)  # the weights, exactly
    prompts = [tok.encode(t, bos=True, eos=False) for t in ("Simply put, the theory", "Hi", "The river flows past")]
    seqs = [2, 0, 1]
    for engine in (plain, packed):
        run(engine, item(2, 0, prompts[0] + prompts[2]))  # stale keys in sequence 2's blocks beyond its prompt
    first = [run(e, *(item(s, 0, p) for s, p in zip(seqs, prompts))) for e in (plain, packed)]
    assert rel_err(first[1], first[0]) < 2e-2  # bf16 activations rounded after sums taken in another order
    for step in range(3):
        work = [item(s, len(p) + step, [5 + step]) for s, p in zip(seqs, prompts)]
        if step == 2:
            work.append(item(3, 0, prompts[0], sample=False))
            work.append(item(3, len(prompts[0]), prompts[1]))
        assert rel_err(run(packed, *work), run(plain, *work)) < 2e-2


@pytest.mark.parametrize("ckpt", ["tiny_ckpt", "gqa_ckpt"], ids=["mha", "gqa"])
def test_kernels_off_give_the_same_greedy_tokens_and_logits(request, monkeypatch, lib, ckpt):
    """PRESETS_CPU_KERNELS=0 (oneDNN or plain layers, PyTorch's attention) against the C kernels: 16 greedy
    steps of three sequences from a packed prefill, the same tokens and logits within fp32 rounding."""
    ckpt = request.getfixturevalue(ckpt)
    tok = Tokenizer(f"{ckpt}/tokenizer.model")
    prompts = [tok.encode(t, bos=True, eos=False) for t in ("Simply put, the theory", "Hi", "The river flows past")]

    def greedy(engine):
        logits = run(engine, *(item(s, 0, p) for s, p in enumerate(prompts)))
        rows, seqs = [logits], [list(p) for p in prompts]
        for _ in range(16):
            for s, row in zip(seqs, logits):
                s.append(int(row.argmax()))
            logits = run(engine, *(item(i, len(s) - 1, s[-1:]) for i, s in enumerate(seqs)))
            rows.append(logits)
        return seqs, torch.cat(rows)

    on = engine_for(load_model(ckpt, tok, 0, 1, torch.device("cpu"), torch.float32))
    assert on.model.layers[0].attention.cache.decode_kernel is cpu_kernels.decode_attention
    with_kernels = greedy(on)
    monkeypatch.setenv("PRESETS_CPU_KERNELS", "0")
    cpu_kernels.native.cache_clear()
    try:
        off = engine_for(load_model(ckpt, tok, 0, 1, torch.device("cpu"), torch.float32))
        assert off.model.layers[0].attention.cache.decode_kernel is None
        assert off.model.output.packed.kind in ("onednn", "plain")
        without = greedy(off)
    finally:
        cpu_kernels.native.cache_clear()
    assert without[0] == with_kernels[0]
    assert rel_err(without[1], with_kernels[1]) < 1e-5


def test_engine_runs_without_c_kernels(monkeypatch, tiny_ckpt):
    """PRESETS_CPU_KERNELS=0 turns them off: the engine packs with oneDNN (or nothing) and still answers."""
    monkeypatch.setenv("PRESETS_CPU_KERNELS", "0")
    cpu_kernels.native.cache_clear()
    try:
        assert cpu_kernels.native() is None
        tok = Tokenizer(f"{tiny_ckpt}/tokenizer.model")
        engine = engine_for(load_model(tiny_ckpt, tok, 0, 1, torch.device("cpu"), torch.float32), 32, 2)
        assert engine.model.layers[0].attention.cache.decode_kernel is None
        assert run(engine, item(0, 0, [3])).shape == (1, tok.n_words)
    finally:
        cpu_kernels.native.cache_clear()


def test_auto_dtype_is_bf16_only_where_the_cpu_multiplies_bf16(monkeypatch):
    from presets.process import device

    avx2, zen4, xeon = frozenset({"avx2", "fma"}), frozenset({"avx512f", "avx512_bf16"}), frozenset({"amx_bf16"})
    onednn_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert device.cpu_dtype(avx2) == torch.float32
    assert device.cpu_dtype(zen4) == device.cpu_dtype(xeon) == (torch.bfloat16 if onednn_bf16 else torch.float32)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # a torch without it
    assert device.cpu_dtype(xeon) == torch.float32
    monkeypatch.setattr(device, "cpu_flags", lambda: zen4)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert device.resolve("cpu", "auto") == (torch.device("cpu"), torch.bfloat16)
    assert device.resolve("cpu", "float32") == (torch.device("cpu"), torch.float32)
    assert (
        device.describe(torch.device("cpu"), torch.bfloat16, "auto") == "cpu, bfloat16 (auto: the CPU has avx512_bf16)"
    )
    monkeypatch.setattr(device, "cpu_flags", lambda: avx2)
    assert device.resolve("cpu", "auto") == (torch.device("cpu"), torch.float32)
    assert "no bf16 matmul instructions" in device.describe(torch.device("cpu"), torch.float32, "auto")
