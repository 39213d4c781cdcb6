"""A model-free engine and a byte tokenizer, to test scheduling and HTTP without weights."""

import threading
import time

import torch

BOS, EOS, OFFSET = 1, 2, 3


class ByteTokenizer:
    """UTF-8 bytes shifted by 3; BOS 1, EOS 2."""

    bos_id, eos_id, n_words = BOS, EOS, 256 + OFFSET

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        return [BOS] * bos + [b + OFFSET for b in text.encode()] + [EOS] * eos

    def decode(self, ids: list[int]) -> str:
        return bytes(i - OFFSET for i in ids if i >= OFFSET).decode(errors="replace")


class FakeEngine:
    """Always predicts last token + 1 (mod vocab); records every step's batch, may sleep per step."""

    device = torch.device("cpu")

    def __init__(self, vocab: int = 256 + OFFSET, step_seconds: float = 0.0):
        self.vocab = vocab
        self.step_seconds = step_seconds
        self.steps: list[tuple[str, list[int]]] = []  # (kind, slots)
        self.lock = threading.Lock()

    def _logits(self, last_tokens: list[int]) -> torch.Tensor:
        time.sleep(self.step_seconds)
        logits = torch.zeros(len(last_tokens), self.vocab)
        for row, tok in enumerate(last_tokens):
            logits[row, (tok + 1) % self.vocab] = 10.0
        return logits

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        self.steps.append(("prefill", list(slots)))
        return self._logits([p[-1] for p in prompts])

    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        self.steps.append(("decode", list(slots)))
        return self._logits(tokens)
