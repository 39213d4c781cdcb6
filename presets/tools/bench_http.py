"""The defined benchmark (docs/benchmarks.md) over HTTP beside the engine alone, same run, and a crowd of streams.

    python -m presets.tools.bench_http [--ckpt_dir DIR] [--requests 64 --clients 16 --new_tokens 64 --streams 256]

1. Engine alone: `clients` closed-loop clients call Runtime.generate in the server's own process
   layout (bench.py's run_ours), on prompts of the corpus text.
2. Over HTTP: the same prompts, as text, to POST /v1/completions of a real server process (greedy,
   EOS ignored, `new_tokens` each), from `clients` closed-loop clients on keep-alive connections. Both
   count the tokens generated over the wall time; HTTP overhead = 1 - HTTP tokens/s / engine tokens/s.
   The clients run on the same machine as the server (on 2 cores they take some of its CPU).
3. `streams` streamed requests at once (`stream: true`), each to its `data: [DONE]`: errors, tokens/s,
   time to first token, the server's peak RSS.
"""

import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time

from presets.models.llama.tokenizer import Tokenizer
from presets.tools.bench import BENCH_ARGS, _in_process, closed_loop, cpu_model, run_ours, workload_args
from presets.tools.tiny_checkpoint import write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.txt")


def text_prompts(tok: Tokenizer, n: int) -> list[str]:
    """n prompts cut from the corpus, 16-128 tokens each (as bench.py's token prompts)."""
    words = open(CORPUS).read().split()
    prompts, at = [], 0
    for i in range(n):
        want = 16 + (i * 37) % 113
        text = ""
        while len(tok.encode(text, bos=True, eos=False)) < want:
            text = (text + " " + words[at % len(words)]).strip()
            at += 1
        prompts.append(text)
    return prompts


def start_server(ckpt: str, port: int, clients: int, max_seq_len: int, queue: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "inference_api.py",
        "--ckpt_dir",
        ckpt,
        "--tokenizer_path",
        f"{ckpt}/tokenizer.model",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--max_batch_size",
        str(clients),
        "--max_seq_len",
        str(max_seq_len),
        "--max_queue_size",
        str(queue),
    ]
    cwd = os.path.join(ROOT, "presets", "inference", "llama2-completion")
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not become healthy")


def http_closed_loop(port: int, prompts: list[str], clients: int, new_tokens: int) -> tuple[float, int]:
    """(seconds, completion tokens) for the prompts over keep-alive connections, `clients` at a time."""
    local = threading.local()

    def serve(prompt):
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
        local.conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = local.conn.getresponse()
        data = json.loads(r.read())
        assert r.status == 200, data
        return [0.0] * data["usage"]["completion_tokens"]  # closed_loop's record: one entry per token

    seconds, records = closed_loop(prompts, clients, serve)
    return seconds, sum(len(times) for _, times in records)


async def one_stream(port: int, body: bytes) -> tuple[bool, float]:
    """(well formed and complete to its `length` finish, seconds to the first token) of one streamed request."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() + body)
    data, first = b"", None
    while chunk := await reader.read(65536):
        if first is None and b"data: {" in chunk:
            first = time.perf_counter() - t0
        data += chunk
    writer.close()
    _, _, payload = data.partition(b"\r\n\r\n")
    events = [line[6:] for line in payload.split(b"\n") if line.startswith(b"data: ")]
    ok = data.startswith(b"HTTP/1.1 200") and len(events) > 1 and events[-1] == b"[DONE]"
    try:
        ok = ok and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    except (ValueError, KeyError, IndexError):
        ok = False
    return bool(ok), first or 0.0


class PeakRss:
    """`with PeakRss(pid) as rss:` samples a process's resident memory until the block ends; rss.mib: its peak."""

    def __init__(self, pid: int, every_s: float = 0.1):
        self.pid, self.every_s, self.kib = pid, every_s, []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._done.is_set():
            with open(f"/proc/{self.pid}/status") as f:
                self.kib.extend(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
            self._done.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()

    @property
    def mib(self) -> float:
        return max(self.kib) / 1024 if self.kib else float("nan")


def stream_crowd(proc, port: int, n: int, new_tokens: int) -> dict:
    body = json.dumps(
        {"prompt": "The river flows", "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    ).encode()

    async def crowd():
        return await asyncio.gather(*[one_stream(port, body) for _ in range(n)], return_exceptions=True)

    with PeakRss(proc.pid) as rss:
        t0 = time.perf_counter()
        results = asyncio.run(crowd())
        seconds = time.perf_counter() - t0
    good = [r for r in results if isinstance(r, tuple) and r[0]]
    return {
        "streams": n,
        "errors": n - len(good),
        "seconds": seconds,
        "tokens_per_s": len(good) * new_tokens / seconds,  # ignore_eos: each complete stream has new_tokens
        "ttft_p50": statistics.median(r[1] for r in good) if good else float("nan"),
        "rss_mib": rss.mib,
    }


def main(argv=None):
    ap = workload_args(__doc__)
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--port", type=int, default=5089)
    a = ap.parse_args(argv)
    if not os.path.exists(f"{a.ckpt_dir}/params.json"):
        write_checkpoint(a.ckpt_dir, BENCH_ARGS)
    ckpt = os.path.abspath(a.ckpt_dir)
    tok = Tokenizer(f"{ckpt}/tokenizer.model")
    texts = text_prompts(tok, a.requests)
    ids = [tok.encode(t, bos=True, eos=False) for t in texts]

    engine = _in_process(run_ours, ckpt, ids, a.clients, a.new_tokens)
    proc = start_server(ckpt, a.port, a.clients, max(map(len, ids)) + a.new_tokens, max(a.streams, a.requests) * 2)
    try:
        http_closed_loop(a.port, texts[: a.clients], a.clients, a.new_tokens)  # warm-up at full batch
        seconds, tokens = http_closed_loop(a.port, texts, a.clients, a.new_tokens)
        assert tokens == a.requests * a.new_tokens, tokens
        crowd = stream_crowd(proc, a.port, a.streams, a.new_tokens)
    finally:
        proc.terminate()
        proc.wait(60)
    over_http = tokens / seconds
    print(
        f"\nmachine: {os.cpu_count()} CPUs ({cpu_model()}); model: dim {BENCH_ARGS.dim}, "
        f"{BENCH_ARGS.n_layers} layers, random weights, fp32; {a.requests} requests, {a.clients} clients, "
        f"{a.new_tokens} new tokens\n"
    )
    print("| path | output tokens/s | wall (s) |")
    print("|---|---|---|")
    print(f"| engine alone (Runtime.generate) | {engine['tokens_per_s']:.1f} | {engine['seconds']:.1f} |")
    print(f"| over HTTP (POST /v1/completions) | {over_http:.1f} | {seconds:.1f} |")
    print(f"\nHTTP overhead at {a.clients} clients: {100 * (1 - over_http / engine['tokens_per_s']):.1f}% of tokens/s")
    print(
        f"{crowd['streams']} concurrent streams: {crowd['errors']} errors, {crowd['tokens_per_s']:.1f} tokens/s, "
        f"TTFT p50 {crowd['ttft_p50']:.2f}s, wall {crowd['seconds']:.1f}s, "
        f"server RSS peak {crowd['rss_mib']:.0f} MiB"
    )


if __name__ == "__main__":
    main()
