"""StepRunner: runs a request's sequences on the step engine and gives them to the routes, whole or as they grow
(streamed text, stop strings, log probabilities). Every route on the step engine (OpenAI, llm-api) uses it; the
HF server's runner (models/hf/runner.py) gives the same shapes from transformers' generate."""

from presets.engine.flag import Flag
from presets.engine.stop_strings import StreamedText, TokenOffsets, cut_at_stop
from presets.errors import ApiError


class StepRunner:
    """Runs OpenAI (and llm-api) requests on a step engine (EngineLoop): real streaming, stop strings end
    sequences."""

    def __init__(self, rt):
        self.rt = rt

    def decode(self, ids: list[int]) -> str:
        return self.rt.tokenizer.decode(ids)

    async def generate(self, prompts, params, n, stops) -> list[tuple]:
        """(text, finish_reason, completion tokens, log probabilities or None) per choice."""
        seqs = await self.rt.arun(self.rt.sequences(prompts, params, n, stops))
        out = []
        for s in seqs:
            text = cut_at_stop(self.decode(s.output), stops)[0]
            lps = None if params.logprobs is None else self.logprobs(s, TokenOffsets(self.decode), len(text), True)
            out.append((text, s.finish_reason, len(s.output), lps))
        return out

    @staticmethod
    def logprobs(seq, offsets: TokenOffsets, length: int, final: bool) -> list[tuple]:
        """(token id, (logprob, top alternatives), text offset) of the tokens the first `length` characters carry."""
        return [(seq.output[i], seq.logprobs[i], start) for i, start in offsets.take(seq.output, length, final)]

    async def stream(self, prompts, params, n, stops, usage=None):
        """Yield (choice index, new text or None, finish_reason or None, log probabilities or None) as tokens
        come out; `usage` gets the request's counts when it ends (also when the client left: the tokens it got)."""
        seqs = self.rt.sequences(prompts, params, n, stops)
        notify = Flag()
        for seq in seqs:
            seq.notify = notify
        deadline = self.rt.submit(seqs)  # 503 now, before the stream starts, if the queue is full
        texts = [StreamedText(self.decode, stops) for _ in seqs]
        offsets = [TokenOffsets(self.decode) for _ in seqs] if params.logprobs is not None else None
        finished = [False] * len(seqs)
        try:
            while not all(finished):
                await self.rt.wait(seqs[0], deadline, flag=notify)
                notify.clear()
                for i, seq in enumerate(seqs):
                    if finished[i]:
                        continue
                    done = seq.done.is_set()
                    if done and seq.error:
                        raise ApiError(seq.error_status, seq.error)
                    piece = texts[i].update(list(seq.output), done)
                    lps = offsets and self.logprobs(seq, offsets[i], len(texts[i].sent), done)
                    if piece or lps:
                        yield i, piece, None, lps
                    if done:
                        finished[i] = True
                        yield i, None, seq.finish_reason, None
        finally:
            self.rt.cancel(seqs)  # a client that left, or a request past its time, frees its slots
            count_usage(usage, prompts, [len(s.output) for s in seqs])


def count_usage(usage: dict | None, prompts, generated: list[int]) -> None:
    """A stream's counts for its log line and usage chunk (OpenAI counts each prompt once, whatever n)."""
    if usage is not None:
        usage.update(sequences=len(generated), prompt_tokens=sum(map(len, prompts)), completion_tokens=sum(generated))
