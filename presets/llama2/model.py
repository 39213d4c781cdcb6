"""Llama-2 model math: ModelArgs (the params.json keys), RMSNorm, rotary embeddings, SwiGLU, KV cache.

Module attribute names are exactly Meta's checkpoint keys, and the parallel layers split their
weights exactly as Meta's `consolidated.NN.pth` shards do, so one shard loads with one strict
`load_state_dict`. Loading, sampling and scheduling live elsewhere.
"""

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
)
from torch import nn


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # grouped-query attention (70B uses 8)
    vocab_size: int = -1  # -1: take the tokenizer's size
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # not in Llama-2's params.json; Code Llama sets it

    @classmethod
    def from_params(cls, params: dict) -> "ModelArgs":
        """Build from a params.json dict; unknown keys are an error, not silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"params.json has unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**params)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


def _keep(weight: torch.Tensor) -> torch.Tensor:
    # init_method for fairscale layers: weights come from the checkpoint, so skip random init.
    return weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in float32, as Meta's, in one fused op instead of five.
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x) * self.weight


def rope_frequencies(head_dim: int, max_seq_len: int, theta: float) -> torch.Tensor:
    """Complex rotations e^(i * pos * theta^(-2k/hd)), shape (max_seq_len, head_dim // 2)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3)... as Meta does. x: (B, T, h, hd); freqs: (B, T, hd/2)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, T, h, hd/2)
    out = torch.view_as_real(xc * freqs.unsqueeze(2)).flatten(3)
    return out.type_as(x)


class KVCache(nn.Module):
    """Keys and values for `max_batch_size` slots of `max_seq_len` positions each."""

    def __init__(self, slots: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (slots, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # Optional attention for Decode steps, fn(cache, step, q, k, v); cpu_kernels sets one on CPU.
        self.decode_kernel = None

    def write(self, rows, positions, k, v) -> None:
        """Store k, v (B, T, kvh, hd) at cache (rows, positions); rows broadcasts to positions (B, T)."""
        self.k[rows, :, positions] = k
        self.v[rows, :, positions] = v


@dataclass
class Prefill:
    """Whole prompts from position 0, packed into one row of N tokens (no padding)."""

    rows: torch.Tensor  # (1, N): the cache slot of each token
    positions: torch.Tensor  # (1, N): each token's position in its own prompt
    lengths: list[int]  # prompt lengths, in packing order

    @classmethod
    def build(cls, slots: list[int], prompts: list[list[int]], device) -> tuple[torch.Tensor, "Prefill"]:
        """(tokens (1, N), plan) for prompts[i] going into cache slot slots[i]."""
        lengths = [len(p) for p in prompts]
        tokens = torch.tensor([[t for p in prompts for t in p]], device=device)
        rows = torch.repeat_interleave(torch.tensor(slots, device=device), torch.tensor(lengths, device=device))
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])
        return tokens, cls(rows[None], positions[None], lengths)

    def attend(self, cache: KVCache, q, k, v, gqa: bool) -> torch.Tensor:
        cache.write(self.rows, self.positions, k, v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (1, heads, N, hd)
        outs, start = [], 0
        for n in self.lengths:  # each prompt attends causally to itself only
            seg = slice(start, start + n)
            outs.append(
                F.scaled_dot_product_attention(q[:, :, seg], k[:, :, seg], v[:, :, seg], is_causal=True, enable_gqa=gqa)
            )
            start += n
        return torch.cat(outs, dim=2)  # (1, h, N, hd)

    def last(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states of each prompt's last token: (1, N, dim) -> (S, dim)."""
        ends = torch.tensor(self.lengths, device=h.device).cumsum(0) - 1
        return h[0, ends]


@dataclass
class Decode:
    """One new token for each of B sequences, each at its own position."""

    slots: slice | torch.Tensor  # (B,) slot ids, or a slice when they are consecutive (no copies)
    positions: torch.Tensor  # (B, 1)
    mask: torch.Tensor  # (B, 1, 1, L): 0 where a key may be attended to, -inf elsewhere
    length: int  # L: keys needed, the longest sequence's prefix

    @classmethod
    def build(cls, slots: list[int], positions: list[int], device, dtype) -> "Decode":
        if slots == list(range(slots[0], slots[0] + len(slots))):
            slot_index = slice(slots[0], slots[0] + len(slots))
        else:
            slot_index = torch.tensor(slots, device=device)
        pos = torch.tensor(positions, device=device)[:, None]
        length = max(positions) + 1
        # Additive, in the model's dtype, built once per step: a boolean mask is converted to this
        # inside every layer's attention call (about 10% of the attention time on CPU).
        beyond = torch.arange(length, device=device) > pos[..., None]  # (B, 1, L)
        mask = torch.zeros(beyond.shape, dtype=dtype, device=device).masked_fill_(beyond, float("-inf"))
        return cls(slot_index, pos, mask[:, None], length)

    def attend(self, cache: KVCache, q, k, v, gqa: bool) -> torch.Tensor:
        if cache.decode_kernel is not None:
            return cache.decode_kernel(cache, self, q, k, v)
        s = self.slots
        rows = torch.arange(s.start, s.stop, device=k.device) if isinstance(s, slice) else s
        cache.write(rows[:, None], self.positions, k, v)
        keys, values = cache.k[s, :, : self.length], cache.v[s, :, : self.length]  # (B, kvh, L, hd)
        return F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=self.mask, enable_gqa=gqa)

    def last(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, -1]  # (B, 1, dim) -> (B, dim)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        mp = get_model_parallel_world_size()
        n_kv_heads = args.n_kv_heads or args.n_heads
        self.n_local_heads = args.n_heads // mp
        self.n_local_kv_heads = n_kv_heads // mp
        self.head_dim = args.head_dim
        kv_dim = n_kv_heads * self.head_dim
        col = dict(bias=False, gather_output=False, init_method=_keep)
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * self.head_dim, **col)
        self.wk = ColumnParallelLinear(args.dim, kv_dim, **col)
        self.wv = ColumnParallelLinear(args.dim, kv_dim, **col)
        self.wo = RowParallelLinear(
            args.n_heads * self.head_dim, args.dim, bias=False, input_is_parallel=True, init_method=_keep
        )
        self.cache: KVCache | None = None

    def project(self, x):
        """(q, k, v) of x (B, T, dim), each (B, T, heads * hd); cpu_kernels swaps in one fused matmul."""
        return self.wq(x), self.wk(x), self.wv(x)

    def forward(self, x, freqs, step: Prefill | Decode):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.n_local_heads, self.head_dim)
        k = k.view(B, T, self.n_local_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        out = step.attend(self.cache, q, k, v, gqa=self.n_local_heads != self.n_local_kv_heads)  # (B, h, T, hd)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = ColumnParallelLinear(args.dim, hidden, bias=False, gather_output=False, init_method=_keep)
        self.w2 = RowParallelLinear(hidden, args.dim, bias=False, input_is_parallel=True, init_method=_keep)
        self.w3 = ColumnParallelLinear(args.dim, hidden, bias=False, gather_output=False, init_method=_keep)

    def gate_up(self, x):
        """(w1 x, w3 x), each (B, T, hidden); cpu_kernels swaps in one fused matmul."""
        return self.w1(x), self.w3(x)

    def forward(self, x):
        gate, up = self.gate_up(x)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, freqs, step):
        h = x + self.attention(self.attention_norm(x), freqs, step)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size < 1:
            raise ValueError("ModelArgs.vocab_size must be resolved from the tokenizer before building the model")
        self.args = args
        self.tok_embeddings = ParallelEmbedding(args.vocab_size, args.dim, init_method=_keep)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = ColumnParallelLinear(args.dim, args.vocab_size, bias=False, init_method=_keep)
        self.max_seq_len = 0

    def setup_caches(self, max_batch_size: int, max_seq_len: int):
        """Attach a KV cache of `max_batch_size` slots x `max_seq_len` positions to every layer."""
        p = self.output.weight
        for layer in self.layers:
            att = layer.attention
            att.cache = KVCache(max_batch_size, max_seq_len, att.n_local_kv_heads, att.head_dim, p.dtype, p.device)
        freqs = rope_frequencies(self.args.head_dim, max_seq_len, self.args.rope_theta)
        self.register_buffer("freqs", freqs.to(p.device), persistent=False)
        self.max_seq_len = max_seq_len

    def forward(self, tokens: torch.Tensor, step: Prefill | Decode, all_logits: bool = False) -> torch.Tensor:
        """Logits (float32) of `tokens` (B, T) run as `step`, which says where they sit in the cache.

        Returns one row per sequence for its last token: (S, V) for a Prefill of S prompts, (B, V)
        for a Decode; with all_logits, every position's logits (B, T, V).
        """
        freqs = self.freqs[step.positions]  # (B, T, hd/2)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, freqs, step)
        h = self.norm(h if all_logits else step.last(h))
        return self.output(h).float()
