"""GPU check (make gpu-check): CUDA parity with transformers in bf16, then a 7B-shaped model's speed.

    python -m presets.tools.gpu_check [--device cuda] [--shape 7b|small] [--out FILE]

1. Parity: a small random Llama-2 checkpoint (GQA, written by our script) on the GPU in fp32 and bf16:
   our logits against transformers' LlamaForCausalLM on the same weights and dtype, and greedy tokens
   of the paged engine (prefix cache, chunked prefill) against transformers' generate.
2. Speed: a 7B-shaped model (dim 4096, 32 layers, 32 heads, vocab 32000) with random bf16 weights,
   built in GPU memory: the KV pool the engine sizes (blocks, tokens), batch-1 decode ms/token against
   the HBM floor (weight bytes / measured copy bandwidth), and through the engine loop tokens/s and
   TTFT at 1, 16, 64 and 256 concurrent sequences (128-token prompts, 128 new tokens, greedy).
Needs torch (CUDA), transformers, sentencepiece, and fairscale, prometheus-client (wheels).
"""

import argparse
import json
import statistics
import tempfile
import time

import torch

from presets.engine.params import SamplingParams
from presets.engine.scheduler import PlanItem, Sequence, StepPlan
from presets.engine.step_loop import EngineLoop
from presets.models.llama.engine import CacheSettings, LlamaEngine
from presets.models.llama.hf_convert import to_hf
from presets.models.llama.load import load_model, read_args
from presets.models.llama.model import ModelArgs, Transformer
from presets.models.llama.tokenizer import Tokenizer
from presets.process.distributed import init_model_parallel
from presets.tools.tiny_checkpoint import write_checkpoint

SHAPES = {
    "7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256),
    "small": ModelArgs(dim=256, n_layers=2, n_heads=4, vocab_size=1000, multiple_of=64),
}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def parity(dev, ckpt: str, dtype, report: dict) -> None:
    tok = Tokenizer(f"{ckpt}/tokenizer.model")
    ours = load_model(ckpt, tok, 0, 1, dev, dtype)
    hf = to_hf(read_args(ckpt, tok), torch.load(f"{ckpt}/consolidated.00.pth", weights_only=True)).to(dev, dtype)
    hf.generation_config.eos_token_id = None
    engine = LlamaEngine(ours, CacheSettings(256, 4, 16, memory=64 << 20, max_num_batched_tokens=16))
    ids = tok.encode("Simply put, the theory of relativity states that the speed of light", bos=True, eos=False)
    with torch.inference_mode():
        ref = hf(torch.tensor([ids], device=dev)).logits[0, -1].float()
        gen = hf.generate(torch.tensor([ids], device=dev), max_new_tokens=16, do_sample=False, pad_token_id=0)
    logits = engine.run(StepPlan([PlanItem(0, 0, ids, list(range(-(-len(ids) // 16))), True)]))[0]
    rel = ((logits - ref).abs().max() / ref.abs().max()).item()
    loop = EngineLoop(engine, tok.eos_id, 4, 16)
    loop.start()
    seqs = [Sequence(ids, SamplingParams(temperature=0, ignore_eos=True), 16) for _ in range(3)]  # shared prefix
    loop.submit(seqs)
    for s in seqs:
        s.done.wait(60)
    loop.stop()
    expected = gen[0, len(ids) :].tolist()
    same = [next((i for i, (a, b) in enumerate(zip(s.output, expected)) if a != b), 16) for s in seqs]
    name = str(dtype).split(".")[1]
    report[f"parity_{name}"] = {"logits_rel_err": rel, "greedy_tokens_equal_of_16": same}
    print(f"parity ({name}): last-token logits rel err {rel:.5f}; greedy tokens equal to transformers': {same} of 16")


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
    loop.start()
    g = torch.Generator().manual_seed(n)
    seqs = [
        Sequence(
            torch.randint(3, vocab, (prompt_len,), generator=g).tolist(),
            SamplingParams(temperature=0, ignore_eos=True),
            new,
        )
        for _ in range(n)
    ]
    t0 = time.perf_counter()
    loop.submit(seqs)
    for s in seqs:
        s.done.wait(600)
    seconds = time.perf_counter() - t0
    loop.stop()
    loop.join(10)
    assert all(len(s.output) == new for s in seqs), "a sequence did not finish"
    ttft = sorted(s.token_times[0] - s.arrival for s in seqs)
    return {
        "concurrent": n,
        "tokens_per_s": n * new / seconds,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_max_s": ttft[-1],
        "preemptions": loop.scheduler.preemptions,
    }


def speed(dev, shape: str, report: dict) -> None:
    args = SHAPES[shape]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = random_model(args, dev, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    engine = LlamaEngine(model, CacheSettings(max_seq_len=2048, max_batch_size=256, max_num_batched_tokens=8192))
    pool = engine.pool
    bw = copy_bandwidth(dev) if dev.type == "cuda" else float("nan")
    report["kv_pool"] = {"blocks": pool.num_blocks, "tokens": pool.tokens, "bytes": pool.bytes}
    print(
        f"model {shape}: {weight_bytes / 1e9:.2f} GB of weights; KV pool {pool.num_blocks} blocks = {pool.tokens} "
        f"tokens ({pool.bytes / 2**30:.1f} GiB); copy bandwidth {bw / 1e12:.2f} TB/s"
    )
    prompt = list(range(3, 131))
    engine.run(StepPlan([PlanItem(0, 0, prompt, list(range(8)), True)]))
    times = []
    for i in range(64):
        sync(dev)
        t0 = time.perf_counter()
        engine.run(StepPlan([PlanItem(0, 128 + i, [5], list(range((128 + i) // 16 + 1)), True)]))
        sync(dev)
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times[8:]) * 1e3
    floor = weight_bytes / (bw / 2) * 1e3  # reading the weights once, at the read half of the copy rate
    report["batch1_decode"] = {"ms_per_token": ms, "hbm_floor_ms": floor}
    print(f"batch-1 decode: {ms:.2f} ms/token; HBM floor {floor:.2f} ms ({floor / ms:.0%} of the floor's speed)")
    report["concurrency"] = []
    for n in (1, 16, 64, 256):
        r = loop_throughput(engine, n, 128, 128, args.vocab_size)
        report["concurrency"].append(r)
        print(
            f"{n:4d} concurrent: {r['tokens_per_s']:8.0f} tokens/s, TTFT p50 {r['ttft_p50_s'] * 1e3:.0f} ms, "
            f"max {r['ttft_max_s'] * 1e3:.0f} ms, preemptions {r['preemptions']}"
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    init_model_parallel(1, dev)
    report = {"device": str(dev), "torch": torch.__version__}
    t0 = time.perf_counter()
    ckpt = write_checkpoint(
        tempfile.mkdtemp(), ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=64)
    )
    for dtype in (torch.float32, torch.bfloat16):  # fp32: the same math; bf16: how soon rounding parts them
        parity(dev, ckpt, dtype, report)
    speed(dev, a.shape, report)
    report["seconds"] = time.perf_counter() - t0
    print(f"done in {report['seconds']:.0f} s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
