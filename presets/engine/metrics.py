"""Prometheus metrics for every server, named as vLLM names them where the meaning is the same.

vLLM's dashboards and autoscalers read `vllm:num_requests_running`, `vllm:num_requests_waiting`,
`vllm:time_to_first_token_seconds` and the rest; ours add `presets:` metrics for what vLLM lacks.
"""

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)


class Metrics:
    def __init__(self, counts):
        """`counts()` -> (running, waiting) sequences, read at each scrape."""
        r = self.registry = CollectorRegistry()
        Gauge("vllm:num_requests_running", "Sequences in the running batch.", registry=r).set_function(
            lambda: counts()[0]
        )
        Gauge("vllm:num_requests_waiting", "Sequences waiting for a batch slot.", registry=r).set_function(
            lambda: counts()[1]
        )

        def latency(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, registry=r, buckets=LATENCY_BUCKETS)

        self.ttft = latency("vllm:time_to_first_token_seconds", "Submit to first token.")
        self.itl = latency("vllm:inter_token_latency_seconds", "Between consecutive tokens of a sequence.")
        self.e2e = latency("vllm:e2e_request_latency_seconds", "Submit to last token.")
        self.queue = latency("vllm:request_queue_time_seconds", "Submit to admission into the batch.")
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", registry=r)
        self.batch_size = Histogram(
            "presets:batch_size", "Sequences per engine step.", registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
        )
        self.kv_usage = lambda: 0.0  # the step engine's block pool sets this
        Gauge(
            "vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks held by sequences (1 = full).", registry=r
        ).set_function(lambda: self.kv_usage())
        self.prefix_queries = Counter(
            "vllm:prefix_cache_queries",
            "Tokens looked up in the prefix cache (each admitted sequence's tokens).",
            registry=r,
        )
        self.prefix_hits = Counter(
            "vllm:prefix_cache_hits", "Tokens found in the prefix cache (not computed).", registry=r
        )
        self.preemptions = Counter(
            "vllm:num_preemptions", "Sequences preempted for KV-cache space (recomputed later).", registry=r
        )
        self.rejected = Counter(
            "presets:requests_rejected",
            "Requests refused with 503 (full queue, cannot start by X-Request-Timeout, loading, shutting down).",
            registry=r,
        )
        self.adapter_requests = Counter(
            "presets:lora_requests", "Sequences finished per LoRA adapter.", ["adapter"], registry=r
        )
        self.lora = LoraInfo()
        r.register(self.lora)

    def cache_config(self, block_size: int, num_blocks: int, prefix_caching: bool) -> None:
        """vllm:cache_config_info: the paged KV cache's configuration as labels, value 1, as vLLM exports it
        (Kaito's benchmark reads block_size and num_gpu_blocks). num_gpu_blocks is the pool's blocks on
        whatever device holds it, the CPU included, as vLLM's CPU backend names it too."""
        if self._cache_info is None:
            self._cache_info = Gauge(
                "vllm:cache_config_info",
                "Information of the KV cache configuration.",
                ["block_size", "num_gpu_blocks", "num_cpu_blocks", "enable_prefix_caching"],
                registry=self.registry,
            )
        self._cache_info.clear()
        self._cache_info.labels(str(block_size), str(num_blocks), "0", str(prefix_caching)).set(1)

    _cache_info = None

    def prefix_cache(self, queries: int, hits: int) -> None:
        self.prefix_queries.inc(queries)
        self.prefix_hits.inc(hits)

    def preempted(self) -> None:
        self.preemptions.inc()

    def finished(self, seq) -> None:
        """Record a retired sequence (EngineLoop's sequences carry per-token times); one that was cancelled or
        failed counts its tokens, not its latencies."""
        if seq.params.adapter and self.lora.names and self.lora.names[seq.params.adapter - 1]:
            self.adapter_requests.labels(self.lora.names[seq.params.adapter - 1]).inc()
        times = seq.token_times
        if seq.admitted is not None:  # a sequence refused or cancelled while waiting computed nothing
            self.prompt_tokens.inc(len(seq.prompt))
        self.generation_tokens.inc(len(times))
        if seq.error:
            return
        if seq.admitted is not None:
            self.queue.observe(seq.admitted - seq.arrival)
        if times:
            self.ttft.observe(times[0] - seq.arrival)
            self.e2e.observe(times[-1] - seq.arrival)
            for a, b in zip(times, times[1:]):
                self.itl.observe(b - a)

    def finished_request(self, submitted: float, prompt_tokens: int, generated_tokens: int) -> None:
        """Record a request of a whole-request engine (no per-token times)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated_tokens)
        self.e2e.observe(time.perf_counter() - submitted)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LoraInfo:
    """vllm:lora_requests_info, as vLLM exports it and the Kubernetes inference gateway routes by it: one gauge
    whose labels are max_lora and the comma-separated names of the adapters with running and with waiting
    sequences, and whose value is when those last changed (Unix seconds). Only when adapters are served."""

    def __init__(self):
        self.names: list[str | None] = []  # adapter slot - 1 -> name (None: unloaded)
        self.max_lora = 0
        self.state = ((), ())  # (running slots, waiting slots)
        self.changed = time.time()

    def update(self, running: set[int], waiting: set[int]) -> None:
        """Called by the engine thread after each step with the adapter slots of its sequences."""
        state = (tuple(sorted(running - {0})), tuple(sorted(waiting - {0})))
        if state != self.state:
            self.state, self.changed = state, time.time()

    def collect(self):
        if not any(self.names):
            return []
        running, waiting = (",".join(self.names[s - 1] for s in slots) for slots in self.state)
        family = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running and waiting LoRA adapters; the value is when they last changed.",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        family.add_metric([str(self.max_lora), running, waiting], self.changed)
        return [family]
