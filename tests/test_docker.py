"""Real images: a local base image (debootstrap + docker import), a wheelhouse, docker build, docker run.

Needs root and Debian's docker.io and debootstrap (`make test` installs them). No image is pulled and
builds have no network: the base is made here and pip installs from the wheelhouse, as an air-gapped
user would build.
"""

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import requests
import yaml
from dockerfile_parse import DockerfileParser

from presets.tools.gguf_export import export
from presets.tools.tiny_checkpoint import write_checkpoint
from presets.tools.tiny_hf import write_falcon
from tests.conftest import TINY
from tests.launch import ROOT, free_port, get, post
from tests.test_api import SEED_CHATS, SEED_GENERATE
from tests.test_hf import SEED_ADVANCED
from tests.test_llama_cpp import GREEDY, sse_text
from tests.test_llama_cpp import SEED_GENERATE as SEED_LLM_API

BASE = "presets-test-base:bookworm-gomp"
DOCKERFILES = {
    "llama": os.path.join(ROOT, "docker", "presets", "inference", "llama-2", "Dockerfile"),
    "falcon": os.path.join(ROOT, "docker", "presets", "inference", "falcon", "Dockerfile"),
}
LLM_API_DOCKERFILE = os.path.join(ROOT, "docker", "presets", "inference", "llama-cpp", "Dockerfile")
KAITO_LLAMA = ("cd /workspace/llama/llama-2 && torchrun --nnodes 1 --nproc_per_node 1 "
               "inference_api.py --max_seq_len 512 --max_batch_size 8")  # fmt: skip


def sh(*cmd, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def docker():
    """A running Docker engine: the one already running, or one started here and stopped after."""
    for tool in ("docker", "dockerd", "debootstrap"):
        assert shutil.which(tool), f"{tool} is missing: run `make system-deps` (as root)"
    if subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        yield
        return
    with open(os.path.join(tempfile.gettempdir(), "presets-dockerd.log"), "w") as log:
        started = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
            assert time.time() < deadline and started.poll() is None, "dockerd did not start"
            time.sleep(0.5)
        yield
        started.send_signal(signal.SIGTERM)  # stop the engine we started, by its PID
        started.wait(timeout=60)


@pytest.fixture(scope="module")
def base_image(docker):
    """Debian bookworm with python3, venv and OpenMP's runtime (llama.cpp), made by debootstrap; kept between runs."""
    if subprocess.run(["docker", "image", "inspect", BASE], capture_output=True).returncode != 0:
        with tempfile.TemporaryDirectory() as rootfs:
            sh("debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates,libgomp1",
               "bookworm", rootfs, "http://deb.debian.org/debian")  # fmt: skip
            with subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE) as tar:
                sh("docker", "import", "-", BASE, stdin=tar.stdout)
    return BASE


@pytest.fixture(scope="module")
def wheelhouse():
    """The pinned requirements as wheels in .wheelhouse/ (inside the build context). llama-cpp-python's
    wheel comes from pip's cache of the one `make install-llama-cpp` compiled."""
    path = os.path.join(ROOT, ".wheelhouse")
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "-w", path, "-c", os.path.join(ROOT, "constraints.txt")]
    sh(*pip, "-r", os.path.join(ROOT, "requirements.txt"), "-r", os.path.join(ROOT, "requirements-llama-cpp.txt"))
    return path


@pytest.fixture(scope="module")
def weights():
    """Tiny checkpoints under weights/ (the build context admits it), removed afterwards."""
    llama = os.path.join(ROOT, "weights", ".docker-test-llama")
    falcon = os.path.join(ROOT, "weights", ".docker-test-falcon")
    write_checkpoint(llama, TINY)
    write_falcon(falcon)
    yield {"llama": os.path.relpath(llama, ROOT), "falcon": os.path.relpath(falcon, ROOT)}
    shutil.rmtree(llama)
    shutil.rmtree(falcon)


def build(kind: str, tag: str, base: str, weights_path: str, **args) -> None:
    flags = [f"--build-arg={k}={v}" for k, v in
             {"BASE_IMAGE": base, "PIP_FLAGS": "--no-index --find-links /tmp/build", "WEIGHTS_PATH": weights_path,
              **args}.items()]  # fmt: skip
    sh("docker", "build", "-q", "--network", "none", "-f", DOCKERFILES[kind], *flags, "-t", tag, ROOT,
       env={**os.environ, "DOCKER_BUILDKIT": "0"})  # fmt: skip


def run_container(tag: str, *command: str) -> tuple[str, str]:
    port = free_port()
    name = f"presets-test-{port}"
    sh("docker", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:5000", tag, *command)
    return name, f"http://127.0.0.1:{port}"


def wait_healthy(name: str, url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if get(f"{url}/healthz", timeout=2)[0] == 200:
                return
        except Exception:
            pass
        time.sleep(0.5)
    logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
    raise AssertionError(f"container not healthy:\n{logs.stdout}{logs.stderr}")


def shutdown_exits_0(name: str, url: str) -> None:
    assert post(f"{url}/shutdown", None) == (200, {})
    code = subprocess.run(["docker", "wait", name], capture_output=True, text=True, timeout=60).stdout.strip()
    assert code == "0", subprocess.run(["docker", "logs", name], capture_output=True, text=True).stderr


def remove(name: str) -> None:
    subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def test_dockerfiles_lint_and_layer_order():
    hadolint = os.path.join(os.path.dirname(sys.executable), "hadolint")
    sh(hadolint, *DOCKERFILES.values(), LLM_API_DOCKERFILE)
    for path in DOCKERFILES.values():
        parser = DockerfileParser(path=path)
        steps = [(i["instruction"], i["value"]) for i in parser.structure if i["instruction"] != "COMMENT"]
        assert steps[0] == ("ARG", steps[0][1]) and steps[0][1].startswith("BASE_IMAGE=")
        assert ("FROM", "${BASE_IMAGE}") in steps
        copies = [v for op, v in steps if op == "COPY"]
        deps = next(i for i, v in enumerate(copies) if v.startswith("requirements.txt"))
        code = next(i for i, v in enumerate(copies) if v.startswith("presets "))
        weights = next(i for i, v in enumerate(copies) if v.startswith("${WEIGHTS_PATH}"))
        assert deps < code < weights, "dependencies, then code, then weights"
        assert not any(op == "ADD" or "curl " in v or "wget " in v for op, v in steps), "nothing downloaded"
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        ignore = f.read().split()
    assert ignore[ignore.index("*") :][:1] == ["*"] and "!presets/" in ignore  # an allow-list context


@pytest.mark.parametrize("model_type", ["llama2-completion", "llama2-chat"])
def test_llama_image_serves_with_kaitos_command(base_image, wheelhouse, weights, model_type):
    tag = f"presets-test-llama:{model_type}"
    build("llama", tag, base_image, weights["llama"], MODEL_TYPE=model_type, VERSION="0.0.7")
    name, url = run_container(tag, "/bin/sh", "-c", KAITO_LLAMA)
    try:
        wait_healthy(name, url)
        assert get(url) == (200, "Server is running")
        if model_type == "llama2-completion":
            status, body = post(f"{url}/generate", SEED_GENERATE)
            assert status == 200 and len(body["results"]) == 4
        else:
            for seed in SEED_CHATS:
                status, body = post(f"{url}/chat", seed)
                assert status == 200 and len(body["results"]) == len(seed["input_data"]["input_string"])
        version = sh("docker", "exec", name, "cat", "/workspace/llama/llama-2/version.txt").stdout.strip()
        assert version == "0.0.7"
        shutdown_exits_0(name, url)
    finally:
        remove(name)


def test_llama_image_default_command_and_falcon_image(base_image, wheelhouse, weights):
    build("llama", "presets-test-llama:default", base_image, weights["llama"])
    name, url = run_container("presets-test-llama:default")  # the image's own CMD: one GPU (here CPU)
    try:
        wait_healthy(name, url)
        assert post(f"{url}/generate", {"prompts": ["Hello"]})[0] == 200
        shutdown_exits_0(name, url)
    finally:
        remove(name)
    build("falcon", "presets-test-falcon:latest", base_image, weights["falcon"], VERSION="0.0.3")
    name, url = run_container("presets-test-falcon:latest")
    try:
        wait_healthy(name, url)
        status, body = post(f"{url}/chat", SEED_ADVANCED)
        assert status == 200 and body["Result"].startswith("YOUR_PROMPT_HERE")
        assert sh("docker", "exec", name, "cat", "/workspace/tfs/version.txt").stdout.strip() == "0.0.3"
        shutdown_exits_0(name, url)
    finally:
        remove(name)


def test_compose_file_runs_the_image_as_llm_api_did():
    """docker-compose validates the file; its service mounts, port and environment are seed 004's."""
    out = sh("docker-compose", "-f", os.path.join(ROOT, "docker-compose.yaml"), "config").stdout
    app = yaml.safe_load(out)["services"]["app"]
    assert app["build"]["dockerfile"] == os.path.relpath(LLM_API_DOCKERFILE, ROOT)
    assert [(int(p["published"]), p["target"]) for p in app["ports"]] == [(8000, 8000)]
    assert sorted(app["volumes"]) == [f"{ROOT}/config.yaml:/llm-api/config.yaml:ro", f"{ROOT}/models:/models:rw"]
    assert app["environment"] == {"LLM_API_MODELS_DIR": "/models"}
    assert app["ulimits"]["memlock"] == 16000000000


def test_llm_api_image_runs_as_seed_004_says(base_image, wheelhouse, tmp_path):
    """docker run -v models:/models:rw -v config.yaml:/llm-api/config.yaml:ro -p 8000 --ulimit memlock=..."""
    models = tmp_path / "models"
    models.mkdir()
    export(write_checkpoint(str(tmp_path / "ckpt"), TINY), str(models / "ggml-llama-tiny-q4.bin"))
    config = tmp_path / "config.yaml"
    config.write_text("models_dir: /models\nmodel_family: llama\nmodel_name: tiny\n"
                      "setup_params:\n  convert: false\n  migrate: false\n"
                      "model_params:\n  ctx_size: 256\n  seed: -1\n  n_threads: 2\n")  # fmt: skip
    tag = "presets-test-llm-api:latest"
    flags = [f"--build-arg=BASE_IMAGE={base_image}", "--build-arg=PIP_FLAGS=--no-index --find-links /tmp/build"]
    sh("docker", "build", "-q", "--network", "none", "-f", LLM_API_DOCKERFILE, *flags, "-t", tag, ROOT,
       env={**os.environ, "DOCKER_BUILDKIT": "0"})  # fmt: skip
    port = free_port()
    name = f"presets-test-{port}"
    # The seed's memlock=16000000000 where this machine allows it; a sandbox may cap the hard limit lower.
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    memlock = 16000000000 if hard == resource.RLIM_INFINITY else min(16000000000, hard)
    sh("docker", "run", "-d", "--name", name, "-v", f"{models}/:/models:rw", "-v", f"{config}:/llm-api/config.yaml:ro",
       "-p", f"127.0.0.1:{port}:8000", "--ulimit", f"memlock={memlock}", tag)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(name, url)
        r = requests.post(
            f"{url}/generate", data=SEED_LLM_API, headers={"Content-Type": "application/json"}, timeout=60
        )
        assert r.status_code == 200 and isinstance(r.json(), str)
        status, text = post(f"{url}/generate", {"prompt": "Hello", "params": {"n_predict": 12, **GREEDY}})
        stream = requests.post(f"{url}/agenerate", json={"prompt": "Hello", "params": {"n_predict": 12, **GREEDY}},
                               timeout=60)  # fmt: skip
        assert status == 200 and sse_text(stream.text) == (text, [])
        status, vector = post(f"{url}/embeddings", {"text": "Hello"})
        assert status == 200 and len(vector) == TINY.dim
        shutdown_exits_0(name, url)
    finally:
        remove(name)
