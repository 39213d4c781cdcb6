"""Load a HuggingFace LlamaForCausalLM folder (config.json, *.safetensors) into our model, this rank's slice only.

HF's q_proj/k_proj rows rotate halves of each head (x_i with x_{i+hd/2}); Meta's, and our model's, rotate
interleaved pairs (x_2i with x_2i+1): the rows of each head are reordered at load. Every file is read
memory-mapped and each rank reads only the rows or columns of its own shard, so a 70B folder loads on
8 ranks without any rank holding the whole of it.
"""

import logging
import os
import time

import torch

from presets.models.llama.json_files import read_json
from presets.models.llama.layout import CheckpointError, split_dim, transfer_rate
from presets.models.llama.model import ModelArgs, Transformer

log = logging.getLogger(__name__)

# Our key (per layer: "layers.N." + key) -> HF's key ("model.layers.N." + key).
LAYER_KEYS = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_KEYS = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
# config.json values that change the maths from ours: (key, the value we implement). Anything else is refused.
MUST_BE = (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False), ("quantization_config", None))
ROPE_TYPES = ("default", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def read_config(ckpt_dir: str) -> dict:
    return read_json(os.path.join(ckpt_dir, "config.json"), CheckpointError)


def read_hf_args(ckpt_dir: str, max_seq_len: int | None = None) -> ModelArgs:
    """ModelArgs from config.json; a start error names the architecture or field we do not implement."""
    c = read_config(ckpt_dir)
    where = os.path.join(ckpt_dir, "config.json")
    archs = c.get("architectures") or ["LlamaForCausalLM"]
    if c.get("model_type", "llama") != "llama" or "LlamaForCausalLM" not in archs:
        raise CheckpointError(
            f"{where}: architecture {archs} (model_type {c.get('model_type')!r}) is not supported by the Llama "
            "engine, which runs LlamaForCausalLM; serve others with the HF server (presets/inference/falcon)"
        )
    for key, value in MUST_BE:
        if c.get(key) not in (None, value):
            raise CheckpointError(f"{where}: {key}={c[key]!r} is not supported (the Llama engine implements {value!r})")
    try:
        dim, n_heads = c["hidden_size"], c["num_attention_heads"]
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}  # transformers 5 / 4 spell it differently
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise CheckpointError(f"{where}: rope type {rope_type!r} is not supported (supported: {ROPE_TYPES})")
        missing = [k for k in LLAMA3_KEYS if k not in rope] if rope_type == "llama3" else []
        if missing:
            raise CheckpointError(f"{where}: rope type 'llama3' needs {missing}")
        if c.get("head_dim") not in (None, dim // n_heads):
            raise CheckpointError(f"{where}: head_dim {c['head_dim']} is not hidden_size / num_attention_heads")
        args = ModelArgs(
            dim=dim,
            n_layers=c["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=c.get("num_key_value_heads") or n_heads,
            vocab_size=c["vocab_size"],
            norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(c.get("rope_theta") or rope.get("rope_theta", 1e4)),
            hidden_dim=c["intermediate_size"],
            rope_scaling=rope if rope_type == "llama3" else None,
        )
    except KeyError as e:
        raise CheckpointError(f"{where}: missing {e.args[0]}") from e
    if dim % n_heads or n_heads % args.n_kv_heads:
        raise CheckpointError(f"{where}: hidden_size must divide by num_attention_heads, that by num_key_value_heads")
    longest = c.get("max_position_embeddings")
    if max_seq_len and longest and max_seq_len > longest:
        raise CheckpointError(f"--max_seq_len {max_seq_len} is over the model's max_position_embeddings {longest}")
    return args


def weight_files(ckpt_dir: str) -> dict[str, str]:
    """HF key -> the safetensors file holding it (one file, or several listed by model.safetensors.index.json)."""
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        files = {k: os.path.join(ckpt_dir, v) for k, v in weight_map.items()}
        absent = sorted({os.path.basename(p) for p in files.values() if not os.path.isfile(p)})
        if absent:
            raise CheckpointError(f"{index} names files that are not in {ckpt_dir}: {absent[:4]}")
        return files
    single = os.path.join(ckpt_dir, "model.safetensors")
    if not os.path.isfile(single):
        bins = [f for f in os.listdir(ckpt_dir) if f.endswith(".bin")]
        hint = f" (it has {bins[:2]}: convert them to safetensors)" if bins else ""
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {ckpt_dir}{hint}")
    from safetensors import safe_open

    try:
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    except Exception as e:  # safetensors raises its own error type for a truncated or foreign file
        raise CheckpointError(f"cannot read {single}: {type(e).__name__}: {e}") from e


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from HF's half rotation to Meta's interleaved pairs, per head: (h, 2, hd/2) -> (h, hd/2, 2)."""
    out, d = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, d).transpose(1, 2).reshape(out, d)


def hf_key(ours: str) -> str:
    name = ours.removesuffix(".weight")
    if name.startswith("layers."):
        _, n, rest = name.split(".", 2)
        return f"model.layers.{n}.{LAYER_KEYS[rest]}.weight"
    return f"{TOP_KEYS[name]}.weight"


def check_split(args: ModelArgs, mp_size: int) -> None:
    """Each rank takes an equal share of the heads, the vocabulary and the widths: the rank count must divide them."""
    sizes = {
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
    }
    for name, size in sizes.items():
        if size % mp_size:
            raise CheckpointError(
                f"config.json's {name} {size} does not split over {mp_size} ranks; run with a rank count that "
                "divides the heads, key/value heads, vocabulary and widths"
            )


def load_hf_model(ckpt_dir, args: ModelArgs, mp_rank, mp_size, device, dtype, progress=log.info) -> Transformer:
    """Build the model for rank `mp_rank` and fill it from the folder's safetensors, strictly, slicing at read."""
    from safetensors import safe_open

    check_split(args, mp_size)
    files = weight_files(ckpt_dir)
    tied = read_config(ckpt_dir).get("tie_word_embeddings", False)  # the output layer reads the embedding
    model = Transformer(args)  # parameters are uninitialized; every one is replaced below
    expected = {k: v.shape for k, v in model.state_dict().items()}
    wanted = {hf_key(k) for k in expected} - ({"lm_head.weight"} if tied else set())
    missing = sorted(wanted - set(files))
    ignored = ("rotary_emb.inv_freq", "lm_head.weight") if tied else ("rotary_emb.inv_freq",)  # as transformers
    unexpected = sorted(k for k in set(files) - wanted if not k.endswith(ignored))
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt_dir} does not match config.json: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    progress(f"loading {len(set(files.values()))} safetensors file(s) from {ckpt_dir}, rank {mp_rank} of {mp_size}")
    handles, state, done, t0 = {}, {}, 0, time.perf_counter()
    try:
        for i, (key, shape) in enumerate(expected.items()):
            src = "model.embed_tokens.weight" if tied and key == "output.weight" else hf_key(key)
            path = files[src]
            if path not in handles:
                handles[path] = safe_open(path, framework="pt")
            t = _read_slice(handles[path].get_slice(src), src, key, shape, args, mp_rank, mp_size)
            done += t.numel() * t.element_size()
            state[key] = t.to(device).to(dtype)  # converted on the device
            if i % 32 == 31:
                progress(f"loaded {i + 1} of {len(expected)} tensors")
    except CheckpointError:
        raise
    except Exception as e:  # a truncated or malformed file: say which
        raise CheckpointError(f"cannot read the weights in {ckpt_dir}: {type(e).__name__}: {e}") from e
    seconds = time.perf_counter() - t0
    progress(f"weights on {device} in {seconds:.1f} s ({transfer_rate(done, seconds, device)})")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _read_slice(sl, src: str, key: str, shape, args: ModelArgs, rank: int, mp: int) -> torch.Tensor:
    """This rank's part of one HF tensor, as our parameter `key` (of local `shape`) holds it."""
    dim = split_dim(key)
    full = list(shape)
    if dim is not None:
        full[dim] *= mp
    if list(sl.get_shape()) != full:
        raise CheckpointError(f"{src} has shape {tuple(sl.get_shape())}; config.json implies {tuple(full)}")
    if dim is None:
        t = sl[:]
    else:
        lo, hi = rank * shape[dim], (rank + 1) * shape[dim]
        t = sl[lo:hi] if dim == 0 else sl[:, lo:hi]
    if key.endswith(("attention.wq.weight", "attention.wk.weight")):
        t = to_interleaved(t, shape[0] // args.head_dim)  # this rank's heads only: rows never cross a head
    return t
