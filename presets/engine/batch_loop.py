"""A thread that owns a whole-request engine (transformers' generate): it runs queued jobs in batches.

Jobs whose `key` is equal (and not None) may share one batch, up to max_batch_size; a job with key
None runs alone. The step engine of Llama has EngineLoop instead; both give the Runtime the same
handle: submit, warm_up, stop, join, alive, last_step_failed, failed.
"""

import logging
from collections import deque
from dataclasses import dataclass, field

from presets.engine.flag import Flag
from presets.engine.thread import EngineThread, StartBy

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    key: object  # jobs with equal keys can run in one batch; None: alone
    payload: object
    result: object = None
    error: str | None = None
    error_status: int = 503  # the HTTP status its error gives a client: 500 when generating it failed
    done: Flag = field(default_factory=Flag)
    notify: Flag | None = None  # also set when done (a stream's reader waits on it for tokens and the end)

    def finish(self) -> None:
        self.done.set()
        if self.notify:
            self.notify.set()


def _ignore(payload) -> None:
    """Payloads that cannot stop mid-batch: the batch runs to its end."""


class BatchLoop(EngineThread):
    def __init__(
        self, run_batch, max_batch_size: int, max_waiting: int, warm_up_job=None, cancel_payload=_ignore, kv=None
    ):
        super().__init__(max_waiting)
        self.kv = kv  # (() -> token positions the running batch holds, the most it admits), for /metrics
        self.run_batch = run_batch  # (key, payloads) -> results, one per payload
        self.cancel_payload = cancel_payload  # (payload) -> None: stop a running job at its next token
        self.max_batch_size = max_batch_size
        self.warm_up_job = warm_up_job  # () -> Job
        self.waiting: deque[Job] = deque()
        self.running = 0
        self.batch: list[Job] = []  # the jobs of the batch that runs now

    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        return self.running, len(self.waiting)

    def attach_metrics(self, metrics) -> None:
        """With `kv`: vllm:kv_cache_usage_perc is the running batch's share of the token budget (at most 1), and
        vllm:cache_config_info says the budget as blocks of one token."""
        super().attach_metrics(metrics)
        if self.kv:
            held, budget = self.kv
            metrics.kv_usage = lambda: min(1.0, held() / budget)
            metrics.cache_config(1, budget, False)

    def submit(self, jobs: list[Job], start: StartBy | None = None) -> None:
        """Queue `jobs`; 503 when the queue is full or the jobs ahead would not leave it before `start`."""
        with self.cv:
            self._admit_or_refuse(len(self.waiting), len(jobs), "requests", start)
            self.waiting.extend(jobs)
            self.cv.notify()

    def withdraw(self, jobs: list[Job]) -> int | None:
        """Take a request's jobs out of the queue if none has started: how many waited ahead of them; None,
        leaving them, when one has started (it runs, or ran, in a batch)."""
        with self.cv:
            if not all(job in self.waiting for job in jobs):
                return None
            ahead = min(self.waiting.index(job) for job in jobs)
            for job in jobs:
                self.waiting.remove(job)
                job.error = "did not start by its deadline"
                job.finish()
            return ahead

    def cancel(self, jobs: list[Job]) -> None:
        """Drop waiting `jobs`; a running one stops at its next token where its payload allows (HFJob)."""
        with self.cv:
            for job in jobs:
                if job in self.waiting:
                    self.waiting.remove(job)
                    job.error = "cancelled"
                    job.finish()
                else:
                    self.cancel_payload(job.payload)

    def warm_up(self, tokenizer) -> None:
        self._submit_and_wait(self.warm_up_job())

    def _next_batch(self) -> list[Job]:
        """The oldest job, and the later ones that share its key (up to max_batch_size)."""
        first = self.waiting.popleft()
        batch = [first]
        if first.key is not None:
            for job in list(self.waiting):
                if len(batch) == self.max_batch_size:
                    break
                if job.key == first.key:
                    self.waiting.remove(job)
                    batch.append(job)
        return batch

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.waiting and not self.stopping:
                    if not self.cv.wait(timeout=1.0 if self.last_step_failed else None) and self.last_step_failed:
                        break  # idle after a failed batch: probe the device below
                if self.last_step_failed and not self.waiting and not self.stopping:
                    self.waiting.append(self.warm_up_job())  # one real batch again: health recovers without traffic
                if self.stopping:
                    for job in self.waiting:
                        job.error = self.stop_reason
                        job.finish()
                    return
                batch = self.batch = self._next_batch()
                self.drained(len(batch))
                self.running = len(batch)
            if self.metrics:
                self.metrics.batch_size.observe(len(batch))
            try:
                results = self.run_batch(batch[0].key, [j.payload for j in batch])
                self.last_step_failed = False
                for job, result in zip(batch, results, strict=True):
                    job.result = result
            except Exception as e:  # a failed batch fails its jobs, not the server
                log.exception("generation failed")
                self.last_step_failed = True
                for job in batch:
                    job.error, job.error_status = f"generation failed: {type(e).__name__}: {e}", 500
            with self.cv:
                self.running, self.batch = 0, []
                for job in batch:
                    if self.stopping and job.error is None:  # cut short by stop(): not a whole answer
                        job.result, job.error = None, self.stop_reason
                    job.finish()

    def stop(self, reason: str = "server is shutting down") -> None:
        """As EngineThread.stop; a running batch stops at its next token where its jobs allow (HFJob)."""
        super().stop(reason)
        with self.cv:
            for job in self.batch:
                self.cancel_payload(job.payload)
