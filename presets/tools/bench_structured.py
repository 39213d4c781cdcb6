"""What structured output costs: the defined load shape (docs/benchmarks.md) with half the requests constrained by a
small JSON schema, against the same requests all free, in the same run.

    python -m presets.tools.bench_structured [--model_dir .cache/smollm2-135m-instruct]

SmolLM2-135M-Instruct (fp32, CPU) on our engine: 64 chat requests from 16 clients asking for a person as
JSON, up to 64 new tokens, greedy, EOS ends an answer (a grammar ends the text where the JSON ends, so a fixed
count cannot be forced). Each setting runs in its own process; requests go through Runtime.generate, the call
the routes make (HTTP excluded). Reported: output tokens/s, TTFT p50 and inter-token latency p50.
"""

import argparse
import asyncio
import multiprocessing
import os
import statistics
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "city": {"type": "string", "maxLength": 24},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


def run(model_dir: str, constrained_share: float, requests: int, clients: int, new_tokens: int) -> dict:
    from presets.api.chat import encode_dialog
    from presets.engine.params import SamplingParams
    from presets.engine.structured import grammar_for
    from presets.process.settings import Settings
    from presets.servers.llama import build_runtime
    from presets.tools.bench import closed_loop

    settings = Settings(
        ckpt_dir=model_dir, device="cpu", max_batch_size=clients, max_seq_len=512, max_queue_size=requests
    )
    rt = build_runtime(settings)
    rt.start()
    rt.wait_started()
    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    asyncio.run(rt.structured.check(grammar))  # compiled once, as the route does before the first request
    free = SamplingParams(temperature=0, max_tokens=new_tokens)
    every = round(1 / constrained_share) if constrained_share else 0  # every `every`-th request is constrained
    ask = [[{"role": "user", "content": f"Describe person number {i} as JSON."}] for i in range(requests)]
    prompts = [(encode_dialog(rt.tokenizer, d), bool(every) and i % every == 0) for i, d in enumerate(ask)]
    rt.generate([prompts[0][0]] * clients, free)  # warm-up at full batch
    records = []

    def serve(item):
        ids, constrained = item
        (seq,) = rt.generate(
            [ids], SamplingParams(temperature=0, max_tokens=new_tokens, grammar=grammar if constrained else None)
        )
        records.append((seq.arrival, seq.token_times))
        return seq.token_times

    seconds, _ = closed_loop(prompts, clients, serve)
    rt.shutdown()
    tokens = sum(len(t) for _, t in records)
    itl = [b - a for _, t in records for a, b in zip(t, t[1:])]
    return {
        "tokens_per_s": tokens / seconds,
        "ttft_p50": statistics.median(t[0] - a for a, t in records if t),
        "itl_p50": statistics.median(itl),
        "tokens": tokens,
        "seconds": seconds,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", default=".cache/smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--new_tokens", type=int, default=64)
    a = ap.parse_args(argv)
    if a.model_dir == ap.get_default("model_dir"):
        from presets.tools.smollm2 import ensure_smollm2

        ensure_smollm2(a.model_dir)
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for share in (0.0, 0.5):
        with ctx.Pool(1) as pool:
            rows.append((share, pool.apply(run, (a.model_dir, share, a.requests, a.clients, a.new_tokens))))
    print(
        f"\nmachine: {os.cpu_count()} CPUs; {a.model_dir}; {a.requests} requests, {a.clients} clients, "
        f"up to {a.new_tokens} new tokens, greedy; {time.strftime('%Y-%m-%d')}"
    )
    print("| constrained | output tokens | output tokens/s | TTFT p50 (s) | ITL p50 (ms) |\n|---|---|---|---|---|")
    for share, r in rows:
        print(
            f"| {share:.0%} | {r['tokens']} | {r['tokens_per_s']:.1f} | {r['ttft_p50']:.2f} | "
            f"{r['itl_p50'] * 1e3:.1f} |"
        )
    print(f"\nhalf constrained / none: {rows[1][1]['tokens_per_s'] / rows[0][1]['tokens_per_s']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
