"""Next-token sampling: repeat penalty, greedy, temperature, top-k, top-p; each sequence has its own generator."""

import torch


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero all but the smallest set of tokens whose probability reaches top_p (per row), renormalized."""
    sorted_p, idx = probs.sort(dim=-1, descending=True)  # (B, V)
    outside = sorted_p.cumsum(-1) - sorted_p > top_p[:, None]  # mass before this token already enough
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return kept / kept.sum(-1, keepdim=True)


def repeat_penalty(logits: torch.Tensor, seqs) -> torch.Tensor:
    """llama.cpp's repeat penalty: tokens seen in the last repeat_last_n (prompt and output) get their
    logit divided by the penalty when positive, multiplied when negative. A copy when any row has one."""
    rows = [i for i, s in enumerate(seqs) if s.params.repeat_penalty != 1.0 and s.params.repeat_last_n > 0]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        s, n = seqs[i], seqs[i].params.repeat_last_n
        window = s.output[-n:]
        if len(window) < n:
            window = s.prompt[max(0, len(s.prompt) - (n - len(window))) :] + window
        ids = torch.tensor(sorted(set(window)), device=logits.device, dtype=torch.long)
        seen = logits[i, ids]
        penalty = s.params.repeat_penalty
        logits[i, ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits (V,) with all but the k largest set to -inf."""
    if 0 < k < logits.shape[-1]:
        kth = logits.topk(k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def sample(logits: torch.Tensor, seqs) -> list[int]:
    """One token id per row of `logits` (B, V), by each sequence's own SamplingParams and rng."""
    logits = repeat_penalty(logits, seqs)
    tokens = logits.argmax(-1)  # (B,) greedy for every row; sampled rows are overwritten below
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if rows:
        temp = torch.tensor([seqs[i].params.temperature for i in rows], device=logits.device)
        top_p = torch.tensor([seqs[i].params.top_p for i in rows], device=logits.device)
        picked = logits[rows]
        if any(seqs[i].params.top_k for i in rows):
            picked = torch.stack([top_k_filter(logits[i], seqs[i].params.top_k) for i in rows])
        probs = top_p_filter(torch.softmax(picked / temp[:, None], dim=-1), top_p)
        finite = torch.isfinite(probs).all(-1).tolist()
        for j, i in enumerate(rows):
            if finite[j]:  # else (an overflow): the row keeps its greedy token rather than fail the batch
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
