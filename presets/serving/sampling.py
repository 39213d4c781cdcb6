"""Next-token sampling: greedy, temperature, top-p; each sequence draws from its own generator."""

import torch


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero all but the smallest set of tokens whose probability reaches top_p (per row), renormalized."""
    sorted_p, idx = probs.sort(dim=-1, descending=True)  # (B, V)
    outside = sorted_p.cumsum(-1) - sorted_p > top_p[:, None]  # mass before this token already enough
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return kept / kept.sum(-1, keepdim=True)


def sample(logits: torch.Tensor, seqs) -> list[int]:
    """One token id per row of `logits` (B, V), by each sequence's own SamplingParams and rng."""
    tokens = logits.argmax(-1)  # (B,) greedy for every row; sampled rows are overwritten below
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if rows:
        temp = torch.tensor([seqs[i].params.temperature for i in rows], device=logits.device)
        top_p = torch.tensor([seqs[i].params.top_p for i in rows], device=logits.device)
        probs = top_p_filter(torch.softmax(logits[rows] / temp[:, None], dim=-1), top_p)
        for j, i in enumerate(rows):
            tokens[i] = torch.multinomial(probs[j], 1, generator=seqs[i].rng)[0]
    return tokens.tolist()


def make_rng(seed: int | None, device) -> torch.Generator:
    """A generator for one sequence: reproducible when the request gives a seed."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
