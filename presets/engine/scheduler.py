"""Continuous-batching scheduler: sequences, the waiting queue, and each step's plan. No torch here.

All policy lives here. Each engine step runs one StepPlan that `Scheduler.schedule()` returns:
1. running sequences that decode (one token each), oldest first; one that needs a new KV block when
   none is free preempts the newest running sequence (its blocks are freed; it goes back to the front
   of the queue and is recomputed later, from its cached prefix where that survived);
2. running sequences part-way through their prompt, a chunk each, in what is left of the step's
   token budget (chunked prefill: a long prompt is spread over steps while the others decode);
3. waiting sequences, first come first served, while the budget, `max_batch_size` and the pool
   allow: each takes its cached prefix blocks (prefix caching) and fresh blocks for the rest of its
   tokens, and computes a first chunk.
A sequence samples a token in the step that computes its last known token.
"""

import heapq
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from presets.engine.block_manager import BlockManager, BlockTable
from presets.engine.flag import Flag
from presets.engine.params import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Placement:
    """Where the scheduler has a sequence: waiting, running in a batch slot on its KV blocks, or finished. Only
    the scheduler changes it, on the engine thread."""

    status: Status = Status.WAITING
    slot: int | None = None  # 0..max_batch_size-1 while running (llama.cpp's sequence id)
    table: BlockTable | None = None  # its KV blocks while running
    num_computed: int = 0  # leading tokens whose keys and values are in the cache


@dataclass(eq=False)
class Sequence:
    """One prompt being completed (a request with N prompts is N sequences): what the request asked, how it is
    decoded, and what the route waits for and reads back; `sched` is the scheduler's own state of it."""

    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int
    output: list[int] = field(default_factory=list)
    # decoding
    rng: object = None  # the engine loop's random generator for this sequence
    stop_check: object = None  # (output ids) -> True when a stop string has appeared
    matcher: object = None  # with params.grammar: its llguidance matcher, which masks the logits (structured.py)
    logprobs: list = field(default_factory=list)  # with params.logprobs: (logprob, [(id, logprob), ...]) per output
    # the answer, and the route's side of it
    finish_reason: str | None = None  # "stop" (EOS) or "length"
    error: str | None = None
    error_status: int = 503  # the HTTP status its error gives a client: 500 when generating it failed
    done: Flag = field(default_factory=Flag)
    notify: Flag | None = None  # set on every new token, for streaming readers
    cancelled: bool = False  # the client went away: retire at the next step
    # times, for the metrics
    arrival: float = field(default_factory=time.perf_counter)
    admitted: float | None = None  # when it first started running
    token_times: list[float] = field(default_factory=list)
    sched: Placement = field(default_factory=Placement)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)


@dataclass
class PlanItem:
    """One sequence's work in a step: compute `tokens` at positions start.., keys and values into `blocks`."""

    slot: int
    start: int
    tokens: list[int]
    blocks: list[int]  # the block table up to the last position computed
    sample: bool  # the last token is the sequence's newest: its logits are wanted
    adapter: int = 0  # the LoRA adapter's slot; 0: the base model


@dataclass
class StepPlan:
    items: list[PlanItem] = field(default_factory=list)
    seqs: list[Sequence] = field(default_factory=list)  # items[i] is seqs[i]'s (rank 0 only; not sent)

    @property
    def sampled(self) -> list[Sequence]:
        """The sequences that get a token, in the order of the engine's logits rows."""
        return [s for s, item in zip(self.seqs, self.items) if item.sample]

    def encode(self) -> list[int]:
        """The plan as integers (what rank 0 broadcasts): counts, then per-item fields, tokens, blocks."""
        out = [len(self.items)]
        for it in self.items:
            out += [it.slot, it.start, len(it.tokens), len(it.blocks), int(it.sample), it.adapter]
        for it in self.items:
            out += it.tokens
        for it in self.items:
            out += it.blocks
        return out

    @classmethod
    def decode(cls, data: list[int]) -> "StepPlan":
        n, at = data[0], 1 + 6 * data[0]
        heads = [data[1 + 6 * i : 7 + 6 * i] for i in range(n)]
        items = []
        for slot, start, n_tok, _, sample, adapter in heads:
            items.append(PlanItem(slot, start, data[at : at + n_tok], [], bool(sample), adapter))
            at += n_tok
        for item, (_, _, _, n_blocks, _, _) in zip(items, heads):
            item.blocks = data[at : at + n_blocks]
            at += n_blocks
        return cls(items)


def prefix_salt(adapter: int) -> int | None:
    """Where a sequence's prefix-cache keys start: its LoRA adapter changes every key and value, so blocks are
    shared only between sequences of the same adapter (or of the base model, None)."""
    return hash(("lora", adapter)) if adapter else None


@dataclass
class SchedulerConfig:
    max_batch_size: int  # running sequences
    num_blocks: int
    block_size: int = 16
    max_num_batched_tokens: int = 2048  # tokens computed per step
    prefix_caching: bool = True
    max_loras: int = 0  # LoRA adapters running at once (0: none served)


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.blocks = BlockManager(config.num_blocks, config.block_size, config.prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in order of admission: the oldest first
        self.free_slots = list(range(config.max_batch_size))  # a heap: the lowest free slot first
        self.on_finish = None  # called with each sequence that completes (for metrics)
        self.metrics = None  # prefix-cache and preemption counters, when attached
        self.preemptions = 0

    def fits_alone(self, seq: Sequence) -> str | None:
        """Why `seq` could never run (its longest length needs more blocks than the pool has), or None."""
        need = self.blocks.blocks_for(len(seq.prompt) + seq.max_new_tokens)
        if need <= self.config.num_blocks:
            return None
        bs, have = self.config.block_size, self.config.num_blocks
        return (
            f"the prompt ({len(seq.prompt)} tokens) plus {seq.max_new_tokens} new tokens needs {need} KV blocks "
            f"of {bs} tokens; the cache has {have} ({have * bs} tokens)"
        )

    def add(self, seqs: list[Sequence]) -> None:
        """Queue `seqs` (the engine thread bounds the queue before it calls this)."""
        self.waiting.extend(seqs)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the step plan ---------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan, budget = StepPlan(), self.config.max_num_batched_tokens
        preempted = False
        for seq in list(self.running):  # 1. decodes
            if budget == 0:
                break
            if seq.sched.status is not Status.RUNNING or seq.num_tokens - seq.sched.num_computed != 1:
                continue
            while not self.blocks.can_grow(seq.sched.table, seq.num_tokens):
                victim = next(s for s in reversed(self.running) if s not in plan.seqs)
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq.sched.table, seq.num_tokens)
                budget -= self._plan(plan, seq, 1)
        for seq in self.running:  # 2. prompts part-way through (their blocks were taken at admission)
            if budget == 0:
                break
            if seq not in plan.seqs:
                budget -= self._plan(plan, seq, min(seq.num_tokens - seq.sched.num_computed, budget))
        for seq in list(self.waiting):  # 3. new sequences, first come first served
            if preempted or not budget or len(self.running) >= self.config.max_batch_size:
                break
            if self._lora_blocked(seq):
                continue  # its adapter waits for a LoRA slot; the sequences behind it need not
            if not self._admit(seq):
                break  # out of blocks: the first in line is served first
            self.waiting.remove(seq)
            budget -= self._plan(plan, seq, min(seq.num_tokens - seq.sched.num_computed, budget))
        return plan

    def uses(self, adapter: int) -> int:
        """Sequences of LoRA adapter `adapter` running or waiting."""
        return sum(s.params.adapter == adapter for s in (*self.running, *self.waiting))

    def running_adapters(self) -> set[int]:
        return {s.params.adapter for s in self.running} - {0}

    def _lora_blocked(self, seq: Sequence) -> bool:
        """Its LoRA adapter would be one more than max_loras with sequences running."""
        adapter = seq.params.adapter
        if not adapter:
            return False
        running = self.running_adapters()
        return adapter not in running and len(running) >= self.config.max_loras

    def _admit(self, seq: Sequence) -> bool:
        """Give `seq` its cached prefix and fresh blocks for all its tokens, or False when they do not fit now."""
        adapter = seq.params.adapter
        tokens = seq.tokens
        salt = prefix_salt(adapter)
        hits = self.blocks.match(tokens, salt)
        if not self.blocks.can_allocate(hits, len(tokens)):
            return False
        seq.sched.table = self.blocks.allocate(hits, len(tokens), salt)
        seq.sched.num_computed = len(hits) * self.config.block_size
        if self.metrics:
            self.metrics.prefix_cache(len(tokens), seq.sched.num_computed)
        seq.sched.slot = heapq.heappop(self.free_slots)
        seq.sched.status = Status.RUNNING
        if seq.admitted is None:
            seq.admitted = time.perf_counter()
        self.running.append(seq)
        return True

    def _plan(self, plan: StepPlan, seq: Sequence, n: int) -> int:
        """Add `seq`'s next n tokens to the plan; returns n."""
        start, tokens = seq.sched.num_computed, seq.tokens
        end = start + n
        blocks = seq.sched.table.blocks[: self.blocks.blocks_for(end)]
        plan.items.append(
            PlanItem(seq.sched.slot, start, tokens[start:end], blocks, end == len(tokens), seq.params.adapter)
        )
        plan.seqs.append(seq)
        self.blocks.commit(seq.sched.table, tokens, end)  # written in this step, before any reader of this step
        return n

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and requeue it at the front; it is recomputed when readmitted."""
        self._leave(seq)
        seq.sched.status, seq.sched.num_computed = Status.WAITING, 0
        self.waiting.appendleft(seq)
        self.preemptions += 1
        if self.metrics:
            self.metrics.preempted()

    def _leave(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.sched.table)
        seq.sched.table = None
        heapq.heappush(self.free_slots, seq.sched.slot)
        seq.sched.slot = None

    # -- after the step --------------------------------------------------------------------------

    def postprocess(self, plan: StepPlan, tokens: list[int], eos_ids, logprobs=None) -> None:
        """Record what the step computed, append each sampled token (and its log probabilities, when the
        sequence asked: `logprobs` holds one entry per sampled token) and retire the sequences that are done."""
        now, sampled = time.perf_counter(), iter(tokens)
        lps = iter(logprobs or [None] * len(tokens))
        for item, seq in zip(plan.items, plan.seqs):
            if seq.sched.status is not Status.RUNNING:
                continue
            seq.sched.num_computed = item.start + len(item.tokens)
            if not item.sample:
                continue
            tok, lp = next(sampled), next(lps)
            seq.token_times.append(now)
            if tok in eos_ids and not seq.params.ignore_eos:
                self.finish(seq, "stop")
                continue
            seq.output.append(tok)
            if lp is not None:
                seq.logprobs.append(lp)
            if seq.stop_check and seq.stop_check(seq.output):
                self.finish(seq, "stop")
            elif len(seq.output) >= seq.max_new_tokens:
                self.finish(seq, "length")
            elif seq.notify:
                seq.notify.set()

    def finish(self, seq: Sequence, reason: str | None, error: str | None = None, status: int = 503) -> None:
        """Retire `seq` (from any state), free its blocks and wake its waiter; a finished one stays as it is.
        An `error` reaches the client with `status`: 503 (stopped, cancelled: try again), 500 (it failed)."""
        if seq.sched.status is Status.FINISHED:
            return
        if seq.sched.status is Status.RUNNING:
            self._leave(seq)
        elif seq.sched.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.sched.status, seq.finish_reason, seq.error, seq.error_status = Status.FINISHED, reason, error, status
        if self.on_finish:  # cancelled and failed ones too: their tokens were computed
            self.on_finish(seq)
        seq.done.set()
        if seq.notify:
            seq.notify.set()
