"""imgcls.preview: the schedule of a config, stepped as train.py steps it, as a table and a PNG.

In this process (imports paid once) except the exit-code test, which runs the real command.
Expected learning rates are computed here from the schedules' definitions, not by torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile

import pytest
from omegaconf import open_dict

from imgcls import preview
from imgcls.config import CONF_DIR, compose_config
from imgcls.schedule import steps_per_epoch
from tests.conftest import ROOT, run_recipe

ROW = re.compile(r"^\s*(\d+)\s+(\d+\.\d\d)\s+(\S+)\s*(.*)$")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SCHEDULERS = sorted(p.stem for p in (ROOT / "conf" / "scheduler").glob("*.yaml"))


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = preview.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def table(out: str) -> dict[int, tuple[float, float, str]]:
    """{step: (epoch, lr, note)} from the printed table."""
    rows = {}
    for line in out.splitlines():
        if m := ROW.match(line):
            rows[int(m[1])] = (float(m[2]), float(m[3]), m[4])
    return rows


def warmup_linear(step: int, total: int, peak: float) -> float:
    """conf/scheduler/warmup_linear.yaml by hand: 0.2 x peak -> peak over the first 20% of
    the run (linearly), then linearly to 0 at the end."""
    warm = round(0.2 * total)
    if step < warm:
        return peak * (0.2 + 0.8 * step / warm)
    return peak * (1 - (step - warm) / (total - warm))


# --------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------
def test_warmup_linear_table(capsys):
    code, out, err = run(capsys, "scheduler=warmup_linear", "trainer.epochs=10", "--steps-per-epoch", "10", "--no-plot")
    assert code == 0, err
    rows = table(out)
    assert sorted(rows) == list(range(0, 101, 10))  # 10 evenly spaced + the first and the end
    assert rows[0][1] == pytest.approx(0.2 * 0.2)  # 0.04 at step 0
    assert rows[20] == (2.0, pytest.approx(0.2), "milestone")  # the peak, at the milestone
    assert rows[100][1] == 0.0 and rows[100][2].startswith("end")
    for step, (epoch, lr, _) in rows.items():
        assert epoch == step / 10
        assert lr == pytest.approx(warmup_linear(step, 100, 0.2), rel=1e-5, abs=1e-9), step
    assert "peak lr 0.2 at step 20" in out
    assert "10 epochs x 10 steps/epoch" in out


def test_every_step_of_warmup_linear_and_every_k():
    s = preview.preview(["trainer.epochs=10", "optimizer.lr=0.1"], steps_per_epoch_arg=7)
    assert s.total == 70 and len(s.lrs) == 71 and s.milestones == [14]
    for step, row in enumerate(s.lrs):
        assert row == [pytest.approx(warmup_linear(step, 70, 0.1), abs=1e-12)], step
    assert preview.table_steps(s, every=30) == [0, 14, 30, 60, 70]


def test_per_epoch_schedule_is_constant_within_an_epoch():
    # warmup_exp: 0.1x -> peak over 2 epochs (LinearLR), then x0.9 per epoch; stepped per epoch
    s = preview.preview(["scheduler=warmup_exp", "trainer.epochs=5"], steps_per_epoch_arg=4)
    per_epoch = [0.02, 0.11, 0.2, 0.18, 0.162, 0.1458]  # epochs 0..4, then the end of the run
    expected = [per_epoch[step // 4] for step in range(21)]
    assert [row[0] for row in s.lrs] == pytest.approx(expected)
    assert s.milestones == [8]  # ${epochs:2} epochs, drawn in steps


def test_nested_milestones_count_from_their_phase():
    s = preview.preview(["scheduler=warmup_cosine_tail", "trainer.epochs=10"], steps_per_epoch_arg=10)
    assert s.milestones == [10]  # ${run_fraction:0.1}
    assert s.nested_milestones == [80]  # 10 + ${run_fraction:0.7}
    assert s.lrs[80][0] == pytest.approx(0.2 * 0.02) and s.lrs[-1][0] == pytest.approx(0.2 * 0.02)


def test_plateau_is_fed_a_synthetic_loss_and_says_so(capsys):
    code, out, err = run(capsys, "scheduler=warmup_plateau", "trainer.epochs=10", "--steps-per-epoch", "3", "--no-plot")
    assert code == 0, err
    assert "synthetic test loss" in out and "depends on the measured test loss" in out
    lrs = [lr for _, lr, _ in table(out).values()]
    assert max(lrs) == pytest.approx(0.2) and min(lrs[1:]) < 0.2  # warmup, then at least one halving


# --------------------------------------------------------------------------------------
# steps per epoch from the data config
# --------------------------------------------------------------------------------------
def steps(*overrides: str) -> int:
    cfg, _ = compose_config(list(overrides))
    return steps_per_epoch(cfg)[0]


def test_steps_per_epoch_from_the_data_config(tmp_path):
    assert steps() == (50_000 - 5_000) // 512 == 87  # cifar10 less val_size, batch 512
    assert steps("data.val_size=0") == 50_000 // 512 == 97  # no validation split
    assert steps("data.val_size=0.2") == 40_000 // 512
    assert steps("data=cifar100", "trainer.batch_size=128") == 45_000 // 128
    assert steps("data=synthetic") == 512 // 512 == 1  # data.dataset.train_size
    assert steps("data=synthetic", "data.dataset.train_size=1000", "trainer.batch_size=64") == 15
    assert steps("experiment=smoke") == 512 // 64
    assert steps("trainer.limit_train_batches=20") == 20  # the cap
    for split, count in (("train", 30), ("test", 4)):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                (tmp_path / split / cls / f"{i}.png").write_bytes(b"")
    assert (
        steps("data=image_folder", f"data.dataset.path={tmp_path}", "trainer.batch_size=8") == (60 - 6) // 8
    )  # 10% val
    archive = tmp_path.parent / f"{tmp_path.name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path, arcname="top")  # under one top folder, as the loader accepts
    root = tmp_path.parent / "root"  # an archive is counted from its member list: nothing extracted
    assert (
        steps("data=image_folder", f"data.dataset.path={archive}", f"data.dataset.root={root}", "trainer.batch_size=8")
        == 6
    )
    assert not root.exists()


def test_a_new_data_option_counts_or_is_loaded(monkeypatch):
    """A dataset added the way the README's "Make it yours" shows (one function): its own train_size,
    or, without one, the preview loads it."""
    import imgcls.data as D

    loads = []

    def tiny(n: int = 300, counts: bool = True) -> D.DataSource:
        def load():
            loads.append(n)
            return D.synthetic(n, 10).load()

        return D.DataSource("tiny", load, train_size=(lambda: n) if counts else None)

    monkeypatch.setattr(D, "tiny", tiny, raising=False)
    cfg, _ = compose_config(["data=synthetic", "trainer.batch_size=64"])

    def tiny_steps(**keys) -> int:
        with open_dict(cfg):
            cfg.data.dataset = {"_target_": "imgcls.data.tiny", **keys}
        return steps_per_epoch(cfg)[0]

    assert tiny_steps() == 300 // 64 and loads == []  # counted, not read
    assert tiny_steps(n=200, counts=False) == 200 // 64 and loads == [200]


def test_steps_per_epoch_errors(tmp_path):
    with pytest.raises(ValueError, match=r"trainer.batch_size: 1024 is larger than the 512"):
        steps("data=synthetic", "trainer.batch_size=1024")
    with pytest.raises(ValueError, match=r"data.dataset.path: \?\?\?.*--steps-per-epoch"):
        steps("data=image_folder")
    archive = tmp_path / "images.tar.gz"
    archive.write_bytes(b"")
    with pytest.raises(ValueError, match=r"data.dataset.path: .*images.tar.gz is not a readable archive.*--steps"):
        steps("data=image_folder", f"data.dataset.path={archive}")


# --------------------------------------------------------------------------------------
# the PNG
# --------------------------------------------------------------------------------------
def test_png_is_written(capsys, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -e '.[plots]')")
    monkeypatch.chdir(tmp_path)  # the default --out: schedule.png in the working directory
    code, out, err = run(capsys, "scheduler=warmup_cosine_tail", "trainer.epochs=4", "--steps-per-epoch", "25")
    assert code == 0, err
    png = (tmp_path / "schedule.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE and png[12:16] == b"IHDR"
    assert 1_000 < len(png) < 80_000
    assert "wrote schedule.png" in out


def test_without_matplotlib_the_table_still_works(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    code, out, err = run(capsys, "--steps-per-epoch", "5", "--no-plot")
    assert code == 0 and table(out)
    code, out, err = run(capsys, "--steps-per-epoch", "5", "--out", str(tmp_path / "x.png"))
    assert code == preview.EXIT_NO_MATPLOTLIB and err.startswith("error: ") and "matplotlib" in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("option", SCHEDULERS)
def test_every_scheduler_option_previews(option, capsys, tmp_path):
    """Walks conf/scheduler/: a new option is covered with no edit here."""
    plot = importlib.util.find_spec("matplotlib") is not None
    out_args = ["--out", str(tmp_path / f"{option}.png")] if plot else ["--no-plot"]
    code, out, err = run(capsys, f"scheduler={option}", "trainer.epochs=6", "--steps-per-epoch", "5", *out_args)
    assert code == 0, err
    rows = table(out)
    assert min(rows) == 0 and max(rows) == 30 and rows[30][2].startswith("end")
    assert all(0.0 <= lr <= 0.2 * (1 + 1e-9) for _, lr, _ in rows.values()), rows
    if plot:
        assert (tmp_path / f"{option}.png").read_bytes()[:8] == PNG_SIGNATURE


# --------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------
def test_bad_override_exits_2_with_one_error_line():
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run(
        [sys.executable, "-m", "imgcls.preview", "scheduler=nope", "--no-plot"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: scheduler: 'nope' is not an option") and proc.stderr.count("\n") == 1
    assert "warmup_linear" in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize(
    "args,message",
    [
        (["trainer.epochs=0"], "error: trainer.epochs: 0 is not accepted"),
        (["optimizer.lr=-1"], "error: optimizer.lr: -1 is not accepted"),
        (["nosuch.key=1"], "error: nosuch.key: 1 is not accepted: the top level has no key 'nosuch'; accepted: data,"),
        (["trainer.epochs=1=2"], "error: override 'trainer.epochs=1=2': "),
        (["experiment=nope"], "error: experiment: 'nope' is not an option"),
        (["scheduler.milestones=[5,3]"], "error: scheduler: milestones must have exactly one fewer"),
        (["scheduler=warmup_plateau", "schedule.interval=step"], "error: scheduler: a ReduceLROnPlateau phase"),
    ],
)
def test_bad_config_is_one_error_line(args, message, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    code, out, err = run(capsys, *args, "--steps-per-epoch", "5", "--no-plot")
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert out == ""


@pytest.mark.parametrize("args", [["--steps-per-epoch", "0"], ["--every", "x"], ["--out", "plot.jpg"], ["--bogus"]])
def test_bad_option_is_one_error_line(args, capsys):
    with pytest.raises(SystemExit) as exc:
        preview.main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "overrides,says",
    [
        (
            ["scheduler.milestones=[100000]"],
            "scheduler.milestones[0] = 100000 starts scheduler.schedulers[1] at step 100000 (epoch 12500), not before "
            "the end of the run at step 16 (epoch 2): that phase never runs (the run: 2 epochs x 8 steps = 16 steps)",
        ),
        (
            ["scheduler=warmup_exp", "trainer.epochs=1"],  # smoke's 1-epoch warmup in a 1-epoch run
            "scheduler.milestones[0] = 1 starts scheduler.schedulers[1] at step 8 (epoch 1), not before the end of the "
            "run at step 8 (epoch 1)",
        ),
        (
            ["scheduler=multistep", "scheduler.milestones=[1,100]"],
            "scheduler.milestones: 100 is at step 800 (epoch 100), not before the end of the run at step 16 (epoch 2): "
            "that decay never happens",
        ),
        (
            ["scheduler=warmup_linear", "scheduler.schedulers.0.total_iters=40"],
            "scheduler.schedulers[0].total_iters = 40: the LinearLR phase from step 0 (epoch 0) needs until step 40 "
            "(epoch 5), but its phase ends at step 3 (epoch 0.375): it never completes",
        ),
    ],
)
def test_a_schedule_that_does_not_fit_the_run_is_refused(overrides, says):
    with pytest.raises(preview.PreviewError) as e:
        preview.preview(["experiment=smoke", *overrides])
    assert says in str(e.value) and "schedule.allow_truncated=true" in str(e.value)


def test_allow_truncated_runs_it_with_a_warning(capsys):
    s = preview.preview(
        ["experiment=smoke", "scheduler=warmup_exp", "trainer.epochs=1", "schedule.allow_truncated=true"]
    )
    assert s.total == 8 and max(lr[0] for lr in s.lrs[: s.total]) < 0.2  # every step trains below the peak lr
    assert "warning: scheduler.milestones[0] = 1" in capsys.readouterr().err


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF_DIR / "scheduler").glob("*.yaml")))
def test_every_shipped_schedule_fits_the_default_run(option):
    preview.preview([f"scheduler={option}"])  # 16 epochs of CIFAR-10: no refusal


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [["scheduler=warmup_linear"], ["scheduler=warmup_exp", "trainer.epochs=3"]],
    ids=["per-step", "per-epoch"],
)
def test_the_preview_equals_the_lrs_a_run_logs(overrides, tmp_path):
    """metrics.jsonl's lr at step N is the lr after N steps (and the scheduler steps due by
    then): the preview's lr at step N, for per-step and per-epoch schedules alike."""
    run = tmp_path / "run"
    run_recipe(run, "experiment=smoke", "trainer.log_every=1", *overrides)
    logged = {
        m["step"]: m["lr"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in m
    }
    s = preview.preview(["experiment=smoke", *overrides])
    assert sorted(logged) == list(range(1, s.total + 1))
    assert all(logged[step] == pytest.approx(s.lrs[step], rel=1e-12) for step in logged), (logged, s.lrs)
