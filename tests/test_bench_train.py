"""benchmarks/bench_train.py runs end to end on the CPU at its smallest and reports every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_bench_train_cpu_smallest_reports_positive_figures(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_train.py"),
        "--smallest",
        "--json",
        str(out),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    for text in ("command :", "date    :", "device  :", "torch   :", "GPU figures need a CUDA machine"):
        assert text in proc.stdout, f"{text!r} missing from the header:\n{proc.stdout}"

    r = json.loads(out.read_text())
    assert r["settings"]["device"] == "cpu" and r["provenance"]["torch"]
    figures = {
        "matmul TFLOP/s": r["matmul"]["tflops"],
        **{
            f"startup {k}": r["startup"][k]
            for k in ("import_torch_s", "hydra_import_s", "hydra_compose_s", "dataset_to_device_s")
        },
    }
    m = r["models"]["resnet9"]
    assert m["width"] == 8 and m["compile_s"] is None
    assert m["train_flops_per_image"] == 3 * m["forward_flops_per_image"]
    for key in (
        "train_images_per_s",
        "eval_images_per_s",
        "floor_us_per_image",
        "measured_us_per_image",
        "floor_ratio",
        "first_step_s",
        "steady_step_s",
        "first_eval_pass_s",
        "eval_pass_s",
        "checkpoint_write_s",
        "checkpoint_mb",
    ):
        figures[f"resnet9 {key}"] = m[key]
    breakdown = m["breakdown_ms_per_step"]
    assert set(breakdown) == {"data", "forward_backward", "optimizer", "scheduler", "sum"}
    figures.update({f"resnet9 breakdown {k}": v for k, v in breakdown.items()})
    bad = {k: v for k, v in figures.items() if not (isinstance(v, (int, float)) and v > 0)}
    assert not bad, f"figures that are not positive numbers: {bad}"
    assert m["floor_ratio"] == pytest.approx(m["measured_us_per_image"] / m["floor_us_per_image"])
