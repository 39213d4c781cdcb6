"""Write a GGUF file (llama.cpp's format) from a Llama-2 checkpoint in Meta's layout.

    python -m presets.tools.gguf_export CKPT_DIR OUT.gguf [--tokenizer_path T] [--type f32|f16]

Any shard count: the shards are joined as Meta split them. The SentencePiece vocabulary goes into
the file, so llama.cpp tokenizes as the checkpoint's tokenizer.model does. Meta's q/k rows are
already in the interleaved-pair order llama.cpp's rotary embedding expects, so no weight is
permuted. Used by the tests and `make run-llama-cpp` on tiny checkpoints; real models come as GGUF.
"""

import argparse
import os

import numpy as np
import torch
from gguf import GGUFWriter, TokenType

from presets.models.llama.checkpoint import merge_shards
from presets.models.llama.load import read_args
from presets.models.llama.tokenizer import Tokenizer

# Meta's names -> GGUF's, per layer ("blk.N.") and global.
LAYER_NAMES = {
    "attention_norm": "attn_norm",
    "attention.wq": "attn_q",
    "attention.wk": "attn_k",
    "attention.wv": "attn_v",
    "attention.wo": "attn_output",
    "ffn_norm": "ffn_norm",
    "feed_forward.w1": "ffn_gate",
    "feed_forward.w2": "ffn_down",
    "feed_forward.w3": "ffn_up",
}
GLOBAL_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}


def vocab(tok: Tokenizer) -> tuple[list[bytes], list[float], list[int]]:
    """(pieces, scores, types) of a SentencePiece model as llama.cpp's SPM tokenizer reads them."""
    sp = tok.sp
    pieces, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        pieces.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(TokenType.BYTE)
        elif sp.is_unused(i):
            types.append(TokenType.UNUSED)
        else:
            types.append(TokenType.NORMAL)
    return pieces, scores, types


def export(
    ckpt_dir: str,
    out_path: str,
    tokenizer_path: str | None = None,
    ftype: str = "f32",
    chat_template: str | None = None,
    add_bos: bool = True,
) -> str:
    tok = Tokenizer(tokenizer_path or os.path.join(ckpt_dir, "tokenizer.model"))
    args = read_args(ckpt_dir, tok)
    state = merge_shards(ckpt_dir)
    w = GGUFWriter(out_path, "llama")
    w.add_name(os.path.basename(os.path.normpath(ckpt_dir)))
    w.add_context_length(4096)  # Llama-2's training context; the server's ctx_size sets what is used
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.ffn_hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads or args.n_heads)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_dimension_count(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_file_type(0 if ftype == "f32" else 1)  # LLAMA_FTYPE_ALL_F32 / MOSTLY_F16
    w.add_tokenizer_model("llama")
    pieces, scores, types = vocab(tok)
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_unk_token_id(tok.sp.unk_id())
    w.add_add_bos_token(add_bos)  # Llama's tokenizer adds BOS; tests also make files that do not
    w.add_add_eos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    for key, t in sorted(state.items()):
        name = key.removesuffix(".weight")
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            gguf_name = f"blk.{i}.{LAYER_NAMES[rest]}.weight"
        else:
            gguf_name = f"{GLOBAL_NAMES[name]}.weight"
        array = t.to(torch.float32).numpy()
        if ftype == "f16" and array.ndim == 2:  # norms stay f32, as llama.cpp's converter keeps them
            array = array.astype(np.float16)
        w.add_tensor(gguf_name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt_dir")
    ap.add_argument("out_path")
    ap.add_argument("--tokenizer_path", default=None, help="default: CKPT_DIR/tokenizer.model")
    ap.add_argument("--type", choices=["f32", "f16"], default="f32", dest="ftype")
    ap.add_argument("--chat_template_file", default=None, help="a Jinja chat template to store in the file")
    a = ap.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(a.out_path)), exist_ok=True)
    template = None
    if a.chat_template_file:
        with open(a.chat_template_file, encoding="utf-8") as f:
            template = f.read()
    export(a.ckpt_dir, a.out_path, a.tokenizer_path, a.ftype, template)
    print(f"wrote {a.out_path}")


if __name__ == "__main__":
    main()
