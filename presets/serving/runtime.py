"""Runtime: loads the model in the background, warms it up, reports health, runs generation requests."""

import logging
import threading
import time

from presets.serving.engine_loop import Call, EngineLoop
from presets.serving.errors import ApiError
from presets.serving.metrics import Metrics
from presets.serving.params import SamplingParams
from presets.serving.scheduler import Sequence

log = logging.getLogger(__name__)


class Runtime:
    """Owns the engine loop of one model; shared by every route of a server.

    `load(progress)` builds and returns (engine, tokenizer); it runs on a background thread so
    /healthz can answer (non-200, with progress) while a large checkpoint loads. `make_loop(engine,
    tokenizer)` makes the thread that owns the engine: by default the step engine's EngineLoop.
    """

    def __init__(self, load, max_seq_len: int, max_batch_size: int, max_waiting: int,
                 heartbeat_s: float | None = None, make_loop=None):  # fmt: skip
        self._load = load
        self._make_loop = make_loop or self._engine_loop
        self.heartbeat_s = heartbeat_s
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
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
            engine, tokenizer.eos_id, self.max_batch_size, self.max_waiting,
            heartbeat_s=self.heartbeat_s, on_fatal=self._fatal if self.heartbeat_s else None,
        )  # fmt: skip

    def _fatal(self) -> None:
        self.state = "failed"
        self._report(f"failed: {self.loop.failed}")
        if self.on_failure:
            self.on_failure()

    def _report(self, message: str) -> None:
        self.progress = message
        log.info("model: %s", message)

    def shutdown(self) -> None:
        """Stop the engine thread (which tells other ranks to exit) and wait for it, briefly."""
        if self.loop:
            self.loop.stop()
            self.loop.join(timeout=10)

    def _unavailable(self) -> str | None:
        """Why requests cannot be served now, or None."""
        if self.state != "ready":
            return f"model {self.state}: {self.progress}"
        if not self.loop.alive:
            return "engine thread is not running"
        return None

    def health(self) -> tuple[bool, str]:
        """(healthy, detail): healthy only when loaded, warmed up, and the last engine step worked."""
        why = self._unavailable() or (self.loop.last_step_failed and "the last engine step failed")
        return (False, why) if why else (True, "Healthy")

    # -- requests --------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sequence]:
        """Complete each token-id prompt; blocks until all are done. Raises ApiError for the client."""
        seqs = []
        for i, ids in enumerate(prompts):
            if len(ids) >= self.max_seq_len:
                raise ApiError(
                    400,
                    f"prompt {i} is {len(ids)} tokens; max_seq_len is {self.max_seq_len}, "
                    f"so a prompt may have at most {self.max_seq_len - 1} tokens",
                )
            room = self.max_seq_len - len(ids)
            max_new = min(params.max_tokens or room, room)  # the seeds: bounded by max_seq_len
            seqs.append(Sequence(ids, params, max_new))
        return self.run(seqs)

    def require_ready(self) -> None:
        """503 unless requests can be served now (a failed last step still takes them: the next may work)."""
        why = self._unavailable()
        if why:
            raise ApiError(503, why, {"Retry-After": "5"})

    def run_async(self, items: list) -> None:
        """Submit without waiting (streaming readers follow the items themselves)."""
        self.require_ready()
        self.loop.submit(items)

    def run(self, items: list) -> list:
        """Submit items (sequences or jobs) to the loop and wait for all of them; errors become ApiErrors."""
        self.run_async(items)
        for item in items:
            self._wait(item)
            if item.error:
                raise ApiError(500 if item.error.startswith("generation failed") else 503, item.error)
        return items

    def call(self, fn):
        """fn() run by the engine thread between steps (the only thread that touches the model); its result."""
        self.require_ready()
        call = Call(fn)
        self.loop.submit_call(call)
        self._wait(call)
        if call.error:
            raise ApiError(503 if self.loop.stopping else 500, call.error)
        return call.result

    def _wait(self, item) -> None:
        while not item.done.wait(0.5):
            if not self.loop.alive:
                failed = self.loop.failed
                why = f"engine failed: {failed}" if failed else "engine stopped before the request finished"
                raise ApiError(503, why)
