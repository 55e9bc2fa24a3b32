"""`make gpu-report` cannot rot: its --smoke switch runs every step on a CPU, scaled down.

The smoke report is a check that the command works end to end (the GPU tier, the benchmarks,
seeds, compile cold and warm, SIGTERM and resume, ablations), not a benchmark, and says so.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SECTIONS = (
    "GPU test tier",
    "make bench",
    "Data",
    "cifar10_fast, 2 seeds, eager",
    "torch.compile against eager",
    "SIGTERM and resume",
    "Ablations (one trick off at a time)",
    "Total",
)


def test_gpu_report_refuses_a_machine_without_cuda_or_data():
    script = str(ROOT / "benchmarks" / "gpu_report.py")
    proc = subprocess.run(
        [sys.executable, script, "--data", "nowhere"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    import torch

    says = "--data: nowhere does not exist" if torch.cuda.is_available() else "no CUDA device here"
    assert says in proc.stderr, proc.stderr


@pytest.mark.slow
def test_gpu_report_smoke_runs_every_step_on_a_cpu(tmp_path):
    out = tmp_path / "report.md"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "gpu_report.py"),
        "--smoke",
        "--out",
        str(out),
        "--workdir",
        str(tmp_path / "work"),
        "--budget-s",
        "100000",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# SMOKE CHECK, NOT A BENCHMARK\n"), text[:300]
    assert "none of its numbers says anything about a GPU" in text
    found = re.findall(r"^## (.+)$", text, flags=re.M)
    assert found == list(SECTIONS), found
    assert "FAILED" not in text and "NO" not in re.findall(r"\*\*(\w+)\*\*", text), text
    for line in ("- command: ", "- date: ", "- device: CPU", "- torch 2.", "- data: synthetic"):
        assert line in text, f"{line!r} missing from the header"
    assert re.search(r"`-m pytest -m gpu [^`]*`: passed", text)  # every GPU test skipped here, none failed
    # every run of a table reports accuracy and seconds; the mean row has mean ± std
    assert len(re.findall(r"^\| seed \d \| \d+\.\d\d% \| [\d.]+ \| [\d.]+ \|", text, flags=re.M)) == 2
    assert len(re.findall(r"^\| warm cache, seed 0 \| \d+\.\d\d% \|", text, flags=re.M)) == 1  # --smoke: 1 seed
    assert re.search(r"^\| \*\*mean ± std \(2 runs\)\*\* \| \d+\.\d\d% ± \d+\.\d\d \|", text, flags=re.M)
    assert re.search(r"Compilation inside the training loop ≈ .* = \*\*-?[\d.]+ s\*\*", text)
    assert "exit code **143**" in text and "logged step equal to the uninterrupted run's: **yes**" in text
    ablations = text.split("## Ablations", 1)[1]
    assert (
        len(re.findall(r"^\| .+ off.* \| `[^`]+` \| 1 \| \d+\.\d\d% \(one run\) \| [-+]\d", ablations, flags=re.M)) == 4
    )  # --smoke: 1 seed each
