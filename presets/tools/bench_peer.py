"""The DESIGN workload over HTTP: this server against llama.cpp's llama-server on the same weights, same run.

    python -m presets.tools.bench_peer --llama_server .cache/llama-server/build/bin/llama-server

Bench model of DESIGN.md (random weights). Ours: the text-completion server (fp32, C kernels over its
bf16-exact weights), --max_batch_size 16. llama-server: 16 slots (-np 16) of the same context each,
continuous batching, on GGUF exports of the same checkpoint in f32 and in f16. Workload: 64 requests
from 16 closed-loop clients, prompts of 16-128 random pieces of the trained vocabulary sent as the same
text to both (each tokenizes it to the same count, 20-150 tokens), 64 new tokens each, greedy, EOS
ignored; aggregate output tokens/s and request latency. `make llama-server` builds the binary from the
pinned llama-cpp-python sources.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

from presets.llama2.tokenizer import Tokenizer
from presets.tools.bench import BENCH_ARGS, closed_loop, cpu_model, make_prompts
from presets.tools.gguf_export import export
from presets.tools.tiny_checkpoint import write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


def measure(name: str, send, texts: list[str], clients: int, new_tokens: int) -> dict:
    send(texts[0][:40], 4)  # warm-up
    latencies = {}

    def serve(text):
        t0 = time.perf_counter()
        got = send(text, new_tokens)
        assert got == new_tokens, f"{name}: {got} tokens"
        latencies[id(text)] = time.perf_counter() - t0
        return [0.0] * new_tokens

    seconds, _ = closed_loop(texts, clients, serve)
    lat = sorted(latencies.values())
    return {"system": name, "tokens_per_s": len(texts) * new_tokens / seconds, "latency_p50": statistics.median(lat),
            "latency_p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))], "seconds": seconds}  # fmt: skip


def run_ours(ckpt: str, texts, clients: int, new_tokens: int) -> dict:
    port = free_port()
    cmd = [sys.executable, "inference_api.py", "--ckpt_dir", ckpt, "--tokenizer_path", f"{ckpt}/tokenizer.model",
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--max_batch_size", str(clients),
           "--max_seq_len", "512"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=os.path.join(ROOT, "presets/inference/llama2-completion"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_up(f"http://127.0.0.1:{port}/healthz", proc)
        params = {"temperature": 0, "ignore_eos": True}

        def send(text, n):
            post(f"http://127.0.0.1:{port}/generate", {"prompts": [text], "parameters": {**params, "max_gen_len": n}})
            return n  # ignore_eos with room left in max_seq_len: exactly n tokens

        return measure("this server (paged engine, fp32 compute)", send, texts, clients, new_tokens)
    finally:
        proc.terminate()
        proc.wait(30)


def run_llama_server(binary: str, gguf: str, ftype: str, texts, clients: int, new_tokens: int) -> dict:
    port = free_port()
    cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(clients),
           "-c", str(512 * clients), "-t", str(os.cpu_count()), "--no-webui"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(f"http://127.0.0.1:{port}/health", proc)

        def send(text, n):
            body = {"prompt": text, "n_predict": n, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
            return post(f"http://127.0.0.1:{port}/completion", body)["tokens_predicted"]

        return measure(f"llama-server, {clients} slots, GGUF {ftype}", send, texts, clients, new_tokens)
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama_server", required=True)
    ap.add_argument("--ckpt_dir", default=".cache/demo-llama2-random-weights")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--new_tokens", type=int, default=64)
    a = ap.parse_args(argv)
    ckpt = os.path.abspath(a.ckpt_dir)
    if not os.path.exists(f"{ckpt}/params.json"):
        write_checkpoint(ckpt, BENCH_ARGS)
    tok = Tokenizer(f"{ckpt}/tokenizer.model")
    # Random pieces of the trained vocabulary (not the <extra_N> padding symbols, which llama.cpp spells
    # out character by character), as text: both servers tokenize each to the same number of tokens.
    real = [i for i in range(3, tok.n_words) if not tok.sp.id_to_piece(i).startswith("<extra_")]
    texts = [tok.decode([real[i % len(real)] for i in p[1:]]) for p in make_prompts(a.requests, tok.n_words)]
    rows = [run_ours(ckpt, texts, a.clients, a.new_tokens)]
    for ftype in ("f32", "f16"):
        gguf = os.path.join(ckpt, f"bench-{ftype}.gguf")
        if not os.path.exists(gguf):
            export(ckpt, gguf, ftype=ftype)
        rows.append(run_llama_server(a.llama_server, gguf, ftype, texts, a.clients, a.new_tokens))
    print(f"\nmachine: {os.cpu_count()} CPUs ({cpu_model()})")
    print(
        f"workload: {a.requests} requests, {a.clients} clients, prompts 16-128 tokens, {a.new_tokens} new, over HTTP\n"
    )
    print("| system | output tokens/s | latency p50 (s) | latency p99 (s) | wall (s) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['tokens_per_s']:.1f} | {r['latency_p50']:.2f} | {r['latency_p99']:.2f} "
              f"| {r['seconds']:.1f} |")  # fmt: skip
    for r in rows[1:]:
        print(f"\nthis server / {r['system']}: {rows[0]['tokens_per_s'] / r['tokens_per_s']:.2f}x", end="")
    print()


if __name__ == "__main__":
    main()
