"""Runtime: loads the model in the background, warms it up, reports health, runs generation requests."""

import asyncio
import logging
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass, replace
from functools import partial

from presets.engine.metrics import Metrics
from presets.engine.params import SamplingParams, room_left
from presets.engine.scheduler import Sequence
from presets.engine.step_loop import Call, EngineLoop
from presets.engine.stop_strings import stop_window
from presets.engine.thread import StartBy
from presets.errors import ApiError

log = logging.getLogger(__name__)

# The deadline to start of the request being served (the HTTP layer sets it from X-Request-Timeout): a context
# variable, so it reaches submit() from every route of every server without passing through their code.
START_BY: ContextVar[StartBy | None] = ContextVar("start_by", default=None)


@dataclass
class Deadline:
    """What bounds the waits of one request's items (Runtime.submit gives it, Runtime.wait honours it)."""

    end: float | None  # the time.monotonic() past which it is a 504 (--request_timeout); None: no limit
    start: StartBy | None  # the client's deadline to start; None when it sent none, or once the request started
    items: list  # the request's sequences, jobs or Call


class Runtime:
    """Owns the engine loop of one model; shared by every route of a server.

    `load(progress)` builds and returns (engine, tokenizer); it runs on a background thread so
    /healthz can answer (non-200, with progress) while a large checkpoint loads. `make_loop(engine,
    tokenizer)` makes the thread that owns the engine: by default the step engine's EngineLoop.
    """

    def __init__(
        self,
        load,
        max_seq_len: int | None,
        max_batch_size: int,
        max_waiting: int,
        heartbeat_s: float | None = None,
        make_loop=None,
        request_timeout: float = 0,
    ):
        self._load = load
        self._make_loop = make_loop or self._engine_loop
        self.heartbeat_s = heartbeat_s
        self.max_seq_len = max_seq_len  # a step engine's bound on a sequence; None: the engine bounds its jobs itself
        self.context_setting = "max_seq_len"  # what sets max_seq_len, as errors name it (llm-api: ctx_size)
        self.structured = None  # a StructuredOutput when the model can follow a grammar (set once it loads)
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.adapters: list[str] = []  # LoRA adapters served, slot i + 1 = adapters[i] (engine/adapters.py)
        self.request_timeout = request_timeout  # seconds a generation request may run; 0: no limit
        self.draining = False
        self.state = "starting"
        self.progress = "not started"
        self.tokenizer = None
        self.engine = None  # a family may keep its engine here (the HF server does)
        self.loop: EngineLoop | None = None
        self.on_failure = None  # called when loading fails (the launcher makes the process exit non-zero)
        self.metrics = Metrics(lambda: self.loop.counts() if self.loop else (0, 0))

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, background: bool = True) -> None:
        """Load, warm up and start the engine loop (on a thread unless background is False)."""
        if background:
            threading.Thread(target=self._start, name="loader", daemon=True).start()
        else:
            self._start()

    def _start(self) -> None:
        t0 = time.perf_counter()
        self.state = "loading"
        try:
            engine, self.tokenizer = self._load(self._report)
            self.loop = self._make_loop(engine, self.tokenizer)
            self.loop.attach_metrics(self.metrics)
            self.loop.start()
            self._report("warming up")
            self.loop.warm_up(self.tokenizer)  # a real step proves the device computes before /healthz says so
        except Exception as e:
            self.state = "failed"
            self._report(f"failed: {type(e).__name__}: {e}")
            log.exception("model failed to load")
            if self.on_failure:
                self.on_failure()
            return
        self.state = "ready"
        self._report(f"ready in {time.perf_counter() - t0:.1f}s")

    def wait_started(self, timeout: float = 600) -> None:
        """Block until loading and warm-up are over; raise if they failed."""
        deadline = time.monotonic() + timeout
        while self.state not in ("ready", "failed") and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.state != "ready":
            raise RuntimeError(f"model {self.state}: {self.progress}")

    def _engine_loop(self, engine, tokenizer) -> EngineLoop:
        return EngineLoop(
            engine,
            getattr(tokenizer, "eos_ids", tokenizer.eos_id),
            self.max_batch_size,
            self.max_waiting,
            heartbeat_s=self.heartbeat_s,
            on_fatal=self._fatal if self.heartbeat_s else None,
        )

    def _fatal(self) -> None:
        self.state = "failed"
        self._report(f"failed: {self.loop.failed}")
        if self.on_failure:
            self.on_failure()

    def _report(self, message: str) -> None:
        self.progress = message
        log.info("model: %s", message)

    def shutdown(self, reason: str = "server is shutting down") -> None:
        """Stop the engine thread (which tells other ranks to exit) and wait for it, briefly; what is
        still queued or running ends with `reason`."""
        if self.loop:
            self.loop.stop(reason)
            self.loop.join(timeout=10)

    def drain(self) -> None:
        """Refuse new work (503) and report unhealthy, so readiness drops; what runs goes on."""
        self.draining = True
        self._report("draining: finishing the requests in flight, taking no new ones")

    def _unavailable(self) -> str | None:
        """Why requests cannot be served now, or None."""
        if self.draining:
            return "server is shutting down (draining): send requests to another replica"
        if self.state != "ready":  # (a failed load's progress already says "failed: ...")
            return f"model {self.progress}" if self.state == "failed" else f"model {self.state}: {self.progress}"
        if not self.loop.alive:
            return "engine thread is not running"
        return None

    def health(self) -> tuple[bool, str]:
        """(healthy, detail): healthy only when loaded, warmed up, not draining, and the last engine step worked."""
        why = self._unavailable() or (self.loop.last_step_failed and "the last engine step failed")
        return (False, why) if why else (True, "Healthy")

    # -- requests: coroutines of the HTTP event loop; the engine thread wakes them through Flags ----

    def sequences(self, prompts: list[list[int]], params: SamplingParams, n: int = 1, stops=()) -> list[Sequence]:
        """The Sequences of a request, for every route on the step engine: `n` choices per token-id prompt, in
        order (with a seed, choice i samples with seed + i), each bounded by max_seq_len as Kaito's API says (400
        when a prompt cannot fit); with `stops`, a sequence ends once its text holds one of the strings."""
        seqs = []
        for i, ids in enumerate(prompts):
            room = room_left(self.max_seq_len, len(ids), self.context_setting, f"prompt {i}")
            for c in range(n):
                p = params if params.seed is None else replace(params, seed=params.seed + c)
                seq = Sequence(ids, p, min(params.max_tokens or room, room))  # Kaito's API: bounded by max_seq_len
                if params.grammar is not None:
                    seq.matcher = self.structured.matcher(params.grammar)
                if stops:
                    seq.stop_check = partial(self._holds_stop, stops=stops)
                seqs.append(seq)
        return seqs

    def _holds_stop(self, output: list[int], stops) -> bool:
        """Whether the text of a sequence's last tokens holds one of its stop strings (engine thread, each step)."""
        return any(s in self.tokenizer.decode(output[-stop_window(stops) :]) for s in stops)

    async def agenerate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sequence]:
        """Complete each token-id prompt. Raises ApiError for the client."""
        return await self.arun(self.sequences(prompts, params))

    # Blocking forms, for scripts and tests on plain threads (never from the HTTP event loop).
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sequence]:
        return asyncio.run(self.agenerate(prompts, params))

    def run(self, items: list) -> list:
        return asyncio.run(self.arun(items))

    def call(self, fn):
        return asyncio.run(self.acall(fn))

    def require_ready(self) -> None:
        """503 unless requests can be served now (a failed last step still takes them: the next may work)."""
        why = self._unavailable()
        if why:
            raise ApiError(503, why, {"Retry-After": "5"})

    def start_within(self, seconds: float | None, source: str = "") -> None:
        """The request being served must start running within `seconds` (None: no such deadline); `source` names
        it in answers. Set per request by the HTTP layer, before the route runs."""
        START_BY.set(None if seconds is None else StartBy(time.monotonic() + seconds, source))

    def submit(self, items: list) -> Deadline:
        """Queue items (sequences or jobs) without waiting: 503 at once when the queue is full or they cannot start
        by the request's deadline to start. Their Deadline, for wait()."""
        self.require_ready()
        start = START_BY.get()
        self.loop.submit(items, start)
        end = time.monotonic() + self.request_timeout if self.request_timeout else None
        return Deadline(end, start, items)

    async def arun(self, items: list) -> list:
        """Submit items and await all of them; errors become ApiErrors. A request that is cancelled (its
        client left) or runs past --request_timeout retires its items, so their KV blocks are freed."""
        deadline = self.submit(items)
        try:
            for item in items:
                await self.wait(item, deadline)
                if item.error:
                    raise ApiError(item.error_status, item.error)
        finally:
            self.cancel(items)
        return items

    def cancel(self, items: list) -> None:
        """Retire the items that are not done yet (their client is gone, or their time is up)."""
        left = [item for item in items if not item.done.is_set()]
        if left and self.loop:
            self.loop.cancel(left)

    async def acall(self, fn):
        """fn() run by the engine thread between steps (the only thread that touches the model); its result."""
        self.require_ready()
        call = Call(fn)
        self.loop.submit_call(call)
        await self.wait(call, Deadline(None, START_BY.get(), [call]))
        if call.error:
            raise ApiError(503 if self.loop.stopping else 500, call.error)
        return call.result

    async def wait(self, item, deadline: Deadline | None, flag=None) -> bool:
        """Until `item` is done (or `flag`, when given, is set): True. 504 past --request_timeout, 503 when the
        engine stops or when the request has not started by its deadline to start (then it leaves the queue)."""
        flag = flag or item.done
        while True:
            left = self._time_left(deadline) if deadline else None
            if await flag.wait_async(0.5 if left is None else min(0.5, left)):
                return True
            if not self.loop.alive and not item.done.is_set():
                if self.loop.stopping and self.loop.thread.is_alive():
                    continue  # stopped after its current step, the engine thread ends the item with the reason
                failed = self.loop.failed
                why = f"engine failed: {failed}" if failed else "engine stopped before the request finished"
                raise ApiError(503, why)

    def _time_left(self, deadline: Deadline) -> float | None:
        """Seconds until the next of `deadline`'s times, raising once one has passed: 504 past --request_timeout;
        past the deadline to start, a 503 if none of the request's items has started (they are withdrawn from the
        queue first), else the request runs on (the deadline to start is met)."""
        now = time.monotonic()
        if deadline.end is not None and deadline.end <= now:
            raise ApiError(504, f"the request ran past request_timeout ({self.request_timeout:g}s)")
        if deadline.start is not None and deadline.start.left(now) <= 0:
            ahead = self.loop.withdraw(deadline.items)
            if ahead is not None:
                raise self.loop.not_started(ahead, deadline.start)
            deadline.start = None  # it started in time: a started request is not cut by its deadline to start
        times = [t - now for t in (deadline.end, deadline.start and deadline.start.at) if t is not None]
        return max(0.0, min(times)) if times else None
