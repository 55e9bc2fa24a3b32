"""The lr finder (python -m imgcls.lr_find): the sweep's lrs, the stop at divergence, the
suggestion, and the command on experiment=smoke (in process: a plot, a suggestion inside the
swept range, nothing of a run written)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from imgcls import lr_find
from imgcls.config import compose_config
from imgcls.lr_find import RangeTest, lr_at


def test_the_sweep_is_exponential_from_start_to_end():
    lrs = [lr_at(i, 5, 1e-4, 1.0) for i in range(5)]
    for got, want in zip(lrs, (1e-4, 1e-3, 1e-2, 1e-1, 1.0)):
        assert math.isclose(got, want, rel_tol=1e-12)


def test_the_suggestion_lies_two_thirds_down_the_fall_and_the_smoothing_does_not_lag():
    steps = 100
    lrs = [lr_at(i, steps, 1e-6, 10.0) for i in range(steps)]
    # a plateau, a fall over steps 40..70, a rise (the shape of a real range test), plus noise
    line = [2.3 if i < 40 else 2.3 - 0.04 * (i - 40) if i <= 70 else 1.1 + 0.2 * (i - 70) for i in range(steps)]
    noisy = [v + 0.1 * (-1) ** i for i, v in enumerate(line)]
    r = RangeTest(lrs, noisy, False)
    assert 50 <= r.suggested <= 62  # two thirds down the fall from step 40 to 70: step 60
    assert max(abs(a - b) for a, b in zip(r.smoothed[45:66], line[45:66])) < 0.03  # noise averaged out...
    assert abs(min(range(steps), key=r.smoothed.__getitem__) - 70) <= 2  # ...in place (a lagging average: ~80)


def test_each_step_runs_at_the_sweeps_lr_and_a_diverging_loss_stops_it(monkeypatch):
    seen = []

    def fake_step(net, optimizer, loss_fn, x, y, settings):
        i = len(seen)
        seen.append([g["lr"] for g in optimizer.param_groups])
        return torch.tensor(2.0 if i < 30 else 2.0 * 3.0 ** (i - 30))  # explodes after step 30

    monkeypatch.setattr(lr_find, "train_step", fake_step)
    cfg, _ = compose_config(["experiment=smoke"])
    r = lr_find.range_test(cfg, 60, 1e-5, 1.0)
    assert r.diverged and 31 < len(r.lrs) < 40, len(r.lrs)
    for i, lrs in enumerate(seen):
        assert lrs == [pytest.approx(lr_at(i, 60, 1e-5, 1.0))] * len(lrs)


def test_lr_find_on_the_smoke_preset_writes_the_plot_and_nothing_of_a_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_dir, out = tmp_path / "run", tmp_path / "lr.png"
    code = lr_find.main(["experiment=smoke", f"hydra.run.dir={run_dir}", "--steps", "30", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr.png"]  # no run dir, no outputs/
    suggested = float(re.search(r"suggested peak lr (\S+) ", printed)[1])
    assert 1e-6 <= suggested <= 10.0
    lr = float(re.search(r"optimizer\.lr=(\S+)", printed)[1])
    assert lr == pytest.approx(suggested, rel=1e-2)  # warmup_linear peaks at optimizer.lr


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--steps", "5"], "--steps: 5 is not accepted; expected an int >= 20"),
        (
            ["--start-lr", "1", "--end-lr", "0.1"],
            "--start-lr 1.0 --end-lr 0.1 is not accepted; expected 0 < start < end",
        ),
        (["--out", "lr.jpg"], "--out: 'lr.jpg' is not accepted; expected a path ending in .png"),
        (["optimizer.lr=-1"], "optimizer.lr: -1 is not accepted"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(argv, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    try:
        code = lr_find.main(["experiment=smoke", *argv])
    except SystemExit as e:  # argparse's refusals
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())
