"""The OpenAI routes on a HuggingFace model: requests become generate jobs; streaming uses a streamer."""

import time

from presets.engine.batch_loop import Job
from presets.engine.flag import Flag
from presets.engine.params import SamplingParams
from presets.engine.runner import count_usage
from presets.engine.stop_strings import StreamedText, cut_at_stop
from presets.errors import ApiError
from presets.models.hf.engine import HFJob, batch_key
from presets.models.hf.params import DEFAULTS, EXTRAS


class _TokenStreamer:
    """A transformers streamer that appends each new token id to `tokens` and sets `notify`."""

    def __init__(self):
        self.tokens: list[int] = []
        self.notify = Flag()
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.tokens.extend(value.reshape(-1).tolist())
        self.notify.set()

    def end(self):
        self.notify.set()


class HFRunner:
    def __init__(self, rt):
        self.rt = rt

    @staticmethod
    def _params(params: SamplingParams, n: int) -> dict:
        sampling = not params.greedy
        return (
            DEFAULTS
            | EXTRAS
            | {
                "do_sample": sampling,
                "temperature": params.temperature if sampling else 1.0,
                "top_p": params.top_p,
                "top_k": 0,
                "num_return_sequences": n if sampling else 1,
                "ignore_eos": params.ignore_eos,
                "seed": params.seed,
                "adapter": params.adapter,  # in the batch key: a batch runs one LoRA adapter
            }
        )

    async def generate(self, prompts, params: SamplingParams, n: int, stops) -> list[tuple]:
        """(text, finish_reason, completion tokens, None: no log probabilities) per choice, n per prompt."""
        p = self._params(params, n)
        t0 = time.perf_counter()
        jobs = await self.rt.arun(
            [Job(batch_key(p), HFJob("", ids, p, params.max_tokens, stops=tuple(stops))) for ids in prompts]
        )
        choices = []
        for job in jobs:
            sequences = job.result if len(job.result) == n else job.result * n  # greedy: n equal choices
            for ids, eos in sequences:
                text, stopped = cut_at_stop(self.rt.engine.text(ids), stops)
                choices.append((text, "stop" if eos or stopped else "length", len(ids), None))
            self.rt.metrics.finished_request(t0, len(job.payload.prompt_ids), sum(len(i) for i, _ in job.result))
        return choices

    async def stream(self, prompts, params: SamplingParams, n: int, stops, usage=None):
        """Yield (choice index, new text or None, finish_reason or None, None: no log probabilities); each choice
        is its own job, in turn.
        `usage` and the metrics get the request's counts when it ends (a client that left: the tokens it got)."""
        t0 = time.perf_counter()
        jobs = []
        for ids in prompts:
            for c in range(n):
                seed = None if params.seed is None else params.seed + c
                streamer = _TokenStreamer()
                p = self._params(SamplingParams(**{**vars(params), "seed": seed}), 1)
                job = Job(None, HFJob("", ids, p, params.max_tokens, streamer, stops=tuple(stops)))  # runs alone
                job.notify = streamer.notify
                jobs.append(job)
        deadline = self.rt.submit(jobs)  # all at once: one deadline, and a drain that starts later takes them all
        try:
            for i, job in enumerate(jobs):
                async for piece in self._follow(job, job.payload.streamer, i, stops, deadline):
                    yield piece
        finally:
            self.rt.cancel(jobs)  # a client that left stops its generation at the next token
            generated = [len(job.payload.streamer.tokens) for job in jobs]
            for job, tokens in zip(jobs, generated):
                self.rt.metrics.finished_request(t0, len(job.payload.prompt_ids), tokens)
            count_usage(usage, prompts, generated)

    async def _follow(self, job, streamer, index: int, stops, deadline):
        """Pieces of one streamed job, from its streamer's tokens; the final text settles the rest."""
        text = StreamedText(self.rt.engine.text, stops)
        while not job.done.is_set():
            await self.rt.wait(job, deadline, flag=streamer.notify)
            streamer.notify.clear()
            piece = text.update(list(streamer.tokens))
            if piece:
                yield index, piece, None, None
        if job.error:
            raise ApiError(job.error_status, job.error)
        ((final_ids, eos),) = job.result
        piece = text.update(final_ids, done=True)
        if piece:
            yield index, piece, None, None
        yield index, None, "stop" if eos or text.stopped else "length", None
