"""Shared fixtures: running train.py in a subprocess, and the real-data subset."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_JPG = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


def train_cmd(*overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *overrides]


def run_train(*overrides: str, check: bool = True, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run train.py to completion; on failure show its output."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.run(train_cmd(*overrides), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(overrides)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def extract_cifar_subset(dest: Path, per_split: dict[str, int]) -> Path:
    """The first ``per_split[split]`` images of every class of the shared JPEG copy."""
    if not SHARED_JPG.is_file():
        pytest.skip(f"{SHARED_JPG} is absent (a fresh clone has no ../shared): real-data test skipped")
    counts: dict = {}
    with tarfile.open(SHARED_JPG, "r:gz") as tf:
        for m in tf:
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) != 3 or parts[0] not in per_split:
                continue
            key = parts[:2]
            if counts.get(key, 0) < per_split[parts[0]]:
                counts[key] = counts.get(key, 0) + 1
                tf.extract(m, dest, filter="data")
    return dest


@pytest.fixture(autouse=True, scope="session")
def trackers_stay_local(tmp_path_factory):
    """W&B and MLflow never reach the network or the home directory from a test: W&B runs
    offline with its config, cache and data directories under a temporary folder, MLflow's
    default store is a temporary one. Set in os.environ, so train.py subprocesses inherit it."""
    home = tmp_path_factory.mktemp("trackers")
    env = {
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(home / "wandb"),
        "WANDB_CONFIG_DIR": str(home / "wandb-config"), "WANDB_CACHE_DIR": str(home / "wandb-cache"),
        "WANDB_DATA_DIR": str(home / "wandb-data"), "WANDB_ARTIFACT_DIR": str(home / "wandb-artifacts"),
        "MLFLOW_TRACKING_URI": str(home / "mlruns"),
    }
    old = {k: os.environ.get(k) for k in [*env, "WANDB_API_KEY"]}
    os.environ.update(env)
    os.environ.pop("WANDB_API_KEY", None)  # no key: nothing could go online
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
