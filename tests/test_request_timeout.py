"""A client's deadline to start (X-Request-Timeout) on both engine loops, with the engine held: a request that
cannot start in time is refused at once, one admitted but not started by its deadline leaves the queue, one
that started in time is not cut. The HTTP side (400s, every server) is in tests/test_http_contract.py."""

import contextvars
import threading
import time

import pytest

from presets.engine.batch_loop import BatchLoop, Job
from presets.engine.params import SamplingParams
from presets.engine.runtime import Runtime
from presets.engine.thread import RETRY_UNKNOWN, EngineThread, StartBy
from presets.errors import ApiError
from presets.http.deadline import HEADER, parse
from tests.fakes import BOS, ByteTokenizer, FakeEngine


def wait_for(check, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


class Rig:
    """A started Runtime of one running slot on the step engine (FakeEngine) or on a BatchLoop, whose model call
    can be held (`hold()`) until released; `request(x, seconds)` runs one request on a thread of its own, with
    the deadline to start the HTTP layer would set, and `answer(r)` is its outputs or its ApiError."""

    def __init__(self, kind: str):
        self.kind, self.held, self.entered = kind, threading.Event(), threading.Event()
        self.released = threading.Event()
        if kind == "step":
            engine = FakeEngine()
            step = engine.run
            engine.run = lambda plan: self._gate() or step(plan)
            self.rt = Runtime(lambda p: (engine, ByteTokenizer()), max_seq_len=64, max_batch_size=1, max_waiting=8)
        else:

            def run_batch(key, payloads):
                self._gate()
                return [p * 2 for p in payloads]

            self.rt = Runtime(
                lambda p: (None, ByteTokenizer()),
                None,
                1,
                8,
                make_loop=lambda e, t: BatchLoop(run_batch, 1, 8, warm_up_job=lambda: Job(None, 0)),
            )
        self.rt.start(background=False)

    def _gate(self) -> None:
        if self.held.is_set():
            self.entered.set()
            self.released.wait(60)  # a failed test never holds the engine for good

    def hold(self) -> None:
        self.held.set()

    def release(self) -> None:
        self.released.set()

    def items(self, x: int) -> list:
        if self.kind == "step":
            return self.rt.sequences([[BOS, x]], SamplingParams(temperature=0, max_tokens=3))
        return [Job(None, x)]

    def expected(self, x: int):
        return [x + 1, x + 2, x + 3] if self.kind == "step" else 2 * x

    def request(self, x: int, seconds: float | None = None) -> dict:
        """Start one request on a thread; the dict gets "items", then "out" (outputs) or "error" (an ApiError)."""
        r = {"items": self.items(x), "started": time.monotonic()}

        def go():
            if seconds is not None:  # as the HTTP layer does before a route runs, in this request's context only
                self.rt.start_within(seconds, f"{HEADER} of {seconds:g}s")
            try:
                done = self.rt.run(r["items"])
                r["out"] = [s.output if self.kind == "step" else s.result for s in done][0]
            except ApiError as e:
                r["error"] = e
            r["ended"] = time.monotonic()

        r["thread"] = threading.Thread(target=contextvars.copy_context().run, args=(go,))
        r["thread"].start()
        return r

    def queued(self, n_running: int, n_waiting: int) -> None:
        wait_for(lambda: self.rt.loop.counts() == (n_running, n_waiting), f"counts {n_running, n_waiting}")

    def answer(self, r: dict):
        r["thread"].join(60)
        assert not r["thread"].is_alive(), "the request never ended"
        return r.get("error") or r["out"]


@pytest.fixture(params=["step", "batch"])
def rig(request):
    rig = Rig(request.param)
    yield rig
    rig.release()
    rig.rt.shutdown()


def test_a_request_that_cannot_start_in_time_is_refused_at_once_and_one_that_can_is_queued(rig):
    rig.hold()
    first = rig.request(10)
    wait_for(rig.entered.is_set, "the first request to run")
    behind = [rig.request(20), rig.request(30)]
    rig.queued(1, 2)
    loop = rig.rt.loop
    loop.drains.clear()
    now = time.monotonic()
    for t in range(11):
        loop.drained(1, now=now - 50 + 5 * t)  # the queue's pace: 11 in the last 50 s
    late = rig.request(40, seconds=3)  # 2 ahead of it: about 9.1 s
    error = rig.answer(late)
    assert isinstance(error, ApiError) and error.status == 503, error
    assert late["ended"] - late["started"] < 2  # at once, not at its deadline
    assert error.headers == {"Retry-After": "10"}
    what = "sequences" if rig.kind == "step" else "requests"
    assert f"cannot start within its {HEADER} of 3s: the 2 {what} ahead of it leave in about 9.1s" in error.detail
    assert loop.counts() == (1, 2) and late["items"][0].done.is_set() is False  # never queued
    in_time = rig.request(50, seconds=30)  # 9.1 s < 30 s: queued
    rig.queued(1, 3)
    rig.release()
    for r, x in zip([first, *behind, in_time], [10, 20, 30, 50]):
        assert rig.answer(r) == rig.expected(x)


def test_an_admitted_request_not_started_by_its_deadline_leaves_the_queue_and_the_others_run(rig):
    rig.hold()
    first = rig.request(10)
    wait_for(rig.entered.is_set, "the first request to run")
    stuck = rig.request(20, seconds=0.4)  # nothing ahead of it: admitted, but the engine is held
    rig.queued(1, 1)
    behind = rig.request(30)  # no deadline, behind the stuck one
    rig.queued(1, 2)
    error = rig.answer(stuck)
    assert isinstance(error, ApiError) and error.status == 503, error
    assert 0.4 <= stuck["ended"] - stuck["started"] < 10
    assert f"did not start within its {HEADER} of 0.4s: 0 waited ahead of it" in error.detail
    assert 1 <= int(error.headers["Retry-After"]) <= 60
    rig.queued(1, 1)  # it left the queue at once; the one behind it stays
    queue = rig.rt.loop.scheduler.waiting if rig.kind == "step" else rig.rt.loop.waiting
    assert list(queue) == behind["items"] and all(item.done.is_set() for item in stuck["items"])
    rig.release()
    assert rig.answer(first) == rig.expected(10) and rig.answer(behind) == rig.expected(30)
    assert rig.rt.loop.counts() == (0, 0)


def test_a_request_that_started_in_time_is_not_cut_by_its_deadline(rig):
    rig.hold()
    started = rig.request(10, seconds=0.3)  # the engine is idle: it starts at once, then is held past 0.3 s
    wait_for(rig.entered.is_set, "the request to run")
    time.sleep(0.6)  # its deadline passes while it runs: the waiting route checks it and lets it be
    assert rig.rt.loop.counts() == (1, 0)
    rig.release()
    assert rig.answer(started) == rig.expected(10)


def test_the_wait_to_start_is_estimated_from_the_queues_pace_on_a_fake_clock():
    loop = EngineThread(max_waiting=8)
    assert loop.wait_estimate(0, now=100.0) == 0  # none ahead: it starts as soon as there is room
    assert loop.wait_estimate(3, now=100.0) is None  # no pace yet: unknown, so never refused for it
    for t in range(90, 100):
        loop.drained(2, now=float(t))  # two a second
    assert loop.wait_estimate(3, now=100.0) == pytest.approx(1.5)
    assert loop.wait_estimate(3, now=200.0) is None  # a pace from minutes ago says nothing
    assert loop.retry_after(3, now=200.0) == RETRY_UNKNOWN


def test_a_deadline_already_past_is_refused_even_with_no_pace():
    loop = EngineThread(max_waiting=8)
    loop._admit_or_refuse(3, 1, "requests", StartBy(time.monotonic() + 5, "X"))  # unknown pace: admitted
    with pytest.raises(ApiError) as e:
        loop._admit_or_refuse(3, 1, "requests", StartBy(time.monotonic() - 0.1, f"{HEADER} of 1s"))
    assert e.value.status == 503 and e.value.headers == {"Retry-After": str(RETRY_UNKNOWN)}
    assert f"cannot start within its {HEADER} of 1s: time is up" in e.value.detail


@pytest.mark.parametrize("values", [["0"], ["-1"], ["abc"], ["nan"], ["inf"], ["1e3"], ["3601"], [""], ["1", "2"]])
def test_a_bad_header_value_is_a_400_naming_the_header(values):
    with pytest.raises(ApiError) as e:
        parse(values)
    assert e.value.status == 400 and HEADER in e.value.detail


def test_good_header_values():
    assert parse([]) is None
    assert parse(["2.5"]) == 2.5 and parse([" 30 "]) == 30 and parse(["3600"]) == 3600
