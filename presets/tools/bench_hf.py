"""The HuggingFace server's engines under concurrent load.

    python -m presets.tools.bench_hf [--requests 32 --clients 8 --new_tokens 48] [--llama_dir DIR]

1. Falcon on transformers' generate, with and without batching: a random-weight Falcon (hidden 512,
   8 layers, 8 heads), fp32 on CPU, greedy, EOS ignored; prompts of 8 to 40 words.
2. A Llama-architecture folder (default: SmolLM2-135M-Instruct, made by presets/tools/smollm2.py) on our
   engine (the default) vs transformers' generate in static batches (--engine transformers): the defined
   workload (64 requests, 16 clients, prompts of 16-128 tokens, 64 new tokens, greedy, EOS ignored).
Each setting runs in its own process; requests go through the Runtime calls the /chat route makes (HTTP
excluded).
"""

import argparse
import json
import multiprocessing
import os
import tempfile
import time


def run(model_dir: str, batch: int, requests: int, clients: int, new_tokens: int) -> float:
    from presets.engine.batch_loop import Job
    from presets.models.hf import params as hf_params
    from presets.models.hf.engine import batch_key
    from presets.servers.hf import HFSettings, build_runtime
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


def run_llama(model_dir: str, engine: str, prompts: list[list[int]], clients: int, new_tokens: int) -> dict:
    """The defined workload (docs/benchmarks.md) on the HF server's runtime for `engine` (presets or transformers)."""
    from presets.engine.batch_loop import Job
    from presets.engine.params import SamplingParams
    from presets.models.hf import params as hf_params
    from presets.models.hf.engine import HFJob, batch_key
    from presets.servers.hf import HFSettings, build_runtime, create_engine_app
    from presets.tools.bench import closed_loop, summarize

    settings = HFSettings(model_id=model_dir, engine=engine, max_batch_size=clients, max_queue_size=len(prompts))
    if engine == "presets":
        _, rt = create_engine_app(settings)
        sampling = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

        def serve(ids):
            (seq,) = rt.generate([ids], sampling)
            return seq.token_times
    else:
        rt = build_runtime(settings)
        params = hf_params.DEFAULTS | hf_params.EXTRAS | {"do_sample": False, "ignore_eos": True, "max_length": 4096}

        def serve(ids):
            (job,) = rt.run([Job(batch_key(params), HFJob("", ids, params, new_tokens))])
            done = time.perf_counter()  # generate gives the batch's tokens at once: no per-token times
            return [done] * len(job.result[0][0])

    rt.start()
    rt.wait_started()
    serve(prompts[0])  # warm-up
    seconds, records = closed_loop(prompts, clients, serve)
    rt.shutdown()
    name = "our engine (continuous batching)" if engine == "presets" else f"transformers generate, batches of {clients}"
    return summarize(name, seconds, records, new_tokens)


def bench_llama(model_dir: str, requests: int, clients: int, new_tokens: int) -> None:
    from presets.tools.bench import make_prompts, print_table

    with open(os.path.join(model_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    prompts = make_prompts(requests, vocab)
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for engine in ("presets", "transformers"):
        with ctx.Pool(1) as pool:
            rows.append(pool.apply(run_llama, (model_dir, engine, prompts, clients, new_tokens)))
    print(
        f"\nHF server on {model_dir} (fp32, CPU): {requests} requests, {clients} clients, prompts 16-128 tokens, "
        f"{new_tokens} new tokens, greedy, EOS ignored"
    )
    print("(TTFT and ITL of generate are per batch: it hands back a request's tokens when its batch ends)\n")
    print_table(rows)
    print(f"\nour engine / transformers generate: {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--new_tokens", type=int, default=48)
    ap.add_argument("--llama_dir", default=".cache/smollm2-135m-instruct", help="a LlamaForCausalLM folder")
    ap.add_argument("--only_llama", action="store_true", help="skip the Falcon batching measurement")
    a = ap.parse_args(argv)
    if a.llama_dir == ap.get_default("llama_dir"):
        from presets.tools.smollm2 import ensure_smollm2

        ensure_smollm2(a.llama_dir)
    bench_llama(a.llama_dir, 64, 16, 64)
    if a.only_llama:
        return
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
