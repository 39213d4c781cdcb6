"""The engine thread: the only thread that touches the model. HTTP threads submit sequences and wait."""

import logging
import threading
from collections import deque
from dataclasses import dataclass, field

from presets.serving.engine_thread import EngineThread
from presets.serving.params import SamplingParams
from presets.serving.sampling import make_rng, sample
from presets.serving.scheduler import Scheduler, Sequence

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Call:
    """Work on the model that is not generation (an embedding), run by the engine thread between steps."""

    fn: object  # () -> result
    result: object = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


class EngineLoop(EngineThread):
    """Runs prefill and decode steps of `engine` for the scheduler's sequences (continuous batching).

    `engine` provides prefill(slots, prompts) -> (S, V) last-token logits, decode(slots, tokens,
    positions) -> (B, V) logits, and `device`. Each loop iteration admits waiting sequences into
    free slots, prefills them together (packed, up to max_prefill_tokens per step), then runs one
    decode step over every running sequence.
    """

    def __init__(self, engine, eos_id: int, max_batch_size: int, max_waiting: int, max_prefill_tokens: int = 4096,
                 heartbeat_s: float | None = None, on_fatal=None):  # fmt: skip
        super().__init__(max_waiting)
        self.engine = engine
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_id = eos_id
        self.scheduler = Scheduler(max_batch_size)
        # With several ranks: idle heartbeats keep them in step, and a failed step is fatal
        # (the ranks may no longer agree on the cache), so the job stops and is restarted.
        self.heartbeat_s = heartbeat_s
        self.on_fatal = on_fatal
        self.calls: deque[Call] = deque()

    def counts(self) -> tuple[int, int]:
        """(running, waiting) sequences."""
        return len(self.scheduler.running), len(self.scheduler.waiting)

    def attach_metrics(self, metrics) -> None:
        super().attach_metrics(metrics)
        self.scheduler.on_finish = metrics.finished

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue `seqs` for generation, or answer 503 when the queue is full."""
        with self.cv:
            self._admit_or_refuse(len(self.scheduler.waiting), len(seqs), "sequences")
            self.scheduler.add(seqs)
            self.cv.notify()

    def submit_call(self, call: Call) -> None:
        """Queue a Call for the engine thread, or answer 503 when too many wait."""
        with self.cv:
            self._admit_or_refuse(len(self.calls), 1, "calls")
            self.calls.append(call)
            self.cv.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        """Retire `seqs` before the next step (their client is gone)."""
        with self.cv:
            for seq in seqs:
                seq.cancelled = True
            self.cv.notify()

    def warm_up(self, tokenizer) -> None:
        """One real prefill and decode step; raises if it fails."""
        self._submit_and_wait(Sequence([tokenizer.bos_id], SamplingParams(temperature=0), max_new_tokens=2))

    def _run(self) -> None:
        try:
            while True:
                with self.cv:
                    if not self.scheduler.has_work() and not self.calls and not self.stopping:
                        probe = self.last_step_failed and self.heartbeat_s is None
                        self.cv.wait(timeout=1.0 if probe else self.heartbeat_s)
                    if self.stopping:
                        break
                    calls = list(self.calls)
                    self.calls.clear()
                    for seq in [s for s in (*self.scheduler.waiting, *self.scheduler.running) if s.cancelled]:
                        self.scheduler.finish(seq, None, "cancelled: the client disconnected")  # frees its slot
                    new = self.scheduler.admit() if self.scheduler.has_work() else None
                for call in calls:
                    self._call(call)
                if new is not None:
                    self._step(new)
                elif calls:
                    continue  # the calls were this round's work
                elif self.heartbeat_s is not None:
                    self.engine.heartbeat()  # idle: tell the other ranks we are alive
                elif self.last_step_failed:
                    self._probe()
            self._end("server is shutting down")
            if hasattr(self.engine, "close"):
                self.engine.close()
        except Exception as e:
            log.exception("engine failed; stopping")
            self.failed = f"{type(e).__name__}: {e}"
            with self.cv:
                self.stopping = True
            self._end(f"engine failed: {self.failed}")
            if self.on_fatal:
                self.on_fatal()

    def _end(self, error: str) -> None:
        with self.cv:
            for seq in list(self.scheduler.waiting) + list(self.scheduler.running):
                self.scheduler.finish(seq, None, error)
            for call in self.calls:
                call.error = error
                call.done.set()
            self.calls.clear()

    @staticmethod
    def _call(call: Call) -> None:
        try:
            call.result = call.fn()
        except Exception as e:  # a failed call fails its request, not the server
            log.exception("engine call failed")
            call.error = f"{type(e).__name__}: {e}"
        call.done.set()

    def _probe(self) -> None:
        """After a failed step, when idle: one real step again, so health recovers without traffic."""
        try:
            self.engine.prefill([0], [[self.eos_id]])  # slot 0 is free: nothing is running
            self.last_step_failed = False
        except Exception:
            log.exception("engine probe failed")

    def _prefill_groups(self, new: list[Sequence]):
        """Split new sequences into prefill steps of at most max_prefill_tokens prompt tokens (>= 1 each)."""
        group, tokens = [], 0
        for seq in new:
            if group and tokens + len(seq.prompt) > self.max_prefill_tokens:
                yield group
                group, tokens = [], 0
            group.append(seq)
            tokens += len(seq.prompt)
        if group:
            yield group

    def _step(self, new: list[Sequence]) -> None:
        sched = self.scheduler
        try:
            for seq in new:
                seq.rng = make_rng(seq.params.seed, self.engine.device)
            for group in self._prefill_groups(new):
                logits = self.engine.prefill([s.slot for s in group], [s.prompt for s in group])
                sched.postprocess(group, sample(logits, group), self.eos_id)
            batch = sorted(sched.running, key=lambda s: s.slot)  # ascending slots: often one range
            if batch:
                logits = self.engine.decode(
                    [s.slot for s in batch], [s.output[-1] for s in batch], [s.next_position for s in batch]
                )
                sched.postprocess(batch, sample(logits, batch), self.eos_id)
                if self.metrics:
                    self.metrics.batch_size.observe(len(batch))
            self.last_step_failed = False
        except Exception as e:  # one rank alone: fail this step's sequences and go on
            if self.on_fatal:
                raise
            log.exception("engine step failed")
            self.last_step_failed = True
            with self.cv:
                for seq in set(new) | set(sched.running):
                    sched.finish(seq, None, f"generation failed: {type(e).__name__}: {e}")
