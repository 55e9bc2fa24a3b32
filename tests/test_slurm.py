"""SLURM for real: train.py through hydra/launcher=slurm and srun on a running cluster.

The cluster is tools/slurm_cluster.py's single node (`.ci/run` starts it where it can: root,
the Debian packages); it is found through SLURM_CONF (else the script's default directory) and
`sinfo`, and every test here skips, saying why, where none answers. Waiting is what these tests
do most, so every job is submitted at once by the module's first fixture and each test then
waits for its own (SLURM holds a requeued job about 2 minutes before it starts again: the tests
lift that hold, `scontrol update StartTime=now`, as it is SLURM's own behaviour, not this project's):

- a two-job sweep through the launcher: summary.csv lists both, completed;
- a time-limited job (`timeout_min=2`, SIGUSR2 `signal_delay_s=75` s before the limit: 15 to 45 s
  after the start, SLURM checks every 30 s): train.py checkpoints at the next step boundary,
  submitit requeues it, and the requeued job resumes at that step and ends with the metrics of
  an uninterrupted run (the test raises the requeued job's limit so that one more run finishes it);
- a preempted job (`scontrol requeue`: SIGTERM, exit 143, SLURM requeues it) likewise;
- `srun -n2 python train.py`, and the launcher with `tasks_per_node=2`: one 2-rank job, one results.json;
- a request no node can hold: refused in one line before anything is submitted.

Without a cluster (every machine): what SLURM's signals meet in train.py, with the signal sent
from inside the process at a chosen point (deterministic): SIGUSR2 checkpoints and hands over to
the launcher's handler (submitit's requeue); SIGTERM at start-up and in the final test ends the
run with exit 143; a stopped job of a sweep is in its summary; nothing process-bound (a lock,
a descriptor) is left in a module global for a pickled job to carry.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_train

CLUSTER_DIR = Path(os.environ.get("IMGCLS_SLURM_DIR", "/tmp/imgcls-slurm"))
LAUNCHER = (
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
)
# Long enough to outlast the time-limit warning (45 s after the start at the latest) on a fast
# CPU: 2000 steps; evaluation every 25 epochs keeps the cost in the steps.
LONG = ("experiment=smoke", "trainer.epochs=250", "trainer.eval_every=25")
SHORT = ("experiment=smoke", "trainer.epochs=20", "trainer.eval_every=5")
WAIT_S = 420  # one job's longest wait: a run, the requeue (its hold lifted), the rest of the run


def cluster_env() -> tuple[dict | None, str]:
    """The environment that reaches a running cluster (SLURM_CONF, the sacct shim first on
    PATH, one thread per process so that runs in and out of SLURM compute alike), or None and why not."""
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return None, "hydra-submitit-launcher is not installed (pip install -e '.[slurm]')"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    conf = env.get("SLURM_CONF") or (str(CLUSTER_DIR / "slurm.conf") if (CLUSTER_DIR / "slurm.conf").exists() else "")
    if conf:
        env["SLURM_CONF"] = conf
        shim = Path(conf).parent / "bin"
        if (shim / "sacct").exists():
            env["PATH"] = f"{shim}:{env.get('PATH', '')}"
    if shutil.which("sinfo", path=env.get("PATH")) is None:
        return None, "no SLURM here (sinfo not found); start one: python tools/slurm_cluster.py start"
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30)
    state = out.stdout.strip().rstrip("*")
    if out.returncode or state not in ("idle", "mixed", "allocated"):
        why = (out.stderr.strip().splitlines() or [state or "no node"])[-1]
        return None, f"no SLURM cluster answers (sinfo: {why}); start one: python tools/slurm_cluster.py start"
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env, ""


@pytest.fixture(scope="module")
def cluster():
    env, why = cluster_env()
    if env is None:
        pytest.skip(why)
    return env


def train(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *args]


@pytest.fixture(scope="module")
def started(cluster, tmp_path_factory):
    """Every SLURM job of this module, submitted at once, the uninterrupted reference runs
    beside them ({name: (Popen, directory)}), and two watchers that act on the jobs while they
    run (``seen``: what they saw). At the end: what still runs is stopped, and the jobs these
    sweeps submitted are cancelled."""
    base = tmp_path_factory.mktemp("slurm")
    runs = {
        "sweep": train("-m", *LAUNCHER, "experiment=smoke", "optimizer.lr=0.1,0.05"),
        "timelimit": train("-m", *LAUNCHER, *LONG, "hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=75"),
        "preempt": train("-m", *LAUNCHER, *SHORT),
        "ref_long": train(*LONG),  # the same runs, never stopped
        "ref_short": train(*SHORT),
    }
    procs = {}
    for name, cmd in runs.items():
        where = base / name
        cmd = [*cmd, f"hydra.{'sweep' if '-m' in cmd else 'run'}.dir={where}"]
        with open(base / f"{name}.log", "w") as log:
            procs[name] = (subprocess.Popen(cmd, env=cluster, stdout=log, stderr=subprocess.STDOUT), where)
    seen = {}
    watchers = [
        threading.Thread(target=preempt_at_step_40, args=(base / "preempt", cluster, seen), daemon=True),
        threading.Thread(target=lift_limit_after_requeue, args=(base / "timelimit", cluster, seen), daemon=True),
    ]
    for w in watchers:
        w.start()
    yield procs, seen, {"preempt": watchers[0], "timelimit": watchers[1]}
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ids = {i.split("_")[0] for name in ("sweep", "timelimit", "preempt") for i in job_ids(base / name)}
    if ids:
        subprocess.run(["scancel", *sorted(ids)], env=cluster, capture_output=True, timeout=30)


def status_of(job: Path) -> dict | None:
    try:
        return json.loads((job / "status.json").read_text())
    except (OSError, ValueError):
        return None


def preempt_at_step_40(sweep: Path, env: dict, seen: dict) -> None:
    """Once the job logged step 40: `scontrol requeue` (SIGTERM, as a preemption); then what
    status.json said while the job was stopped."""
    metrics = sweep / "0" / "metrics.jsonl"
    try:
        wait_until(lambda: metrics.exists() and any(r.get("step", 0) >= 40 for r in read_jsonl(metrics)), 240, "")
        ids = job_ids(sweep)
        seen["preempt_ids"] = ids
        subprocess.run(["scontrol", "requeue", ids[0]], env=env, check=True, timeout=30, capture_output=True)
        seen["preempt_status"] = wait_until(lambda: (st := status_of(sweep / "0")) and st, 60, "")
        start_now(ids[0], env)
    except (AssertionError, subprocess.SubprocessError, IndexError, OSError) as e:
        seen["preempt_error"] = repr(e)


def start_now(job_id: str, env: dict, *settings: str) -> None:
    """Once the requeued job is PENDING: SLURM's 2-minute hold of it lifted (StartTime=now),
    with ``settings`` (scontrol's Key=Value) changed too."""

    def pending():
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True)
        return "JobState=PENDING" in out.stdout

    wait_until(pending, 60, "")
    subprocess.run(
        ["scontrol", "update", f"JobId={job_id}", *settings, "StartTime=now"],
        env=env,
        check=True,
        timeout=30,
        capture_output=True,
    )


def lift_limit_after_requeue(sweep: Path, env: dict, seen: dict) -> None:
    """Once the time-limit warning stopped the job (status.json) and submitit requeued it
    (PENDING): its limit raised so that one more run finishes it (a second warning would cost
    another requeue), and its hold lifted."""
    try:
        seen["timelimit_status"] = wait_until(lambda: (st := status_of(sweep / "0")) and st, 240, "")
        ids = job_ids(sweep)
        seen["timelimit_ids"] = ids
        start_now(ids[0], env, "TimeLimit=15")
    except (AssertionError, subprocess.SubprocessError, IndexError, OSError) as e:
        seen["timelimit_error"] = repr(e)


def finish(started, name: str, timeout: float = WAIT_S) -> tuple[int, str]:
    proc, where = started[0][name]
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.returncode, (where.parent / f"{name}.log").read_text()


def job_ids(sweep: Path) -> list[str]:
    """The SLURM job ids submitit used for a sweep (its folders under .submitit/)."""
    folder = sweep / ".submitit"
    names = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    return sorted(n for n in names if re.fullmatch(r"\d+(_\d+)?", n))


def job_log(sweep: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((sweep / ".submitit").glob("*/*_0_log.out")))


def wait_until(check, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stop_and_resume_steps(log: str) -> tuple[list[int], list[int]]:
    stops = [int(s) for s in re.findall(r"SIG\w+: checkpoint saved at step (\d+); exiting", log)]
    resumes = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)]
    return stops, resumes


def assert_same_as_uninterrupted(job: Path, reference: Path) -> None:
    """The resumed run ends where the uninterrupted one does: every evaluation, the training
    loss logged at each epoch's end, and results.json's numbers."""

    def evals(run):
        return [r for r in read_jsonl(run / "metrics.jsonl") if "test_acc" in r]

    assert evals(job) == evals(reference)
    got, want = (json.loads((run / "results.json").read_text()) for run in (job, reference))
    for key in ("final_test_acc", "final_test_loss", "best_test_acc", "steps"):
        assert got[key] == want[key], key


@pytest.mark.slurm
@pytest.mark.slow
def test_two_job_sweep_through_the_launcher_lists_both_jobs(started):
    code, log = finish(started, "sweep")
    sweep = started[0]["sweep"][1]
    assert code == 0, log[-3000:]
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert len(rows) == 3, rows  # the header and one row per job
    assert "optimizer.lr=0.1" in rows[1] and "optimizer.lr=0.05" in rows[2]
    assert all(",completed," in row for row in rows[1:]), rows
    assert all((sweep / job / "results.json").exists() for job in ("0", "1"))


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_checkpoints_is_requeued_and_resumes_to_the_same_metrics(started):
    code, log = finish(started, "preempt")
    sweep, seen = started[0]["preempt"][1], started[1]
    started[2]["preempt"].join(timeout=60)  # what the watcher saw, complete
    assert "preempt_error" not in seen, seen
    status = seen["preempt_status"]  # while it was stopped: SIGTERM, a checkpoint, exit 143
    assert status["status"] == "stopped" and status["error"].startswith("SIGTERM at step "), status
    assert "exit 143" in status["error"], status
    assert code == 0, log[-3000:] + job_log(sweep)[-3000:]
    stops, resumes = stop_and_resume_steps(job_log(sweep))
    print(f"preemption: stopped at step {stops}, resumed at step {resumes}")
    assert len(stops) == 1 and resumes == stops and stops[0] >= 40, (stops, resumes)
    assert status_of(sweep / "0")["status"] == "completed"
    finish(started, "ref_short")
    assert_same_as_uninterrupted(sweep / "0", started[0]["ref_short"][1])


@pytest.mark.slurm
@pytest.mark.slow
def test_time_limit_warning_checkpoints_requeues_and_resumes_to_the_same_metrics(started):
    code, log = finish(started, "timelimit")
    sweep, seen = started[0]["timelimit"][1], started[1]
    started[2]["timelimit"].join(timeout=60)
    assert "timelimit_error" not in seen, seen
    status = seen["timelimit_status"]  # while it waited in the queue: SIGUSR2, a checkpoint, submitit's requeue
    assert status["status"] == "stopped" and status["error"].startswith("SIGUSR2 at step "), status
    assert "requeue asked of the launcher" in status["error"], status
    assert code == 0, log[-3000:] + job_log(sweep)[-3000:]
    stops, resumes = stop_and_resume_steps(job_log(sweep))
    print(f"time limit: stopped at step {stops}, resumed at step {resumes}")
    assert len(stops) == 1 and resumes == stops and 0 < stops[0] < 2000, (stops, resumes)
    assert "Requeued job" in job_log(sweep)  # submitit's requeue (SLURM does not requeue at a time limit)
    assert status_of(sweep / "0")["status"] == "completed"
    finish(started, "ref_long")
    assert_same_as_uninterrupted(sweep / "0", started[0]["ref_long"][1])


@pytest.mark.slurm
@pytest.mark.slow
def test_srun_two_tasks_is_one_two_rank_run_with_one_results_file(cluster, tmp_path):
    run = tmp_path / "srun"
    cmd = ["srun", "-n2", "--mem=2G", *train("experiment=smoke", f"hydra.run.dir={run}")]
    out = subprocess.run(cmd, env=cluster, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "x 2 ranks" in out.stdout, out.stdout[-2000:]
    assert "in use by another training process" not in out.stdout + out.stderr
    assert out.stdout.count("done: test accuracy") == 1
    assert sorted(p.name for p in tmp_path.rglob("results.json")) == ["results.json"]
    assert json.loads((run / "results.json").read_text())["steps"] == 16  # 2 epochs x 8 global batches


@pytest.mark.slurm
@pytest.mark.slow
def test_the_launcher_with_two_tasks_per_node_runs_one_two_rank_job(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    args = (*LAUNCHER, "hydra.launcher.tasks_per_node=2", "experiment=smoke", f"hydra.sweep.dir={sweep}")
    out = subprocess.run(train("-m", *args), env=cluster, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "x 2 ranks" in job_log(sweep), job_log(sweep)[-3000:]  # rank 0's output
    assert ",completed," in (sweep / "summary.csv").read_text().splitlines()[1]
    assert json.loads((sweep / "0" / "results.json").read_text())["steps"] == 16


@pytest.mark.slurm
@pytest.mark.slow
def test_a_request_no_node_can_hold_is_refused_before_submitting(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    args = (*LAUNCHER, "hydra.launcher.cpus_per_task=4096", "experiment=smoke", f"hydra.sweep.dir={sweep}")
    try:
        out = subprocess.run(train("-m", *args), env=cluster, capture_output=True, text=True, timeout=120)
    finally:  # a job submitted all the same would wait in the queue for ever
        ids = {i.split("_")[0] for i in job_ids(sweep)}
        if ids:
            subprocess.run(["scancel", *sorted(ids)], env=cluster, capture_output=True, timeout=30)
    assert out.returncode == 2, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "hydra.launcher.cpus_per_task: 4096" in errors[0], out.stderr
    assert "more than any node of partition debug has" in errors[0]
    assert not (sweep / ".submitit").exists()  # nothing was submitted


# --------------------------------------------------------------------------------------
# Without a cluster: the signals SLURM sends, sent at a chosen point of the run
# --------------------------------------------------------------------------------------
# train.py under a wrapper that sends `SIG` to itself when `WHEN` happens: "start-up" (the data
# is loaded), "final-test" (results.json's test split), or "step-N" (N optimizer steps done);
# with LAUNCHER=1 a SIGUSR2 handler stands in for submitit's (it notes the call in MARK and exits
# -1, as submitit does after `scontrol requeue`). NTH: the how-manieth time WHEN happens (a sweep).
WRAPPER = r"""
import os, runpy, signal, sys
from pathlib import Path
sig, when, nth = getattr(signal, os.environ["SIG"]), os.environ["WHEN"], int(os.environ.get("NTH", "1"))
seen = {"n": 0}
def maybe_signal():
    seen["n"] += 1
    if seen["n"] == nth:
        os.kill(os.getpid(), sig)
if os.environ.get("LAUNCHER") == "1":
    def requeue(signum, frame):
        Path(os.environ["MARK"]).write_text("requeue asked")
        sys.exit(-1)
    signal.signal(signal.SIGUSR2, requeue)
if when == "start-up":
    import imgcls.data as module
    name = "load_configured"
elif when == "final-test":
    import imgcls.results as module
    name = "final_test"
else:
    import imgcls.step as module
    name = "train_step"
    nth = int(when.split("-")[1])
original = getattr(module, name)
def patched(*args, **kwargs):
    if name != "train_step":
        maybe_signal()
    out = original(*args, **kwargs)
    if name == "train_step":
        maybe_signal()
    return out
setattr(module, name, patched)
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def signalled(tmp_path, sig: str, when: str, *args: str, nth: int = 1, launcher: bool = False):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(SIG=sig, WHEN=when, NTH=str(nth), MARK=str(tmp_path / "requeue-asked"), PYTHONUNBUFFERED="1")
    if launcher:
        env["LAUNCHER"] = "1"
    return subprocess.run(
        [sys.executable, "-c", WRAPPER, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [True, False], ids=["under-a-launcher", "alone"])
def test_sigusr2_checkpoints_at_the_step_then_hands_over_to_the_launchers_requeue(tmp_path, launcher):
    run = tmp_path / "run"
    out = signalled(tmp_path, "SIGUSR2", "step-5", "experiment=smoke", f"hydra.run.dir={run}", launcher=launcher)
    assert "SIGUSR2: checkpoint saved at step 5; exiting" in out.stdout, out.stdout + out.stderr
    assert (run / "checkpoints" / "last.pt").exists()
    if launcher:  # submitit's handler ran after the checkpoint: it requeues and exits
        assert out.returncode == 255 and (tmp_path / "requeue-asked").exists(), out.stdout + out.stderr
    else:  # no launcher: the documented exit code, 128 + 12
        assert out.returncode == 140 and not (tmp_path / "requeue-asked").exists(), out.stdout + out.stderr
    again = run_train("experiment=smoke", f"hydra.run.dir={run}", check=False)
    assert again.returncode == 0 and "at step 5 (epoch 0, batch 5)" in again.stdout, again.stdout + again.stderr


@pytest.mark.slow
def test_sigterm_at_start_up_and_in_the_final_test_ends_the_run_with_143(tmp_path):
    run = tmp_path / "early"
    out = signalled(tmp_path, "SIGTERM", "start-up", "experiment=smoke", f"hydra.run.dir={run}")
    assert out.returncode == 143, out.stdout + out.stderr
    assert "SIGTERM in start-up: nothing to save yet; exiting" in out.stdout
    assert not list(run.glob("checkpoints/*.pt"))

    run = tmp_path / "late"
    out = signalled(tmp_path, "SIGTERM", "final-test", "experiment=smoke", f"hydra.run.dir={run}")
    assert out.returncode == 143, out.stdout + out.stderr
    assert "SIGTERM in the final test (the run's last checkpoint is saved" in out.stdout
    assert (run / "checkpoints" / "last.pt").exists() and not (run / "results.json").exists()
    again = run_train("experiment=smoke", f"hydra.run.dir={run}", check=False)
    assert again.returncode == 0 and "already finished" in again.stdout, again.stdout + again.stderr
    assert (run / "results.json").exists()


@pytest.mark.slow
def test_a_job_stopped_by_a_signal_is_listed_in_the_sweep_summary(tmp_path):
    sweep = tmp_path / "sweep"
    args = ("-m", "experiment=smoke", "trainer.epochs=1", "optimizer.lr=0.1,0.05", f"hydra.sweep.dir={sweep}")
    out = signalled(tmp_path, "SIGTERM", "start-up", *args, nth=2)  # the second job, as it starts
    assert out.returncode == 143, out.stdout + out.stderr
    rows = {r.split(",")[0]: r for r in (sweep / "summary.csv").read_text().splitlines()[1:]}
    assert sorted(rows) == ["0", "1"], rows
    assert ",completed," in rows["0"]
    assert ",stopped," in rows["1"] and "SIGTERM in start-up: nothing to save yet" in rows["1"], rows["1"]
    assert "1 of 2 stopped or unfinished" in out.stdout


def test_no_module_global_holds_a_lock_or_a_descriptor_after_a_run(tmp_path):
    """submitit pickles train.py's main with the globals it reaches to requeue a job: a lock or
    a file there would come back in the new process holding a descriptor number that is not
    its own (it closed fd 4 of the requeued job)."""
    import io
    import socket
    import threading

    from imgcls.runlock import RunLock
    from tests.conftest import run_recipe

    run_recipe(tmp_path / "run", "experiment=smoke", "trainer.epochs=1")
    import train

    bound = (RunLock, io.IOBase, socket.socket, type(threading.Lock()), type(threading.RLock()))
    modules = [m for name, m in list(sys.modules.items()) if name == "train" or name.startswith("imgcls")]
    found = [
        f"{m.__name__}.{k}"
        for m in [*modules, train]
        for k, v in vars(m).items()
        if isinstance(v, bound) or (isinstance(v, (list, tuple, dict)) and any(isinstance(x, bound) for x in v))
    ]
    assert found == []


@pytest.mark.slow
def test_wall_seconds_counts_from_the_process_start(tmp_path):
    """results.json's wall_seconds is the process's, from its start as the kernel recorded it:
    the 3 s the process slept before train.py (and imgcls.results) was even imported are in
    it. Bound without a clock of its own: it is at least the time from the process's first
    statement to the last line of metrics.jsonl, which is written before results.json."""
    run, started_at = tmp_path / "run", tmp_path / "started_at"
    code = (
        "import sys, time; open(sys.argv[1], 'w').write(repr(time.time())); time.sleep(3); "
        "import runpy; sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    args = [str(started_at), str(ROOT / "train.py"), "experiment=smoke", "trainer.epochs=1", f"hydra.run.dir={run}"]
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    wall = json.loads((run / "results.json").read_text())["wall_seconds"]
    assert wall >= (run / "metrics.jsonl").stat().st_mtime - float(started_at.read_text()), wall
