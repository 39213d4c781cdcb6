"""GPU check (make gpu-check): CUDA parity with transformers, then a 7B-shaped model's speed.

    python -m presets.tools.gpu_check [--device cuda] [--shape 7b|small] [--quick] [--out FILE]

Each phase prints its figures; one that fails prints its error and the others still run.
1. Parity: a small random Llama-2 checkpoint (GQA, written by our script) on the GPU in fp32 and bf16:
   last-token logits of a prompt by our Triton attention and by the SDPA reference path, each against
   transformers' LlamaForCausalLM on the same weights and dtype; greedy tokens through the engine loop
   (prefix cache, 16-token prompt chunks, decode steps replayed as CUDA graphs) against transformers'
   generate, and how many decode steps the graphs replayed.
2. Speed: a 7B-shaped model (dim 4096, 32 layers, 32 heads, vocab 32000) with random bf16 weights made in
   GPU memory: the KV pool the engine sizes, the graphs captured and their seconds, batch-1 decode
   ms/token (graph and eager) against the HBM floor (weight bytes / measured copy bandwidth), then through
   the engine loop tokens/s and TTFT at 1, 16, 64 and 256 concurrent sequences (512-token prompts, 256
   new tokens, greedy), with the mean host time of a step beside the GPU's.
3. Baseline: transformers' generate on the same shape and GPU, batch 1: ms/token.
4. Time to ready: a 1B-shaped checkpoint written in Meta's layout, a server process started on it, the
   seconds until /health answers 200, and the load lines it logged.
--quick shrinks every phase (CPU smoke run: tests/test_gpu_check.py).
Needs torch (CUDA), transformers, sentencepiece, and fairscale, prometheus-client (wheels).
"""

import argparse
import gc
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request

import torch

from presets.engine.params import SamplingParams
from presets.engine.scheduler import PlanItem, Sequence, StepPlan
from presets.engine.step_loop import EngineLoop
from presets.models.llama.engine import CacheSettings, LlamaEngine
from presets.models.llama.hf_convert import hf_config, to_hf
from presets.models.llama.load import load_model, read_args
from presets.models.llama.model import ModelArgs, Transformer
from presets.models.llama.tokenizer import Tokenizer
from presets.process.distributed import init_model_parallel
from presets.tools.tiny_checkpoint import write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = {
    "7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256),
    "1b": ModelArgs(dim=2048, n_layers=16, n_heads=16, n_kv_heads=4, vocab_size=512, multiple_of=256),
    "small": ModelArgs(dim=256, n_layers=2, n_heads=4, vocab_size=1000, multiple_of=64),
}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free_device(dev) -> None:
    """Give the memory of what the last phase held back to the device (a later one, or another process, needs it)."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def phase(report: dict, name: str, fn, *args) -> None:
    """Run one phase; its failure is reported (with the traceback) and the next phase still runs."""
    t0 = time.perf_counter()
    try:
        fn(*args, report)
    except Exception as e:
        traceback.print_exc()
        report.setdefault("failed", {})[name] = f"{type(e).__name__}: {e}"
        print(f"{name}: FAILED: {type(e).__name__}: {e}", flush=True)
    print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)


def parity(dev, ckpt: str, dtype, quick: bool, report: dict) -> None:
    tok = Tokenizer(f"{ckpt}/tokenizer.model")
    hf = to_hf(read_args(ckpt, tok), torch.load(f"{ckpt}/consolidated.00.pth", weights_only=True)).to(dev, dtype)
    hf.generation_config.eos_token_id = None
    ids = tok.encode("Simply put, the theory of relativity states that the speed of light", bos=True, eos=False)
    new = 16
    with torch.inference_mode():
        ref = hf(torch.tensor([ids], device=dev)).logits[0, -1].float()
        gen = hf.generate(torch.tensor([ids], device=dev), max_new_tokens=new, do_sample=False, pad_token_id=0)
    expected = gen[0, len(ids) :].tolist()
    name = str(dtype).split(".")[1]
    table = list(range(-(-len(ids) // 16)))
    for attention in ("auto", "sdpa"):
        model = load_model(ckpt, tok, 0, 1, dev, dtype)
        engine = LlamaEngine(model, CacheSettings(256, 4, 16, 64 << 20, max_num_batched_tokens=16, attention=attention))
        logits = engine.run(StepPlan([PlanItem(0, 0, ids, table, True)]))[0]
        rel = ((logits - ref).abs().max() / ref.abs().max()).item()
        loop = EngineLoop(engine, tok.eos_id, 4, 16)
        loop.start()
        seqs = [Sequence(ids, SamplingParams(temperature=0, ignore_eos=True), new) for _ in range(3)]  # shared prefix
        loop.submit(seqs)
        for sq in seqs:
            sq.done.wait(120)
        loop.stop()
        same = [next((i for i, (a, b) in enumerate(zip(sq.output, expected)) if a != b), new) for sq in seqs]
        replays = engine.graphs.replays if engine.graphs else 0
        report[f"parity_{name}_{engine.attention}"] = {
            "logits_rel_err": rel,
            "greedy_tokens_equal_of_16": same,
            "graph_replays": replays,
        }
        print(
            f"parity ({name}, attention {engine.attention}, graphs {engine.graphs is not None}): last-token logits "
            f"rel err {rel:.5f}; greedy tokens equal to transformers': {same} of {new}; {replays} graph replays",
            flush=True,
        )
        del engine, model
        free_device(dev)


def copy_bandwidth(dev) -> float:
    """Bytes moved per second (read + write) by a device-to-device copy of 4 GiB, best of 5."""
    x = torch.empty(1 << 30, dtype=torch.float32, device=dev)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        sync(dev)
        t0 = time.perf_counter()
        y.copy_(x)
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    del x, y
    return 2 * (4 << 30) / best


def random_model(args: ModelArgs, dev, dtype) -> Transformer:
    """Random weights made on `dev` one parameter at a time (the CPU model's untouched memory is never filled)."""
    model = Transformer(args)
    g = torch.Generator(device=dev).manual_seed(0)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            new = torch.empty(p.shape, device=dev, dtype=dtype)
            new.normal_(0, 0.02, generator=g) if p.dim() == 2 else new.fill_(1.0)
            setattr(module, name, torch.nn.Parameter(new, requires_grad=False))
    return model.eval()


def loop_throughput(engine, n: int, prompt_len: int, new: int, vocab: int) -> dict:
    loop = EngineLoop(engine, eos_id=2, max_batch_size=n, max_waiting=4 * n)
    g = torch.Generator().manual_seed(n)
    seqs = [
        Sequence(
            torch.randint(3, vocab, (prompt_len,), generator=g).tolist(),
            SamplingParams(temperature=0, ignore_eos=True),
            new,
        )
        for _ in range(n)
    ]
    steps = []
    run = engine.run

    def timed(plan):  # the host's view of a step: from the plan to logits the sampler can read
        t = time.perf_counter()
        out = run(plan)
        sync(engine.device)
        steps.append((time.perf_counter() - t, all(len(it.tokens) == 1 for it in plan.items)))
        return out

    engine.run = timed  # an instance attribute: deleted below, or it would keep the engine alive (a cycle)
    replays = engine.graphs.replays if engine.graphs else 0
    try:
        loop.start()
        t0 = time.perf_counter()
        loop.submit(seqs)
        for s in seqs:
            s.done.wait(600)
        seconds = time.perf_counter() - t0
        loop.stop()
        loop.join(10)
    finally:
        del engine.run
    assert all(len(s.output) == new for s in seqs), "a sequence did not finish"
    ttft = sorted(s.token_times[0] - s.arrival for s in seqs)
    decode = [t for t, d in steps if d]
    return {
        "concurrent": n,
        "tokens_per_s": n * new / seconds,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_max_s": ttft[-1],
        "preemptions": loop.scheduler.preemptions,
        "steps": len(steps),
        "decode_step_ms": statistics.median(decode) * 1e3 if decode else float("nan"),
        "step_loop_ms": seconds / max(1, len(steps)) * 1e3,  # wall time per step, sampling and scheduling included
        "graph_replays": (engine.graphs.replays - replays) if engine.graphs else 0,
    }


def decode_ms(engine, steps: int) -> float:
    """Median ms of a batch-1 decode step at positions 128.. (after a 128-token prompt)."""
    engine.run(StepPlan([PlanItem(0, 0, list(range(3, 131)), list(range(8)), True)]))
    times = []
    for i in range(steps):
        sync(engine.device)
        t0 = time.perf_counter()
        engine.run(StepPlan([PlanItem(0, 128 + i, [5], list(range((128 + i) // 16 + 1)), True)]))
        sync(engine.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[steps // 8 :]) * 1e3


def speed(dev, shape: str, quick: bool, report: dict) -> None:
    args = SHAPES[shape]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = random_model(args, dev, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    batch = 8 if quick else 256
    settings = CacheSettings(max_seq_len=1024, max_batch_size=batch, max_num_batched_tokens=8192)
    t0 = time.perf_counter()
    engine = LlamaEngine(model, settings)
    ready = time.perf_counter() - t0
    pool = engine.pool
    bw = copy_bandwidth(dev) if dev.type == "cuda" else float("nan")
    graphs = engine.graphs
    report["engine"] = {
        "attention": engine.attention,
        "kv_blocks": pool.num_blocks,
        "kv_tokens": pool.tokens,
        "kv_bytes": pool.bytes,
        "graphs": len(graphs.buckets) if graphs else 0,
        "graph_capture_s": graphs.capture_seconds if graphs else 0.0,
        "engine_init_s": ready,
    }
    print(
        f"model {shape}: {weight_bytes / 1e9:.2f} GB of weights; KV pool {pool.num_blocks} blocks = {pool.tokens} "
        f"tokens ({pool.bytes / 2**30:.1f} GiB); copy bandwidth {bw / 1e12:.2f} TB/s; attention {engine.attention}; "
        f"{report['engine']['graphs']} graphs captured in {report['engine']['graph_capture_s']:.1f} s; "
        f"engine ready in {ready:.1f} s",
        flush=True,
    )
    steps = 16 if quick else 64
    ms = decode_ms(engine, steps)
    floor = weight_bytes / (bw / 2) * 1e3  # reading the weights once, at the read half of the copy rate
    eager = float("nan")
    if graphs is not None:
        engine.graphs = None
        eager = decode_ms(engine, steps)
        engine.graphs = graphs
    report["batch1_decode"] = {"ms_per_token": ms, "eager_ms_per_token": eager, "hbm_floor_ms": floor}
    print(
        f"batch-1 decode: {ms:.2f} ms/token (eager {eager:.2f}); HBM floor {floor:.2f} ms "
        f"({floor / ms:.0%} of the floor's speed)",
        flush=True,
    )
    report["concurrency"] = []
    prompt, new = (32, 8) if quick else (512, 256)
    for n in (1, 4) if quick else (1, 16, 64, 256):
        r = loop_throughput(engine, n, prompt, new, args.vocab_size)
        report["concurrency"].append(r)
        print(
            f"{n:4d} concurrent ({prompt}-token prompts, {new} new): {r['tokens_per_s']:8.0f} tokens/s, TTFT p50 "
            f"{r['ttft_p50_s'] * 1e3:.0f} ms, max {r['ttft_max_s'] * 1e3:.0f} ms; decode step "
            f"{r['decode_step_ms']:.2f} ms on the engine, {r['step_loop_ms']:.2f} ms per loop step; "
            f"{r['graph_replays']} graph replays of {r['steps']} steps; preemptions {r['preemptions']}",
            flush=True,
        )
    if graphs is not None:
        report["engine"]["graphs_after"] = len(graphs.buckets)  # captured once: never recaptured
    del engine, model, graphs
    free_device(dev)


def transformers_baseline(dev, shape: str, quick: bool, report: dict) -> None:
    """transformers' generate, batch 1, on the same shape: ms per new token (a long minus a short generate)."""
    from transformers import LlamaForCausalLM

    free_device(dev)
    a = SHAPES[shape]
    config = hf_config(a, max_position_embeddings=2048)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            hf = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    prompt = torch.randint(3, a.vocab_size, (1, 32 if quick else 512), device=dev)
    long_new = 16 if quick else 128

    def generate(new: int) -> float:
        sync(dev)
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        sync(dev)
        return time.perf_counter() - t0

    generate(2)  # warm-up
    ms = (generate(long_new) - generate(1)) / (long_new - 1) * 1e3
    report["transformers_batch1"] = {"ms_per_token": ms, "tokens_per_s": 1e3 / ms}
    print(f"transformers generate, batch 1: {ms:.2f} ms/token ({1e3 / ms:.0f} tokens/s)", flush=True)


def time_to_ready(dev, shape: str, quick: bool, report: dict) -> None:
    """A server process on a checkpoint written to disk: seconds from its start to /health 200."""
    free_device(dev)
    ckpt = write_checkpoint(tempfile.mkdtemp(), SHAPES[shape])
    size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "inference_api.py", "--ckpt_dir", ckpt, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--device", dev.type, "--max_seq_len", "1024", "--max_batch_size", "8" if quick else "64"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])}
    log = tempfile.TemporaryFile("w+")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=os.path.join(ROOT, "presets/inference/llama2-completion"),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        ready = None
        while ready is None and proc.poll() is None and time.perf_counter() - t0 < 300:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    ready = time.perf_counter() - t0 if r.status == 200 else None
            except OSError:
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(30)
        log.seek(0)
        text = log.read()
    if ready is None:
        raise RuntimeError(f"the server did not answer /health 200 (exit {proc.returncode}): {text[-2000:]}")
    lines = [m for m in text.splitlines() if re.search(r"load|ready|graphs|KV cache|attention|CUDA", m)]
    report["time_to_ready"] = {"checkpoint_bytes": size, "seconds": ready, "log": lines[-12:]}
    print(f"time to /health 200 on a {size / 1e9:.2f} GB checkpoint: {ready:.1f} s; the server logged:", flush=True)
    for line in lines[-12:]:
        print(f"   {line}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--quick", action="store_true", help="small sizes everywhere: a smoke run")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}", flush=True)
    init_model_parallel(1, dev)
    report = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__}
    t0 = time.perf_counter()
    ckpt = write_checkpoint(
        tempfile.mkdtemp(), ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=64)
    )
    for dtype in (torch.float32, torch.bfloat16):  # fp32: the same math; bf16: how soon rounding parts them
        phase(report, f"parity {dtype}", parity, dev, ckpt, dtype, a.quick)
    phase(report, "speed", speed, dev, a.shape, a.quick)
    phase(report, "transformers baseline", transformers_baseline, dev, a.shape, a.quick)
    phase(report, "time to ready", time_to_ready, dev, "small" if a.quick else "1b", a.quick)
    report["seconds"] = time.perf_counter() - t0
    print(f"done in {report['seconds']:.0f} s; failed phases: {sorted(report.get('failed', {})) or 'none'}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if report.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
