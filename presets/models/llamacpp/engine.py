"""Step engine on llama.cpp (through llama-cpp-python's C bindings): runs the EngineLoop's step plans.

Slot i of the scheduler is llama.cpp sequence i of one context; each sequence has its own KV stream
of ctx_size positions, so up to max_batch_size requests decode together in one llama_decode call.
One more sequence, after the slots, is used by embeddings. Only the engine thread calls the model;
the HTTP routes tokenize with a vocabulary-only copy of the file (llama.cpp's tokenizer is read-only,
and llama.cpp's own server tokenizes on its HTTP threads too).
"""

import ctypes
import logging

import llama_cpp
import numpy as np
import torch

from presets.engine.step_loop import KVConfig
from presets.models.chat_template import ChatTemplate, ChatTemplateError
from presets.process.device import cpu_flags

log = logging.getLogger(__name__)

_GGML_LOG_WARN, _GGML_LOG_ERROR = 3, 4  # ggml_log_level; DEBUG/INFO (the loading chatter) are dropped


@llama_cpp.llama_log_callback
def _log_to_python(level, text, _user_data):
    if level in (_GGML_LOG_WARN, _GGML_LOG_ERROR) and text:
        log.warning("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


class LlamaCppError(Exception):
    """The model file cannot be loaded, or llama.cpp refused a step."""


def extra_buffers_safe(system_info: str, flags: frozenset[str]) -> bool:
    """Whether llama.cpp may repack weights into its extra buffer types (llama_model_params.use_extra_bufts).

    Not where this llama.cpp was built with AMX kernels and the CPU has AMX: its AMX buffer type, first of
    the extra ones, takes the quantized weights, and its matmul crashes the process (ggml-org/llama.cpp#20824).
    Our build compiles no AMX kernels (requirements-llama-cpp.cmake); this guards a llama-cpp-python built
    otherwise, at the cost of its other repacked layouts on that CPU."""
    return not ("AMX_INT8 = 1" in system_info and "amx_int8" in flags)


class LlamaCppTokenizer:
    """The GGUF file's own vocabulary (loaded alone, without weights): what the routes need of a tokenizer.
    Never freed: the HTTP routes may use it until the process exits."""

    def __init__(self, path: str):
        mp = llama_cpp.llama_model_default_params()
        mp.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise LlamaCppError(f"llama.cpp cannot read the vocabulary of {path} (see the llama.cpp messages above)")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_words = llama_cpp.llama_vocab_n_tokens(self.vocab)
        bos, self.eos_id = llama_cpp.llama_vocab_bos(self.vocab), llama_cpp.llama_vocab_eos(self.vocab)
        self.bos_text, self.eos_text = self.special_text(bos), self.special_text(self.eos_id)  # for chat templates
        self.bos_id = bos if bos >= 0 else self.eos_id  # a model without BOS: the warm-up step starts from EOS
        self.add_bos = llama_cpp.llama_vocab_get_add_bos(self.vocab)
        self._pieces: dict[int, bytes] = {}
        self.chat_template = self._chat_template()

    def special_text(self, token: int) -> str:
        """How a control token (BOS, EOS) is written in text, e.g. "<s>"; "" for none (-1)."""
        if token < 0:
            return ""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", "replace")

    def encode(self, text: str, bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of `text`, after BOS when the model adds one; special: "<s>" in the text is BOS."""
        data = text.encode("utf-8", "replace")  # (request bodies with lone surrogates are refused earlier)
        size = len(data) + 8
        while True:
            buf = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, size, bos and self.add_bos, special)
            if n >= 0:
                return list(buf[:n])
            size = -n

    def piece(self, token: int) -> bytes:
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
            cached = self._pieces[token] = buf.raw[:n]
        return cached

    def decode(self, ids: list[int]) -> str:
        """The text of `ids` as a continuation (a leading space is kept; BOS/EOS render as nothing)."""
        return b"".join(self.piece(t) for t in ids).decode("utf-8", "replace")

    def detokenize(self, ids: list[int]) -> str:
        """The text of `ids` as a whole prompt (the space the tokenizer put before the first word dropped), special
        tokens written as their text ("<s>"): llama.cpp's inverse of `encode`."""
        tokens = (llama_cpp.llama_token * len(ids))(*ids)
        size = 4 * len(ids) + 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_detokenize(self.vocab, tokens, len(ids), buf, size, False, True)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            size = -n

    def token_strs(self, ids: list[int]) -> list[str]:
        """Each id's text in the vocabulary ("▁Paris")."""
        return [llama_cpp.llama_vocab_get_text(self.vocab, t).decode("utf-8", "replace") for t in ids]

    def _chat_template(self) -> ChatTemplate | None:
        """The file's tokenizer.chat_template, rendered as every server renders templates (api/chat.py); None
        without one, or with one that does not compile (then /v1/chat/completions says there is none)."""
        raw = llama_cpp.llama_model_chat_template(self.model, None)
        if not raw:
            return None
        try:
            return ChatTemplate(
                raw.decode("utf-8", "replace"), {"bos_token": self.bos_text, "eos_token": self.eos_text}
            )
        except ChatTemplateError as e:
            log.warning("the model file's chat template cannot be used: %s", e)
            return None


def _load_model(path: str, use_mmap: bool, use_mlock: bool):
    """The GGUF file's weights, with llama.cpp's log sent to ours; without repacked layouts where its AMX
    kernels would crash."""
    llama_cpp.llama_log_set(_log_to_python, None)
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.use_mmap, mp.use_mlock = use_mmap, use_mlock
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    if not extra_buffers_safe(info, cpu_flags()):
        log.warning(
            "llama.cpp has AMX kernels and this CPU AMX: weights are not repacked (extra buffer types "
            "off), since llama.cpp's AMX matmul crashes; build llama-cpp-python with "
            "requirements-llama-cpp.cmake to keep its other repacked layouts"
        )
        mp.use_extra_bufts = False
    model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
    if not model:
        raise LlamaCppError(f"llama.cpp cannot load {path} (see the llama.cpp messages above)")
    return model


def _new_context(model, path: str, ctx_size: int, n_seq: int, n_batch: int, n_threads: int):
    """A llama.cpp context where each of `n_seq` sequences has ctx_size positions (or more) of its own."""
    cp = llama_cpp.llama_context_default_params()
    cp.n_seq_max = n_seq
    per_seq = -(-ctx_size // 256) * 256  # llama.cpp pads the cache to 256 positions
    cp.n_ctx = per_seq * cp.n_seq_max
    cp.kv_unified = False
    cp.n_batch = n_batch
    cp.n_ubatch = min(n_batch, 512)
    cp.n_threads = cp.n_threads_batch = n_threads
    cp.embeddings = False
    ctx = llama_cpp.llama_init_from_model(model, cp)
    if not ctx:
        raise LlamaCppError(f"llama.cpp cannot create a context of {cp.n_ctx} tokens for {path}")
    if llama_cpp.llama_n_ctx_seq(ctx) < ctx_size:
        got = llama_cpp.llama_n_ctx_seq(ctx)
        raise LlamaCppError(f"llama.cpp gave each sequence {got} positions, not ctx_size {ctx_size}")
    return ctx


class LlamaCppEngine:
    def __init__(
        self,
        path: str,
        ctx_size: int,
        max_batch_size: int,
        n_threads: int,
        n_batch: int,
        use_mmap: bool = True,
        use_mlock: bool = False,
    ):
        self.model = _load_model(path, use_mmap, use_mlock)
        self.tokenizer = LlamaCppTokenizer(path)
        self.n_vocab = self.tokenizer.n_words
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        self.ctx_size = ctx_size
        self.embed_seq = max_batch_size  # the sequence embeddings use
        self.n_batch = n_batch
        self.ctx = _new_context(self.model, path, ctx_size, max_batch_size + 1, n_batch, n_threads)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.device = torch.device("cpu")
        # The scheduler's view: each running sequence has a slot of ctx_size positions (blocks of 16,
        # counted only); llama.cpp's prompt reuse per slot stands in for prefix caching.
        self.kv_config = KVConfig(max_batch_size * -(-ctx_size // 16), 16, False)
        self.max_num_batched_tokens = n_batch
        self.held: list[list[int]] = [[] for _ in range(max_batch_size)]  # tokens each slot's cache holds
        # Recurrent/hybrid memories cannot drop a sequence's tail, and a sliding-window cache no longer holds
        # the whole prefix: those models compute every prompt in full, as llama-server does for them.
        m = self.model
        self.prefix_reuse = not (
            llama_cpp.llama_model_is_recurrent(m)
            or llama_cpp.llama_model_is_hybrid(m)
            or llama_cpp.llama_model_n_swa(m) > 0
        )
        self.reused_tokens = 0

    def free(self) -> None:
        """Free the context and the weights (tests; a server leaves them to the process exit, since a
        request thread may still be between its last check and its call)."""
        if self.ctx:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            llama_cpp.llama_model_free(self.model)
            self.ctx = self.model = None

    # -- the step engine interface of EngineLoop (engine/step_loop.py StepEngine) -----------------------

    def heartbeat(self) -> None:
        """One process: nobody to tell."""

    def close(self) -> None:
        """Nothing: see free(); the process exit releases the model."""

    def run(self, plan) -> torch.Tensor:
        """Run a step plan (engine/scheduler.py); (S, V) logits of the items that sample, in plan order.

        The plan's slots are llama.cpp sequence ids; its block tables are not used (llama.cpp keeps its
        own cache). A sequence that starts again from position 0 in a slot keeps the leading tokens the
        slot already holds (llama.cpp's prompt reuse, as llama-server's cache_prompt): only the rest,
        and always the last token, is computed.
        """
        try:
            return torch.from_numpy(self._run(self._plan_items(plan), logits=True))
        except Exception:  # what the slots hold is unknown now: start them empty
            for it in plan.items:
                llama_cpp.llama_memory_seq_rm(self.memory, it.slot, -1, -1)
                self.held[it.slot].clear()
            raise

    def _plan_items(self, plan) -> list[tuple[int, int, int, bool]]:
        items = []
        for it in plan.items:
            start, tokens = it.start, it.tokens
            if start == 0:
                held = self.held[it.slot]
                same = 0
                while same < min(len(held), len(tokens) - 1) and held[same] == tokens[same]:
                    same += 1
                if same and not self.prefix_reuse:
                    same = 0
                if not llama_cpp.llama_memory_seq_rm(self.memory, it.slot, same, -1):  # what it held beyond
                    llama_cpp.llama_memory_seq_rm(self.memory, it.slot, -1, -1)  # a part cannot be removed
                    same = 0
                del held[same:]
                start, tokens = same, tokens[same:]
                self.reused_tokens += same
            self.held[it.slot].extend(tokens)
            last = start + len(tokens) - 1
            items += [(tok, pos, it.slot, it.sample and pos == last) for pos, tok in enumerate(tokens, start)]
        return items

    def embed(self, ids: list[int]) -> np.ndarray:
        """Mean over the tokens of the final normalized hidden states, L2-normalized; shape (n_embd,)."""
        seq = self.embed_seq
        llama_cpp.llama_memory_seq_rm(self.memory, seq, -1, -1)
        llama_cpp.llama_set_embeddings(self.ctx, True)
        try:
            rows = self._run([(tok, pos, seq, True) for pos, tok in enumerate(ids)], logits=False)
        finally:
            llama_cpp.llama_set_embeddings(self.ctx, False)
            llama_cpp.llama_memory_seq_rm(self.memory, seq, -1, -1)
        mean = rows.mean(axis=0)
        return mean / max(float(np.linalg.norm(mean)), 1e-12)

    # -- llama_decode over a list of (token, position, sequence, output) ----------------------------

    def _run(self, items: list[tuple[int, int, int, bool]], logits: bool) -> np.ndarray:
        """Decode `items` in chunks of at most n_batch; the outputs (logits or embeddings) of the flagged rows."""
        width = self.n_vocab if logits else self.n_embd
        out = []
        b = self.batch
        for start in range(0, len(items), self.n_batch):
            chunk = items[start : start + self.n_batch]
            for i, (tok, pos, seq, want) in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
                b.seq_id[i][0] = seq
            b.n_tokens = len(chunk)
            rc = llama_cpp.llama_decode(self.ctx, b)
            if rc != 0:
                raise LlamaCppError(f"llama_decode returned {rc} for a batch of {len(chunk)} tokens")
            get = llama_cpp.llama_get_logits_ith if logits else llama_cpp.llama_get_embeddings_ith
            for i, (_, _, _, want) in enumerate(chunk):
                if want:
                    out.append(np.ctypeslib.as_array(get(self.ctx, i), shape=(width,)).copy())
        return np.stack(out) if out else np.zeros((0, width), dtype=np.float32)
