"""Next-token sampling: repeat penalty (llama.cpp's), OpenAI's presence and frequency penalties and logit bias,
greedy, temperature, top-k, top-p; each sequence has its own generator."""

import torch

from presets.engine.structured import advance, constrain


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


def openai_adjust(logits: torch.Tensor, seqs) -> torch.Tensor:
    """OpenAI's penalties over each sequence's generated tokens (not its prompt) and its logit_bias. A copy when
    any row has one."""
    rows = [
        i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty or s.params.logit_bias
    ]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        p, out = seqs[i].params, seqs[i].output
        if out and (p.presence_penalty or p.frequency_penalty):
            ids, counts = torch.tensor(out, device=logits.device).unique(return_counts=True)
            logits[i, ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty
    biased = [(i, token, bias) for i in rows for token, bias in seqs[i].params.logit_bias]
    if biased:  # one op for the whole batch (each (row, token) once: the request's validation sees to it)
        at = torch.tensor([(i, token) for i, token, _ in biased], device=logits.device).T  # (2, entries)
        values = torch.tensor([bias for _, _, bias in biased], dtype=logits.dtype, device=logits.device)
        logits.index_put_((at[0], at[1]), values, accumulate=True)
    return logits


NUCLEUS_CANDIDATES = 256


def nucleus_sample(probs: torch.Tensor, top_p: torch.Tensor, rngs) -> list[int]:
    """One draw per row from the top-p nucleus of `probs` (R, V). The nucleus is the head of the sorted
    order, so when the 256 likeliest tokens already hold top_p of the mass it lies among them: a partial
    top-k then replaces sorting the whole vocabulary (the same distribution, several times faster)."""
    k = min(NUCLEUS_CANDIDATES, probs.shape[-1])
    head, head_ids = probs.topk(k, dim=-1)
    inside = (head.sum(-1) >= top_p).tolist()
    short = [j for j, ok in enumerate(inside) if ok]
    long = [j for j, ok in enumerate(inside) if not ok]
    kept = {}  # row -> (probabilities to draw from, ids they stand for or None)
    if short:
        for j, row in zip(short, top_p_filter(head[short], top_p[short])):
            kept[j] = (row, head_ids[j])
    if long:
        for j, row in zip(long, top_p_filter(probs[long], top_p[long])):
            kept[j] = (row, None)
    out = []
    for j, rng in enumerate(rngs):
        row, ids = kept[j]
        drawn = torch.multinomial(row, 1, generator=rng)[0]
        out.append(int(drawn if ids is None else ids[drawn]))
    return out


def sample(raw: torch.Tensor, seqs) -> list[int]:
    """One token id per row of `raw` logits (B, V), by each sequence's own SamplingParams and rng; a grammar's
    matcher (structured output) masks its row first and takes the token after."""
    logits = openai_adjust(repeat_penalty(raw, seqs), seqs)
    if any(s.matcher is not None for s in seqs):
        logits = logits.clone() if logits is raw else logits  # the raw logits stay as they are (for logprobs)
        constrain(logits, seqs)
    tokens = logits.argmax(-1)  # (B,) greedy for every row; sampled rows are overwritten below
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    vocab = logits.shape[-1]
    full = [i for i in rows if not 0 < seqs[i].params.top_k < vocab]  # whole vocabulary: one batched op
    if full:
        temp = torch.tensor([seqs[i].params.temperature for i in full], device=logits.device)
        top_p = torch.tensor([seqs[i].params.top_p for i in full], device=logits.device)
        picked = nucleus_sample(torch.softmax(logits[full] / temp[:, None], dim=-1), top_p, [seqs[i].rng for i in full])
        for j, i in enumerate(full):
            tokens[i] = picked[j]
    for i in (i for i in rows if 0 < seqs[i].params.top_k < vocab):  # top-k first: only k candidates to sort
        p = seqs[i].params
        values, ids = logits[i].topk(p.top_k)
        top_p = torch.tensor([p.top_p], device=logits.device)  # on the logits' device (CUDA too)
        probs = top_p_filter(torch.softmax(values / p.temperature, dim=-1)[None], top_p)[0]
        tokens[i] = ids[torch.multinomial(probs, 1, generator=seqs[i].rng)[0]]
    tokens = tokens.tolist()
    advance(seqs, tokens)
    return tokens


def token_logprobs(logits: torch.Tensor, seqs, tokens: list[int]) -> list | None:
    """Per sampled row, (log probability of its token, [(id, log probability)] of the k likeliest) when its
    sequence asks (params.logprobs = k), else None; None when no row asks. From the model's own distribution
    (the logits before penalties, bias and temperature), as vLLM reports them."""
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if not rows:
        return None
    out = [None] * len(seqs)
    lp = torch.log_softmax(logits[rows].float(), dim=-1)  # (R, V)
    for j, i in enumerate(rows):
        k = seqs[i].params.logprobs
        values, ids = lp[j].topk(k) if k else (lp[j][:0], lp[j][:0].long())
        out[i] = (lp[j, tokens[i]].item(), list(zip(ids.tolist(), values.tolist())))
    return out


def make_rng(seed: int | None, device) -> torch.Generator:
    """A generator for one sequence: reproducible when the request gives a seed."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
