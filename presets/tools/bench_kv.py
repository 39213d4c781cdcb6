"""Benchmarks of the paged KV cache, each feature against its baseline in the same run (issue 14's b-d).

    python -m presets.tools.bench_kv [--ckpt_dir DIR] [--only memory,prefix,long]

The bench model of docs/benchmarks.md (dim 512, 8 layers, random weights, fp32, CPU), driven through
Runtime.generate (HTTP excluded), greedy, EOS ignored; every system runs in a process of its own.
- memory: a KV pool of what 16 slots x 1024 positions take; 128 requests, prompts 32-512 tokens,
  outputs 32-256 (uniform), 64 clients. Paged (up to 64 running) vs slots (16 running: the most the
  slot cache of earlier versions admitted in that memory). Peak running sequences and tokens/s.
- prefix: 64 requests from 16 clients, one ~600-token system prompt plus a distinct 20-token
  question each, 32 new tokens: TTFT p50/p99 and tokens/s, prefix caching on vs off.
- long: 8 streams decoding, then one 2000-token prompt arrives: the streams' inter-token latency
  p99 while it prefills, against their steady ITL, at several step budgets (--max_num_batched_tokens);
  the largest budget takes the whole prompt in one step (not chunked).
"""

import argparse
import os
import statistics
import threading
import time

import torch

from presets.engine.params import SamplingParams
from presets.models.llama.load import read_args
from presets.models.llama.tokenizer import Tokenizer
from presets.process.settings import Settings
from presets.servers.llama import build_runtime
from presets.tools.bench import BENCH_ARGS, _in_process, closed_loop, cpu_model
from presets.tools.tiny_checkpoint import write_checkpoint


def random_ids(g: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def start(ckpt: str, **kw):
    settings = Settings(ckpt_dir=ckpt, tokenizer_path=f"{ckpt}/tokenizer.model", device="cpu", max_queue_size=512, **kw)
    rt = build_runtime(settings)
    rt.start()
    rt.wait_started()
    sched, peak = rt.loop.scheduler, [0]
    schedule = sched.schedule

    def counting():  # the most sequences running after any step's planning
        plan = schedule()
        peak[0] = max(peak[0], len(sched.running))
        return plan

    sched.schedule = counting
    return rt, peak


def serve_jobs(ckpt: str, settings: dict, jobs: list[tuple[list[int], int]], clients: int) -> dict:
    """Closed-loop clients over (prompt, new tokens) jobs; throughput, TTFT, peak running, preemptions."""
    rt, peak = start(ckpt, **settings)
    by_prompt = {id(p): n for p, n in jobs}
    rt.generate([jobs[0][0][:16]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up

    def serve(prompt):
        params = SamplingParams(temperature=0, max_tokens=by_prompt[id(prompt)], ignore_eos=True)
        return rt.generate([prompt], params)[0].token_times

    seconds, records = closed_loop([p for p, _ in jobs], clients, serve)
    total = sum(len(times) for _, times in records)
    assert total == sum(n for _, n in jobs), f"generated {total} tokens"
    ttft = sorted(times[0] - submit for submit, times in records)
    out = {
        "tokens_per_s": total / seconds,
        "seconds": seconds,
        "peak_running": peak[0],
        "preemptions": rt.loop.scheduler.preemptions,
        "ttft_p50": statistics.median(ttft),
        "ttft_p99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
    }
    rt.shutdown()
    return out


def long_prompt(ckpt: str, budget: int, vocab: int) -> dict:
    """8 streams decode; a 2000-token prompt arrives; ITL of the streams before and while it prefills."""
    g = torch.Generator().manual_seed(3)
    rt, _ = start(ckpt, max_batch_size=9, max_seq_len=2304, max_num_batched_tokens=budget)
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    rt.generate([random_ids(g, 32, vocab)], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    streams = [None] * 8
    threads = []
    for i in range(8):
        prompt = [1] + random_ids(g, 31, vocab)
        t = threading.Thread(target=lambda i=i, p=prompt: streams.__setitem__(i, rt.generate([p], params)[0]))
        threads.append(t)
        t.start()
    while len(rt.loop.scheduler.running) < 8 or min(len(s.output) for s in rt.loop.scheduler.running) < 30:
        time.sleep(0.01)
    arrival = time.perf_counter()
    (long,) = rt.generate([[1] + random_ids(g, 1999, vocab)], SamplingParams(temperature=0, max_tokens=1))
    first = long.token_times[0]
    for t in threads:
        t.join()
    steady, during = [], []
    for s in streams:
        for a, b in zip(s.token_times, s.token_times[1:]):
            if b < arrival:
                steady.append(b - a)
            elif a < first and b > arrival:  # a gap that overlaps the prefill
                during.append(b - a)
    during.sort()
    rt.shutdown()
    return {
        "budget": budget,
        "steady_itl_p50": statistics.median(steady),
        "during_itl_p99": during[int(0.99 * len(during))],
        "during_itl_max": during[-1],
        "long_ttft": first - arrival,
    }


def table(header: list[str], rows: list[list]) -> None:
    """A markdown table."""
    print("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt_dir", default=".cache/demo-llama2-random-weights")
    ap.add_argument("--only", default="memory,prefix,long")
    a = ap.parse_args(argv)
    if not os.path.exists(f"{a.ckpt_dir}/params.json"):
        write_checkpoint(a.ckpt_dir, BENCH_ARGS)
    args = read_args(a.ckpt_dir, Tokenizer(f"{a.ckpt_dir}/tokenizer.model"))
    per_token = 2 * args.n_layers * (args.n_kv_heads or args.n_heads) * (args.dim // args.n_heads) * 4
    print(f"machine: {os.cpu_count()} CPUs ({cpu_model()}), torch {torch.__version__}")
    print(f"model: dim {args.dim}, {args.n_layers} layers, vocab {args.vocab_size}, fp32; KV {per_token} bytes/token")
    only = a.only.split(",")
    g = torch.Generator().manual_seed(0)

    if "memory" in only:
        pool = str(16 * 1024 * per_token)
        jobs = [
            (
                [1] + random_ids(g, int(torch.randint(32, 513, (1,), generator=g)) - 1, args.vocab_size),
                int(torch.randint(32, 257, (1,), generator=g)),
            )
            for _ in range(128)
        ]
        base = dict(max_seq_len=1024, kv_cache_memory=pool)
        rows = [
            (name, _in_process(serve_jobs, a.ckpt_dir, {**base, "max_batch_size": mb}, jobs, 64))
            for name, mb in (("paged, up to 64 running", 64), ("slots: 16 running", 16))
        ]
        print(f"\n### memory: KV pool {int(pool) / 2**20:.0f} MiB (16 x 1024 positions), 128 requests, 64 clients\n")
        table(
            ["system", "peak running", "tokens/s", "preemptions", "wall (s)"],
            [
                [n, r["peak_running"], f"{r['tokens_per_s']:.1f}", r["preemptions"], f"{r['seconds']:.1f}"]
                for n, r in rows
            ],
        )
        print(
            f"\nconcurrency {rows[0][1]['peak_running'] / rows[1][1]['peak_running']:.1f}x, "
            f"tokens/s {rows[0][1]['tokens_per_s'] / rows[1][1]['tokens_per_s']:.2f}x"
        )

    if "prefix" in only:
        system = [1] + random_ids(g, 599, args.vocab_size)
        jobs = [(system + random_ids(g, 20, args.vocab_size), 32) for _ in range(64)]
        base = dict(max_seq_len=1024, max_batch_size=16)
        rows = [
            (name, _in_process(serve_jobs, a.ckpt_dir, {**base, "no_prefix_caching": off}, jobs, 16))
            for name, off in (("prefix caching on", False), ("prefix caching off", True))
        ]
        print("\n### prefix: 64 requests, 16 clients, one 600-token system prompt + 20 distinct tokens, 32 new\n")
        table(
            ["system", "TTFT p50 (s)", "TTFT p99 (s)", "tokens/s", "wall (s)"],
            [
                [n, f"{r['ttft_p50']:.3f}", f"{r['ttft_p99']:.3f}", f"{r['tokens_per_s']:.1f}", f"{r['seconds']:.1f}"]
                for n, r in rows
            ],
        )
        print(
            f"\nTTFT p50 {rows[1][1]['ttft_p50'] / rows[0][1]['ttft_p50']:.1f}x lower with caching, "
            f"tokens/s {rows[0][1]['tokens_per_s'] / rows[1][1]['tokens_per_s']:.2f}x"
        )

    if "long" in only:
        rows = [_in_process(long_prompt, a.ckpt_dir, budget, args.vocab_size) for budget in (4096, 256, 64, 32, 16)]
        print("\n### long: 8 streams decoding, one 2000-token prompt arrives\n")
        print(
            "| step budget (tokens) | steady ITL p50 (ms) | ITL p99 while it prefills (ms) | max (ms) "
            "| ratio p99/steady | its TTFT (s) |\n|---|---|---|---|---|---|"
        )
        for r in rows:
            name = f"{r['budget']} (not chunked)" if r["budget"] >= 2008 else f"{r['budget']} (chunked)"
            print(
                f"| {name} | {r['steady_itl_p50'] * 1e3:.1f} | {r['during_itl_p99'] * 1e3:.1f} | "
                f"{r['during_itl_max'] * 1e3:.1f} | {r['during_itl_p99'] / r['steady_itl_p50']:.1f}x | "
                f"{r['long_ttft']:.2f} |"
            )


if __name__ == "__main__":
    main()
