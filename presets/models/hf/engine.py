"""Batched transformers generate for HF causal LMs; the BatchLoop thread is its only caller."""

import contextlib
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from presets.engine.stop_strings import stop_window
from presets.errors import ApiError
from presets.models.hf.params import new_tokens

# Parameters passed to generate as they are; the others are handled here (lengths, ids, seed).
SAMPLING = ("temperature", "top_k", "top_p", "typical_p")
COMMON = (
    "num_beams",
    "length_penalty",
    "early_stopping",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
)


@dataclass(eq=False)
class HFJob:
    prompt_text: str
    prompt_ids: list[int]
    params: dict
    max_new_tokens: int
    streamer: object = None  # a transformers streamer; a streamed job runs alone
    cancelled: bool = False  # its client went away: generate stops at the next token
    stops: tuple[str, ...] = ()  # stop strings (OpenAI routes): its rows stop once one appears

    def cancel(self) -> None:
        """Its client went away: generate stops at the next token (BatchLoop's cancel_payload)."""
        self.cancelled = True


def batch_key(params: dict):
    """Jobs with equal keys can share a left-padded batch and answer exactly as alone; None: run alone.

    Beam search, min_length, repetition and n-gram penalties and seeds all see the padding or the
    batch, so such requests run alone. max_length is not in the key: each job keeps its own budget.
    """
    alone = (
        params["num_beams"] > 1
        or params["min_length"] > 0
        or params["repetition_penalty"] != 1
        or params["no_repeat_ngram_size"] > 0
        or params["seed"] is not None
    )
    if alone:
        return None
    return tuple((k, repr(v)) for k, v in sorted(params.items()) if k != "max_length")


class HFEngine:
    def __init__(self, model, tokenizer, chat_template=None, adapters: list[str] = ()):
        """`adapters`: the LoRA adapters PEFT holds on `model` (loader.load_adapters), slot i + 1 each."""
        self.model = model
        self.adapters = list(adapters)
        self.tokenizer = tokenizer
        self.chat_template = chat_template  # the folder's, as api/chat.py renders every model's (None: none)
        self.device = model.device
        config = model.config
        self.context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.vocab_size = len(tokenizer)
        self.eos_id = model.generation_config.eos_token_id or tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _first(self.eos_id)
        # Token positions the running batch's KV cache holds (rows x (padded prompt + tokens so far), as generate
        # grows it each step); 0 between batches. Read by /metrics (vllm:kv_cache_usage_perc) from another thread.
        self.kv_tokens = 0
        # generate() fills unset fields from the model's own config; EOS is passed explicitly per batch,
        # so clear it there, or ignore_eos could not turn it off.
        model.generation_config.eos_token_id = None

    def kv_budget(self, max_batch_size: int) -> int:
        """The token positions the server admits at once: max_batch_size sequences of the model's whole context
        (generate has no block pool; this is its budget as vllm:cache_config_info's blocks of one token)."""
        return max_batch_size * (self.context or 2048)

    def job(self, prompt_text: str, params: dict, add_special_tokens: bool = True) -> HFJob:
        """Tokenize and size one request; 400 when the prompt leaves no room to generate."""
        ids = self.tokenizer(prompt_text, add_special_tokens=add_special_tokens).input_ids
        if not ids:
            raise ApiError(400, "prompt is empty: it has no tokens for this model")
        return HFJob(prompt_text, ids, params, new_tokens(params, len(ids), self.context, "the model's context"))

    @torch.inference_mode()
    def run_batch(self, key, jobs: list[HFJob]) -> list[list[tuple[list[int], bool]]]:
        """Generate for jobs sharing one set of parameters: per job, (new token ids, ended by EOS) per sequence."""
        p = jobs[0].params
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.tensor(
            [[self.pad_id] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs], device=self.device
        )
        mask = torch.tensor(
            [[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs], device=self.device
        )
        eos = p["eos_token_id"] if p["eos_token_id"] is not None else self.eos_id
        kwargs = {k: p[k] for k in COMMON} | ({k: p[k] for k in SAMPLING} if p["do_sample"] else {})
        config = GenerationConfig(
            do_sample=p["do_sample"],
            max_new_tokens=max(j.max_new_tokens for j in jobs),
            min_new_tokens=max(0, p["min_length"] - width) or None,
            eos_token_id=None if p["ignore_eos"] else eos,
            pad_token_id=p["pad_token_id"] if p["pad_token_id"] is not None else self.pad_id,
            **kwargs,
        )
        if p["seed"] is not None:
            torch.manual_seed(p["seed"])  # the job runs alone (see batch_key): reproducible
        streamer = jobs[0].streamer if len(jobs) == 1 else None
        stop = StoppingCriteriaList([_StopWhen(jobs, width, self.text, self._held)])
        self.kv_tokens = ids.numel()  # the prompts' cache, before the first step
        try:
            with self._adapter(p.get("adapter", 0)):  # one adapter per batch: batch_key keeps them apart
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    generation_config=config,
                    streamer=streamer,
                    stopping_criteria=stop,
                )
        finally:
            self.kv_tokens = 0
        n = p["num_return_sequences"]
        stops = set() if p["ignore_eos"] else set(eos if isinstance(eos, list) else [eos])
        results = []
        for i, job in enumerate(jobs):
            sequences = []
            for row in out[i * n : (i + 1) * n, width:].tolist():
                new = row[: job.max_new_tokens]
                cut = next((k for k, t in enumerate(new) if t in stops), len(new))
                sequences.append((new[:cut], cut < len(new)))
            results.append(sequences)
        return results

    def _adapter(self, slot: int):
        """The context a batch of LoRA adapter `slot` generates in (0: the base model, PEFT's layers off)."""
        if not self.adapters:
            return contextlib.nullcontext()
        if slot == 0:
            return self.model.disable_adapter()
        self.model.set_adapter(self.adapters[slot - 1])
        return contextlib.nullcontext()

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _held(self, input_ids: torch.Tensor) -> None:
        """After each step: every row (return sequences and beams included) holds keys and values for its ids."""
        self.kv_tokens = input_ids.numel()


class _StopWhen(StoppingCriteria):
    """Per row: stop once its job is cancelled (the client left) or its text holds one of the job's stops; called
    after every step of generate, it also reports the ids so far (`on_step`)."""

    def __init__(self, jobs, width: int, text, on_step):
        self.jobs, self.width, self.text, self.on_step = jobs, width, text, on_step

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.on_step(input_ids)
        per_job = input_ids.shape[0] // len(self.jobs)  # return sequences or beams of each job
        done = []
        for row, ids in enumerate(input_ids):
            job = self.jobs[row // per_job]
            text = self.text(ids[self.width :][-stop_window(job.stops) :].tolist()) if job.stops else ""
            done.append(job.cancelled or any(s in text for s in job.stops))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _first(ids):
    return ids[0] if isinstance(ids, list) else ids
