"""The soak's bookkeeping (presets/tools/soak_traffic.py): what each attempt counts as, and its HTTP client
against a scripted server. The soak itself (make soak) is not part of make test."""

import asyncio
import json
import types

import pytest

from presets.tools.soak_traffic import (
    FAILURES,
    RETRY,
    Conn,
    Outcome,
    Tally,
    Window,
    check_answer,
    classify,
    exchange,
    one_request,
)

DRAIN, KILL = Window("drain", 100.0, 130.0), Window("kill", 200.0, 230.0)
FAULTS = [DRAIN, KILL]


@pytest.mark.parametrize(
    "outcome, t0, t1, expected",
    [
        (Outcome("ok", 200), 10, 11, "ok"),
        (Outcome("cancelled"), 10, 11, "cancelled"),
        (Outcome("status", 503, 5.0), 10, 11, "retry 503"),
        (Outcome("status", 429, 1.0), 10, 11, "retry 429"),
        (Outcome("status", 503), 10, 11, "no Retry-After"),  # no fault: a 503 must say when to retry
        (Outcome("status", 500), 205, 206, "5xx"),  # a 500 is a failure even at the kill
        (Outcome("status", 400), 10, 11, "other status"),
        (Outcome("refused"), 10, 11, "lost"),  # no fault: the server must be there
        (Outcome("refused"), 131, 132, "lost"),  # after the window closed
        (Outcome("refused"), 110, 111, "restart refused"),
        (Outcome("closed"), 99, 101, "lost"),  # in flight at the SIGTERM: the drain promised to finish it
        (Outcome("dropped"), 99, 101, "lost"),
        (Outcome("closed", reused=True), 99, 101, "stale keep-alive"),  # closed as it was sent: retried
        (Outcome("closed", reused=True), 10, 11, "stale keep-alive"),
        (Outcome("dropped", reused=True), 10, 11, "lost"),  # an answer had begun
        (Outcome("status", 503, detail="drain_timeout (20s) ran out"), 99, 120, "drain cut"),
        (Outcome("stream_error", 200, detail="drain_timeout (20s) ran out"), 99, 120, "drain cut"),
        (Outcome("status", 503, detail="server is shutting down"), 99, 120, "no Retry-After"),
        (Outcome("status", 503, detail="engine failed"), 199, 201, "rank failure"),
        (Outcome("dropped"), 199, 201, "rank failure"),
        (Outcome("stream_error", 200, detail="engine failed"), 199, 201, "rank failure"),
        (Outcome("closed"), 201, 201, "restart refused"),
        (Outcome("timeout"), 110, 400, "past deadline"),
        (Outcome("malformed", 200), 10, 11, "malformed"),
    ],
)
def test_classify(outcome, t0, t1, expected):
    assert classify(outcome, t0, t1, FAULTS) == expected


def test_an_open_window_lasts_until_it_is_closed():
    assert classify(Outcome("refused"), 500, 501, [Window("kill", 490.0)]) == "restart refused"
    assert classify(Outcome("refused"), 480, 481, [Window("kill", 490.0)]) == "lost"


def test_tally_counts_failures_not_retries():
    t = Tally()
    for category in [*RETRY, "ok"]:
        t.attempt(category)
    t.finish("/chat", "ok", seconds=1.5)
    t.finish("/chat", "cancelled", seconds=0.5)
    assert t.failed == 0
    t.finish("/v1/completions", "lost", "closed")
    t.finish("/v1/completions", "expired", "retry 503")
    assert t.failed == 2 and set(FAILURES) >= {"lost", "expired"}
    assert (t.routes["/chat", True], t.routes["/v1/completions", False]) == (2, 2)
    assert t.examples == ["lost: /v1/completions: closed", "expired: /v1/completions: retry 503"]
    assert t.seconds == [1.5, 0.5]  # successes only


def sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def test_check_answer():
    chunk = {"choices": [{"text": "a", "finish_reason": None}]}
    last = {"choices": [{"text": "", "finish_reason": "length"}]}
    assert check_answer("/v1/completions", True, sse(chunk, last, b"[DONE]")).kind == "ok"
    assert check_answer("/v1/completions", True, sse(chunk, last)).kind == "malformed"  # no [DONE]
    error = check_answer("/v1/completions", True, sse(chunk, {"error": {"message": "engine failed"}}, b"[DONE]"))
    assert error.kind == "stream_error" and "engine failed" in error.detail
    assert check_answer("/chat", False, json.dumps({"results": [[{"role": "Assistant"}]]}).encode()).kind == "ok"
    assert check_answer("/v1/chat/completions", False, b'{"choices": []}').kind == "malformed"


async def scripted(answers: list[bytes]):
    """A server answering its connections' requests with `answers` in turn (b"": close without a word)."""

    async def serve(reader, writer):
        while answers:
            try:
                await reader.readuntil(b"\r\n\r\n")
                await reader.read(65536)  # the small JSON body
            except asyncio.IncompleteReadError:
                break
            answer = answers.pop(0)
            if not answer:
                break
            writer.write(answer)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


OK_BODY = b'{"choices": [{"finish_reason": "length"}]}'
OK = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(OK_BODY), OK_BODY)
BUSY = b'HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\nContent-Length: 12\r\n\r\n{"detail":1}'


def test_exchange_reads_retry_after_and_a_close_without_answer():
    async def go():
        server = await scripted([BUSY, b""])
        conn = Conn(server.sockets[0].getsockname()[1])
        busy, _ = await exchange(conn, "POST", "/v1/completions", {})
        closed, _ = await exchange(conn, "POST", "/v1/completions", {})
        conn.close()
        server.close()
        return busy, closed

    busy, closed = asyncio.run(go())
    assert (busy.kind, busy.status, busy.retry_after) == ("status", 503, 0.0)
    assert (closed.kind, closed.reused) == ("closed", True)


def test_a_request_is_retried_after_503_until_it_succeeds():
    async def go():
        server = await scripted([BUSY, BUSY, OK])
        port = server.sockets[0].getsockname()[1]
        run = types.SimpleNamespace(kind="completion", deadline_s=30, windows=[], tally=Tally(), t0=0.0)
        rng = types.SimpleNamespace(
            randrange=lambda n: 0, randint=lambda a, b: a, random=lambda: 0.9, choice=lambda xs: xs[-1]
        )
        conn = Conn(port)
        await one_request(conn, rng, run)  # the last route: /v1/completions, not streamed
        conn.close()
        server.close()
        return run.tally

    tally = asyncio.run(go())
    assert tally.attempts == {"retry 503": 2, "ok": 1} and tally.requests == {"ok": 1}
