"""Driving a step engine by hand: plan items with explicit block tables (what the scheduler would send)."""

from presets.engine.scheduler import PlanItem, StepPlan
from presets.models.llama.engine import CacheSettings, LlamaEngine

BLOCK = 16
PER_SEQ = 8  # blocks each hand-driven sequence owns: 128 positions


def engine_for(model, max_seq_len=128, max_batch_size=4, **kw) -> LlamaEngine:
    """An engine whose pool is max_batch_size x max_seq_len positions (the CPU default), blocks of 16."""
    return LlamaEngine(model, CacheSettings(max_seq_len, max_batch_size, BLOCK), **kw)


def blocks(seq: int, n_positions: int) -> list[int]:
    """Block table of hand-driven sequence `seq` (its own range of blocks) for n_positions positions."""
    return list(range(seq * PER_SEQ, seq * PER_SEQ + -(-n_positions // BLOCK)))


def item(seq: int, start: int, tokens: list[int], sample: bool = True, table: list[int] | None = None) -> PlanItem:
    """Sequence `seq` computes `tokens` at positions start..; its table defaults to blocks(seq, ...)."""
    return PlanItem(seq, start, tokens, table or blocks(seq, start + len(tokens)), sample)


def run(engine, *items: PlanItem, all_logits: bool = False):
    """One step; logits of the sampling items (S, V), or every token's (1, N, V) with all_logits."""
    if not all_logits:
        return engine.run(StepPlan(list(items)))
    import torch

    from presets.models.llama.kv_cache import PagedStep

    with torch.inference_mode():
        tokens, step = PagedStep.build(list(items), BLOCK, engine.device, engine.kernel_group)
        return engine.model(tokens, step, all_logits=True)
