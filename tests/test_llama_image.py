"""presets/tools/llama_image.py, the build steps of the three Llama Dockerfiles, without Docker (test_docker.py
builds the images), and the --max_batch_size default Kaito's docs give."""

import os

import pytest

from presets.process.settings import parse_settings
from presets.servers.hf import HFSettings
from presets.tools.llama_image import main

KAITO_FLAGS = ["--max_seq_len", "512", "--max_batch_size", "8"]  # Kaito's command for the Llama presets


@pytest.mark.parametrize(
    "src_dir, server",
    [
        ("/home/kaito/presets/llama-2", "llama2-completion"),  # the presets README: a path on the builder's machine
        ("presets/llama-2-chat", "llama2-chat"),  # Kaito's preset configurations page
        ("presets/llama-2-chat/", "llama2-chat"),
        ("llama2-completion", "llama2-completion"),  # the supported-models page's MODEL_TYPE
        ("llama2-chat", "llama2-chat"),
    ],
)
def test_server_step_copies_the_server_that_src_dir_names(tmp_path, monkeypatch, src_dir, server):
    monkeypatch.chdir(tmp_path)
    assert main(["server", f"SRC_DIR={src_dir}", "LLAMA_WEIGHTS=weights/llama-2-7b"]) == 0
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(here, "presets", "inference", server, "inference_api.py")) as f:
        assert (tmp_path / "inference_api.py").read_text() == f.read()


@pytest.mark.parametrize(
    "args, message",
    [
        (["SRC_DIR=presets/llama-3", "LLAMA_VERSION=llama-2-7b"], "SRC_DIR='presets/llama-3': its last folder must be"),
        (["MODEL_TYPE=", "WEIGHTS_PATH=weights/x"], "MODEL_TYPE='': its last folder must be llama-2"),
        (["SRC_DIR=presets/llama-2", "LLAMA_VERSION="], "LLAMA_VERSION is not set: pass --build-arg LLAMA_VERSION="),
        (["SRC_DIR=presets/llama-2", "LLAMA_WEIGHTS="], "LLAMA_WEIGHTS is not set: pass --build-arg LLAMA_WEIGHTS="),
        (["MODEL_TYPE=llama2-chat", "WEIGHTS_PATH=/data/llama-2-7b"], "WEIGHTS_PATH='/data/llama-2-7b': Docker copies"),
        (["SRC_DIR=presets/llama-2", "LLAMA_WEIGHTS=../llama-2-7b"], "LLAMA_WEIGHTS='../llama-2-7b': Docker copies"),
    ],
)
def test_server_step_rejects_a_bad_arg_naming_it(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["server", *args]) == 1
    assert capsys.readouterr().err.startswith(f"error: {message}")
    assert not (tmp_path / "inference_api.py").exists()


def test_weights_step_checks_the_folder_then_writes_the_version(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "README.md").write_text("not weights")
    assert main(["weights", "LLAMA_WEIGHTS=downloads", "VERSION=0.0.1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: LLAMA_WEIGHTS='downloads': the folder holds no checkpoint") and "README.md" in err
    assert not (tmp_path / "version.txt").exists()
    (tmp_path / "weights" / "params.json").write_text("{}")
    assert main(["weights", "LLAMA_WEIGHTS=downloads", "VERSION=0.0.9"]) == 0
    assert (tmp_path / "version.txt").read_text() == "0.0.9\n"


def test_max_batch_size_is_32_by_default_as_documented_and_kaitos_8_stays_8(monkeypatch):
    monkeypatch.delenv("PRESET_MAX_BATCH_SIZE", raising=False)
    assert parse_settings([]).max_batch_size == 32
    assert parse_settings(KAITO_FLAGS).max_batch_size == 8
    assert parse_settings([], cls=HFSettings).max_batch_size == 32
    assert parse_settings(["--max_batch_size", "8"], cls=HFSettings).max_batch_size == 8
