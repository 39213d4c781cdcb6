"""Continuous-batching scheduler: sequences, the waiting queue, KV-cache slots. No torch here."""

import heapq
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from presets.serving.params import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One prompt being completed; a request with N prompts is N sequences."""

    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    slot: int | None = None
    finish_reason: str | None = None  # "stop" (EOS) or "length"
    error: str | None = None
    rng: object = None  # the engine loop's random generator for this sequence
    arrival: float = field(default_factory=time.perf_counter)
    admitted: float | None = None  # when it got a batch slot
    token_times: list[float] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    notify: threading.Event | None = None  # set on every new token, for streaming readers
    stop_check: object = None  # (output ids) -> True when a stop string has appeared
    cancelled: bool = False  # the client went away: retire at the next step

    @property
    def next_position(self) -> int:
        """Cache position of the last sampled token, the next decode step's input."""
        return len(self.prompt) + len(self.output) - 1


class Scheduler:
    """Admits waiting sequences into free slots between steps and retires finished ones at once."""

    def __init__(self, max_batch_size: int):
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(max_batch_size))  # a heap: the lowest free slot first
        self.on_finish = None  # called with each sequence that completes (for metrics)

    def add(self, seqs: list[Sequence]) -> None:
        """Queue `seqs` (the engine thread bounds the queue before it calls this)."""
        self.waiting.extend(seqs)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into free slots; they need a prefill step."""
        new = []
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = heapq.heappop(self.free_slots)
            seq.status, seq.admitted = Status.RUNNING, time.perf_counter()
            self.running.append(seq)
            new.append(seq)
        return new

    def postprocess(self, seqs: list[Sequence], tokens: list[int], eos_id: int) -> None:
        """Append each sequence's sampled token and retire the ones that are done."""
        now = time.perf_counter()
        for seq, tok in zip(seqs, tokens):
            seq.token_times.append(now)
            if tok == eos_id and not seq.params.ignore_eos:
                self.finish(seq, "stop")
                continue
            seq.output.append(tok)
            if seq.stop_check and seq.stop_check(seq.output):
                self.finish(seq, "stop")
            elif len(seq.output) >= seq.max_new_tokens:
                self.finish(seq, "length")
            elif seq.notify:
                seq.notify.set()

    def finish(self, seq: Sequence, reason: str | None, error: str | None = None) -> None:
        """Retire `seq` (from any state), free its slot and wake its waiter; a finished one stays as it is."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            heapq.heappush(self.free_slots, seq.slot)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason, seq.error = Status.FINISHED, reason, error
        if reason is not None and self.on_finish:
            self.on_finish(seq)
        seq.done.set()
        if seq.notify:
            seq.notify.set()
