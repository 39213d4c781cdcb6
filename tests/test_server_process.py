"""Real server processes, as a user runs them, driven over HTTP on loopback."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import requests

from tests.launch import (
    ROOT,
    answers_kaitos_documented_requests,
    finish,
    free_port,
    post,
    running,
    server_cmd,
    start,
    wait_healthy,
)

LAUNCHES = [("completion", None), ("chat", None), ("completion", ["--nproc_per_node", "1"])]


@pytest.mark.parametrize("kind, torchrun", LAUNCHES, ids=["completion", "chat", "completion-under-torchrun"])
def test_server_process_serves_kaitos_requests_and_shuts_down_with_0(tiny_ckpt, kind, torchrun):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(server_cmd(kind, tiny_ckpt, port, "--max_seq_len", "256", torchrun=torchrun), kind)
    with running(proc):
        wait_healthy(proc, url)
        assert requests.get(f"{url}/healthz").json() == {"status": "Healthy"}
        answers_kaitos_documented_requests(url, chat=kind == "chat")
        bad = requests.post(
            f"{url}/{'generate' if kind == 'completion' else 'chat'}",
            data="{",
            timeout=5,
            headers={"Content-Type": "application/json"},
        )
        assert bad.status_code == 400 and "valid JSON" in bad.json()["detail"]
        assert post(f"{url}/shutdown", None) == (200, {})
        code, out = finish(proc, timeout=15)  # exits within seconds
    assert code == 0, out
    route = "/generate" if kind == "completion" else "/chat"
    assert f"POST {route} 200 sequences=" in out and "generated_tokens=" in out  # one log line per request
    assert "Traceback" not in out
    # No --max_batch_size: Kaito's documented default of 32 (on CPU the pool holds 32 x --max_seq_len positions).
    assert "32 sequences of max_seq_len 256 fit" in out


def test_missing_checkpoint_exits_with_a_clear_error(tmp_path):
    proc = start(server_cmd("completion", str(tmp_path), free_port()), "completion")
    code, out = finish(proc)
    assert code != 0
    assert f"error: neither params.json (Meta's layout) nor config.json (HuggingFace's) in {tmp_path}" in out
    assert "Traceback" not in out


def test_shard_that_does_not_match_params_fails_loading_with_exit_code(tiny_ckpt, tmp_path):
    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    with open(ckpt / "params.json") as f:
        params = json.load(f)
    with open(ckpt / "params.json", "w") as f:
        json.dump({**params, "dim": 128}, f)
    proc = start(server_cmd("completion", str(ckpt), free_port()), "completion")
    code, out = finish(proc, timeout=60)
    assert code == 1, out  # a model that cannot load ends the server with exit code 1
    assert "does not match params.json" in out or "has shape" in out


PROBE = """
import os, runpy, sys
order = []
class Note:
    def find_spec(self, name, path=None, target=None):
        order.append(name)
sys.meta_path.insert(0, Note())
runpy.run_path(sys.argv[1])  # the entry point's imports, not its main()
print(order.index("presets.process.omp_spin") < order.index("torch"), os.environ.get("GOMP_SPINCOUNT"))
"""


@pytest.mark.parametrize("entry", ["llama2-completion", "llama2-chat", "falcon"])
def test_entry_points_set_openmp_spin_before_torch_loads(entry):
    """presets/process/omp_spin.py's spin count is in the environment before torch loads libgomp; the user's wins."""
    path = os.path.join(ROOT, "presets", "inference", entry, "inference_api.py")
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    for extra, want in (
        ({}, "True 10000000"),
        ({"GOMP_SPINCOUNT": "5"}, "True 5"),
        ({"OMP_WAIT_POLICY": "PASSIVE"}, "True None"),
    ):
        out = subprocess.run(
            [sys.executable, "-c", PROBE, path], env=base | extra, cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert out.stdout.strip() == want, out.stderr[-2000:]


@pytest.mark.parametrize("state,code", [("ready", 0), ("failed", 1)])
def test_sigterm_exits_0_after_a_drain_and_1_when_the_model_had_failed(state, code):
    """torchrun SIGTERMs rank 0 after another rank died: the exit code still says the job failed."""
    import asyncio
    import signal
    import types

    from presets.process.server import ServerProcess
    from presets.process.settings import HttpSettings

    calls = []
    rt = types.SimpleNamespace(
        state=state, drain=lambda: calls.append("drain"), shutdown=lambda *a: calls.append("end")
    )
    http = types.SimpleNamespace(active_requests=0, drain=lambda: calls.append("http drain"))

    async def drain():
        proc = ServerProcess("127.0.0.1", 0, HttpSettings())
        proc._loop, proc._stopped = asyncio.get_running_loop(), asyncio.Event()
        await proc._drain(http, rt, signal.SIGTERM)
        return proc.code, proc._stopped.is_set()

    assert asyncio.run(drain()) == (code, True) and calls == ["drain", "http drain", "end"]
