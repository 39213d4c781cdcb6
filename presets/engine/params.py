"""Per-request sampling parameters, validated where they are built."""

from dataclasses import dataclass

from presets.errors import ApiError

GREEDY_BELOW = 1e-5  # temperatures under this are treated as 0 (greedy)
MAX_TEMPERATURE = 2.0  # OpenAI's bound, on every route: beyond it sampling is near uniform noise


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.6  # 0 means greedy
    top_p: float = 0.9
    max_tokens: int | None = None  # None: all the room left in max_seq_len
    ignore_eos: bool = False
    seed: int | None = None
    top_k: int = 0  # keep the k most likely tokens before sampling; 0: all
    repeat_penalty: float = 1.0  # llama.cpp's: logits of tokens among the last repeat_last_n are pushed down
    repeat_last_n: int = 64
    # OpenAI's: logits[j] -= frequency_penalty * (times j was generated) + presence_penalty * (j was generated)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple = ()  # (token id, bias added to its logit) pairs
    logprobs: int | None = None  # return each sampled token's log probability and this many top alternatives
    grammar: str | None = None  # structured output: the llguidance grammar the text must follow (structured.py)
    adapter: int = 0  # the LoRA adapter's slot (engine/adapters.py); 0: the base model

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW  # dividing logits by less would overflow to inf/NaN


def room_left(context: int, prompt_tokens: int, setting: str, which: str = "prompt") -> int:
    """Tokens a prompt leaves for generation in a context of `context` tokens (every route's one rule); a 400
    naming `setting`, what sets the context (--max_seq_len, ctx_size, the model's), when it leaves none."""
    if prompt_tokens >= context:
        raise ApiError(
            400,
            f"{which} is {prompt_tokens} tokens; {setting} is {context} tokens, so a prompt may "
            f"have at most {context - 1} tokens",
        )
    return context - prompt_tokens
