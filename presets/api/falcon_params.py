"""Kaito's Falcon preset API: its flat generation parameters validated, defaults filled in (`parse`); a 400
names the field."""

from presets.api.validation import boolean, integer, number
from presets.errors import ApiError
from presets.models.hf.params import DEFAULTS


def _token_id(body: dict, key: str, vocab_size: int):
    return integer(body, key, "", None, lo=0, hi=vocab_size - 1)


def _bad_words(body: dict, vocab_size: int):
    v = body.get("bad_words_ids")
    if v is None:
        return None
    ok = isinstance(v, list) and v and all(isinstance(w, list) and w for w in v)
    ok = ok and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for w in v for t in w)
    if not ok:
        raise ApiError(400, f"bad_words_ids must be a non-empty list of non-empty lists of token ids < {vocab_size}")
    return v


def parse(body: dict, vocab_size: int) -> dict:
    """Validated generation parameters (defaults filled in) from a flat /chat body; 400 names the field."""
    p = {
        "max_length": integer(body, "max_length", "", DEFAULTS["max_length"], lo=1),
        "min_length": integer(body, "min_length", "", 0, lo=0),
        "do_sample": boolean(body, "do_sample", "", True),
        "num_beams": integer(body, "num_beams", "", 1, lo=1, hi=16),
        "num_beam_groups": integer(body, "num_beam_groups", "", 1, lo=1),
        "diversity_penalty": number(body, "diversity_penalty", "", 0.0, lo=0),
        "temperature": number(body, "temperature", "", 1.0, lo=1e-5),  # smaller overflows to inf/NaN
        "top_k": integer(body, "top_k", "", 10, lo=0),
        "top_p": number(body, "top_p", "", 1.0, lo=0, hi=1, lo_open=True),
        "typical_p": number(body, "typical_p", "", 1.0, lo=0, hi=1, lo_open=True),
        "repetition_penalty": number(body, "repetition_penalty", "", 1.0, lo=0, lo_open=True),
        "length_penalty": number(body, "length_penalty", "", 1.0),
        "no_repeat_ngram_size": integer(body, "no_repeat_ngram_size", "", 0, lo=0),
        "encoder_no_repeat_ngram_size": integer(body, "encoder_no_repeat_ngram_size", "", 0, lo=0),
        "bad_words_ids": _bad_words(body, vocab_size),
        "num_return_sequences": integer(body, "num_return_sequences", "", 1, lo=1, hi=16),
        "output_scores": boolean(body, "output_scores", "", False),
        "return_dict_in_generate": boolean(body, "return_dict_in_generate", "", False),
        "pad_token_id": _token_id(body, "pad_token_id", vocab_size),
        "eos_token_id": _token_id(body, "eos_token_id", vocab_size),
        "forced_bos_token_id": _token_id(body, "forced_bos_token_id", vocab_size),
        "forced_eos_token_id": _token_id(body, "forced_eos_token_id", vocab_size),
        "remove_invalid_values": boolean(body, "remove_invalid_values", "", None),
        "ignore_eos": boolean(body, "ignore_eos", "", False),
        "seed": integer(body, "seed", "", None, lo=0, hi=2**63 - 1),
    }
    early = body.get("early_stopping", False)
    if early not in (True, False, "never") and early is not None:
        raise ApiError(400, f"early_stopping must be true, false or 'never', got {early!r}")
    p["early_stopping"] = False if early is None else early
    _check_combinations(p)
    return p


def _check_combinations(p: dict) -> None:
    if p["min_length"] > p["max_length"]:
        raise ApiError(400, f"min_length ({p['min_length']}) must not exceed max_length ({p['max_length']})")
    if p["num_beams"] % p["num_beam_groups"]:
        raise ApiError(400, f"num_beam_groups ({p['num_beam_groups']}) must divide num_beams ({p['num_beams']})")
    if p["num_beam_groups"] > 1 and p["do_sample"]:
        raise ApiError(400, "num_beam_groups > 1 (group beam search) cannot be combined with do_sample=true")
    if p["diversity_penalty"] > 0 and p["num_beam_groups"] == 1:
        raise ApiError(400, "diversity_penalty only applies with num_beam_groups > 1")
    if p["num_beam_groups"] > 1:
        raise ApiError(
            400,
            "num_beam_groups > 1 (group beam search) is not available: transformers 5 moved it to code on "
            "the Hugging Face Hub, and this server never downloads code",
        )
    if p["encoder_no_repeat_ngram_size"]:
        raise ApiError(400, "encoder_no_repeat_ngram_size applies to encoder-decoder models only; use 0")
    if not p["do_sample"] and p["num_return_sequences"] > p["num_beams"]:
        raise ApiError(
            400,
            f"num_return_sequences ({p['num_return_sequences']}) must not exceed num_beams ({p['num_beams']}) "
            "without sampling",
        )
