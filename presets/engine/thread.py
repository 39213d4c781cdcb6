"""The base of the threads that own an engine (EngineLoop, BatchLoop): what the Runtime relies on."""

import threading

from presets.api.errors import ApiError


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

    def _admit_or_refuse(self, waiting: int, adding: int, what: str) -> None:
        """503 (called under self.cv) when shutting down or when `adding` more would overflow the queue."""
        if self.stopping:
            raise ApiError(503, self.stop_reason)
        if waiting + adding > self.max_waiting:
            raise ApiError(
                503, f"server is at capacity ({self.max_waiting} {what} waiting); retry shortly", {"Retry-After": "1"}
            )

    def _submit_and_wait(self, item) -> None:
        """Run one item through the loop (the warm-up); raise if it failed."""
        self.submit([item])
        item.done.wait()
        if item.error:
            raise RuntimeError(item.error)
