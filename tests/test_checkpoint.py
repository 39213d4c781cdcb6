"""Loading Meta's layout: the tiny checkpoint script's splits, and clear errors for broken folders."""

import json
import os
import shutil

import pytest
import sentencepiece as spm
import torch

from presets.models.llama.layout import CheckpointError
from presets.models.llama.load import check_layout, load_model
from presets.models.llama.tokenizer import Tokenizer
from presets.tools.tiny_checkpoint import train_tokenizer, write_checkpoint
from tests.conftest import TINY


@pytest.fixture
def broken(tiny_ckpt, tmp_path):
    """A fresh copy of the tiny checkpoint that a test may break."""
    return shutil.copytree(tiny_ckpt, tmp_path / "ckpt")


def load(ckpt):
    return load_model(str(ckpt), Tokenizer(f"{ckpt}/tokenizer.model"), 0, 1, torch.device("cpu"), torch.float32)


def test_files_are_metas_layout(tiny_ckpt):
    assert sorted(os.listdir(tiny_ckpt)) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    with open(f"{tiny_ckpt}/params.json") as f:
        assert json.load(f)["vocab_size"] == -1
    shard = torch.load(f"{tiny_ckpt}/consolidated.00.pth", weights_only=True)
    assert shard["layers.0.attention.wq.weight"].dtype == torch.bfloat16
    assert "rope.freqs" in shard  # as in Meta's files; the loader must ignore it


def test_two_shards_split_as_meta_does(tiny_ckpt, tmp_path):
    two = write_checkpoint(str(tmp_path / "two"), TINY, shards=2)
    one = torch.load(f"{tiny_ckpt}/consolidated.00.pth", weights_only=True)
    s0, s1 = (torch.load(f"{two}/consolidated.{i:02d}.pth", weights_only=True) for i in range(2))
    for key, dim in [
        ("output.weight", 0),
        ("layers.1.attention.wq.weight", 0),
        ("layers.0.feed_forward.w2.weight", 1),
        ("tok_embeddings.weight", 1),
        ("layers.0.attention.wo.weight", 1),
    ]:
        assert s0[key].shape[dim] * 2 == one[key].shape[dim]
        assert torch.equal(torch.cat([s0[key], s1[key]], dim), one[key])
    assert torch.equal(s0["norm.weight"], one["norm.weight"]) and torch.equal(s1["norm.weight"], one["norm.weight"])


def test_layout_errors_name_the_problem(broken, tmp_path):
    tok = f"{broken}/tokenizer.model"
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        check_layout(str(tmp_path / "nowhere"), tok, 1)
    with pytest.raises(CheckpointError, match="model-parallel size is 2"):
        check_layout(str(broken), tok, 2)
    with pytest.raises(CheckpointError, match="tokenizer not found"):
        check_layout(str(broken), str(tmp_path / "missing.model"), 1)
    os.rename(broken / "consolidated.00.pth", broken / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"expected \['consolidated.00.pth'\]"):
        check_layout(str(broken), tok, 1)
    os.remove(broken / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="no consolidated.NN.pth shard"):
        check_layout(str(broken), tok, 1)
    os.remove(broken / "params.json")
    with pytest.raises(CheckpointError, match=r"neither params.json \(Meta's layout\) nor config.json"):
        check_layout(str(broken), tok, 1)


def test_vocab_mismatch(broken):
    with open(broken / "params.json") as f:
        params = json.load(f)
    with open(broken / "params.json", "w") as f:
        json.dump({**params, "vocab_size": 1000}, f)
    with pytest.raises(CheckpointError, match="vocab mismatch: params.json has vocab_size 1000, the tokenizer has 512"):
        load(broken)


def test_shape_mismatch(broken):
    with open(broken / "params.json") as f:
        params = json.load(f)
    with open(broken / "params.json", "w") as f:
        json.dump({**params, "multiple_of": 128}, f)  # changes the SwiGLU hidden size
    with pytest.raises(CheckpointError, match=r"feed_forward.w2.weight has shape \(64, 192\).*imply \(64, 256\)"):
        load(broken)


def test_unknown_and_missing_keys(broken):
    path = broken / "consolidated.00.pth"
    shard = torch.load(path, weights_only=True)
    shard["extra.weight"] = torch.zeros(1)
    del shard["norm.weight"]
    torch.save(shard, path)
    with pytest.raises(CheckpointError, match=r"missing \['norm.weight'\], unexpected \['extra.weight'\]"):
        load(broken)


def test_unknown_params_key_and_corrupt_shard(broken):
    (broken / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read .*consolidated.00.pth"):
        load(broken)
    with open(broken / "params.json", "w") as f:
        json.dump({"dim": 64, "n_layers": 2, "n_heads": 4, "colour": "red"}, f)
    with pytest.raises(CheckpointError, match=r"unknown keys \['colour'\]"):
        load(broken)


def test_tokenizer_reaches_a_large_vocab_exactly():
    # The benchmark model has Llama's 32000 tokens; the small corpus alone yields fewer pieces.
    sp = spm.SentencePieceProcessor(model_proto=train_tokenizer(32000))
    assert sp.vocab_size() == 32000 and sp.bos_id() == 1 and sp.eos_id() == 2
    assert sp.decode(sp.encode("menthe poivrée ☃\n")) == "menthe poivrée ☃\n"
