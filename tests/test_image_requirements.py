"""docker/install_requirements.sh, the images' dependency step, run here with a stand-in python3 and pip
that record their arguments: which torch build each TORCH_INDEX gives, and that every other package is
pinned by constraints.txt. (tests/test_docker.py builds the real images.)"""

import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "docker", "install_requirements.sh")

FAKE_PYTHON = """#!/bin/sh
# python3 -m venv DIR: a venv whose pip appends its arguments to $CALLS
mkdir -p "$3/bin"
printf '#!/bin/sh\\necho "$*" >> "$CALLS"\\n' > "$3/bin/pip"
chmod +x "$3/bin/pip"
"""


def install(tmp_path, **env) -> list[str]:
    build, bin_dir = tmp_path / "build", tmp_path / "bin"
    build.mkdir()
    bin_dir.mkdir()
    for name in ("requirements.txt", "constraints.txt"):
        shutil.copy(os.path.join(ROOT, name), build / name)
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    (bin_dir / "python3").chmod(0o755)
    calls = tmp_path / "calls"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "BUILD": str(build),
        "VENV": str(tmp_path / "venv"),
        "CALLS": str(calls),
        **env,
    }
    subprocess.run(["sh", SCRIPT], env=env, check=True, timeout=60)
    constraints = (build / "image-constraints.txt").read_text().splitlines()
    assert not any(line.startswith("torch==") for line in constraints)  # torch's build is the index's
    assert "triton==3.7.1" in constraints  # what CUDA torch 2.13.0 requires: the GPU image resolves
    return calls.read_text().splitlines()


def test_default_is_pypis_torch_with_everything_pinned(tmp_path):
    (call,) = install(tmp_path, PIP_FLAGS="")
    assert "--index-url" not in call
    assert f"-c {tmp_path}/build/image-constraints.txt -r {tmp_path}/build/requirements.txt" in call


def test_torch_index_installs_torch_from_it_first(tmp_path):
    index = "https://download.pytorch.org/whl/cu126"
    torch_call, rest = install(tmp_path, TORCH_INDEX=index, PIP_FLAGS="--retries 9")
    assert torch_call == f"install --no-cache-dir --retries 9 --index-url {index} torch==2.13.0"
    assert rest.startswith("install --no-cache-dir --retries 9 -c ")


def test_every_torch_dockerfile_passes_the_build_args_to_the_script():
    for path in [
        "Dockerfile",
        "docker/presets/llama-2/Dockerfile",
        "docker/presets/inference/llama-2/Dockerfile",
        "docker/presets/inference/falcon/Dockerfile",
    ]:
        with open(os.path.join(ROOT, path)) as f:
            text = f.read()
        assert 'ARG TORCH_INDEX=""' in text and "docker/install_requirements.sh" in text, path
        assert 'TORCH_INDEX="${TORCH_INDEX}" sh /tmp/build/install_requirements.sh' in text, path
