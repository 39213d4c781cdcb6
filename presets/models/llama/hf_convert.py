"""Convert a full (single-shard) Meta state dict to transformers' LlamaForCausalLM, for reference checks."""

import torch

from presets.models.llama.hf_checkpoint import hf_key
from presets.models.llama.model import ModelArgs


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # Meta rotates interleaved pairs (x0, x1); HF rotates halves (x0, x_hd/2). Reorder q/k rows to match.
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_config(args: ModelArgs, max_position_embeddings: int = 4096):
    """transformers' LlamaConfig of the model `args` describe."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads or args.n_heads,
        rms_norm_eps=args.norm_eps,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )


def to_hf(args: ModelArgs, state: dict[str, torch.Tensor], max_position_embeddings: int = 4096):
    """A transformers LlamaForCausalLM (fp32, eval) holding the same weights as `state`."""
    from transformers import LlamaForCausalLM

    n_kv = args.n_kv_heads or args.n_heads
    config = hf_config(args, max_position_embeddings)
    hf = {hf_key(key): w for key, w in state.items() if key != "rope.freqs"}  # (Meta's table; HF recomputes it)
    for i in range(args.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        hf[dst + "self_attn.q_proj.weight"] = _unpermute(state[src + "attention.wq.weight"], args.n_heads)
        hf[dst + "self_attn.k_proj.weight"] = _unpermute(state[src + "attention.wk.weight"], n_kv)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict({k: v.float() for k, v in hf.items()}, strict=True, assign=True)
    model.model.rotary_emb.__init__(config)  # meta-device buffers: recompute the rotary table
    return model.eval()
