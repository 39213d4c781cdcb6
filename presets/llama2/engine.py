"""Step engine for Llama-2: prefill and decode over KV-cache slots. Knows token ids, not text."""

import logging

import torch

from presets.llama2 import cpu_kernels
from presets.llama2.model import Decode, Prefill, Transformer

log = logging.getLogger(__name__)


class LlamaEngine:
    def __init__(self, model: Transformer, max_batch_size: int, max_seq_len: int, cpu_packed: bool = True):
        self.model = model
        self.device, self.dtype = model.output.weight.device, model.output.weight.dtype
        model.setup_caches(max_batch_size, max_seq_len)
        if cpu_packed and self.device.type == "cpu":
            forms = cpu_kernels.pack_linears(model, max_batch_size)
            caches = cpu_kernels.attach_decode_attention(model)
            log.info("CPU linear layers packed as %s; decode attention kernel on %d layers", forms, caches)

    @torch.inference_mode()
    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Run whole prompts into their slots from position 0, packed as one row; (S, V) last-token logits."""
        tokens, step = Prefill.build(slots, prompts, self.device)
        return self.model(tokens, step)

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each running slot at its own position; logits (B, V)."""
        step = Decode.build(slots, positions, self.device, self.dtype)
        return self.model(torch.tensor(tokens, device=self.device)[:, None], step)
