"""A model-free engine and a byte tokenizer, to test scheduling and HTTP without weights."""

import threading
import time

import torch

from presets.engine.step_loop import KVConfig

BOS, EOS, OFFSET = 1, 2, 3


class ByteTokenizer:
    """UTF-8 bytes shifted by 3; BOS 1, EOS 2."""

    bos_id, eos_id, n_words = BOS, EOS, 256 + OFFSET

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        return [BOS] * bos + [b + OFFSET for b in text.encode()] + [EOS] * eos

    def decode(self, ids: list[int]) -> str:
        return bytes(i - OFFSET for i in ids if i >= OFFSET).decode(errors="replace")


class FakeEngine:
    """Always predicts last token + 1 (mod vocab); records every step's items, may sleep per step.

    Its scheduler view: `num_blocks` blocks of `block_size` tokens (default: plenty), with prefix caching."""

    device = torch.device("cpu")

    def __init__(
        self,
        vocab: int = 256 + OFFSET,
        step_seconds: float = 0.0,
        num_blocks: int = 1024,
        block_size: int = 16,
        max_num_batched_tokens: int = 2048,
        prefix_caching: bool = True,
    ):
        self.vocab = vocab
        self.step_seconds = step_seconds
        self.kv_config = KVConfig(num_blocks, block_size, prefix_caching)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.steps: list[list[tuple[int, int, int]]] = []  # per step: (slot, start, tokens) of each item
        self.lock = threading.Lock()

    def heartbeat(self) -> None:
        pass

    def close(self) -> None:
        pass

    def run(self, plan) -> torch.Tensor:
        self.steps.append([(it.slot, it.start, len(it.tokens)) for it in plan.items])
        time.sleep(self.step_seconds)
        last = [it.tokens[-1] for it in plan.items if it.sample]
        logits = torch.zeros(len(last), self.vocab)
        for row, tok in enumerate(last):
            logits[row, (tok + 1) % self.vocab] = 10.0
        return logits
