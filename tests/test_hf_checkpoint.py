"""HuggingFace Llama folders on our engine: equal to transformers on the same folder (GQA, tied embeddings,
rope_theta, Llama 3.1 rope scaling, sharded safetensors), 2 ranks equal 1, and one-line start errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from presets.models.llama.layout import CheckpointError
from presets.models.llama.load import check_layout, load_model
from presets.models.llama.tokenizer import HFTokenizer, find_tokenizer, load_tokenizer
from presets.tools.tiny_hf import write_llama
from tests.launch import ROOT, assert_ranks_answer_as_one
from tests.paged import engine_for, item, run

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 5e5,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
PROMPT = "The river flows past the old mill and the quick brown fox " * 3


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    """GQA 4/2, tied embeddings, rope_theta 5e5, weights in 5 safetensors shards with an index."""
    return write_llama(
        str(tmp_path_factory.mktemp("tied")), seed=3, tie=True, rope={"rope_theta": 5e5}, max_shard_size="100KB"
    )


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    """GQA 8/2, Llama 3.1's rope scaling, sharded safetensors; unlike the tied model's, its greedy text varies."""
    return write_llama(
        str(tmp_path_factory.mktemp("llama3")), seed=4, rope=LLAMA3_ROPE, heads=(8, 2), max_shard_size="100KB"
    )


def pair(folder):
    from transformers import LlamaForCausalLM

    tok = load_tokenizer(find_tokenizer(folder), folder)
    ours = load_model(folder, tok, 0, 1, torch.device("cpu"), torch.float32)
    return tok, ours, LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()


@pytest.mark.parametrize("folder", ["tied_dir", "llama3_dir"])
def test_hf_folder_logits_and_greedy_tokens_equal_transformers(request, folder):
    path = request.getfixturevalue(folder)
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
    tok, ours, hf = pair(path)
    ids = tok.encode(PROMPT, bos=True, eos=False)
    engine = engine_for(ours)
    logits = run(engine, item(0, 0, ids), all_logits=True)
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits
    assert ((logits - ref).abs().max() / ref.abs().max()).item() < 1e-4
    got = [int(run(engine, item(1, 0, ids)).argmax())]
    while len(got) < 16:
        got.append(int(run(engine, item(1, len(ids) + len(got) - 1, [got[-1]])).argmax()))
    hf.generation_config.eos_token_id = None
    with torch.inference_mode():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert got == want[0, len(ids) :].tolist()


def test_llama3_rope_scaling_changes_the_answer(llama3_dir, tmp_path):
    """The scaled frequencies matter here: the same weights without the scaling give other logits."""
    plain = str(tmp_path / "plain")
    shutil.copytree(llama3_dir, plain)
    edit_config(plain, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    a, b = (pair(p) for p in (llama3_dir, plain))
    ids = a[0].encode(PROMPT, bos=True, eos=False)
    la = run(engine_for(a[1]), item(0, 0, ids), all_logits=True)
    lb = run(engine_for(b[1]), item(0, 0, ids), all_logits=True)
    assert ((la - lb).abs().max() / lb.abs().max()).item() > 1e-3


def test_tied_folder_has_no_lm_head_and_tokenizer_comes_from_its_files(tied_dir):
    files = read_json(os.path.join(tied_dir, "model.safetensors.index.json"))["weight_map"]
    assert "lm_head.weight" not in files and "model.embed_tokens.weight" in files
    tok = load_tokenizer(find_tokenizer(tied_dir), tied_dir)
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_ids) == (1, (2,))
    assert tok.chat_template is not None


def edit_config(folder, **changes):
    write_json(os.path.join(folder, "config.json"), {**read_json(os.path.join(folder, "config.json")), **changes})


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, value: dict):
    with open(path, "w") as f:
        json.dump({k: v for k, v in value.items() if v is not ...}, f)


@pytest.fixture
def broken(tied_dir, tmp_path):
    shutil.copytree(tied_dir, tmp_path / "b")
    return str(tmp_path / "b")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, r"architecture \['MistralForCausalLM'\]"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"attention_bias": True}, "attention_bias=True is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
        ({"head_dim": 8}, "head_dim 8 is not hidden_size / num_attention_heads"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config=.* is not supported"),
        ({"num_hidden_layers": ...}, "missing num_hidden_layers"),
        ({"num_hidden_layers": 3}, r"missing \['model.layers.2"),
        ({"intermediate_size": 96}, "has shape .*config.json implies"),
        ({"vocab_size": 100}, "vocab mismatch: config.json has vocab_size 100"),
    ],
)
def test_unsupported_or_inconsistent_config_is_a_start_error_naming_it(broken, change, message):
    edit_config(broken, **change)
    with pytest.raises(CheckpointError, match=message):
        check_layout(broken, "", 1)
        tok = load_tokenizer(find_tokenizer(broken), broken)
        load_model(broken, tok, 0, 1, torch.device("cpu"), torch.float32)


def test_missing_or_extra_tensors_and_max_seq_len_are_start_errors(broken):
    with pytest.raises(CheckpointError, match="over the model's max_position_embeddings 512"):
        check_layout(broken, "", 1, max_seq_len=4096)
    index = os.path.join(broken, "model.safetensors.index.json")
    weight_map = read_json(index)["weight_map"]
    shard = os.path.join(broken, weight_map["model.norm.weight"])
    tensors = load_file(shard)
    tensors["model.extra.weight"] = tensors.pop("model.norm.weight")
    save_file(tensors, shard, metadata={"format": "pt"})
    weight_map["model.extra.weight"] = weight_map.pop("model.norm.weight")
    write_json(index, {"weight_map": weight_map})
    tok = load_tokenizer(find_tokenizer(broken), broken)
    with pytest.raises(CheckpointError, match=r"missing \['model.norm.weight'\], unexpected \['model.extra.weight'\]"):
        load_model(broken, tok, 0, 1, torch.device("cpu"), torch.float32)
    os.remove(index)
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        check_layout(broken, "", 1)


def test_bad_tokenizers_give_one_line_errors(broken, tmp_path):
    garbage = tmp_path / "tokenizer.model"
    garbage.write_bytes(b"\x00\x01 not a sentencepiece model")
    with pytest.raises(CheckpointError, match="neither a SentencePiece tokenizer.model nor a tokenizer.json"):
        check_layout(broken, str(garbage), 1)
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    with pytest.raises(CheckpointError, match="not a tokenizer.json the tokenizers package can read"):
        check_layout(broken, str(bad_json), 1)
    os.remove(os.path.join(broken, "tokenizer.json"))
    with pytest.raises(CheckpointError, match="no tokenizer.model or tokenizer.json in"):
        check_layout(broken, "", 1)


def test_server_exits_non_zero_with_one_line_error_for_a_bad_folder(broken):
    edit_config(broken, hidden_act="gelu")
    cmd = [sys.executable, "inference_api.py", "--ckpt_dir", broken, "--device", "cpu"]
    cwd = os.path.join(ROOT, "presets", "inference", "llama2-completion")
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        f"error: {broken}/config.json: hidden_act='gelu' is not supported (the Llama engine implements 'silu')"
    ]


@pytest.mark.parametrize("folder", ["tied_dir", "llama3_dir"])
def test_two_ranks_equal_one_rank_on_an_hf_folder(request, folder):
    """Each rank reads its own slices of the sharded safetensors (heads, FFN columns, vocab rows; the tied
    output layer's rows from the embedding)."""
    from tests.conftest import real_client

    folder = request.getfixturevalue(folder)
    client, rt = real_client(folder, "completion", max_seq_len=128, max_batch_size=4)
    bodies = [
        {
            "prompts": [f"The river flows past mill {i}" + " and on" * i],
            "parameters": {"temperature": 0, "max_gen_len": 12, "ignore_eos": True},
        }
        for i in range(4)
    ]
    try:
        one_rank = [client.post("/generate", json=b).get_json() for b in bodies]
    finally:
        rt.shutdown()
    assert_ranks_answer_as_one(
        "completion", folder, 2, ["--max_seq_len", "128", "--max_batch_size", "4"], bodies, one_rank
    )


def test_more_start_errors_without_tracebacks(broken, tmp_path):
    with pytest.raises(CheckpointError, match="num_key_value_heads 2 does not split over 4 ranks"):
        check_layout(broken, "", 4)
    edit_config(broken, rope_parameters={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(CheckpointError, match=r"rope type 'llama3' needs \['low_freq_factor'"):
        check_layout(broken, "", 1)
    with open(os.path.join(broken, "config.json"), "w") as f:
        f.write("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json is not a JSON object"):
        check_layout(broken, "", 1)
    index = os.path.join(broken, "model.safetensors.index.json")
    os.remove(os.path.join(broken, read_json(index)["weight_map"]["model.norm.weight"]))
    with pytest.raises(CheckpointError, match="names files that are not in"):
        from presets.models.llama.hf_checkpoint import weight_files

        weight_files(broken)
    single = tmp_path / "single"
    write_llama(str(single))
    with open(single / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        check_layout(str(single), "", 1)


def test_several_eos_ids_each_end_the_answer(llama3_dir, tmp_path):
    """generation_config.json's list of EOS ids (as Llama 3's): the second id ends a greedy answer too."""
    from presets.engine.params import SamplingParams
    from tests.conftest import real_client

    folder = str(tmp_path / "eos")
    shutil.copytree(llama3_dir, folder)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    _, rt = real_client(folder, "completion", max_seq_len=128, max_batch_size=4)
    try:
        prompt = rt.tokenizer.encode(PROMPT, bos=True, eos=False)
        (seq,) = rt.generate([prompt], greedy)
        out = seq.output
    finally:
        rt.shutdown()
    at = next(i for i in range(1, len(out)) if out[i] not in out[:i] and out[i] != 2)  # first seen at `at`
    path = os.path.join(folder, "generation_config.json")
    write_json(path, {**read_json(path), "eos_token_id": [2, out[at]]})
    _, rt = real_client(folder, "completion", max_seq_len=128, max_batch_size=4)
    try:
        assert rt.tokenizer.eos_ids == (2, out[at])
        (stopped,) = rt.generate([prompt], SamplingParams(temperature=0, max_tokens=24))
        (full,) = rt.generate([prompt], greedy)
    finally:
        rt.shutdown()
    assert (stopped.output, stopped.finish_reason) == (out[:at], "stop")
    assert (full.output, full.finish_reason) == (out, "length")


def test_a_sentencepiece_tokenizer_keeps_the_llama2_format(tiny_ckpt, tied_dir, tmp_path):
    """A template writes "<s>" as text, which SentencePiece cannot turn into BOS: the Llama-2 format is used."""
    from presets.api.chat import encode_dialog, encode_llama2

    folder = tmp_path / "sp"
    shutil.copytree(tied_dir, folder)
    shutil.copy(os.path.join(tiny_ckpt, "tokenizer.model"), folder / "tokenizer.model")
    tok = load_tokenizer(str(folder / "tokenizer.model"), str(folder))
    assert tok.chat_template is None and load_tokenizer(find_tokenizer(str(folder)), str(folder)).chat_template
    dialog = [{"role": "user", "content": "Hello"}]
    assert encode_dialog(tok, dialog) == encode_llama2(tok, dialog) and encode_dialog(tok, dialog)[0] == tok.bos_id
