"""Time to ready: a server process on a large random checkpoint, from its start to /health 200, against
reading the checkpoint's bytes once, cold and warm page cache, same run, both layouts (Meta, HF safetensors).

    python -m presets.tools.bench_ready [--dir .cache/ready] [--dim 2048 --n_layers 22]

Cold runs drop the page cache first (root: /proc/sys/vm/drop_caches); without that right they are skipped.
The server runs with its defaults on the CPU (dtype auto). Its load lines (with their seconds) are printed.
"""

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch

from presets.models.llama.hf_convert import to_hf
from presets.models.llama.load import read_args
from presets.models.llama.model import ModelArgs
from presets.models.llama.tokenizer import Tokenizer
from presets.tools.bench import cpu_model
from presets.tools.tiny_checkpoint import write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def read_seconds(folder: str) -> float:
    t0 = time.perf_counter()
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            while f.read(16 << 20):
                pass
    return time.perf_counter() - t0


def ready_seconds(folder: str) -> tuple[float, list[str]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "inference_api.py", "--ckpt_dir", folder, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--device", "cpu", "--max_seq_len", "512", "--max_batch_size", "4"]
    log = tempfile.TemporaryFile("w+")
    env = {**os.environ, "PYTHONPATH": ROOT}
    t0 = time.perf_counter()
    cwd = os.path.join(ROOT, "presets", "inference", "llama2-completion")
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        while proc.poll() is None and time.perf_counter() - t0 < 900:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        seconds = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(60)
    log.seek(0)
    text = log.read()
    if proc.returncode not in (0, -15, None) and "ready in" not in text:
        raise RuntimeError(text[-2000:])
    lines = [
        m.split(" INFO ", 1)[-1]
        for m in text.splitlines()
        if re.search(r"weights on|ready in|linear layers|loading", m)
    ]
    return seconds, lines


def write_hf(meta: str, out: str) -> str:
    """The same weights as a HuggingFace folder: bf16 safetensors, config.json, the SentencePiece tokenizer."""
    tok = Tokenizer(f"{meta}/tokenizer.model")
    state = torch.load(f"{meta}/consolidated.00.pth", weights_only=True, mmap=True)
    to_hf(read_args(meta, tok), state).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    shutil.copy(f"{meta}/tokenizer.model", out)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=".cache/ready")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--n_layers", type=int, default=22)
    a = ap.parse_args(argv)
    args = ModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=16, n_kv_heads=4, vocab_size=32000, multiple_of=256)
    meta, hf = os.path.abspath(os.path.join(a.dir, "meta")), os.path.abspath(os.path.join(a.dir, "hf"))
    if not os.path.exists(f"{meta}/params.json"):
        print("writing the Meta-layout checkpoint", flush=True)
        write_checkpoint(meta, args)
    if not os.path.exists(f"{hf}/config.json"):
        print("writing the HuggingFace folder", flush=True)
        write_hf(meta, hf)
    params = sum(t.numel() for t in torch.load(f"{meta}/consolidated.00.pth", mmap=True, weights_only=True).values())
    print(f"\nmachine: {os.cpu_count()} CPUs ({cpu_model()}), torch {torch.__version__}")
    print(f"checkpoint: {params / 1e9:.2f}B parameters, bf16, dim {a.dim}, {a.n_layers} layers\n")
    print(
        "| layout | bytes | read cold (s) | read warm (s) | ready cold (s) | ready warm (s) | ready warm / read warm |"
    )
    print("|---|---|---|---|---|---|---|")
    logs = {}
    for name, folder in (("Meta", meta), ("HF safetensors", hf)):
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        cold = read_seconds(folder) if drop_caches() else float("nan")
        warm = read_seconds(folder)
        ready_cold = ready_seconds(folder)[0] if drop_caches() else float("nan")
        ready_warm, logs[name] = ready_seconds(folder)
        print(
            f"| {name} | {size / 1e9:.2f} GB | {cold:.1f} | {warm:.1f} | {ready_cold:.1f} | {ready_warm:.1f} "
            f"| {ready_warm / warm:.1f}x |",
            flush=True,
        )
    for name, lines in logs.items():
        print(f"\n{name}, warm start, the server's load lines:")
        for line in lines:
            print(f"  {line}")


if __name__ == "__main__":
    main()
