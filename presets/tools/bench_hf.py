"""Throughput of the HuggingFace server's batching: the same concurrent load with and without it.

    python -m presets.tools.bench_hf [--requests 32 --clients 8 --new_tokens 48]

A random-weight Falcon (hidden 512, 8 layers, 8 heads), fp32 on CPU, greedy, EOS ignored; prompts of
8 to 40 words. Each setting runs in its own process; requests go through Runtime.run, the call the
/chat route makes (HTTP excluded).
"""

import argparse
import multiprocessing
import os
import tempfile
import time


def run(model_dir: str, batch: int, requests: int, clients: int, new_tokens: int) -> float:
    from presets.hf import params as hf_params
    from presets.hf.engine import batch_key
    from presets.hf.server import HFSettings, build_runtime
    from presets.serving.batch_loop import Job
    from presets.tools.bench import closed_loop

    rt = build_runtime(HFSettings(model_id=model_dir, max_batch_size=batch))
    rt.start()
    rt.wait_started()
    params = hf_params.DEFAULTS | hf_params.EXTRAS | {"do_sample": False, "ignore_eos": True, "max_length": 1024}
    words = "the river flows past the old mill under the stone bridge".split()
    prompts = [" ".join(words[j % len(words)] for j in range(8 + (i * 7) % 33)) for i in range(requests)]

    def serve(prompt):
        job = rt.engine.job(prompt, params)
        job.max_new_tokens = new_tokens
        rt.run([Job(batch_key(params), job)])
        return [time.perf_counter()] * new_tokens  # closed_loop wants token times; only the total is used

    seconds, _ = closed_loop(prompts, clients, serve)
    rt.shutdown()
    return requests * new_tokens / seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--new_tokens", type=int, default=48)
    a = ap.parse_args(argv)
    from presets.tools.tiny_hf import write_falcon

    with tempfile.TemporaryDirectory() as d:
        write_falcon(d, hidden_size=512, layers=8, heads=8)
        ctx = multiprocessing.get_context("spawn")
        rows = []
        for batch in (1, a.clients):
            with ctx.Pool(1) as pool:
                rows.append((batch, pool.apply(run, (d, batch, a.requests, a.clients, a.new_tokens))))
    print(f"\nmachine: {os.cpu_count()} CPUs; {a.requests} requests, {a.clients} clients, {a.new_tokens} new tokens")
    print("| max_batch_size | output tokens/s |\n|---|---|")
    for batch, tps in rows:
        print(f"| {batch} | {tps:.1f} |")
    print(f"\nbatching gain: {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
