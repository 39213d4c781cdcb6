"""Real images: a local base image (debootstrap + docker import), a wheelhouse, docker build, docker run.

Needs root and Debian's docker.io and debootstrap (`make test` installs them). No image is pulled and
builds have no network: the base is made here and pip installs from the wheelhouse, as an air-gapped
user would build. Every container runs as Pod Security's restricted profile has it run (docker_env.RESTRICTED:
the images' UID, a read-only root with /tmp writable, no capabilities, no privilege escalation).
"""

import os
import resource
import shutil
import subprocess
import sys
import time

import pytest
import requests
import yaml
from dockerfile_parse import DockerfileParser

from presets.tools.gguf_export import export
from presets.tools.tiny_checkpoint import write_checkpoint
from presets.tools.tiny_hf import write_falcon
from tests import docker_env
from tests.conftest import TINY
from tests.docker_env import IMAGE_UID, RESTRICTED, sh
from tests.launch import ROOT, answers_kaitos_documented_requests, free_port, get, post
from tests.test_hf import FALCON_ADVANCED
from tests.test_llama_cpp import GREEDY, LLM_API_GENERATE, sse_text

DOCKERFILES = {
    "llama": os.path.join(
        ROOT, "docker", "presets", "inference", "llama-2", "Dockerfile"
    ),  # Kaito's supported-models page
    "llama presets page": os.path.join(
        ROOT, "docker", "presets", "llama-2", "Dockerfile"
    ),  # Kaito's preset configurations
    "llama readme": os.path.join(ROOT, "Dockerfile"),  # the original presets README's command
    "falcon": os.path.join(ROOT, "docker", "presets", "inference", "falcon", "Dockerfile"),
}
LLM_API_DOCKERFILE = os.path.join(ROOT, "docker", "presets", "inference", "llama-cpp", "Dockerfile")
# No network and no pull: the base made here, pip from the wheelhouse (added to each documented command).
OFFLINE = [
    "--network",
    "none",
    f"--build-arg=BASE_IMAGE={docker_env.BASE}",
    "--build-arg=PIP_FLAGS=--no-index --find-links /tmp/build",
]
KAITO_LLAMA = (
    "cd /workspace/llama/llama-2 && torchrun --nnodes 1 --nproc_per_node 1 "
    "inference_api.py --max_seq_len 512 --max_batch_size 8"
)


@pytest.fixture(scope="module")
def base_image():
    with docker_env.engine():
        yield docker_env.base_image()


@pytest.fixture(scope="module")
def wheelhouse():
    return docker_env.wheelhouse()


@pytest.fixture(scope="module")
def weights():
    """Tiny checkpoints under weights/ (the build context admits it), removed afterwards."""
    llama = os.path.join(ROOT, "weights", ".docker-test-llama")
    falcon = os.path.join(ROOT, "weights", ".docker-test-falcon")
    readme_root = os.path.join(ROOT, "llama")  # the presets README's layout: llama/<MODEL-VERSION>/
    made_root = not os.path.isdir(readme_root)
    readme_folder = os.path.join(readme_root, "presets-test-tiny")
    write_checkpoint(llama, TINY)
    write_falcon(falcon)
    for folder in (llama, falcon):  # as safetensors saves them: only their owner reads them (the images' user must)
        for file in [os.path.join(folder, f) for f in os.listdir(folder)]:
            os.chmod(file, 0o600 if os.path.isfile(file) else 0o700)
    shutil.copytree(llama, readme_folder, dirs_exist_ok=True)
    yield {
        "llama": os.path.relpath(llama, ROOT),
        "falcon": os.path.relpath(falcon, ROOT),
        "llama version": "presets-test-tiny",
    }
    shutil.rmtree(llama)
    shutil.rmtree(falcon)
    shutil.rmtree(readme_root if made_root else readme_folder)


def docker_build(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """`docker build <argv>` run from the repository root, as Kaito's docs say, plus OFFLINE before the context."""
    *args, context = argv
    out = subprocess.run(
        ["docker", "build", "-q", *args, *OFFLINE, context],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
    )
    assert not check or out.returncode == 0, (
        f"docker build {' '.join(argv)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return out


def build(kind: str, tag: str, weights_path: str, **args) -> None:
    """The supported-models page's form (--file, WEIGHTS_PATH, MODEL_TYPE, VERSION), or the Falcon image's."""
    flags = [f"--build-arg={k}={v}" for k, v in {"WEIGHTS_PATH": weights_path, **args}.items()]
    docker_build("-f", DOCKERFILES[kind], *flags, "-t", tag, ".")


def documented_build(
    doc: str, kind: str, weights: dict, tag: str, src_dir: str | None = None
) -> subprocess.CompletedProcess:
    """The presets README's (doc "readme") or the preset configurations page's (doc "presets page") command
    for the text (kind "") or chat (kind "-chat") server, as the document writes it; src_dir replaces SRC_DIR's
    value (to give a wrong one)."""
    if doc == "readme":
        src = src_dir or f"/home/kaito/presets/llama-2{kind}"
        return docker_build(
            "--build-arg",
            f"LLAMA_VERSION={weights['llama version']}",
            "--build-arg",
            f"SRC_DIR={src}",
            "-t",
            tag,
            ".",
            check=src_dir is None,
        )
    src = src_dir or f"presets/llama-2{kind}"
    return docker_build(
        "--file",
        "docker/presets/llama-2/Dockerfile",
        "--build-arg",
        f"LLAMA_WEIGHTS={weights['llama']}",
        "--build-arg",
        f"SRC_DIR={src}",
        "-t",
        tag,
        ".",
        check=src_dir is None,
    )


def image_contents(tag: str) -> str:
    """What makes two images the same server: Kaito's folder (files and checksums), the config."""
    files = sh(
        "docker",
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        tag,
        "-c",
        "cd /workspace/llama/llama-2 && find . -type f | sort | xargs sha256sum",
    ).stdout
    config = sh(
        "docker",
        "inspect",
        "--format",
        "{{json .Config.Cmd}} {{json .Config.Env}} {{.Config.WorkingDir}} {{json .Config.ExposedPorts}} "
        "{{.Config.User}}",
        tag,
    ).stdout
    return files + config


def run_container(tag: str, *command: str) -> tuple[str, str]:
    """The image run the restricted way (docker_env.RESTRICTED), its port published on 127.0.0.1."""
    port = free_port()
    name = f"presets-test-{port}"
    sh("docker", "run", "-d", "--name", name, *RESTRICTED, "-p", f"127.0.0.1:{port}:5000", tag, *command)
    return name, f"http://127.0.0.1:{port}"


def image_user(tag: str) -> str:
    return sh("docker", "inspect", "--format", "{{.Config.User}}", tag).stdout.strip()


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
        weights = next(i for i, v in enumerate(copies) if v.endswith(" weights/"))
        assert deps < code < weights, "dependencies, then code, then weights"
        assert not any(op == "ADD" or "curl " in v or "wget " in v for op, v in steps), "nothing downloaded"
    # The three Llama Dockerfiles (one per documented command) are one recipe: the same steps but for arg names.
    names = {"LLAMA_VERSION": "W", "LLAMA_WEIGHTS": "W", "WEIGHTS_PATH": "W", "SRC_DIR": "S", "MODEL_TYPE": "S"}

    def recipe(path):
        steps = []
        for i in DockerfileParser(path=path).structure:
            value = (
                i["value"].replace("llama/${LLAMA_VERSION}", "${LLAMA_VERSION}").replace("=llama2-completion", '=""')
            )
            for name, same in names.items():
                value = value.replace(name, same)
            steps += [] if i["instruction"] == "COMMENT" else [(i["instruction"], value)]
        return steps

    llama = [recipe(path) for kind, path in DOCKERFILES.items() if kind.startswith("llama")]
    assert len(llama) == 3 and llama[0] == llama[1] == llama[2]
    for path in [*DOCKERFILES.values(), LLM_API_DOCKERFILE]:
        parser = DockerfileParser(path=path)
        users = [i["value"] for i in parser.structure if i["instruction"] == "USER"]
        assert users[-1:] == [f"{IMAGE_UID}:{IMAGE_UID}"], path  # numeric, so runAsNonRoot can check it
        # Nothing written beside the code; every cache under HOME, in the writable /tmp (docs/operations.md).
        assert parser.envs["PYTHONDONTWRITEBYTECODE"] == "1" and parser.envs["HOME"] == "/tmp", path
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        ignore = f.read().split()
    assert ignore[ignore.index("*") :][:1] == ["*"] and "!presets/" in ignore  # an allow-list context


@pytest.mark.parametrize("model_type", ["llama2-completion", "llama2-chat"])
def test_llama_image_serves_with_kaitos_command(base_image, wheelhouse, weights, model_type):
    """The supported-models page's command; Kaito's explicit --max_batch_size 8 stays 8 (the pool's log line says
    8 fit)."""
    tag = f"presets-test-llama:{model_type}"
    build("llama", tag, weights["llama"], MODEL_TYPE=model_type, VERSION="0.0.7")
    assert image_user(tag) == f"{IMAGE_UID}:{IMAGE_UID}"
    name, url = run_container(tag, "/bin/sh", "-c", KAITO_LLAMA)
    try:
        wait_healthy(name, url)
        answers_kaitos_documented_requests(url, chat=model_type == "llama2-chat")
        version = sh("docker", "exec", name, "cat", "/workspace/llama/llama-2/version.txt").stdout.strip()
        assert version == "0.0.7"
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
        assert "8 sequences of max_seq_len 512 fit" in logs.stdout + logs.stderr
        shutdown_exits_0(name, url)
    finally:
        remove(name)


@pytest.mark.parametrize("doc", ["readme", "presets page"])
@pytest.mark.parametrize("kind", ["", "-chat"], ids=["text", "chat"])
def test_older_documented_commands_build_the_same_image(base_image, wheelhouse, weights, doc, kind):
    """Run verbatim from the repository root, each older command builds the supported-models page's image for its
    SRC_DIR (same server, Kaito folder, weights, version, command), which serves Kaito's command."""
    tag = f"presets-test-llama-2{kind}:{doc.replace(' ', '-')}"
    documented_build(doc, kind, weights, tag)
    reference = f"presets-test-llama:reference{kind}"
    build("llama", reference, weights["llama"], MODEL_TYPE="llama2-chat" if kind else "llama2-completion")
    assert image_contents(tag) == image_contents(reference)
    name, url = run_container(tag, "/bin/sh", "-c", KAITO_LLAMA)
    try:
        wait_healthy(name, url)
        answers_kaitos_documented_requests(url, chat=kind == "-chat")
        shutdown_exits_0(name, url)
    finally:
        remove(name)


def test_a_wrong_src_dir_or_missing_weights_fail_the_build_naming_the_arg(base_image, wheelhouse, weights):
    out = documented_build("presets page", "", weights, "presets-test-llama:wrong", src_dir="presets/llama-3")
    assert out.returncode != 0
    assert (
        "error: SRC_DIR='presets/llama-3': its last folder must be llama-2 (text completion" in out.stdout + out.stderr
    )
    out = docker_build(
        "--build-arg", "SRC_DIR=/home/kaito/presets/llama-2", "-t", "presets-test-llama:wrong", ".", check=False
    )
    assert out.returncode != 0
    assert "error: LLAMA_VERSION is not set: pass --build-arg LLAMA_VERSION=<MODEL-VERSION>" in out.stdout + out.stderr
    out = docker_build(
        "--file",
        "docker/presets/llama-2/Dockerfile",
        "--build-arg",
        "LLAMA_WEIGHTS=presets/models/llama",
        "--build-arg",
        "SRC_DIR=presets/llama-2-chat",
        "-t",
        "presets-test-llama:wrong",
        ".",
        check=False,
    )
    assert out.returncode != 0
    assert "error: LLAMA_WEIGHTS='presets/models/llama': the folder holds no checkpoint" in out.stdout + out.stderr


def test_llama_image_default_command_and_falcon_image(base_image, wheelhouse, weights):
    build("llama", "presets-test-llama:default", weights["llama"])
    name, url = run_container("presets-test-llama:default")  # the image's own CMD: one GPU (here CPU)
    try:
        wait_healthy(name, url)
        assert post(f"{url}/generate", {"prompts": ["Hello"]})[0] == 200
        shutdown_exits_0(name, url)
    finally:
        remove(name)
    build("falcon", "presets-test-falcon:latest", weights["falcon"], VERSION="0.0.3")
    assert image_user("presets-test-falcon:latest") == f"{IMAGE_UID}:{IMAGE_UID}"
    name, url = run_container("presets-test-falcon:latest")
    try:
        wait_healthy(name, url)
        status, body = post(f"{url}/chat", FALCON_ADVANCED)
        assert status == 200 and body["Result"].startswith("YOUR_PROMPT_HERE")
        assert sh("docker", "exec", name, "cat", "/workspace/tfs/version.txt").stdout.strip() == "0.0.3"
        shutdown_exits_0(name, url)
    finally:
        remove(name)


def test_compose_file_runs_the_image_as_llm_api_did():
    """docker-compose validates the file; its service mounts, port and environment are llm-api's README's."""
    out = sh("docker-compose", "-f", os.path.join(ROOT, "docker-compose.yaml"), "config").stdout
    app = yaml.safe_load(out)["services"]["app"]
    assert app["build"]["dockerfile"] == os.path.relpath(LLM_API_DOCKERFILE, ROOT)
    assert [(int(p["published"]), p["target"]) for p in app["ports"]] == [(8000, 8000)]
    assert sorted(app["volumes"]) == [f"{ROOT}/config.yaml:/llm-api/config.yaml:ro", f"{ROOT}/models:/models:rw"]
    assert app["environment"] == {"LLM_API_MODELS_DIR": "/models"}
    assert app["ulimits"]["memlock"] == 16000000000
    assert app["read_only"] and app["tmpfs"] == ["/tmp"] and app["cap_drop"] == ["ALL"]  # as the tests run it
    assert app["security_opt"] == ["no-new-privileges:true"] and "user" not in app  # the image's UID


def test_llm_api_image_runs_as_llm_apis_readme_says(base_image, wheelhouse, tmp_path):
    """docker run -v models:/models:rw -v config.yaml:/llm-api/config.yaml:ro -p 8000 --ulimit memlock=..."""
    models = tmp_path / "models"
    models.mkdir()
    export(write_checkpoint(str(tmp_path / "ckpt"), TINY), str(models / "ggml-llama-tiny-q4.bin"))
    config = tmp_path / "config.yaml"
    config.write_text(
        "models_dir: /models\nmodel_family: llama\nmodel_name: tiny\n"
        "setup_params:\n  convert: false\n  migrate: false\n"
        "model_params:\n  ctx_size: 256\n  seed: -1\n  n_threads: 2\n"
    )
    tag = "presets-test-llm-api:latest"
    docker_build("-f", LLM_API_DOCKERFILE, "-t", tag, ".")
    assert image_user(tag) == f"{IMAGE_UID}:{IMAGE_UID}"
    port = free_port()
    name = f"presets-test-{port}"
    # llm-api's README's memlock=16000000000 where this machine allows it; a sandbox may cap the hard limit lower.
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    memlock = 16000000000 if hard == resource.RLIM_INFINITY else min(16000000000, hard)
    sh(
        "docker",
        "run",
        "-d",
        "--name",
        name,
        *RESTRICTED,
        "-v",
        f"{models}/:/models:rw",
        "-v",
        f"{config}:/llm-api/config.yaml:ro",
        "-p",
        f"127.0.0.1:{port}:8000",
        "--ulimit",
        f"memlock={memlock}",
        tag,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(name, url)
        r = requests.post(
            f"{url}/generate", data=LLM_API_GENERATE, headers={"Content-Type": "application/json"}, timeout=60
        )
        assert r.status_code == 200 and isinstance(r.json(), str)
        status, text = post(f"{url}/generate", {"prompt": "Hello", "params": {"n_predict": 12, **GREEDY}})
        stream = requests.post(
            f"{url}/agenerate", json={"prompt": "Hello", "params": {"n_predict": 12, **GREEDY}}, timeout=60
        )
        assert status == 200 and sse_text(stream.text) == (text, [])
        status, vector = post(f"{url}/embeddings", {"text": "Hello"})
        assert status == 200 and len(vector) == TINY.dim
        shutdown_exits_0(name, url)
    finally:
        remove(name)
