"""The base of the threads that own an engine (EngineLoop, BatchLoop): what the Runtime relies on."""

import math
import threading
import time
from collections import deque
from dataclasses import dataclass

from presets.errors import ApiError

RETRY_FLOOR, RETRY_CEILING = 1, 60  # seconds a full queue's Retry-After says, at least and at most
RETRY_UNKNOWN = 5  # ... when nothing has left the queue lately to measure its pace by
DRAIN_WINDOW = 60.0  # seconds of admissions the pace is measured over


@dataclass(frozen=True)
class StartBy:
    """A client's deadline for its request to start running (the HTTP layer reads it from a header)."""

    at: float  # the time.monotonic() by which it must have started
    source: str  # how answers name it: "X-Request-Timeout of 2s"

    def left(self, now: float | None = None) -> float:
        return self.at - (time.monotonic() if now is None else now)


class EngineThread:
    """start/stop/join/alive, the health flags, metrics, and the queue admission rule of both loops."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self.cv = threading.Condition()
        self.stopping = False
        self.stop_reason = "server is shutting down"
        self.last_step_failed = False
        self.failed: str | None = None  # set when the engine can no longer run (fatal)
        self.metrics = None  # set by the Runtime
        self.drains: deque[tuple[float, int]] = deque()  # (monotonic time, how many left the queue then)
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def stop(self, reason: str = "server is shutting down") -> None:
        """Stop after the current step; what is still queued or running ends with the error `reason`."""
        with self.cv:
            self.stopping = True
            self.stop_reason = reason
            self.cv.notify()

    def attach_metrics(self, metrics) -> None:
        self.metrics = metrics

    def drained(self, n: int, now: float | None = None) -> None:
        """`n` items left the queue (started running): the pace Retry-After is computed from."""
        if n > 0:
            now = time.monotonic() if now is None else now
            self.drains.append((now, n))
            while self.drains and self.drains[0][0] < now - DRAIN_WINDOW:
                self.drains.popleft()

    def wait_estimate(self, ahead: int, now: float | None = None) -> float | None:
        """Seconds until `ahead` more items have left the queue at its pace over the last minute: 0 when none is
        ahead, None when nothing left it lately (no pace to go by)."""
        if ahead <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        recent = [(t, n) for t, n in self.drains if t >= now - DRAIN_WINDOW]
        if not recent:
            return None
        span = max(now - recent[0][0], 1.0)  # from the first admission seen, so a burst is not a rate of infinity
        return ahead / (sum(n for _, n in recent) / span)

    def retry_after(self, excess: int, now: float | None = None) -> int:
        """Seconds until `excess` more items have left the queue at its pace over the last minute, between
        RETRY_FLOOR and RETRY_CEILING (RETRY_UNKNOWN when nothing left it lately)."""
        wait = self.wait_estimate(excess, now)
        if wait is None:
            return RETRY_UNKNOWN
        return min(RETRY_CEILING, max(RETRY_FLOOR, math.ceil(wait)))

    def _admit_or_refuse(self, waiting: int, adding: int, what: str, start: StartBy | None = None) -> None:
        """503 (called under self.cv) when shutting down, when `adding` more would overflow the queue, or when the
        request's deadline to start (`start`) comes before the `waiting` items ahead of it have left at the
        queue's pace; Retry-After is when that pace would have made room for it."""
        if self.stopping:
            raise ApiError(503, self.stop_reason)
        if waiting + adding > self.max_waiting:
            seconds = self.retry_after(waiting + adding - self.max_waiting)
            raise ApiError(
                503,
                f"server is at capacity ({self.max_waiting} {what} waiting); retry in {seconds}s",
                {"Retry-After": str(seconds)},
            )
        if start is None:
            return
        left, wait = start.left(), self.wait_estimate(waiting)
        if left <= 0 or (wait is not None and wait > left):
            ahead = f"the {waiting} {what} ahead of it leave in about {wait:.1f}s" if waiting and wait else "time is up"
            raise self._late(waiting, f"the request cannot start within its {start.source}: {ahead}")

    def _late(self, waiting: int, why: str) -> ApiError:
        """503 for a request that cannot start by its deadline; Retry-After: when the `waiting` items ahead of it
        will have left at the queue's pace."""
        seconds = self.retry_after(max(waiting, 1))
        return ApiError(503, f"{why}; retry in {seconds}s", {"Retry-After": str(seconds)})

    def not_started(self, waiting: int, start: StartBy) -> ApiError:
        """The answer to a request withdrawn from the queue at its deadline, `waiting` items ahead of it then."""
        return self._late(waiting, f"the request did not start within its {start.source}: {waiting} waited ahead of it")

    def _submit_and_wait(self, item) -> None:
        """Run one item through the loop (the warm-up); raise if it failed."""
        self.submit([item])
        item.done.wait()
        if item.error:
            raise RuntimeError(item.error)
