"""The defined benchmark (docs/benchmarks.md, "Benchmark definition"): this server's engine vs two transformers
baselines, same weights, same run.

    python -m presets.tools.bench [--ckpt_dir DIR] [--requests 64 --clients 16 --new_tokens 64]

Bench model: Llama-2 architecture, dim 512, 8 layers, 8 heads, vocab 32000, random weights, fp32,
CPU. Workload: `requests` requests from `clients` closed-loop clients (each sends its next request
when the last one is answered), prompts of 16-128 random tokens, `new_tokens` new tokens each,
greedy, EOS ignored. Every system is measured the same way: TTFT is from the client's submit to
the first token (queueing included), inter-token latency is between consecutive tokens of one
request. Ours is driven through Runtime.generate, the call the HTTP routes make (HTTP excluded).
Baselines: (a) transformers `generate`, one request at a time; (b) transformers `generate` on
static batches of `clients` requests (left-padded). Each system runs in a process of its own, with
one thread doing all its torch work (a second thread that has run OpenMP work slows the first), and
OpenMP's spin set as the servers set it (presets/process/omp_spin.py), for every system alike.
"""

import argparse
import multiprocessing
import os
import platform
import statistics
import threading
import time

import presets.process.omp_spin  # noqa: F401  (before torch: the servers' OpenMP setting, inherited by each system's process)

# isort: split
import torch

from presets.engine.params import SamplingParams
from presets.models.llama import cpu_kernels
from presets.models.llama.hf_convert import to_hf
from presets.models.llama.load import read_args
from presets.models.llama.model import ModelArgs
from presets.models.llama.tokenizer import Tokenizer
from presets.process import device
from presets.process.settings import Settings
from presets.servers.llama import build_runtime
from presets.tools.tiny_checkpoint import write_checkpoint

BENCH_ARGS = ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=32000, multiple_of=256)


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 129, (n,), generator=g).tolist()
    return [[1] + torch.randint(3, vocab, (n_tok - 1,), generator=g).tolist() for n_tok in lengths]


def closed_loop(prompts, clients: int, serve) -> tuple[float, list[tuple[float, list[float]]]]:
    """Run `serve(prompt) -> token times` from `clients` threads; returns (seconds, [(submit, times)])."""
    queue, lock, records = list(enumerate(prompts)), threading.Lock(), [None] * len(prompts)

    def client():
        while True:
            with lock:
                if not queue:
                    return
                i, prompt = queue.pop(0)
            submit = time.perf_counter()
            records[i] = (submit, serve(prompt))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, records


def summarize(name, seconds, records, new_tokens) -> dict:
    ttft = sorted(times[0] - submit for submit, times in records)
    itl = [b - a for _, times in records for a, b in zip(times, times[1:])]
    total = sum(len(times) for _, times in records)
    assert total == len(records) * new_tokens, f"{name}: generated {total} tokens"
    return {
        "system": name,
        "tokens_per_s": total / seconds,
        "ttft_p50": statistics.median(ttft),
        "ttft_p99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
        "itl_p50": statistics.median(itl),
        "seconds": seconds,
    }


# -- the systems; each runs in its own process (see main) ---------------------------------------------


def run_ours(ckpt, prompts, clients, new_tokens, dtype: str = "float32"):
    settings = Settings(
        ckpt_dir=ckpt,
        tokenizer_path=f"{ckpt}/tokenizer.model",
        device="cpu",
        max_batch_size=clients,
        max_seq_len=max(map(len, prompts)) + new_tokens,
        max_queue_size=len(prompts),
        dtype=dtype,
    )
    rt = build_runtime(settings)
    rt.start()  # loads on a thread that then exits, as in the server: only the engine thread computes
    rt.wait_started()
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    rt.generate(prompts[:clients], params)  # warm-up at full batch

    def serve(prompt):
        (seq,) = rt.generate([prompt], params)
        return seq.token_times

    seconds, records = closed_loop(prompts, clients, serve)
    rt.shutdown()
    return summarize(f"this server (continuous batching, {dtype})", seconds, records, new_tokens)


class _Timer:
    """A transformers streamer that notes when each new token (of the whole batch) comes out."""

    def __init__(self):
        self.times, self.calls = [], 0

    def put(self, value):
        self.calls += 1
        if self.calls > 1:  # the first call carries the prompt
            self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_generate(hf, batch: list[list[int]], new_tokens: int) -> list[float]:
    """Greedy generate for a left-padded batch; returns the time of each generated step."""
    width = max(map(len, batch))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    timer = _Timer()
    with torch.inference_mode():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            streamer=timer,
        )
    assert out.shape[1] == width + new_tokens
    return timer.times


def run_hf(ckpt, prompts, clients, new_tokens, batch_size: int):
    """transformers generate on batches of up to `batch_size` requests, run by this (main) thread.

    Clients submit to a queue; the main thread takes up to batch_size requests (a static batch
    waits until it is full or no requests remain), generates, and answers them. batch_size 1 is
    the one-request-at-a-time pattern.
    """
    tok = Tokenizer(f"{ckpt}/tokenizer.model")
    hf = to_hf(read_args(ckpt, tok), torch.load(f"{ckpt}/consolidated.00.pth", weights_only=True))
    hf.generation_config.eos_token_id = None  # EOS ignored: every request gets new_tokens
    hf_generate(hf, prompts[:batch_size], 4)  # warm-up
    cv, pending, results = threading.Condition(), [], {}

    def serve(prompt):
        key = object()
        with cv:
            pending.append((key, prompt))
            cv.notify_all()
            while key not in results:
                cv.wait()
            return results.pop(key)

    outcome = {}
    clients_thread = threading.Thread(target=lambda: outcome.update(r=closed_loop(prompts, clients, serve)))
    clients_thread.start()
    served = 0
    while served < len(prompts):
        with cv:
            want = min(batch_size, len(prompts) - served)
            while len(pending) < want:
                cv.wait()
            batch = pending[:want]
            del pending[:want]
        times = hf_generate(hf, [p for _, p in batch], new_tokens)
        with cv:
            results.update((key, times) for key, _ in batch)
            cv.notify_all()
        served += len(batch)
    clients_thread.join()
    seconds, records = outcome["r"]
    name = "one request at a time" if batch_size == 1 else f"static batches of {batch_size}"
    return summarize(f"transformers generate, {name}", seconds, records, new_tokens)


def print_table(rows: list[dict]) -> None:
    """The systems' summaries as a markdown table."""
    print("| system | output tokens/s | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) | wall (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['system']} | {r['tokens_per_s']:.1f} | {r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} "
            f"| {r['itl_p50'] * 1e3:.1f} | {r['seconds']:.1f} |"
        )


def _in_process(fn, *args):
    """Run fn(*args) in a fresh process: each system gets its own threads, memory and OpenMP pool."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


# -- memory bandwidth floor -------------------------------------------------------------------------


def read_bandwidth(n_bytes: int = 1 << 30) -> float:
    """Best-of-5 bytes/s for summing a large fp32 tensor (a stand-in for streaming the weights)."""
    x = torch.ones(n_bytes // 4)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return n_bytes / best


def cpu_model() -> str:
    """The CPU's model name (the baselines' speed depends on it: MKL is much slower on AMD than Intel)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def workload_args(doc: str) -> argparse.ArgumentParser:
    """The flags of the defined workload (docs/benchmarks.md), shared by the benchmarks that run it."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt_dir", default=".cache/demo-llama2-random-weights")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--new_tokens", type=int, default=64)
    return ap


def main(argv=None):
    ap = workload_args(__doc__)
    ap.add_argument("--skip_one_at_a_time", action="store_true", help="skip the slowest baseline")
    a = ap.parse_args(argv)
    if not os.path.exists(f"{a.ckpt_dir}/params.json"):
        print(f"writing the random-weight bench checkpoint to {a.ckpt_dir}")
        write_checkpoint(a.ckpt_dir, BENCH_ARGS)
    tok = Tokenizer(f"{a.ckpt_dir}/tokenizer.model")
    args = read_args(a.ckpt_dir, tok)
    prompts = make_prompts(a.requests, args.vocab_size)

    # Ours in fp32 (the bench model's dtype), and in bf16 where --dtype auto picks it (process/device.py).
    rows = [_in_process(run_ours, a.ckpt_dir, prompts, a.clients, a.new_tokens)]
    if device.cpu_dtype() == torch.bfloat16:
        rows.append(_in_process(run_ours, a.ckpt_dir, prompts, a.clients, a.new_tokens, "bfloat16"))
    rows.append(_in_process(run_hf, a.ckpt_dir, prompts, a.clients, a.new_tokens, a.clients))
    if not a.skip_one_at_a_time:
        rows.append(_in_process(run_hf, a.ckpt_dir, prompts, a.clients, a.new_tokens, 1))
    shard = torch.load(f"{a.ckpt_dir}/consolidated.00.pth", mmap=True, weights_only=True)
    weight_bytes = 4 * sum(t.numel() for k, t in shard.items() if k != "rope.freqs")  # all of them in fp32
    # The matmul weights (every 2-D one but the embedding, of which a step reads a few rows): what a
    # decode step streams. This server keeps them as bf16 when its C kernels run (cpu_kernels.py).
    matmul = sum(t.numel() for k, t in shard.items() if t.dim() == 2 and k != "tok_embeddings.weight")
    ours_format = "bf16" if cpu_kernels.native() is not None else "fp32"
    ours_bytes = matmul * (2 if ours_format == "bf16" else 4)
    bw = read_bandwidth()

    cpu = cpu_model()
    print(f"\nmachine: {os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"model: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, vocab {args.vocab_size}, fp32")
    print(f"workload: {a.requests} requests, {a.clients} clients, prompts 16-128 tokens, {a.new_tokens} new tokens\n")
    print_table(rows)
    ours = [r for r in rows if r["system"].startswith("this server")]
    for o in ours:
        for r in rows[len(ours) :]:
            print(f"\n{o['system']} / {r['system']}: {o['tokens_per_s'] / r['tokens_per_s']:.2f}x", end="")
    floor = weight_bytes / bw
    print(
        f"\n\nbandwidth floor: {weight_bytes / 1e6:.0f} MB of weights / {bw / 1e9:.1f} GB/s measured read "
        f"bandwidth = {floor * 1e3:.1f} ms per decode step ({1 / floor:.0f} tokens/s at batch 1, "
        f"{a.clients / floor:.0f} tokens/s at batch {a.clients} if memory-bound)"
    )
    print(
        f"this server's decode step streams {ours_bytes / 1e6:.0f} MB of matmul weights "
        f"({ours_format}): {ours_bytes / bw * 1e3:.1f} ms per step"
    )


if __name__ == "__main__":
    main()
