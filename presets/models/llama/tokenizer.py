"""Tokenizers of the Llama engine: Meta's SentencePiece `tokenizer.model` or a HuggingFace `tokenizer.json`.

`load_tokenizer` tells them apart by content, not by name. Both answer the same calls: encode(text, bos,
eos), decode(ids, special), token_strs(ids), n_words, bos_id, eos_id and eos_ids (every id that ends a
generation, e.g. Llama 3's <|end_of_text|> and <|eot_id|>), and chat_template (the model's own, or None for
Meta's Llama-2 format).
"""

import logging
import os

from presets.models.chat_template import ChatTemplate, ChatTemplateError, load_chat_template, special_tokens
from presets.models.llama.json_files import read_json
from presets.models.llama.layout import is_hf_folder

log = logging.getLogger(__name__)


class TokenizerError(Exception):
    """A tokenizer file that cannot be used; the message says why."""


class Tokenizer:
    """SentencePiece tokenizer as Meta's Llama-2 uses it (BOS 1, EOS 2, no pad)."""

    chat_template: ChatTemplate | None = None

    def __init__(self, model_path: str):
        from sentencepiece import SentencePieceProcessor

        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        self.sp = SentencePieceProcessor(model_file=model_path)
        self.n_words = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.eos_ids = (self.eos_id,)

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int], special: bool = False) -> str:
        """special: control tokens (BOS, EOS) written as their text ("<s>") instead of left out."""
        if not special:
            return self.sp.decode(ids)
        out, run = [], []
        for i in ids:
            if self.sp.is_control(i):
                out += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def token_strs(self, ids: list[int]) -> list[str]:
        return [self.sp.id_to_piece(i) for i in ids]


class HFTokenizer:
    """A tokenizer.json (the `tokenizers` package), with its special tokens and chat template from the files
    beside it (tokenizer_config.json, chat_template.jinja) and the model's EOS ids from `model_dir`'s
    config.json and generation_config.json (the tokenizer's folder when no model folder is given)."""

    def __init__(self, path: str, model_dir: str | None = None):
        from tokenizers import Tokenizer as Fast

        try:
            self.tok = Fast.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise TokenizerError(f"{path}: not a tokenizer.json the tokenizers package can read: {e}") from e
        self.n_words = self.tok.get_vocab_size(with_added_tokens=True)
        self.path = path  # structured output reads the file itself (llguidance)
        folder = os.path.dirname(os.path.abspath(path))
        try:
            special = special_tokens(folder)
            self.chat_template = load_chat_template(folder)
        except ChatTemplateError as e:
            raise TokenizerError(f"{folder}: {e}") from e
        self.bos_id = self._id(special.get("bos_token"))
        eos = [self._id(special.get("eos_token"))]
        for name in ("config.json", "generation_config.json"):  # generation_config's list of stop ids first
            value = read_json(os.path.join(model_dir or folder, name), TokenizerError, required=False).get(
                "eos_token_id"
            )
            eos = (value if isinstance(value, list) else [value]) + eos
        self.eos_ids = tuple(dict.fromkeys(i for i in eos if i is not None))
        if not self.eos_ids:
            raise TokenizerError(f"{folder}: no EOS token in tokenizer_config.json, config.json or generation_config")
        self.eos_id = self.eos_ids[0]
        if self.bos_id is None:  # a model without BOS (GPT-2-style BPE): the warm-up step may start from EOS
            self.bos_id = self.eos_id

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        """bos: add what the tokenizer adds to a prompt (its post-processor: BOS for Llama, nothing for GPT-2 BPE)."""
        return self.tok.encode(text, add_special_tokens=bos).ids + [self.eos_id] * eos

    def decode(self, ids: list[int], special: bool = False) -> str:
        """special: special tokens written as their text ("<|im_start|>") instead of left out."""
        return self.tok.decode(ids, skip_special_tokens=not special)

    def token_strs(self, ids: list[int]) -> list[str]:
        return [self.tok.id_to_token(i) for i in ids]


def find_tokenizer(ckpt_dir: str, tokenizer_path: str = "") -> str:
    """The tokenizer file: `tokenizer_path` when given, else the checkpoint folder's tokenizer.json or
    tokenizer.model (tokenizer.json first in a HuggingFace folder, which may carry both)."""
    if tokenizer_path:
        if not os.path.isfile(tokenizer_path):
            raise TokenizerError(f"tokenizer not found: {tokenizer_path}")
        return tokenizer_path
    names = ("tokenizer.json", "tokenizer.model") if is_hf_folder(ckpt_dir) else ("tokenizer.model", "tokenizer.json")
    for name in names:
        if os.path.isfile(os.path.join(ckpt_dir, name)):
            return os.path.join(ckpt_dir, name)
    raise TokenizerError(f"no tokenizer.model or tokenizer.json in {ckpt_dir}; give one with --tokenizer_path")


def load_tokenizer(path: str, model_dir: str | None = None) -> Tokenizer | HFTokenizer:
    """The tokenizer in `path`, told by its content: JSON is a tokenizer.json, else a SentencePiece model
    (which has no chat template here: the Llama-2 format is written for it; see api/chat.py)."""
    with open(path, "rb") as f:
        head = f.read(256).lstrip()
    if head.startswith(b"{"):
        return HFTokenizer(path, model_dir)
    try:
        tok = Tokenizer(path)
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"{path} is neither a SentencePiece tokenizer.model nor a tokenizer.json") from e
    folder = model_dir or os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(folder, "chat_template.jinja")) or "chat_template" in read_json(
        os.path.join(folder, "tokenizer_config.json"), TokenizerError, required=False
    ):
        # A template writes its special tokens as text ("<s>"), which SentencePiece cannot turn into their ids.
        log.warning("%s has a chat template, used only with a tokenizer.json; chat uses Llama-2's format", folder)
    return tok
