"""Pictures of runs: curves.png redrawn after each evaluation (trainer.plot_curves) and
``python -m imgcls.plot RUN_DIR...`` (integration tier: smoke runs in process)."""

from __future__ import annotations

import pytest

from imgcls import plot
from tests.conftest import run_recipe

PNG = b"\x89PNG\r\n\x1a\n"
pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -e '.[plots]')")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("plot")
    run_recipe(base / "a", "experiment=smoke", "trainer.plot_curves=true")  # in process: no start-up
    run_recipe(base / "b", "experiment=smoke", "optimizer.lr=0.1")
    return base / "a", base / "b"


@pytest.mark.slow
def test_curves_png_is_written_with_the_switch_only(runs, monkeypatch):
    a, b = runs
    assert (a / "curves.png").read_bytes()[:8] == PNG
    assert not (b / "curves.png").exists()  # off by default
    assert not list(a.glob(".curves.png.*"))  # written atomically: no temp file left
    drawn = []  # redrawn after each evaluation: what write_curves reads is the run's records
    monkeypatch.setattr(plot, "curves_png", lambda r: drawn.append(r) or PNG)
    plot.write_curves(a)
    (records,) = drawn[0].values()
    assert [r["epoch"] for r in records if "test_acc" in r] == [1, 2]


@pytest.mark.slow
def test_plot_module_draws_chosen_runs_and_refuses_a_non_run(runs, tmp_path, capsys):
    a, b = runs
    out = tmp_path / "both.png"
    assert plot.main([str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG and len(out.read_bytes()) > 10_000
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: runs:") and "\n" not in err and not (tmp_path / "x.png").exists()
