"""Start real server processes (plain python or torchrun, optionally inside a network namespace)."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import requests

from tests.test_api import KAITO_CHATS, KAITO_GENERATE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_cmd(kind: str, ckpt: str, port: int, *flags: str, torchrun=None, host: str = "127.0.0.1") -> list[str]:
    """The command line of a `kind` server in fp32 unless `flags` pass --dtype (conftest.settings_for says why);
    `torchrun` is None (plain python) or torchrun's flags."""
    launcher = [sys.executable] if torchrun is None else [sys.executable, "-m", "torch.distributed.run", *torchrun]
    sp = os.path.join(ckpt, "tokenizer.model")  # Meta's layout; a HuggingFace folder's tokenizer is found by the server
    tokenizer = ["--tokenizer_path", sp] if os.path.isfile(sp) else []
    return [
        *launcher,
        "inference_api.py",
        "--ckpt_dir",
        ckpt,
        *tokenizer,
        "--host",
        host,
        "--port",
        str(port),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        *flags,
    ]


def start(cmd: list[str], kind: str, netns: str | None = None, env: dict | None = None) -> subprocess.Popen:
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    cwd = os.path.join(ROOT, "presets", "inference", kind if kind == "falcon" else f"llama2-{kind}")
    # Its output goes to a file, not a pipe: a pipe nobody reads fills (64 KiB of request log lines) and
    # then blocks the server on its next log line.
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # its own process group: `running` ends torchrun's ranks with it
    )
    proc.log = log
    return proc


def output(proc: subprocess.Popen) -> str:
    """What a process started by start() has written so far (all of it once it has been reaped)."""
    log = getattr(proc, "log", None)
    if log is None or log.closed:
        return getattr(proc, "final_output", "")
    log.seek(0)
    return log.read()


def reaped(proc: subprocess.Popen) -> None:
    """Keep the output of a process that has exited and close its file."""
    if getattr(proc, "log", None) is not None and not proc.log.closed:
        proc.final_output = output(proc)
        proc.log.close()


def get(url: str, netns: str | None = None, timeout: float = 5) -> tuple[int, object]:
    """(status, JSON body) of GET url, from inside `netns` when given."""
    return call("GET", url, None, netns, timeout)


def post(url: str, body, netns: str | None = None, timeout: float = 60) -> tuple[int, object]:
    return call("POST", url, body, netns, timeout)


def answers_kaitos_documented_requests(url: str, chat: bool) -> None:
    """The server at url answers the health check of Kaito's docs, then their /chat requests (chat) or /generate
    request."""
    assert get(url) == (200, "Server is running")
    if not chat:
        status, body = post(f"{url}/generate", KAITO_GENERATE)
        assert status == 200 and len(body["results"]) == 4
    else:
        for documented in KAITO_CHATS:
            status, body = post(f"{url}/chat", documented)
            assert status == 200 and len(body["results"]) == len(documented["input_data"]["input_string"])


_CLIENT = """
import json, sys, urllib.request, urllib.error
method, url, body, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
req = urllib.request.Request(url, data=None if body == "-" else body.encode(), method=method,
                             headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
        print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"""


def call(method: str, url: str, body, netns: str | None, timeout: float) -> tuple[int, object]:
    """One HTTP call; inside a namespace it runs as a small client process there. Raises ConnectionError."""
    if netns is None:
        r = requests.request(method, url, json=body, timeout=timeout)
        return r.status_code, r.json()
    args = [
        "ip",
        "netns",
        "exec",
        netns,
        sys.executable,
        "-c",
        _CLIENT,
        method,
        url,
        "-" if body is None else json.dumps(body),
        str(timeout),
    ]
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout + 10)
    if out.returncode != 0:
        raise requests.ConnectionError(out.stderr.strip().splitlines()[-1] if out.stderr else "failed")
    status, text = out.stdout.split("\n", 1)
    return int(status), json.loads(text)


def wait_healthy(proc: subprocess.Popen, url: str, netns: str | None = None, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{output(proc)}")
        try:
            if get(f"{url}/healthz", netns, timeout=2)[0] == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    raise AssertionError("server did not become healthy")


@contextlib.contextmanager
def running(*procs: subprocess.Popen):
    """Kill and reap whatever is still running when the block ends (a failed test leaves nothing behind)."""
    try:
        yield procs
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(p.pid) == p.pid:  # started by start(): its own group
                    os.killpg(p.pid, signal.SIGKILL)  # the ranks too: no orphan outlives the test
                else:
                    p.kill()
            p.communicate()
            reaped(p)


def assert_ranks_answer_as_one(kind: str, ckpt: str, nproc: int, flags: list[str], bodies: list, answers: list):
    """A `kind` server on `nproc` ranks (torchrun) answers `bodies` (POST /generate) with `answers`, then
    shuts down with exit 0."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(server_cmd(kind, ckpt, port, *flags, torchrun=["--nproc_per_node", str(nproc)]), kind)
    with running(proc):
        wait_healthy(proc, url)
        assert [post(f"{url}/generate", b) for b in bodies] == [(200, a) for a in answers]
        assert post(f"{url}/shutdown", None) == (200, {})
        code, out = finish(proc)
    assert code == 0, out


def finish(proc: subprocess.Popen, timeout: float = 30) -> tuple[int, str]:
    """Wait for the process to exit by itself; (exit code, output)."""
    if getattr(proc, "log", None) is None:  # not started by start(): its output comes through a pipe
        proc.final_output = ""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        reaped(proc)
        raise AssertionError(f"did not exit within {timeout}s:\n{out or output(proc)}") from None
    reaped(proc)
    return proc.returncode, out or output(proc)
