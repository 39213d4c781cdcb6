"""Real server processes (gunicorn, as a user runs them) driven over HTTP on loopback."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import requests

from tests.test_api import SEED_CHATS, SEED_GENERATE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, ckpt: str, *flags: str, torchrun: bool = False):
    port = free_port()
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"] if torchrun else [sys.executable]
    )
    cmd = [*launcher, "inference_api.py", "--ckpt_dir", ckpt, "--tokenizer_path", f"{ckpt}/tokenizer.model",
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--max_seq_len", "256", *flags]  # fmt: skip
    cwd = os.path.join(ROOT, "presets", "inference", f"llama2-{kind}")
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc, url: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become healthy")


def shutdown(proc, url: str) -> str:
    r = requests.post(f"{url}/shutdown", timeout=5)
    assert r.status_code == 200 and r.json() == {}
    out, _ = proc.communicate(timeout=15)  # exits within seconds
    assert proc.returncode == 0, out
    return out


@pytest.mark.parametrize("kind, torchrun", [("completion", False), ("chat", False), ("completion", True)],
                         ids=["completion", "chat", "completion-under-torchrun"])  # fmt: skip
def test_server_process_serves_seeds_and_shuts_down_with_0(tiny_ckpt, kind, torchrun):
    proc, url = start(kind, tiny_ckpt, torchrun=torchrun)
    try:
        wait_healthy(proc, url)
        assert requests.get(url).json() == "Server is running"
        assert requests.get(f"{url}/healthz").json() == {"status": "Healthy"}
        if kind == "completion":
            r = requests.post(f"{url}/generate", json=SEED_GENERATE, timeout=60)
            assert r.status_code == 200 and len(r.json()["results"]) == 4
        else:
            for body in SEED_CHATS:
                r = requests.post(f"{url}/chat", data=json.dumps(body), headers={"Content-Type": "application/json"})
                assert r.status_code == 200 and len(r.json()["results"]) == len(body["input_data"]["input_string"])
        bad = requests.post(f"{url}/{'generate' if kind == 'completion' else 'chat'}", data="{", timeout=5)
        assert bad.status_code == 400 and "valid JSON" in bad.json()["detail"]
        out = shutdown(proc, url)
    finally:
        proc.kill()
    route = "/generate" if kind == "completion" else "/chat"
    assert f"POST {route} 200 sequences=" in out and "generated_tokens=" in out  # one log line per request
    assert "Traceback" not in out


def test_missing_checkpoint_exits_with_a_clear_error(tmp_path):
    proc, _ = start("completion", str(tmp_path))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert f"error: params.json not found in {tmp_path}" in out and "Traceback" not in out


def test_shard_that_does_not_match_params_fails_loading_with_exit_code(tiny_ckpt, tmp_path):
    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    with open(ckpt / "params.json") as f:
        params = json.load(f)
    with open(ckpt / "params.json", "w") as f:
        json.dump({**params, "dim": 128}, f)
    proc, _ = start("completion", str(ckpt))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, out  # gunicorn halts: "Worker failed to boot"
    assert "does not match params.json" in out or "has shape" in out
