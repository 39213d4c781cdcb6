"""The base of the threads that own an engine (EngineLoop, BatchLoop): what the Runtime relies on."""

import math
import threading
import time
from collections import deque

from presets.errors import ApiError

RETRY_FLOOR, RETRY_CEILING = 1, 60  # seconds a full queue's Retry-After says, at least and at most
RETRY_UNKNOWN = 5  # ... when nothing has left the queue lately to measure its pace by
DRAIN_WINDOW = 60.0  # seconds of admissions the pace is measured over


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

    def retry_after(self, excess: int, now: float | None = None) -> int:
        """Seconds until `excess` more items have left the queue at its pace over the last minute, between
        RETRY_FLOOR and RETRY_CEILING (RETRY_UNKNOWN when nothing left it lately)."""
        now = time.monotonic() if now is None else now
        recent = [(t, n) for t, n in self.drains if t >= now - DRAIN_WINDOW]
        if not recent:
            return RETRY_UNKNOWN
        span = max(now - recent[0][0], 1.0)  # from the first admission seen, so a burst is not a rate of infinity
        rate = sum(n for _, n in recent) / span
        return min(RETRY_CEILING, max(RETRY_FLOOR, math.ceil(excess / rate)))

    def _admit_or_refuse(self, waiting: int, adding: int, what: str) -> None:
        """503 (called under self.cv) when shutting down or when `adding` more would overflow the queue; its
        Retry-After is when the queue's measured pace would have made room for them."""
        if self.stopping:
            raise ApiError(503, self.stop_reason)
        if waiting + adding > self.max_waiting:
            seconds = self.retry_after(waiting + adding - self.max_waiting)
            raise ApiError(
                503,
                f"server is at capacity ({self.max_waiting} {what} waiting); retry in {seconds}s",
                {"Retry-After": str(seconds)},
            )

    def _submit_and_wait(self, item) -> None:
        """Run one item through the loop (the warm-up); raise if it failed."""
        self.submit([item])
        item.done.wait()
        if item.error:
            raise RuntimeError(item.error)
