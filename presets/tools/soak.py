"""Faults under load (`make soak`): mixed traffic from many clients against a 2-rank torchrun server (CPU,
gloo), with a SIGTERM drain-and-restart at 1/3 of the run and a killed worker rank (SIGKILL on rank 1) at
2/3, each restarted as Kubernetes would. Prints a markdown table; exits 1 if any request was lost, got a
5xx other than a 503, a 503/429 without Retry-After outside a fault, hung past its deadline, if the greedy
probe's answer changed, or a fault check failed.

    python -m presets.tools.soak [--minutes 30 --clients 128 --kind chat --deadline_s 300]

The clients and what counts as what: presets/tools/soak_traffic.py (classify); docs/benchmarks.md (Soak).
"""

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

from presets.tools.soak_traffic import FAILURES, Conn, Tally, Window, client, exchange, probe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRACE_S = 2.0  # a fault window ends this long after the restarted server's /health 200
KILL_BOUND_S = 15  # docs/operations.md: a dead rank stops the job within this (as tests/test_distributed.py)
# A small random-weight model in Meta's layout, 2 shards (its text is gibberish; EOS comes at random).
SOAK_SHAPE = dict(dim=256, n_layers=4, n_heads=8, vocab_size=1024, multiple_of=64)
SERVER_FLAGS = ["--max_seq_len", "512", "--max_batch_size", "16", "--max_queue_size", "32", "--drain_timeout", "20"]


# -- the server and its faults -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The 2-rank torchrun server; start() again after each fault. Life N logs to logdir/life-N.log."""

    def __init__(self, ckpt: str, port: int, kind: str, logdir: str, flags: list[str]):
        self.ckpt, self.port, self.kind, self.logdir, self.flags = ckpt, port, kind, logdir, flags
        self.life, self.proc, self.log_path, self.ranks, self.orphans = 0, None, None, [], []

    def start(self) -> None:
        self.life += 1
        run = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
        ]
        cmd = [*run, "inference_api.py", "--ckpt_dir", self.ckpt, "--tokenizer_path", f"{self.ckpt}/tokenizer.model"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu", "--dtype", "float32", *self.flags]
        self.log_path = os.path.join(self.logdir, f"life-{self.life}.log")
        with open(self.log_path, "w") as log:  # a file: a pipe nobody reads would block the server
            cwd = os.path.join(ROOT, "presets", "inference", f"llama2-{self.kind}")
            self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    async def health(self):
        """/health's status, or how it failed (refused, closed)."""
        conn = Conn(self.port)
        o, _ = await exchange(conn, "GET", "/health", None)
        conn.close()
        return o.status if o.kind in ("ok", "status") else o.kind

    async def wait_healthy(self, timeout: float = 600) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout and self.proc.poll() is None:
            if await self.health() == 200:
                self.ranks = children(self.proc.pid)
                return time.monotonic() - t0
            await asyncio.sleep(0.3)
        raise RuntimeError(f"server life {self.life} not healthy (exit {self.proc.poll()}):\n{self.log()[-3000:]}")

    async def watch(self, since: float, timeout: float) -> tuple[object, int | None, float]:
        """Poll /health until the server exits (at most `timeout` s): (first answer other than 200 and its
        seconds after `since`, torchrun's exit code (None: killed here after the timeout), seconds to exit)."""
        first = None
        while self.proc.poll() is None and time.monotonic() - since < timeout:
            status = await self.health()
            if status != 200 and first is None:
                first = (status, round(time.monotonic() - since, 2))
            await asyncio.sleep(0.25)
        code, seconds = self.proc.poll(), time.monotonic() - since
        await asyncio.sleep(1)  # then none of its ranks may be left
        self.orphans = [pid for pid in self.ranks if self.is_rank(pid)]
        self.stop()
        return first, code, seconds

    def is_rank(self, pid: int) -> bool:
        """Whether pid still runs a rank of this server (not a zombie, not a reused pid)."""
        try:
            with open(f"/proc/{pid}/stat") as stat, open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                return stat.read().rsplit(")", 1)[1].split()[0] != "Z" and self.ckpt.encode() in cmdline.read()
        except OSError:
            return False

    def rank_pid(self, rank: int) -> int:
        for pid in children(self.proc.pid):
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"\0RANK={rank}\0".encode() in b"\0" + f.read():
                    return pid
        raise RuntimeError(f"no rank {rank} under torchrun {self.proc.pid}")

    def rss_mib(self) -> float:
        """Resident memory of both ranks together (VmRSS, MiB)."""
        kib = 0
        for rank in (0, 1):
            with open(f"/proc/{self.rank_pid(rank)}/status") as f:
                kib += sum(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
        return kib / 1024

    def stop(self) -> None:
        """Kill what is left of this life and reap torchrun. Its ranks too, by pid: torchrun starts each in a
        session of its own, so they are not in its process group, and a rank outlives a killed torchrun."""
        if self.proc is None:
            return
        for pid in filter(self.is_rank, {*self.ranks, *children(self.proc.pid)}):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()


def children(pid: int) -> list[int]:
    kids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry))
        except OSError:
            continue
    return kids


async def drain_and_restart(run) -> None:
    """SIGTERM to torchrun (a rollout): /health 503 while draining, rank 0 exits 0 and tells rank 1 to exit."""
    w = Window("drain", time.monotonic())
    run.windows.append(w)
    run.server.proc.send_signal(signal.SIGTERM)
    first, code, seconds = await run.server.watch(w.start, 90)
    log = run.server.log()
    clean = "server stopped (exit code 0)" in log and "rank 1: rank 0 asked to exit" in log
    run.check("SIGTERM: /health 503 while draining", first is not None and first[0] == 503, f"first non-200: {first}")
    run.check("SIGTERM: rank 0 stopped with 0, rank 1 told to exit", clean, f"in {seconds:.1f}s, torchrun exit {code}")
    await restart(run, w)


async def kill_and_restart(run) -> None:
    """SIGKILL on rank 1 (a lost worker): /health not 200 and the job exits non-zero within KILL_BOUND_S."""
    pid = run.server.rank_pid(1)
    w = Window("kill", time.monotonic())
    run.windows.append(w)
    os.kill(pid, signal.SIGKILL)
    first, code, seconds = await run.server.watch(w.start, 60)
    run.check("kill: /health not 200 after rank 1 died", first is not None, f"first: {first}")
    failed_fast = code not in (0, None) and seconds <= KILL_BOUND_S
    run.check(f"kill: the job exits non-zero within {KILL_BOUND_S}s", failed_fast, f"exit {code} in {seconds:.1f}s")
    await restart(run, w)


async def restart(run, w: Window) -> None:
    orphans = run.server.orphans
    run.check(f"{w.kind}: no rank left running 1 s after torchrun exited", not orphans, f"left: {orphans}")
    run.server.start()
    seconds = await run.server.wait_healthy()
    w.end = time.monotonic() + GRACE_S
    run.check(f"{w.kind}: restarted, healthy again", True, f"in {seconds:.1f}s; fault window {w.end - w.start:.1f}s")


class Run:
    """What the clients and the faults share: the server, the fault windows, the tally, the checks."""

    def __init__(self, a, server: Server):
        self.kind, self.port, self.seed, self.deadline_s = a.kind, server.port, a.seed, a.deadline_s
        self.server, self.windows, self.tally, self.checks = server, [], Tally(), []
        self.rss: list[list[float]] = []  # per server life: [warm, end] MiB
        self.t0 = self.stop_at = 0.0

    def check(self, what: str, ok: bool, detail: str) -> None:
        self.checks.append((what, ok, detail))

    async def life(self, seconds: float) -> None:
        """The current server life's RSS, once warm (a fifth of the life, at most 60 s) and at its end."""
        warm = min(60.0, seconds / 5)
        await asyncio.sleep(warm)
        self.rss.append([self.server.rss_mib()])
        await asyncio.sleep(max(0.0, seconds - warm))
        self.rss[-1].append(self.server.rss_mib())


async def soak(a, run: Run) -> tuple[str, str]:
    """The run: probe, clients, the two faults, the clients' last requests, probe. (probe at start, at end)"""
    run.server.start()
    await run.server.wait_healthy()
    first = await probe(run.port)
    t0 = run.t0 = time.monotonic()
    third = a.minutes * 60 / 3
    run.stop_at = t0 + 3 * third
    clients = [asyncio.create_task(client(i, run)) for i in range(a.clients)]
    await run.life(third)
    await drain_and_restart(run)
    await run.life(t0 + 2 * third - time.monotonic())
    await kill_and_restart(run)
    await run.life(run.stop_at - time.monotonic())
    await asyncio.gather(*clients)  # each finishes the request it has begun (within its deadline)
    return first, await probe(run.port)


def percentiles(seconds: list[float]) -> str:
    if not seconds:
        return "-"
    s = sorted(seconds)
    return f"{s[len(s) // 2]:.1f} / {s[min(len(s) - 1, len(s) * 99 // 100)]:.1f} / {s[-1]:.1f}"


def report(a, run: Run, probes: tuple[str, str], machine: str) -> tuple[str, bool]:
    """The markdown table, and whether the soak passed."""
    t, r, n = run.tally, run.tally.requests, run.tally.attempts
    routes = sorted({route for route, _ in t.routes})
    mix = ", ".join(f"{p} {t.routes[p, True]}/{t.routes[p, True] + t.routes[p, False]}" for p in routes)
    rows = [
        ("machine", machine),
        ("run", f"{a.minutes:g} min, {a.clients} clients, Llama {a.kind} server on 2 ranks (torchrun, gloo)"),
        ("requests sent", sum(r.values())),
        ("succeeded (of which cancelled mid-stream by the client)", f"{r['ok'] + r['cancelled']} ({r['cancelled']})"),
        ("succeeded / sent, by route", mix),
        ("request seconds, retries included: p50 / p99 / max", percentiles(t.seconds)),
        ("attempts", sum(n.values())),
        ("retried: 503 / 429 with Retry-After", f"{n['retry 503']} / {n['retry 429']}"),
        ("retried: refused or closed unanswered while stopping or restarting", n["restart refused"]),
        ("retried at once: reused keep-alive connection closed unanswered (idle-close race)", n["stale keep-alive"]),
        ("retried: ended by drain_timeout (documented)", n["drain cut"]),
        ("retried: in flight at the rank kill (503 without Retry-After, reset, cut stream)", n["rank failure"]),
    ]
    rows += [(f"**failed: {c}**", r[c]) for c in FAILURES]
    same = probes[0] == probes[1]
    rows.append(("greedy probe identical at start and end", "yes" if same else f"NO: {probes[0]!r} -> {probes[1]!r}"))
    for i, (warm, end) in enumerate(run.rss, 1):
        rows.append((f"RSS, both ranks, life {i}: warm -> end", f"{warm:.0f} -> {end:.0f} MiB ({end - warm:+.0f})"))
    rows += [(what, f"{'ok' if ok else '**FAILED**'}: {detail}") for what, ok, detail in run.checks]
    lines = ["| soak | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    passed = same and not t.failed and all(ok for _, ok, _ in run.checks)
    return "\n".join(lines), passed


def checkpoint(folder: str) -> str:
    if not os.path.exists(os.path.join(folder, "params.json")):
        from presets.models.llama.model import ModelArgs
        from presets.tools.tiny_checkpoint import write_checkpoint

        write_checkpoint(folder, ModelArgs(**SOAK_SHAPE), shards=2)
    return os.path.abspath(folder)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--clients", type=int, default=128)
    ap.add_argument("--kind", choices=("chat", "completion"), default="chat", help="Kaito's /chat or /generate")
    ap.add_argument("--deadline_s", type=float, default=300, help="each request's deadline, retries included")
    ap.add_argument("--ckpt_dir", default=os.path.join(ROOT, ".cache", "soak-llama2-2shards"))
    ap.add_argument("--logdir", default=os.path.join(ROOT, ".cache", "soak-logs"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    os.makedirs(a.logdir, exist_ok=True)
    from presets.tools.bench import cpu_model

    machine = f"{os.cpu_count()} CPUs ({cpu_model()})"
    run = Run(a, Server(checkpoint(a.ckpt_dir), free_port(), a.kind, a.logdir, SERVER_FLAGS))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        probes = asyncio.run(soak(a, run))
    finally:
        run.server.stop()
    table, passed = report(a, run, probes, machine)
    print(f"\nsoak started {started}; server logs in {a.logdir}\n\n{table}\n")
    for example in run.tally.examples:
        print(f"- {example}")
    print("PASSED" if passed else "FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
