"""What the image tests build on: a Docker engine, a local base image, a wheelhouse. No image is pulled.

`python -m tests.docker_env` makes the base image ahead of the tests (`make test` runs it while
llama-cpp-python compiles: debootstrap waits on the network, the compiler on the CPU); the fixtures of
tests/test_docker.py use the same functions and find it made.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "presets-test-base:bookworm-gomp"
IMAGE_UID = 1000  # the images' USER (numeric, no passwd entry), as the Kubernetes examples' runAsUser
# How the tests run every image: Pod Security's restricted profile in Docker's words. The root filesystem is
# read-only and /tmp the only writable folder (the images point HOME there); Docker's own /dev/shm stays.
RESTRICTED = [
    "--user",
    f"{IMAGE_UID}:{IMAGE_UID}",
    "--read-only",
    "--tmpfs",
    "/tmp",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
]


def sh(*cmd, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@contextlib.contextmanager
def engine():
    """A running Docker engine: the one already running, or one started here and stopped after."""
    for tool in ("docker", "dockerd", "debootstrap"):
        assert shutil.which(tool), f"{tool} is missing: run `make system-deps` (as root)"
    if subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        yield
        return
    with open(os.path.join(tempfile.gettempdir(), "presets-dockerd.log"), "w") as log:
        started = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 60
            while subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
                assert time.time() < deadline and started.poll() is None, "dockerd did not start"
                time.sleep(0.5)
            yield
        finally:
            started.send_signal(signal.SIGTERM)  # stop the engine we started, by its PID
            started.wait(timeout=60)


def base_image() -> str:
    """Debian bookworm with python3, venv and OpenMP's runtime (llama.cpp), made by debootstrap; kept between
    runs. Needs a running engine."""
    if subprocess.run(["docker", "image", "inspect", BASE], capture_output=True).returncode != 0:
        with tempfile.TemporaryDirectory() as rootfs:
            sh(
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates,libgomp1",
                "bookworm",
                rootfs,
                "http://deb.debian.org/debian",
            )
            with subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE) as tar:
                sh("docker", "import", "-", BASE, stdin=tar.stdout)
    return BASE


def wheelhouse() -> str:
    """The pinned requirements as wheels in .wheelhouse/ (inside the build context). llama-cpp-python's
    wheel comes from pip's cache of the one `make install-llama-cpp` compiled."""
    path = os.path.join(ROOT, ".wheelhouse")
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "-w", path, "-c", os.path.join(ROOT, "constraints.txt")]
    sh(*pip, "-r", os.path.join(ROOT, "requirements.txt"), "-r", os.path.join(ROOT, "requirements-llama-cpp.txt"))
    return path


if __name__ == "__main__":
    with engine():
        print(f"base image {base_image()} ready")
