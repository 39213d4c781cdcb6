"""Throughput of the llm-api server against llm-api's own pattern, same GGUF file, same run.

    python -m presets.tools.bench_llama_cpp [--requests 32 --clients 8 --new_tokens 64]

The bench model of docs/benchmarks.md (Llama-2 architecture, dim 512, 8 layers, 8 heads, vocab 32000, random
weights) exported to GGUF (f32); prompts of 16-128 random tokens, greedy, EOS ignored, closed-loop
clients. Systems: this server's engine through Runtime.generate (the call the routes make, HTTP
excluded) with max_batch_size = clients, and with max_batch_size 1; baseline: llama-cpp-python's
`Llama` called one request at a time, as llm-api served (its sampler made greedy, no repeat penalty).
Every system uses n_threads = the CPU count and runs in a process of its own.
"""

import argparse
import os
import tempfile
import time


def run_ours(path: str, prompts, clients: int, batch: int, new_tokens: int):
    from presets.engine.params import SamplingParams
    from presets.servers.llm_api import build_runtime
    from presets.servers.llm_api_config import LlmApiConfig
    from presets.tools.bench import closed_loop, summarize

    ctx = max(map(len, prompts)) + new_tokens
    cfg = LlmApiConfig(
        model_family="llama",
        model_name="bench",
        max_batch_size=batch,
        max_queue_size=len(prompts),
        model_params={"ctx_size": ctx, "n_threads": os.cpu_count()},
    )
    rt = build_runtime(cfg, path)
    rt.start()
    rt.wait_started()
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, repeat_penalty=1.0)

    def serve(prompt):
        (seq,) = rt.generate([prompt], params)
        return seq.token_times

    seconds, records = closed_loop(prompts, clients, serve)
    rt.shutdown()
    return summarize(f"this server, max_batch_size {batch}", seconds, records, new_tokens)


def run_llama_cpp_python(path: str, prompts, clients: int, new_tokens: int):
    """llama-cpp-python's high-level Llama, one request at a time in arrival order (one worker thread
    takes requests from a FIFO queue), as llm-api served requests."""
    import queue
    import threading

    from llama_cpp import Llama

    from presets.tools.bench import closed_loop, summarize

    llm = Llama(path, n_ctx=max(map(len, prompts)) + new_tokens, n_threads=os.cpu_count(), n_batch=512, verbose=False)
    requests: queue.Queue = queue.Queue()

    def worker():
        while (item := requests.get()) is not None:
            prompt, times, done = item
            for _token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                times.append(time.perf_counter())
                if len(times) == new_tokens:
                    break
            done.set()

    thread = threading.Thread(target=worker)
    thread.start()

    def serve(prompt):
        times, done = [], threading.Event()
        requests.put((prompt, times, done))
        done.wait()
        return times

    seconds, records = closed_loop(prompts, clients, serve)
    requests.put(None)
    thread.join()
    return summarize("llama-cpp-python Llama, one request at a time (llm-api)", seconds, records, new_tokens)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--new_tokens", type=int, default=64)
    a = ap.parse_args(argv)
    from presets.tools.bench import BENCH_ARGS, _in_process, make_prompts, print_table
    from presets.tools.gguf_export import export
    from presets.tools.tiny_checkpoint import write_checkpoint

    with tempfile.TemporaryDirectory() as d:
        write_checkpoint(os.path.join(d, "ckpt"), BENCH_ARGS)
        path = export(os.path.join(d, "ckpt"), os.path.join(d, "bench.gguf"))
        prompts = make_prompts(a.requests, BENCH_ARGS.vocab_size)
        rows = [
            _in_process(run_ours, path, prompts, a.clients, a.clients, a.new_tokens),
            _in_process(run_ours, path, prompts, a.clients, 1, a.new_tokens),
            _in_process(run_llama_cpp_python, path, prompts, a.clients, a.new_tokens),
        ]
    print(f"\nmachine: {os.cpu_count()} CPUs; model: dim 512, 8 layers, vocab 32000, GGUF f32")
    print(f"workload: {a.requests} requests, {a.clients} clients, prompts 16-128 tokens, {a.new_tokens} new tokens\n")
    print_table(rows)
    for r in rows[1:]:
        print(
            f"\nthis server (batch {a.clients}) / {r['system']}: {rows[0]['tokens_per_s'] / r['tokens_per_s']:.2f}x",
            end="",
        )
    print()


if __name__ == "__main__":
    main()
