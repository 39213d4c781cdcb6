"""Llama-2 model math: ModelArgs (the params.json keys), RMSNorm, rotary embeddings, SwiGLU.

Module attribute names are Meta's checkpoint keys (wq|wk|wv and w1|w3 are each stored stacked, as
one matmul, and state-dict hooks map them to and from their own keys), and the parallel layers
split their weights exactly as Meta's `consolidated.NN.pth` shards do, so one shard loads with one
strict `load_state_dict` and `state_dict()` gives the shard's keys back. The paged KV cache and
the attention of a step are in kv_cache.py; loading, sampling and scheduling live elsewhere.
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

from presets.models.llama.kv_cache import PagedKVCache, PagedStep


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
    # Not in Meta's params.json; set from an HF config.json (hf_checkpoint.py):
    hidden_dim: int | None = None  # the SwiGLU width when given outright (HF's intermediate_size)
    rope_scaling: dict | None = None  # Llama 3.1's "llama3" frequency scaling: factor, low/high_freq_factor, ...

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
        if self.hidden_dim is not None:
            return self.hidden_dim
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


def rope_frequencies(head_dim: int, max_seq_len: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Complex rotations e^(i * pos * theta^(-2k/hd)), shape (max_seq_len, head_dim // 2)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is not None:
        inv = llama3_scaled(inv, scaling)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def llama3_scaled(inv: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1's long-context rope: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    old = s["original_max_position_embeddings"]
    wavelen = 2 * torch.pi / inv
    # 0 where the wavelength is longer than old / low_freq_factor (fully scaled), 1 where shorter than
    # old / high_freq_factor (kept), linear in old / wavelen between.
    smooth = ((old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])).clamp(0, 1)
    return (1 - smooth) * inv / s["factor"] + smooth * inv


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3)... as Meta does. x: (B, T, h, hd); freqs: (B, T, hd/2)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, T, h, hd/2)
    out = torch.view_as_real(xc * freqs.unsqueeze(2)).flatten(3)
    return out.type_as(x)


def stack_in_state_dict(module: nn.Module, stacked: str, parts: list[str], sizes: list[int]) -> None:
    """`module.<stacked>` holds the weights of the checkpoint's `parts` stacked by rows (`sizes` rows each, this
    rank's): loading stacks the parts' keys, and state_dict() gives them back split, under their own names."""

    def stack(module, state, prefix, *_):
        keys = [f"{prefix}{p}.weight" for p in parts]
        if all(k in state for k in keys):  # otherwise strict loading names what is missing
            state[f"{prefix}{stacked}.weight"] = torch.cat([state.pop(k) for k in keys])

    def split(module, state, prefix, _):
        for p, w in zip(parts, state.pop(f"{prefix}{stacked}.weight").split(sizes)):
            state[f"{prefix}{p}.weight"] = w

    module.register_load_state_dict_pre_hook(stack)
    module.register_state_dict_post_hook(split)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        mp = get_model_parallel_world_size()
        n_kv_heads = args.n_kv_heads or args.n_heads
        self.n_local_heads = args.n_heads // mp
        self.n_local_kv_heads = n_kv_heads // mp
        self.head_dim = args.head_dim
        kv_dim = n_kv_heads * self.head_dim
        # wq, wk and wv read the same input: one matmul over their stacked rows (this rank's of each).
        q_dim = args.n_heads * self.head_dim
        self.wqkv = ColumnParallelLinear(
            args.dim, q_dim + 2 * kv_dim, bias=False, gather_output=False, init_method=_keep
        )
        self.qkv_sizes = [s * self.head_dim for s in (self.n_local_heads, self.n_local_kv_heads, self.n_local_kv_heads)]
        stack_in_state_dict(self, "wqkv", ["wq", "wk", "wv"], self.qkv_sizes)
        self.wo = RowParallelLinear(
            args.n_heads * self.head_dim, args.dim, bias=False, input_is_parallel=True, init_method=_keep
        )
        self.cache: PagedKVCache | None = None
        self.lora = None  # {"wqkv": LinearLora, "wo": ...} when adapters are served (lora.py)

    def forward(self, x, freqs, step: PagedStep):
        B, T, _ = x.shape
        qkv = self.wqkv(x)
        if step.lora:
            self.lora["wqkv"].add_to(qkv, x, step.lora)
        qk, v = qkv.split([self.qkv_sizes[0] + self.qkv_sizes[1], self.qkv_sizes[2]], dim=-1)
        qk = apply_rope(qk.view(B, T, -1, self.head_dim), freqs)  # q's and k's heads rotated in one pass
        q, k = qk.split([self.n_local_heads, self.n_local_kv_heads], dim=2)
        v = v.view(B, T, self.n_local_kv_heads, self.head_dim)
        out = step.attend(self.cache, q, k, v, gqa=self.n_local_heads != self.n_local_kv_heads)  # (1, h, N, hd)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return self.wo(out) if not step.lora else self.lora["wo"].add_to(self.wo(out), out, step.lora)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w13 = ColumnParallelLinear(args.dim, 2 * hidden, bias=False, gather_output=False, init_method=_keep)
        self.w2 = RowParallelLinear(hidden, args.dim, bias=False, input_is_parallel=True, init_method=_keep)
        self.local_hidden = hidden // get_model_parallel_world_size()
        stack_in_state_dict(self, "w13", ["w1", "w3"], [self.local_hidden] * 2)
        self.lora = None  # {"w13": LinearLora, "w2": ...} when adapters are served (lora.py)

    def forward(self, x, lora=()):
        """`lora`: the step's adapter segments (PagedStep.lora)."""
        gate_up = self.w13(x) if not lora else self.lora["w13"].add_to(self.w13(x), x, lora)
        gate, up = gate_up.split(self.local_hidden, dim=-1)  # w1 x and w3 x, each (B, T, hidden)
        h = F.silu(gate) * up
        return self.w2(h) if not lora else self.lora["w2"].add_to(self.w2(h), h, lora)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, freqs, step):
        h = x + self.attention(self.attention_norm(x), freqs, step)
        return h + self.feed_forward(self.ffn_norm(h), step.lora)


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

    def kv_bytes_per_token(self) -> int:
        """Bytes of keys and values one token position takes in this rank's caches (all layers)."""
        att = self.layers[0].attention
        return 2 * self.args.n_layers * att.n_local_kv_heads * att.head_dim * self.norm.weight.element_size()

    def setup_caches(self, num_blocks: int, block_size: int, max_seq_len: int):
        """Attach a paged KV cache of `num_blocks` blocks of `block_size` positions to every layer."""
        p = self.norm.weight  # the model's dtype and device (the linear layers may be packed)
        for layer in self.layers:
            att = layer.attention
            att.cache = PagedKVCache(num_blocks, block_size, att.n_local_kv_heads, att.head_dim, p.dtype, p.device)
        freqs = rope_frequencies(self.args.head_dim, max_seq_len, self.args.rope_theta, self.args.rope_scaling)
        self.register_buffer("freqs", freqs.to(p.device), persistent=False)
        self.max_seq_len = max_seq_len

    def forward(self, tokens: torch.Tensor, step: PagedStep, all_logits: bool = False) -> torch.Tensor:
        """Logits (float32) of `tokens` (1, N) run as `step`, which says where they sit in the cache.

        Returns the rows the step samples from (S, V); with all_logits, every token's logits (1, N, V).
        """
        freqs = self.freqs[step.positions]  # (1, N, hd/2)
        h = self.tok_embeddings(tokens)  # (1, N, dim)
        for layer in self.layers:
            h = layer(h, freqs, step)
        h = self.norm(h if all_logits else step.last(h))
        return self.output(h).float()
