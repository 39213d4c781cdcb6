"""The Falcon server's generation parameters: the list of Kaito's Falcon preset with its defaults (validated in
api/falcon_params.py), and mapped to our engine's sampling parameters where it runs the model (Llama-architecture
folders)."""

from presets.engine.params import SamplingParams, room_left
from presets.errors import ApiError

# Kaito's Falcon preset documents these "full configurable parameters": these are its values.
DEFAULTS = {
    "max_length": 200,
    "min_length": 0,
    "do_sample": True,
    "early_stopping": False,
    "num_beams": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "temperature": 1.0,
    "top_k": 10,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "num_return_sequences": 1,
    "output_scores": False,
    "return_dict_in_generate": False,
    "pad_token_id": None,
    "eos_token_id": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "remove_invalid_values": None,
}
# Ours, on every server: a fixed token count for benchmarks, and reproducible sampling.
EXTRAS = {"ignore_eos": False, "seed": None}


# Parameters that only transformers' generate implements, with the values that leave it out. Others map to our
# sampler (do_sample, temperature, top_k, top_p, num_return_sequences, seed, ignore_eos, max_length) or change
# nothing of the text the route returns (beam-search-only settings without beams, output_scores, pad_token_id).
GENERATE_ONLY = {
    "num_beams": 1,
    "min_length": 0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "eos_token_id": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
}


def new_tokens(p: dict, prompt_tokens: int, context: int | None, setting: str) -> int:
    """Tokens a request may generate: max_length counts the prompt (generate's rule), capped by the context
    (`setting`: what sets it); 400 when the prompt leaves no room."""
    room = room_left(context, prompt_tokens, setting) if context else None
    if p["max_length"] <= prompt_tokens:
        raise ApiError(
            400, f"prompt is {prompt_tokens} tokens, so max_length {p['max_length']} leaves no room to generate"
        )
    new = p["max_length"] - prompt_tokens
    return new if room is None else min(new, room)


def to_sampling(p: dict, prompt_tokens: int, context: int) -> tuple[SamplingParams, int]:
    """(our sampling parameters, num_return_sequences) for validated parameters `p` on a prompt of
    `prompt_tokens` in a context of `context` tokens; 400 naming the first parameter that needs generate."""
    for key, neutral in GENERATE_ONLY.items():
        if key == "min_length" and p[key] <= prompt_tokens:
            continue  # a minimum the prompt already reaches changes nothing, in generate either
        if p[key] != neutral:
            raise ApiError(
                400,
                f"{key}={p[key]!r} needs transformers' generate, and this server runs the model on its own "
                "engine (continuous batching); start it with --engine transformers to use it",
            )
    sampling = SamplingParams(
        temperature=p["temperature"] if p["do_sample"] else 0.0,
        top_p=p["top_p"],
        top_k=p["top_k"] if p["do_sample"] else 0,
        max_tokens=new_tokens(p, prompt_tokens, context, "--max_seq_len"),
        ignore_eos=p["ignore_eos"],
        seed=p["seed"],
    )
    return sampling, p["num_return_sequences"]
