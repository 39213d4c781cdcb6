"""The soak's clients (presets/tools/soak.py): the traffic, the HTTP/1.1 client, and what each attempt's
outcome counts as (classify) and their tally.

Each client sends requests one after another on its own keep-alive connection (Kaito's /chat or /generate,
OpenAI's /v1/chat/completions and /v1/completions, streamed or not, 1 to 128 new tokens, some streams
cancelled by the client), each within a deadline, and retries a 503 or 429 after its Retry-After.
"""

import asyncio
import collections
import dataclasses
import json
import os
import random
import time

import h11

SUCCESS = ("ok", "cancelled")
RETRY = ("retry 503", "retry 429", "restart refused", "stale keep-alive", "drain cut", "rank failure")
FAILURES = ("lost", "5xx", "no Retry-After", "other status", "malformed", "past deadline", "expired")
KEEPALIVE_S = 2.0  # a client's idle connection is closed after this (the server's keepalive_timeout is 5 s)
PROBE = {"prompt": "The river flows past the mill", "max_tokens": 24, "temperature": 0, "ignore_eos": True}


@dataclasses.dataclass
class Outcome:
    """What one attempt got. kind: ok, cancelled (the client's own cut), status (an error answer), refused
    (no connection), closed (closed before any answer byte), dropped (cut mid-answer), stream_error (an
    error event), timeout (no end before the deadline), malformed (a 200 that is not a whole answer)."""

    kind: str
    status: int = 0
    retry_after: float | None = None
    detail: str = ""
    reused: bool = False  # sent on a keep-alive connection that had answered before


@dataclasses.dataclass
class Window:
    """A fault: "drain" (SIGTERM) or "kill" (rank 1 SIGKILLed), from the signal to GRACE_S after the restarted
    server is healthy (end None: still open)."""

    kind: str
    start: float
    end: float | None = None

    def overlaps(self, t0: float, t1: float) -> bool:
        return t0 <= (self.end if self.end is not None else float("inf")) and t1 >= self.start


def classify(o: Outcome, t0: float, t1: float, windows: list[Window]) -> str:
    """The category of an attempt made from t0 to t1: SUCCESS, RETRY (the client tries again) or FAILURES."""
    if o.kind in SUCCESS:
        return o.kind
    if o.kind == "status" and o.status in (429, 503) and o.retry_after is not None:
        return f"retry {o.status}"
    if o.kind == "status" and o.status != 503:
        return "5xx" if o.status >= 500 else "other status"
    if o.kind in ("timeout", "malformed"):
        return "past deadline" if o.kind == "timeout" else "malformed"
    if o.kind == "closed" and o.reused:  # the server closed an idle keep-alive connection as the request went out
        return "stale keep-alive"  # (RFC 9112 9.3.1: clients must be ready for it; every pool retries it)
    w = next((w for w in windows if w.overlaps(t0, t1)), None)
    unanswered = o.kind == "refused" or o.kind == "closed"
    if w is None:  # no fault: every answer must be a success or a 503/429 with Retry-After
        return "no Retry-After" if o.kind == "status" else "lost"
    if unanswered and t0 >= w.start:  # sent after the fault began: the server is stopping or restarting
        return "restart refused"
    if w.kind == "kill":  # in flight when rank 1 died: a 503 without Retry-After, a reset, a cut stream
        return "rank failure"
    if "drain_timeout" in o.detail:  # the drain's documented end of what is still running
        return "drain cut"
    return "no Retry-After" if o.kind == "status" else "lost"  # the drain promised to finish it


class Tally:
    """Counts of attempts and of requests by category, and the first failures' details."""

    def __init__(self):
        self.attempts, self.requests, self.routes = collections.Counter(), collections.Counter(), collections.Counter()
        self.examples: list[str] = []
        self.seconds: list[float] = []  # each successful request's, from its first attempt to its answer

    def attempt(self, category: str) -> None:
        self.attempts[category] += 1

    def finish(self, route: str, category: str, detail: str = "", seconds: float = 0.0) -> None:
        self.requests[category] += 1
        if category in SUCCESS:
            self.seconds.append(seconds)
        self.routes[route, category in SUCCESS] += 1
        if category not in SUCCESS and len(self.examples) < 20:
            self.examples.append(f"{category}: {route}: {detail[:300]}")

    @property
    def failed(self) -> int:
        return sum(self.requests[c] for c in FAILURES)


# -- the client: HTTP/1.1 over h11, one keep-alive connection per client ---------------------------


class Conn:
    """A keep-alive connection, not reused once idle for KEEPALIVE_S: the server closes an idle one after its
    keepalive_timeout (5 s), and a request sent as it does so would be lost in the race (so do HTTP clients)."""

    def __init__(self, port: int):
        self.port, self.reader, self.writer, self.h11, self.used, self.last = port, None, None, None, False, 0.0

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.h11, self.used = h11.Connection(h11.CLIENT), False

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = None

    async def send(self, method: str, path: str, body) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        head = [("Host", "soak"), ("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
        out = self.h11.send(h11.Request(method=method, target=path, headers=head))
        out += self.h11.send(h11.Data(data=data)) + self.h11.send(h11.EndOfMessage())
        self.writer.write(out)
        await self.writer.drain()

    async def event(self):
        while (ev := self.h11.next_event()) is h11.NEED_DATA:
            self.h11.receive_data(await self.reader.read(65536))
        return ev


def sse_events(body: bytes) -> list[str]:
    return [line[6:] for line in body.decode(errors="replace").split("\n") if line.startswith("data: ")]


def check_answer(path: str, stream: bool, body: bytes) -> Outcome:
    """A 200's body: ok when it is the route's whole answer (a stream to its [DONE]), else what it is."""
    try:
        if stream:
            events = sse_events(body)
            errors = [e for e in events if e.startswith('{"error"')]
            if errors:
                return Outcome("stream_error", 200, detail=errors[0])
            assert events[-1] == "[DONE]" and any(json.loads(e)["choices"][0].get("finish_reason") for e in events[:-1])
        elif path.startswith("/v1/"):
            assert json.loads(body)["choices"][0]["finish_reason"] in ("stop", "length")
        else:
            assert len(json.loads(body)["results"]) == 1
    except (ValueError, KeyError, IndexError, AssertionError):
        return Outcome("malformed", 200, detail=body[-300:].decode(errors="replace"))
    return Outcome("ok", 200)


async def exchange(conn: Conn, method: str, path: str, body, cancel_after: int = 0) -> tuple[Outcome, bytes]:
    """One request on `conn` (opened when closed): its Outcome (ok means 200 here) and body."""
    idle = time.monotonic() - conn.last
    if conn.writer is not None and (idle > KEEPALIVE_S or conn.reader.at_eof()):  # as HTTP clients' pools do
        conn.close()
    if conn.writer is None:
        try:
            await conn.open()
        except OSError as e:
            return Outcome("refused", detail=repr(e)), b""
    reused, got, status, retry, data = conn.used, False, 0, None, b""
    try:
        await conn.send(method, path, body)
        while not isinstance(ev := await conn.event(), h11.EndOfMessage):
            if isinstance(ev, h11.Response):
                got = True
                status, headers = ev.status_code, dict(ev.headers)
                retry = float(headers[b"retry-after"]) if b"retry-after" in headers else None
            elif isinstance(ev, h11.Data):
                data += ev.data
                if cancel_after and data.count(b"data: {") >= cancel_after:
                    conn.close()
                    return Outcome("cancelled"), data
            elif isinstance(ev, h11.ConnectionClosed):
                raise ConnectionResetError("closed")
    except (OSError, h11.ProtocolError) as e:
        conn.close()
        detail = f"{e!r} after {data[-200:]!r}" + (f" (reused after {idle:.1f}s idle)" if reused else "")
        return Outcome("dropped" if got else "closed", status, retry, detail, reused), data
    conn.used, conn.last = True, time.monotonic()
    try:
        conn.h11.start_next_cycle()
    except h11.LocalProtocolError:  # the server closes this one (Connection: close)
        conn.close()
    detail = "" if status == 200 else data[:300].decode(errors="replace")
    return Outcome("ok" if status == 200 else "status", status, retry, detail), data


# -- the traffic -------------------------------------------------------------------------------------

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.txt")) as _f:
    WORDS = _f.read().split()


def pick(rng: random.Random, kind: str) -> tuple[str, dict, bool, int]:
    """(path, body, stream, cancel after this many events or 0) of one random request."""
    at = rng.randrange(len(WORDS))
    text = " ".join(WORDS[at : at + rng.randint(3, 40)]) or "Hello"
    n, sampling = rng.choice((1, 4, 16, 32, 64, 128)), {"temperature": rng.choice((0, 0.7, 1.0))}
    route = rng.choice(("kaito", "chat", "completions"))
    if route == "kaito" and kind == "chat":
        dialog = [[{"role": "user", "content": text}]]
        return "/chat", {"input_data": {"input_string": dialog}, "parameters": {"max_gen_len": n, **sampling}}, False, 0
    if route == "kaito":
        return "/generate", {"prompts": [text], "parameters": {"max_gen_len": n, **sampling}}, False, 0
    stream = rng.random() < 0.5
    cancel = rng.randint(1, 4) if stream and rng.random() < 0.3 else 0
    body = {"max_tokens": n, "stream": stream, **sampling}
    if route == "chat":
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}]}, stream, cancel
    return "/v1/completions", {**body, "prompt": text}, stream, cancel


async def one_request(conn: Conn, rng: random.Random, run) -> None:
    """One request to its end: attempts until a success, a failure, or its deadline; retries honour Retry-After."""
    path, body, stream, cancel = pick(rng, run.kind)
    start = time.monotonic()
    deadline = start + run.deadline_s
    while True:
        t0 = time.monotonic()
        try:
            o, data = await asyncio.wait_for(exchange(conn, "POST", path, body, cancel), deadline - t0)
        except TimeoutError:
            conn.close()
            o = Outcome("timeout", detail=f"no whole answer within the deadline ({run.deadline_s:g}s)")
        else:
            o = check_answer(path, stream, data) if o.kind == "ok" else o
        t1 = time.monotonic()
        category = classify(o, t0, t1, run.windows)
        run.tally.attempt(category)
        if category not in RETRY:
            when = (
                f"{t0 - run.t0:.1f}-{t1 - run.t0:.1f}s (faults at {[round(w.start - run.t0, 1) for w in run.windows]})"
            )
            return run.tally.finish(path, category, f"{when}: {o.kind} {o.status} {o.detail}", t1 - start)
        wait = o.retry_after if o.retry_after is not None else (0.0 if category == "stale keep-alive" else 0.5)
        if time.monotonic() + wait + 1 >= deadline:
            return run.tally.finish(path, "expired", f"last attempt: {category} {o.kind} {o.status} {o.detail}")
        await asyncio.sleep(wait)


async def client(i: int, run) -> None:
    rng, conn = random.Random(f"{run.seed}-{i}"), Conn(run.port)
    while time.monotonic() < run.stop_at:
        await one_request(conn, rng, run)
        await asyncio.sleep(rng.uniform(0, 0.2))
    conn.close()


async def probe(port: int) -> str:
    """The greedy answer to PROBE (or what came instead)."""
    conn = Conn(port)
    o, data = await exchange(conn, "POST", "/v1/completions", PROBE)
    conn.close()
    return json.loads(data)["choices"][0]["text"] if o.kind == "ok" else f"<{o.kind} {o.status} {o.detail}>"
