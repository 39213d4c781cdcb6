"""Kaito's preset API for Falcon: POST /chat with a prompt (or chat messages) and HF generate parameters, flat; on
transformers' generate (`chat`) or, for Llama-architecture folders, on our engine (`engine_chat`)."""

import time

from quart import Blueprint, jsonify, request

from presets.api import falcon_params
from presets.api.chat import openai_messages, render
from presets.api.validation import json_body, reject_unknown
from presets.engine.batch_loop import Job
from presets.errors import ApiError
from presets.http.app import record, record_counts, runtime
from presets.models.chat_template import ChatTemplate
from presets.models.hf import params as hf_params
from presets.models.hf.engine import batch_key

chat = Blueprint("hf_chat", __name__)

ALLOWED = {"prompt", "messages"} | set(hf_params.DEFAULTS) | set(hf_params.EXTRAS)


def prompt_text(body: dict, template) -> tuple[str, bool]:
    """(text, add_special_tokens): the prompt, or the messages rendered by the model's chat template."""
    if ("prompt" in body) == ("messages" in body):
        raise ApiError(400, "give exactly one of prompt (a string) or messages (a list of {role, content})")
    if "prompt" in body:
        if not isinstance(body["prompt"], str):
            raise ApiError(400, "prompt must be a string")
        return body["prompt"], True
    return render(template, openai_messages(body["messages"])), False  # the template writes special tokens itself


def chat_template(rt) -> ChatTemplate | None:
    """The model's chat template: the one the HF engine loaded for generate, or our engine's tokenizer's."""
    return rt.engine.chat_template if rt.engine is not None else rt.tokenizer.chat_template


async def kaito_request():
    """(runtime, generate parameters, prompt text, whether to add special tokens) of a /chat body."""
    body = await json_body(request)
    reject_unknown(body, ALLOWED, "body")
    rt = runtime()
    rt.require_ready()
    vocab = rt.engine.vocab_size if rt.engine is not None else rt.tokenizer.n_words  # generate's or ours
    text, special = prompt_text(body, chat_template(rt))
    return rt, falcon_params.parse(body, vocab), text, special


@chat.post("/chat")
async def chat_route():
    """Generate from `prompt`: {"Result": prompt + generated text (all sequences, joined)}."""
    rt, params, text, special = await kaito_request()
    engine = rt.engine
    job = engine.job(text, params, special)
    t0 = time.perf_counter()
    (done,) = await rt.arun([Job(batch_key(params), job)])
    generated = sum(len(ids) for ids, _ in done.result)
    record_counts(len(done.result), len(job.prompt_ids), generated)
    rt.metrics.finished_request(t0, len(job.prompt_ids), generated)
    return jsonify(Result="".join(text + engine.text(ids) for ids, _ in done.result))


engine_chat = Blueprint("hf_chat_on_engine", __name__)


@engine_chat.post("/chat")
async def chat_on_engine():
    """The same route when our engine runs the model (a Llama-architecture folder): for the parameters our
    sampler has, generate's greedy answer and the same distribution when sampling (other random draws); a 400
    for what only transformers' generate does."""
    rt, params, text, special = await kaito_request()
    tok = rt.tokenizer
    ids = tok.encode(text, bos=special, eos=False)
    if not ids:
        raise ApiError(400, "prompt is empty: it has no tokens for this model")
    sampling, n = hf_params.to_sampling(params, len(ids), rt.max_seq_len)
    seqs = await rt.arun(rt.sequences([ids], sampling, n))
    record(seqs)
    return jsonify(Result="".join(text + tok.decode(s.output) for s in seqs))
