"""Fault injection for train.py: the run survives kills, bad checkpoints, config drift, NaNs, full disks.

Every test drives `python train.py experiment=smoke ...` in subprocesses (CPU, synthetic data),
except 5., which runs train.py's main in this process (tests/conftest.py run_recipe):

1. SIGKILL at random moments, 9 trials in ONE run directory, all running the same command
   (SMOKE3: 3 epochs x 8 steps, log_every=1): first TARGETED_KILLS=5 with a delay uniform over half
   the training time, counted from the first training step printed (`random.Random(5678)`), then
   KILL_TRIALS=4 with a delay uniform over 0.5 s .. the wall time of an uninterrupted run, counted
   from the start (`random.Random(1234)`). After every kill each checkpoints/*.pt loads with
   weights_only=True, metrics.jsonl parses, last.pt never disappears and its step never goes
   backwards; the run then finishes with the weights and metrics.jsonl of an uninterrupted run.
   Trials are classified from their stdout and the checkpoint files. Measured (2-core CPU, run
   ~5.7 s: ~3.1 s start-up, ~1.6 s training): targeted: 2 training before a new checkpoint, 2 after
   one, 1 inside a checkpoint write; uniform: 2 start-up, 2 ran to the end (the run was finished
   by trial 6, so these only restart a finished run); 0 checkpoints lost or truncated. Start-up is
   ~55-75% of a run, so uniform delays alone almost never land in training: hence the targeted
   trials, and few uniform ones (25 trials, 20 uniform, took 84 s of the suite for 15 start-ups).
2. SIGTERM after a random number of metrics lines k in [2, 20] (`random.Random(4321)`),
   SIGTERM_TRIALS run directories: exit 143, the checkpoint is at most 2 steps past line k, and the
   resumed run equals the uninterrupted one (metrics.jsonl and weights, bit for bit).
3. A truncated last.pt falls back to last.1.pt with a warning naming last.pt; both corrupt stops
   (exit 2) instead of silently restarting; `resume=` a truncated or garbage file exits 2 naming it.
4. A pickle whose __reduce__ calls open() (raw protocol-2 pickle, and inside a torch zip file) is
   refused (exit 2, file named) and the payload never runs (its marker file is never created).
5. Resuming with a changed config: model / optimizer / scheduler changes are refused (exit 2,
   the differing keys listed, last.pt byte-identical); resume_force=true loads when shapes fit and
   fails cleanly when they do not; trainer.epochs / trainer.eval_every are accepted and logged.
   data.dataset.train_size is refused like a model change (exit 2, listed, last.pt unchanged);
   data.dataset.root (where the data lives) is accepted: tests/test_conf.py (synthetic data has no root).
6. Non-finite loss: a fresh run with optimizer.lr=1e10 exits 3 pointing at skip_nonfinite and
   saves no non-finite weights; resuming a good run with model.scale_out=1e39 exits 3 with last.pt
   byte-identical; with trainer.skip_nonfinite=true the same run finishes with skipped_steps > 0.
7. Write faults, injected WITHOUT touching project files: a sitecustomize.py first on PYTHONPATH
   (imported at interpreter start-up; the venv's .pth only puts the project root, which has no
   sitecustomize, ahead of it) wraps os.fsync / os.replace so that the (N+1)-th checkpoint save
   raises ENOSPC (full disk, at the temp file's fsync) or EACCES (read-only directory, at the final
   rename, after the backups rotated). Exit 4, one error line naming last.pt, the previous last.pt
   byte-identical and loadable, no *.tmp left; re-running afterwards finishes like a clean run.

All train.py processes run with OMP_NUM_THREADS=1 (see _one_thread_per_process), two at a time
where independent. The regression tests at the end pin the defects these trials found.

Tampered data files are covered by tests/test_data.py (a tampered official archive is refused).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import subprocess
import textwrap
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import ROOT, assert_same_weights, metrics, run_recipe, run_train, train_cmd, weights
from tests.conftest import run_until_sigterm as _run_until_sigterm

SMOKE = ["experiment=smoke"]
SMOKE3 = [*SMOKE, "trainer.epochs=3", "trainer.log_every=1"]  # 24 steps, 27 metrics lines
KILL_TRIALS = 4  # delays uniform over the whole run (mostly land in start-up, as imports do)
TARGETED_KILLS = 5  # delays uniform over the training that follows the first step: the trials that matter
SIGTERM_TRIALS = 5


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _run(*overrides: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """train.py to its end (any exit code), with extra environment variables."""
    return subprocess.run(
        train_cmd(*overrides), cwd=ROOT, env=_env(**(env or {})), capture_output=True, text=True, timeout=timeout
    )


def _parallel(*jobs):
    """Run independent subprocess jobs two at a time (2 cores; start-up is mostly one thread)."""
    with ThreadPoolExecutor(max_workers=2) as ex:
        futures = [ex.submit(job) for job in jobs]
        return [f.result() for f in futures]


def _sha(path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _load(path) -> dict:
    return torch.load(path, weights_only=True)


def _error_lines(proc) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]


def _assert_clean_error(proc, code: int, *needles: str) -> str:
    """Exit `code`, exactly one `error: ...` line holding every needle, no traceback."""
    out = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == code, out
    errors = _error_lines(proc)
    assert len(errors) == 1, out
    for needle in needles:
        assert needle in errors[0], out
    assert "Traceback" not in proc.stderr, out
    return errors[0]


def _temp_files(ckpt_dir) -> set[str]:
    return {p.name for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")} if ckpt_dir.exists() else set()


def _copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module", autouse=True)
def _one_thread_per_process():
    """OMP_NUM_THREADS=1 for every train.py started here. Two train.py with 2 OpenMP threads each
    on 2 cores spin-wait on each other (~22 s each instead of ~5 s), and _parallel runs two; and all
    runs compared with one another must use one setting: the weights differ bitwise across
    thread counts."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


def _trained(output: str) -> bool:
    """Whether train.py's stdout shows a training step (start-up is over)."""
    return any(ln.startswith("step=") and "train_loss=" in ln for ln in output.splitlines())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted SMOKE3 run: metrics, weights, wall time and start-up time (set the kill ranges)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    log_path = run.parent / "reference.log"
    startup = done = None
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            train_cmd(*SMOKE3, f"hydra.run.dir={run}"), cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT
        )
        while done is None and proc.poll() is None:
            output = log_path.read_text()
            if startup is None and _trained(output):
                startup = time.perf_counter() - t0
            if "done:" in output:
                done = time.perf_counter() - t0
            time.sleep(0.01)
        proc.wait(timeout=300)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    startup = startup or seconds
    return SimpleNamespace(
        dir=run,
        seconds=seconds,
        startup=startup,
        training=(done or seconds) - startup,
        metrics=metrics(run),
        weights=weights(run),
    )


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A finished default smoke run (2 epochs, keep_checkpoints=2): last.pt and last.1.pt."""
    run = tmp_path_factory.mktemp("two_epochs") / "run"
    run_recipe(run, *SMOKE)
    return run


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory, two_epochs):
    """two_epochs rolled back to its epoch-1 checkpoint (only last.pt, step 8): the same command
    resumes there and redoes epoch 2. Tests resume from copies of it."""
    run = _copy_run(two_epochs, tmp_path_factory.mktemp("one_epoch") / "run")
    os.replace(run / "checkpoints" / "last.1.pt", run / "checkpoints" / "last.pt")
    return run


# --------------------------------------------------------------------------------------
# 1. kill -9 at random moments
# --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_or_truncates_a_checkpoint(tmp_path, reference):
    # TARGETED_KILLS first: a delay uniform over 1.5 of the 3 epochs of training, counted from the first
    # training step printed (mid-epoch, evaluation, checkpoint writes); then KILL_TRIALS delays
    # uniform over 0.5 s .. the whole run, counted from the start (mostly start-up: imports, data).
    window = max(reference.training, 0.1) / 2
    targeted = random.Random(5678)
    rng = random.Random(1234)
    plan = [("targeted", targeted.uniform(0.0, window)) for _ in range(TARGETED_KILLS)]
    plan += [("uniform", rng.uniform(0.5, reference.seconds)) for _ in range(KILL_TRIALS)]
    run = tmp_path / "run"
    ckpt_dir = run / "checkpoints"
    last, backup = ckpt_dir / "last.pt", ckpt_dir / "last.1.pt"
    phases: Counter = Counter()
    best_step, lost, history = 0, 0, []
    for trial, (kind, delay) in enumerate(plan):
        before = (_sha(last), _sha(backup), _temp_files(ckpt_dir))
        log_path = tmp_path / f"trial{trial:02d}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                train_cmd(*SMOKE3, f"hydra.run.dir={run}"), cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT
            )
            start = time.perf_counter()
            if kind == "targeted":
                while proc.poll() is None and time.perf_counter() < start + 120:
                    if _trained(log_path.read_text()):
                        break
                    time.sleep(0.005)
                start = time.perf_counter()
            try:
                code = proc.wait(timeout=max(delay - (time.perf_counter() - start), 0.001))
                killed = False
            except subprocess.TimeoutExpired:
                proc.kill()  # SIGKILL: no handler, no cleanup
                code = proc.wait()
                killed = True
        output = log_path.read_text()
        where = f"trial {trial} ({kind}, delay {delay:.2f} s, run {reference.seconds:.2f} s):\n{output[-2000:]}"
        if not killed:
            assert code == 0, where

        # every checkpoint file is complete; last.pt never disappears or goes back in steps
        steps = {p.name: _load(p)["state"]["step"] for p in sorted(ckpt_dir.glob("*.pt"))}
        if before[0] is not None and not last.exists():
            lost += 1
        assert lost == 0, f"last.pt vanished after {where}"
        if last.exists():
            assert steps["last.pt"] >= best_step, f"checkpoint went back from step {best_step}: {steps} {where}"
            assert all(s <= steps["last.pt"] for s in steps.values()), f"{steps} {where}"
            best_step = steps["last.pt"]
        history.append(best_step)
        if (run / "metrics.jsonl").exists():
            metrics(run)  # every line is complete JSON (a torn line would break the next resume)

        after = (_sha(last), _sha(backup), _temp_files(ckpt_dir))
        if not killed:
            phase = "ran to the end"
        elif after[2] - before[2] or (after[1] != before[1] and after[0] == before[0]):
            phase = "checkpoint write"
        elif not _trained(output):
            phase = "start-up"
        elif after[0] != before[0]:
            phase = "training, after a new checkpoint"
        else:
            phase = "training, before a new checkpoint"
        phases[kind, phase] += 1

    stray = len(_temp_files(ckpt_dir))
    finished = run_recipe(run, *SMOKE3)
    assert not _temp_files(ckpt_dir), "the next save removes the temp files killed saves left"
    assert_same_weights(weights(run), reference.weights)
    assert sum(phases.values()) == len(plan) and lost == 0
    print(
        f"\n{len(plan)} SIGKILL trials (start-up {reference.startup:.1f} s, training {reference.training:.1f} s, "
        f"run {reference.seconds:.1f} s): "
        f"{sorted(phases.items())}; "
        f"last.pt step after each: {history}; checkpoints lost: {lost}; "
        f"stray temp files left by kills: {stray}"
    )
    assert metrics(run) == reference.metrics, finished.stdout


# --------------------------------------------------------------------------------------
# 2. SIGTERM at random steps
# --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_at_random_steps_checkpoints_promptly_and_resumes_bit_identically(tmp_path, reference):
    rng = random.Random(4321)
    ks = [rng.randint(2, 20) for _ in range(SIGTERM_TRIALS)]

    def trial(i: int, k: int):
        run = tmp_path / f"k{k}-{i}"
        run.mkdir()
        stopped = _run_until_sigterm(run, SMOKE3, after_lines=k)
        assert stopped.returncode == 143, f"k={k}: exit {stopped.returncode}\n{stopped.stdout[-2000:]}"
        assert "SIGTERM: checkpoint saved at step" in stopped.stdout
        state = _load(run / "checkpoints" / "last.pt")["state"]
        seen = reference.metrics[k - 1]["step"]  # the step of line k: the signal went out once it existed
        assert seen <= state["step"] <= seen + 2, f"k={k}: line {k} is step {seen}, checkpoint at step {state['step']}"
        assert not state["finished"]
        resumed = run_train(*SMOKE3, f"hydra.run.dir={run}")
        assert f"resumed from {run / 'checkpoints' / 'last.pt'} at step {state['step']}" in resumed.stdout
        assert metrics(run) == reference.metrics, f"k={k}"
        assert_same_weights(weights(run), reference.weights)
        return state["step"] - seen

    lags = _parallel(*(lambda i=i, k=k: trial(i, k) for i, k in enumerate(ks)))
    print(f"\nSIGTERM after lines {ks}: checkpoint steps past line k: {lags}")


# --------------------------------------------------------------------------------------
# 3. corrupt / truncated checkpoints
# --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_truncated_last_falls_back_to_backup_and_bad_files_are_refused(tmp_path, two_epochs):
    run = _copy_run(two_epochs, tmp_path / "run")
    last, backup = run / "checkpoints" / "last.pt", run / "checkpoints" / "last.1.pt"
    assert _load(backup)["state"]["epoch"] == 1 and _load(last)["state"]["epoch"] == 2
    whole = last.read_bytes()
    last.write_bytes(whole[: len(whole) // 2])
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole[: len(whole) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(random.Random(0).randbytes(4096))
    both_bad = _copy_run(run, tmp_path / "both_bad")
    (both_bad / "checkpoints" / "last.1.pt").write_bytes(b"\0" * 1000)

    more = run_recipe(run, *SMOKE, "trainer.epochs=3")
    all_bad = run_recipe(both_bad, *SMOKE, "trainer.epochs=3", check=False)
    refused = [
        run_recipe(tmp_path / f"fresh-{bad.stem}", *SMOKE, f"resume={bad}", check=False) for bad in (truncated, garbage)
    ]
    # truncated last.pt: a warning naming it, then last.1.pt (end of epoch 1) takes over
    assert f"skipping corrupt checkpoint {last}" in more.stderr
    assert f"resumed from {backup} at step 8 (epoch 1, batch 0)" in more.stdout
    assert json.loads((run / "results.json").read_text())["steps"] == 24
    assert _load(last)["state"]["finished"] and _load(backup)["state"]["epoch"] == 2

    # nothing loadable: stop and say so, rather than silently start again from step 0
    _assert_clean_error(
        all_bad,
        2,
        "no loadable checkpoint",
        str(both_bad / "checkpoints" / "last.pt"),
        str(both_bad / "checkpoints" / "last.1.pt"),
    )
    assert "step=" not in all_bad.stdout

    for bad, proc in zip((truncated, garbage), refused):
        _assert_clean_error(proc, 2, f"checkpoint {bad} cannot be loaded")
        assert not (tmp_path / f"fresh-{bad.stem}" / "checkpoints" / "last.pt").exists()


# --------------------------------------------------------------------------------------
# 4. no code runs from a checkpoint
# --------------------------------------------------------------------------------------
class _OpensAFile:
    """Unpickling this calls open(marker, "w"): the file appearing proves code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_a_checkpoint_that_would_run_code_is_refused_and_never_executed(tmp_path):
    raw_marker, zip_marker = tmp_path / "pwned-raw", tmp_path / "pwned-zip"
    raw = tmp_path / "evil-raw.pt"  # a bare protocol-2 pickle (torch's legacy format path)
    raw.write_bytes(pickle.dumps(_OpensAFile(str(raw_marker)), protocol=2))
    zipped = tmp_path / "evil-zip.pt"  # the payload inside an otherwise normal torch zip checkpoint
    torch.save({"model": {}, "state": {"step": 1}, "x": _OpensAFile(str(zip_marker))}, zipped)

    pickle.loads(raw.read_bytes()).close()  # the payload is live: plain unpickling runs it
    assert raw_marker.exists()
    raw_marker.unlink()

    procs = _parallel(
        *(
            lambda p=p: _run(*SMOKE, f"resume={p}", f"hydra.run.dir={tmp_path / ('run-' + p.stem)}")
            for p in (raw, zipped)
        )
    )
    for path, proc in zip((raw, zipped), procs):
        _assert_clean_error(proc, 2, f"checkpoint {path}", "weights_only")
    assert not raw_marker.exists() and not zip_marker.exists()


# --------------------------------------------------------------------------------------
# 5. resuming with a changed config
# --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_changed_config_on_resume_is_refused_forced_or_logged(tmp_path, one_epoch):
    original = _sha(one_epoch / "checkpoints" / "last.pt")
    refused = {  # override -> differing keys the refusal must list
        "model.width=16": ["model.width"],
        "optimizer=adamw": ["optimizer._target_", "optimizer.lr"],
        "scheduler=warmup_cosine": ["scheduler.schedulers.1._target_"],
        "optimizer.lr=0.1": ["optimizer.lr"],
    }
    cases = {
        **{o: [o] for o in refused},
        "data.dataset.train_size": ["data.dataset.train_size=256"],
        "force": ["optimizer.lr=0.1", "resume_force=true"],
        "force-misfit": ["model.width=16", "resume_force=true"],
        "safe": ["trainer.epochs=3", "trainer.eval_every=3"],
    }
    dirs = {name: _copy_run(one_epoch, tmp_path / f"run{i}") for i, name in enumerate(cases)}
    # in this process (train.py's main without the start-up: 8 runs in seconds); exit codes and
    # the error line as a subprocess gets them
    procs = {name: run_recipe(dirs[name], *SMOKE, *o, check=False) for name, o in cases.items()}

    for override, keys in refused.items():
        line = _assert_clean_error(procs[override], 2, "differing keys:", "resume_force=true", *keys)
        assert "trainer.epochs" not in line.split("differing keys:")[1]  # a safe key is not listed as one
        assert _sha(dirs[override] / "checkpoints" / "last.pt") == original
        assert "step=" not in procs[override].stdout

    # data.dataset.train_size changes the data and steps per epoch: refused like a model change
    _assert_clean_error(procs["data.dataset.train_size"], 2, "differing keys: data.dataset.train_size")
    assert _sha(dirs["data.dataset.train_size"] / "checkpoints" / "last.pt") == original

    forced = procs["force"]
    assert forced.returncode == 0, forced.stderr
    assert "config changed" in forced.stdout and "optimizer.lr" in forced.stdout and "resumed from" in forced.stdout
    assert json.loads((dirs["force"] / "results.json").read_text())["steps"] == 16

    misfit = procs["force-misfit"]  # forced, but the saved tensors cannot go into a wider model
    _assert_clean_error(misfit, 2, "does not fit this model")
    assert _sha(dirs["force-misfit"] / "checkpoints" / "last.pt") == original

    safe = procs["safe"]
    assert safe.returncode == 0, safe.stderr
    changed = next(ln for ln in safe.stdout.splitlines() if "config changed" in ln)
    assert "trainer.epochs" in changed and "trainer.eval_every" in changed
    lines = metrics(dirs["safe"])
    assert [m["step"] for m in lines if "test_acc" in m] == [8, 24]  # epoch 2 skipped, the last one always done


# --------------------------------------------------------------------------------------
# 6. numerical faults
# --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_nonfinite_loss_stops_without_saving_or_is_skipped(tmp_path, one_epoch):
    # model.scale_out=1e39 overflows float32: the logits are inf, every loss NaN from the first step,
    # whatever the lr. (1e30 is not deterministic: logits ~1e30 give a finite loss ~1e30 that turns
    # NaN only after an update at lr > 0; resumed where a schedule has reached lr 0 it never does.)
    blow_up = ["model.scale_out=1e39", "resume_force=true"]
    fresh = tmp_path / "fresh"
    stop, skip = (_copy_run(one_epoch, tmp_path / name) for name in ("stop", "skip"))
    before = _sha(stop / "checkpoints" / "last.pt")
    lr = run_recipe(fresh, *SMOKE, "optimizer.lr=1e10", check=False)
    stopped = run_recipe(stop, *SMOKE, *blow_up, check=False)
    skipped = run_recipe(skip, *SMOKE, *blow_up, "trainer.skip_nonfinite=true", check=False)

    _assert_clean_error(lr, 3, "training loss is", "skip_nonfinite")
    for p in (fresh / "checkpoints").glob("*.pt"):  # whatever was saved before the blow-up is finite
        assert all(torch.isfinite(t).all() for t in _load(p)["model"].values() if t.is_floating_point()), p

    _assert_clean_error(stopped, 3, "skip_nonfinite", str(stop / "checkpoints" / "last.pt"))
    assert _sha(stop / "checkpoints" / "last.pt") == before
    assert not (stop / "checkpoints" / "last.1.pt").exists()

    assert skipped.returncode == 0, skipped.stderr
    results = json.loads((skip / "results.json").read_text())
    assert results["skipped_steps"] == 8 and results["steps"] == 16


# --------------------------------------------------------------------------------------
# 7. write faults (full disk, read-only directory) injected through sitecustomize
# --------------------------------------------------------------------------------------
SITECUSTOMIZE = '''
"""Checkpoint write faults for tests/test_faults.py; inert unless FAULT_AFTER_SAVES is set.

FAULT_AT=fsync: the fsync of a checkpoint temp file (.last.pt.*.tmp) fails, as a full disk does;
FAULT_AT=replace: the final os.replace onto last.pt fails, as a read-only directory does.
The first FAULT_AFTER_SAVES saves succeed; the next one raises OSError(FAULT_ERRNO).
"""
import errno
import hashlib
import os
import sys

if os.environ.get("FAULT_AFTER_SAVES") is not None:
    _after = int(os.environ["FAULT_AFTER_SAVES"])
    _at = os.environ.get("FAULT_AT", "fsync")
    _errno = getattr(errno, os.environ.get("FAULT_ERRNO", "ENOSPC"))
    _saves = [0]
    print(f"FAULT-INJECTOR armed: {_at}, after {_after} saves", file=sys.stderr, flush=True)

    def _maybe_fail(target, last_pt):
        _saves[0] += 1
        if _saves[0] > _after:
            digest = hashlib.sha256(open(last_pt, "rb").read()).hexdigest() if os.path.exists(last_pt) else None
            print(f"FAULT-INJECTED {errno.errorcode[_errno]} at {_at} of {target}; last.pt sha256={digest}",
                  file=sys.stderr, flush=True)
            raise OSError(_errno, os.strerror(_errno), str(target))

    if _at == "replace":
        _replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if os.path.basename(os.fspath(dst)) == "last.pt":
                _maybe_fail(dst, dst)
            return _replace(src, dst, *args, **kwargs)

        os.replace = replace
    else:
        _fsync = os.fsync

        def fsync(fd):
            try:
                name = os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
            except OSError:
                name = ""
            base = os.path.basename(name)
            if base.startswith(".last.pt.") and base.endswith(".tmp") and not base.endswith(".bak.tmp"):
                _maybe_fail(name, os.path.join(os.path.dirname(name), "last.pt"))
            return _fsync(fd)

        os.fsync = fsync
'''


@pytest.fixture
def injector(tmp_path):
    site = tmp_path / "inject"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    assert not (ROOT / "sitecustomize.py").exists(), "the project root (sys.path[0] via .pth) would shadow it"

    def env(after: int, at: str, err: str) -> dict:
        path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
        return {"PYTHONPATH": path, "FAULT_AFTER_SAVES": str(after), "FAULT_AT": at, "FAULT_ERRNO": err}

    return env


def _injected_digest(proc) -> str:
    """The last.pt sha256 the injector saw when it fired (proves it was imported and fired)."""
    assert "FAULT-INJECTOR armed" in proc.stderr, proc.stderr[-3000:]
    fired = [ln for ln in proc.stderr.splitlines() if ln.startswith("FAULT-INJECTED")]
    assert len(fired) == 1, proc.stderr[-3000:]
    return fired[0].rsplit("sha256=", 1)[1]


@pytest.mark.slow
def test_full_disk_or_read_only_dir_keeps_the_previous_checkpoint(tmp_path, injector, one_epoch, two_epochs):
    full = tmp_path / "full"  # fresh 2-epoch run: save 1 (epoch 1) works, save 2 hits a full disk
    readonly = _copy_run(one_epoch, tmp_path / "readonly")  # resume; its first save cannot be renamed
    before = _sha(readonly / "checkpoints" / "last.pt")
    disk, ro = _parallel(
        lambda: _run(*SMOKE, f"hydra.run.dir={full}", env=injector(1, "fsync", "ENOSPC")),
        lambda: _run(*SMOKE, f"hydra.run.dir={readonly}", env=injector(0, "replace", "EACCES")),
    )
    for proc, run in ((disk, full), (ro, readonly)):
        ckpt = run / "checkpoints" / "last.pt"
        _assert_clean_error(proc, 4, f"could not save checkpoint to {ckpt}")
        assert _injected_digest(proc) == _sha(ckpt)  # byte-identical to what was there when it failed
        assert _load(ckpt)["state"]["step"] == 8  # epoch 1
        assert _temp_files(run / "checkpoints") == set()
    assert not (full / "results.json").exists()
    assert (readonly / "results.json").read_bytes() == (one_epoch / "results.json").read_bytes()
    assert "No space left on device" in _error_lines(disk)[0]
    assert "Permission denied" in _error_lines(ro)[0]
    assert _sha(readonly / "checkpoints" / "last.pt") == before
    assert _sha(readonly / "checkpoints" / "last.1.pt") == before  # rotated before the rename failed

    # the disk has room again: the same command resumes at epoch 1 and ends like a clean run
    again = run_recipe(full, *SMOKE)
    assert "resumed from" in again.stdout and "at step 8" in again.stdout
    assert metrics(full) == metrics(two_epochs)
    assert_same_weights(weights(full), weights(two_epochs))


# --------------------------------------------------------------------------------------
# regressions: defects these trials found (exit code of ENOENT writes, backups evicted after a
# fallback, stale metrics of a run killed before its first checkpoint), fixed
# --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_enoent_while_saving_is_a_write_fault_not_bad_input(tmp_path, injector, one_epoch):
    run = _copy_run(one_epoch, tmp_path / "run")
    proc = _run(*SMOKE, f"hydra.run.dir={run}", env=injector(0, "replace", "ENOENT"))
    _injected_digest(proc)
    _assert_clean_error(proc, 4, f"could not save checkpoint to {run / 'checkpoints' / 'last.pt'}")


@pytest.mark.slow
def test_after_a_fallback_the_backups_stay_loadable(tmp_path, two_epochs):
    run = _copy_run(two_epochs, tmp_path / "run")
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    # resume from last.1.pt (epoch 1), redo epoch 2: one save, which rotates last.pt into last.1.pt
    run_train(*SMOKE, f"hydra.run.dir={run}")
    for p in sorted((run / "checkpoints").glob("*.pt")):
        _load(p)


@pytest.mark.slow
def test_a_fresh_start_drops_metrics_of_a_run_killed_before_its_first_checkpoint(tmp_path, reference):
    run = tmp_path / "run"
    log = run / "metrics.jsonl"
    proc = subprocess.Popen(
        train_cmd(*SMOKE3, f"hydra.run.dir={run}"),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= 3:  # steps 1-3 of epoch 1
            proc.kill()
            break
        time.sleep(0.005)
    proc.wait()
    assert not (run / "checkpoints" / "last.pt").exists()
    run_train(*SMOKE3, f"hydra.run.dir={run}")
    assert metrics(run) == reference.metrics
