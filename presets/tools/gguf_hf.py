"""Write a GGUF file (llama.cpp's format) from a HuggingFace Llama model folder, in f32, f16 or Q8_0.

    python -m presets.tools.gguf_hf MODEL_DIR OUT.gguf [--type f32|f16|q8_0]

For the peer benchmark (bench_peer.py): llama.cpp then runs the very weights our server loads from
MODEL_DIR (config.json, model.safetensors, a byte-level BPE tokenizer.json as SmolLM2's). What
llama.cpp's own converter (convert_hf_to_gguf.py) does for this architecture, and no more:

- q_proj/k_proj rows are permuted from HuggingFace's rotate-half order back into the interleaved pairs
  llama.cpp's rotary embedding expects (k with the KV head count);
- the vocabulary goes in as a "gpt2" (byte-level BPE) tokenizer, "gpt-2" pre-tokenizer, with its merges,
  added special tokens as control tokens; BOS is added only when the tokenizer.json's post-processor adds one;
- tied embeddings write no output.weight (llama.cpp then uses token_embd.weight);
- norms stay f32 in every type; in Q8_0 every matrix is quantized (the embeddings too), as
  `convert_hf_to_gguf.py --outtype q8_0` does, by gguf's reference quantizer (numpy).
"""

import argparse
import os

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize
from safetensors.torch import load_file

from presets.models.llama.json_files import read_json

# HuggingFace's names -> GGUF's, per layer ("model.layers.N." -> "blk.N.") and global.
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0}


def unrotate(w: np.ndarray, n_heads: int) -> np.ndarray:
    """A q or k projection's rows from HuggingFace's order (each head: first halves, then second halves of the
    rotary pairs) to Meta's interleaved pairs, which llama.cpp's LLAMA architecture rotates."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_weights(model_dir: str) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors file(s), as float32 numpy arrays (bf16 files too: through torch)."""
    names = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not names:
        raise SystemExit(f"{model_dir}: no .safetensors file")
    state = {}
    for name in names:
        state.update(load_file(os.path.join(model_dir, name)))
    return {k: v.float().numpy() for k, v in state.items()}


def bpe_vocab(model_dir: str) -> dict:
    """The byte-level BPE tokenizer of tokenizer.json as llama.cpp's "gpt2" tokenizer reads it."""
    tok = read_json(os.path.join(model_dir, "tokenizer.json"))
    model = tok["model"]
    if model["type"] != "BPE" or (tok.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise SystemExit(f"{model_dir}: only a byte-level BPE tokenizer.json is supported")
    # llama.cpp names its pre-tokenizers; "gpt-2" is ByteLevel's own regex, which is all this tokenizer.json
    # splits with (SmolLM2's original tokenizer also splits digits, llama.cpp's "smollm": not this one).
    if not tok["pre_tokenizer"].get("use_regex", True):
        raise SystemExit(f"{model_dir}: a ByteLevel pre-tokenizer without its regex has no llama.cpp name")
    vocab = model["vocab"] | {t["content"]: t["id"] for t in tok["added_tokens"]}
    pieces = [""] * (max(vocab.values()) + 1)
    for piece, i in vocab.items():
        pieces[i] = piece
    special = {t["id"] for t in tok["added_tokens"] if t["special"]}
    added = {t["id"] for t in tok["added_tokens"]} - special
    types = [
        TokenType.CONTROL if i in special else TokenType.USER_DEFINED if i in added else TokenType.NORMAL
        for i in range(len(pieces))
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    post = tok.get("post_processor") or {}
    add_bos = post.get("type") == "TemplateProcessing" and any("SpecialToken" in p for p in post.get("single", []))
    return {"pieces": pieces, "types": types, "merges": merges, "add_bos": add_bos}


def tensor_for(array: np.ndarray, ftype: str) -> tuple[np.ndarray, GGMLQuantizationType | None]:
    """The array to write for one tensor in file type `ftype`, and its quantized type when it is packed."""
    if array.ndim == 1 or ftype == "f32":  # norms stay f32, as llama.cpp's converter keeps them
        return array, None
    if ftype == "f16":
        return array.astype(np.float16), None
    return quantize(array, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0


def export(model_dir: str, out_path: str, ftype: str = "f32") -> str:
    """Write MODEL_DIR's Llama model into the GGUF file out_path in `ftype` (f32, f16 or q8_0); returns out_path."""
    config = read_json(os.path.join(model_dir, "config.json"))
    if config.get("model_type") != "llama":
        raise SystemExit(f"{model_dir}: model_type {config.get('model_type')!r}, only llama is supported")
    rope = config.get("rope_parameters") or {"rope_type": "default", "rope_theta": config.get("rope_theta", 10000.0)}
    if (config.get("rope_scaling") or {}).get("rope_type", "default") != "default" or rope["rope_type"] != "default":
        raise SystemExit(f"{model_dir}: rope scaling is not supported")
    n_heads, n_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    vocab = bpe_vocab(model_dir)

    tmp_path = f"{out_path}.tmp-{os.getpid()}"  # renamed at the end: an interrupted export leaves no .gguf
    w = GGUFWriter(tmp_path, "llama")
    w.add_name(os.path.basename(os.path.normpath(model_dir)))
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_vocab_size(config["vocab_size"])
    w.add_file_type(FILE_TYPES[ftype])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(vocab["pieces"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    w.add_add_bos_token(vocab["add_bos"])
    for key, add in (
        ("bos_token_id", w.add_bos_token_id),
        ("eos_token_id", w.add_eos_token_id),
        ("pad_token_id", w.add_pad_token_id),
        ("unk_token_id", w.add_unk_token_id),
    ):
        if isinstance(config.get(key), int):
            add(config[key])
    template = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            w.add_chat_template(f.read())

    state = load_weights(model_dir)
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # llama.cpp reads token_embd.weight as the output when output is absent
    for key, array in state.items():
        name = key.removesuffix(".weight")
        if name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            gguf_name = f"blk.{i}.{LAYER_NAMES[rest]}.weight"
            if rest == "self_attn.q_proj":
                array = unrotate(array, n_heads)
            elif rest == "self_attn.k_proj":
                array = unrotate(array, n_kv)
        else:
            gguf_name = f"{GLOBAL_NAMES[name]}.weight"
        data, raw_dtype = tensor_for(array, ftype)
        w.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp_path, out_path)
    return out_path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("out_path")
    ap.add_argument("--type", choices=sorted(FILE_TYPES), default="f32", dest="ftype")
    a = ap.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(a.out_path)), exist_ok=True)
    export(a.model_dir, a.out_path, a.ftype)
    print(f"wrote {a.out_path}")


if __name__ == "__main__":
    main()
