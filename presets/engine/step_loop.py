"""The engine thread: the only thread that touches the model. the HTTP routes submit sequences and await them."""

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import torch

from presets.engine.flag import Flag
from presets.engine.params import SamplingParams
from presets.engine.sampling import make_rng, sample, token_logprobs
from presets.engine.scheduler import PlanItem, Scheduler, SchedulerConfig, Sequence, StepPlan
from presets.engine.thread import EngineThread, StartBy
from presets.errors import ApiError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVConfig:
    """The KV pool an engine allocated: what the scheduler plans with."""

    num_blocks: int
    block_size: int
    prefix_caching: bool
    max_loras: int = 0  # LoRA adapters one step may mix (0: the engine serves none)


class StepEngine(Protocol):
    """What EngineLoop runs: models/llama/engine.py LlamaEngine (and process/ranks.py LeaderEngine around it
    under torchrun), models/llamacpp/engine.py LlamaCppEngine."""

    device: torch.device
    kv_config: KVConfig
    max_num_batched_tokens: int  # tokens one step may compute

    def run(self, plan: StepPlan) -> torch.Tensor:
        """The step's logits, one row per sampled item: (items that sample, vocab)."""

    def heartbeat(self) -> None:
        """Idle: tell the other ranks this one is alive (a no-op with one rank)."""

    def close(self) -> None:
        """The loop has stopped: release what the engine holds (tell other ranks to exit)."""


@dataclass(eq=False)
class Call:
    """Work on the model that is not generation (an embedding), run by the engine thread between steps."""

    fn: object  # () -> result
    result: object = None
    error: str | None = None
    done: Flag = field(default_factory=Flag)


class EngineLoop(EngineThread):
    """Runs the scheduler's step plans on `engine` (continuous batching over a paged KV cache).

    `engine` provides run(plan) -> (sampled items, V) logits, `device`, `kv_config` (num_blocks,
    block_size, prefix_caching: the pool it allocated) and `max_num_batched_tokens` (its step size).
    Each iteration: schedule -> run the plan -> sample -> postprocess.
    """

    def __init__(
        self, engine, eos_id, max_batch_size: int, max_waiting: int, heartbeat_s: float | None = None, on_fatal=None
    ):
        super().__init__(max_waiting)
        self.engine = engine
        self.eos_ids = (eos_id,) if isinstance(eos_id, int) else tuple(eos_id)  # one id, or every id that ends
        kv = engine.kv_config
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_batch_size,
                kv.num_blocks,
                kv.block_size,
                engine.max_num_batched_tokens,
                kv.prefix_caching,
                kv.max_loras,
            )
        )
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
        self.scheduler.metrics = metrics
        metrics.kv_usage = self.scheduler.blocks.usage
        kv = self.engine.kv_config
        metrics.cache_config(kv.block_size, kv.num_blocks, kv.prefix_caching)

    def submit(self, seqs: list[Sequence], start: StartBy | None = None) -> None:
        """Queue `seqs` for generation; 400 when one could never fit the KV cache, 503 when the queue is full or
        the sequences ahead would not leave it before `start`, the request's deadline to start."""
        for i, seq in enumerate(seqs):
            why = self.scheduler.fits_alone(seq)
            if why:
                raise ApiError(400, f"sequence {i}: {why}")
        with self.cv:
            self._admit_or_refuse(len(self.scheduler.waiting), len(seqs), "sequences", start)
            self.scheduler.add(seqs)
            self.cv.notify()

    def submit_call(self, call: Call) -> None:
        """Queue a Call for the engine thread, or answer 503 when too many wait."""
        with self.cv:
            self._admit_or_refuse(len(self.calls), 1, "calls")
            self.calls.append(call)
            self.cv.notify()

    def withdraw(self, items: list) -> int | None:
        """Take a request's sequences (or its Call) out of the queue if none has started running (a sequence
        preempted back to the queue has started): how many waited ahead of them; None, leaving them, otherwise."""
        with self.cv:
            queue = self.calls if isinstance(items[0], Call) else self.scheduler.waiting
            if not all(item in queue for item in items) or any(getattr(s, "admitted", None) is not None for s in items):
                return None
            ahead = min(queue.index(item) for item in items)
            for item in items:
                if isinstance(item, Call):
                    queue.remove(item)
                    item.error = "did not start by its deadline"
                    item.done.set()
                else:  # waiting, never admitted: it holds no block; finish() takes it off the queue
                    self.scheduler.finish(item, None, "did not start by its deadline")
            return ahead

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
        sched = self.scheduler
        try:
            while True:
                with self.cv:
                    if not sched.has_work() and not self.calls and not self.stopping:
                        probe = self.last_step_failed and self.heartbeat_s is None
                        self.cv.wait(timeout=1.0 if probe else self.heartbeat_s)
                    if self.stopping:
                        break
                    calls = list(self.calls)
                    self.calls.clear()
                    for seq in [s for s in (*sched.waiting, *sched.running) if s.cancelled]:
                        sched.finish(seq, None, "cancelled: the client disconnected")  # frees its blocks
                    queued = len(sched.waiting)
                    plan = sched.schedule() if sched.has_work() else None
                    self.drained(queued - len(sched.waiting))  # admitted (preempted ones come back: negative)
                for call in calls:
                    self._call(call)
                if plan is not None and plan.items:
                    self._step(plan)
                elif calls or plan is not None:
                    continue  # the calls were this round's work
                elif self.heartbeat_s is not None:
                    self.engine.heartbeat()  # idle: tell the other ranks we are alive
                elif self.last_step_failed:
                    self._probe()
            self._end(self.stop_reason)
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
        try:  # nothing runs and the prefix cache was dropped: block 0 and slot 0 are free
            self.engine.run(StepPlan([PlanItem(0, 0, [self.eos_ids[0]], [0], True)]))
            self.last_step_failed = False
        except Exception:
            log.exception("engine probe failed")

    def _step(self, plan: StepPlan) -> None:
        sched = self.scheduler
        try:
            for seq in plan.seqs:
                if seq.rng is None:
                    seq.rng = make_rng(seq.params.seed, self.engine.device)
            logits = self.engine.run(plan)
            sampled = plan.sampled
            tokens = sample(logits, sampled) if sampled else []
            sched.postprocess(plan, tokens, self.eos_ids, token_logprobs(logits, sampled, tokens))
            if self.metrics:
                self.metrics.batch_size.observe(len(plan.items))
                if sched.config.max_loras:
                    waiting = {s.params.adapter for s in list(sched.waiting)}  # a copy: routes change the queue
                    self.metrics.lora.update(sched.running_adapters(), waiting)
            self.last_step_failed = False
        except Exception as e:  # one rank alone: fail this step's sequences and go on
            if self.on_fatal:
                raise
            log.exception("engine step failed")
            self.last_step_failed = True
            with self.cv:
                for seq in list(sched.running):
                    sched.finish(seq, None, f"generation failed: {type(e).__name__}: {e}", status=500)
                sched.blocks.reset_cache()  # blocks keyed in this step may hold nothing valid
