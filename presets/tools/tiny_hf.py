"""Write tiny random-weight HuggingFace model folders (Falcon, Llama) with a tokenizer trained here.

    python -m presets.tools.tiny_hf OUT_DIR [--arch falcon|llama]

For tests and demos of the HuggingFace server: nothing is downloaded. The weights are random.
"""

import argparse
import os

import torch

from presets.tools.tiny_checkpoint import CORPUS

# Llama-2's chat format as a Jinja chat template (system prompt folded into the first user turn).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + (sys if loop.first else '') + "
    "m['content'].strip() + ' [/INST]' }}{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def train_tokenizer(special: list[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on corpus.txt, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def write_falcon(out_dir: str, seed: int = 0, hidden_size: int = 64, layers: int = 2, heads: int = 4) -> str:
    from transformers import FalconConfig, FalconForCausalLM

    tokenizer = train_tokenizer(["<|endoftext|>"])
    tokenizer.eos_token = tokenizer.bos_token = "<|endoftext|>"
    eos = tokenizer.eos_token_id
    config = FalconConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    torch.manual_seed(seed)
    FalconForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_llama(
    out_dir: str,
    seed: int = 0,
    tie: bool = False,
    rope: dict | None = None,
    max_shard_size: str | None = None,
    heads: tuple[int, int] = (4, 2),
) -> str:
    """A LlamaForCausalLM folder: GQA `heads` (query, key/value), optionally tied embeddings, other rope
    parameters (`rope`: rope_theta, or Llama 3.1's rope_type "llama3" with its factors) and sharded safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(["<unk>", "<s>", "</s>"])
    tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token = "<unk>", "<s>", "</s>"
    tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=heads[0],
        num_key_value_heads=heads[1],
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, **(rope or {})},
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--arch", choices=["falcon", "llama"], default="falcon")
    a = ap.parse_args(argv)
    os.makedirs(a.out_dir, exist_ok=True)
    (write_falcon if a.arch == "falcon" else write_llama)(a.out_dir)
    print(f"wrote a random-weight {a.arch} folder to {a.out_dir}")


if __name__ == "__main__":
    main()
