"""Step engine for Llama-2: prefill and decode over KV-cache slots. Knows token ids, not text."""

import torch

from presets.llama2.model import Transformer


class LlamaEngine:
    def __init__(self, model: Transformer, max_batch_size: int, max_seq_len: int):
        self.model = model
        self.device = model.output.weight.device
        model.setup_caches(max_batch_size, max_seq_len)

    def _ids(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: list[int]) -> torch.Tensor:
        """Run a whole prompt into `slot` from position 0; logits of its last position, (1, V)."""
        return self.model(self._ids([tokens]), self._ids([slot]), self._ids([0]))

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each running slot at its own position; logits (B, V)."""
        return self.model(self._ids(tokens)[:, None], self._ids(slots), self._ids(positions))
