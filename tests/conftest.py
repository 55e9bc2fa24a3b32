"""Shared helpers (here only): running train.py in a subprocess, reading a run's metrics and
weights, and the real-data subset. Tests come in three tiers, marked per module below
(`pytest -m unit`, `-m integration`, `-m system`): unit (no subprocess, no training run),
integration (train.py's command line in this process), system (train.py in subprocesses:
signals, faults, torchrun, sweeps)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_JPG = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


TIERS = {
    "unit": (
        "test_sequential",
        "test_layers",
        "test_sequential_properties",
        "test_checkpoint",
        "test_conf",
        "test_data",
        "test_models",
        "test_schema",
        "sequential",
        "test_splits",
        "test_averaging",
        "test_precision",
        "test_startup",
    ),
    "integration": (
        "test_bad_input",
        "test_evaluate",
        "test_recipe",
        "test_docs",
        "test_accumulate",
        "test_augment",
        "test_lr_find",
        "test_plot",
    ),
    "system": (
        "test_train",
        "test_faults",
        "test_faults_disk",
        "test_early_stop",
        "test_distributed",
        "test_sweeps",
        "test_loggers",
        "test_preview",
        "test_timm",
        "test_gpu",
        "test_gpu_recipe_cpu",
        "test_gpu_report",
        "test_bench_train",
        "test_import_sched",
        "test_runlock",
        "test_model_selection",
        "test_hooks",
        "test_slurm",
    ),
}


def pytest_collection_modifyitems(config, items):
    """Mark each test with its module's tier (a module is in the tier of its heaviest test)."""
    tier_of = {module: tier for tier, modules in TIERS.items() for module in modules}
    for item in items:
        tier = tier_of.get(Path(str(item.fspath)).stem)
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))


def train_cmd(*overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *overrides]


def run_train(*overrides: str, check: bool = True, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run train.py to completion; on failure show its output."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.run(
        train_cmd(*overrides), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kw
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(overrides)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_module(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m module ARGS`` from the repository root (imgcls.evaluate, imgcls.predict);
    it must exit 0 (else its stderr is shown)."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"python -m {module} {' '.join(args)} exited {proc.returncode}\n{proc.stderr}"
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
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(home / "wandb"),
        "WANDB_CONFIG_DIR": str(home / "wandb-config"),
        "WANDB_CACHE_DIR": str(home / "wandb-cache"),
        "WANDB_DATA_DIR": str(home / "wandb-data"),
        "WANDB_ARTIFACT_DIR": str(home / "wandb-artifacts"),
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


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir, name="last.pt"):
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"weights differ at {k}"


def build_recipe(*overrides: str):
    """train.py's config, data, model, optimizer and scheduler for ``overrides``, built in this
    process exactly as train.recipe builds them (one process, no run directory)."""
    from imgcls import build, distributed
    from imgcls.config import compose_config, validate_config
    from imgcls.device import pick_device

    cfg = compose_config(list(overrides))[0]
    validate_config(cfg)
    device = pick_device(cfg.trainer.device)
    data = build.load_data(cfg, device, distributed.Dist())
    model = build.build_model(cfg, data.num_classes, device, data.info["size"])
    optimizer = build.build_optimizer(cfg, model, device)
    return cfg, device, data, model, optimizer, build.build_scheduler(cfg, optimizer)


def run_recipe(run_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """train.py's main() in this process (the integration tier): the config composed from
    ``overrides`` as train.py's Hydra composes it, ``train.recipe`` run into ``run_dir`` under
    main's ``exit_cleanly`` (a refused input: exit code 2 and one ``error:`` line). Returns what a
    subprocess would (exit code, stdout, stderr with its warnings) in a fraction of the time: no
    interpreter, torch or Hydra start-up. As a subprocess, it uses OMP_NUM_THREADS threads when
    that is set (runs compared bit for bit must reduce in the same order).
    ``check``: a non-zero exit fails, showing the output."""
    import contextlib
    import io
    import warnings

    import train
    from imgcls.config import compose_config

    out, err, code = io.StringIO(), io.StringIO(), 0
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or threads))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("default")  # as python prints them
                try:
                    with train.exit_cleanly(Path(run_dir)):
                        train.recipe(compose_config(list(overrides))[0], Path(run_dir))
                except SystemExit as e:
                    code = e.code
    finally:
        torch.set_num_threads(threads)
    err.write("".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught))
    proc = subprocess.CompletedProcess(["train.recipe", *overrides], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"train.recipe {' '.join(overrides)} exited {code}\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_recipe_until_sigterm(run_dir: Path, overrides, after_lines: int) -> subprocess.CompletedProcess:
    """run_recipe, with a real SIGTERM sent to this process once metrics.jsonl has
    ``after_lines`` lines (before the next training step; the step it logged last in
    ``.signalled_at``): what run_until_sigterm does to a subprocess, deterministic and without
    its start-up. train.py's handler answers it at the next step boundary (exit 143)."""
    import imgcls.step

    real, log, sent = imgcls.step.train_step, Path(run_dir) / "metrics.jsonl", []

    def step(*args, **kwargs):
        if not sent and log.exists() and len(lines := log.read_text().splitlines()) >= after_lines:
            sent.append(max(json.loads(line)["step"] for line in lines))
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(imgcls.step, "train_step", step)  # train.py's loop looks it up at every step
        done = run_recipe(run_dir, *overrides, check=False)
    done.signalled_at = sent[0] if sent else None
    return done


def run_until_sigterm(run_dir, overrides, after_lines: int, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run train.py, and once metrics.jsonl has ``after_lines`` lines: pause it (SIGSTOP), note
    the last step it logged (in ``.signalled_at``), send SIGTERM and let it go on (SIGCONT)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        train_cmd(*overrides, f"hydra.run.dir={run_dir}"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout  # seconds (a compiled run takes minutes on a 2-core CPU)
    signalled_at = None
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= after_lines:
            proc.send_signal(signal.SIGSTOP)
            signalled_at = max(json.loads(line)["step"] for line in log.read_text().splitlines())
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)
            break
        time.sleep(0.005)
    out, _ = proc.communicate(timeout=timeout)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
    done.signalled_at = signalled_at
    return done
