"""`make gpu-check`'s script, run on the CPU with --quick: every phase runs to its end and reports its figures,
so a GPU machine's few minutes are not spent finding a typo."""

import json
import subprocess
import sys


def test_gpu_check_runs_every_phase_on_the_cpu(tmp_path):
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "presets.tools.gpu_check", "--device", "cpu", "--shape", "small", "--quick"]
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "failed" not in report
    for attention in ("c", "sdpa"):  # fp32: the same sums as transformers, every greedy token equal
        parity = report[f"parity_float32_{attention}"]
        assert parity["logits_rel_err"] < 1e-4 and parity["greedy_tokens_equal_of_16"] == [16, 16, 16]
    assert [r["concurrent"] for r in report["concurrency"]] == [1, 4]
    assert all(r["tokens_per_s"] > 0 and r["preemptions"] == 0 for r in report["concurrency"])
    assert report["batch1_decode"]["ms_per_token"] > 0 and report["transformers_batch1"]["ms_per_token"] > 0
    assert report["time_to_ready"]["seconds"] > 0
    assert any("ready in" in line for line in report["time_to_ready"]["log"])
