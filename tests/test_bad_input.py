"""Every row of the bad-input table (docs/bad-input.md), run as written, in this process.

Each row is `python train.py experiment=smoke <input>`: it must end before any training step
with the exit code and the error text of its row. Running train.cli() in-process (the
command line, with sys.argv set) keeps the rows to seconds.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import re
import sys

import pytest
import torch
from PIL import Image

import train
from tests.conftest import ROOT

ROW = re.compile(r"^\| (\d+) \| `([^`]*)`[^|]* \| (\d+) \| `([^`]*)` \|$")


def table_rows():
    text = (ROOT / "docs" / "bad-input.md").read_text()
    rows = [m.groups() for line in text.splitlines() if (m := ROW.match(line))]
    assert len(rows) >= 56, "docs/bad-input.md's table lost rows"
    assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1)), "rows are numbered 1, 2, ... with none skipped"
    return rows


def _image_tree(base, sizes, extra=None, empty=None):
    for split in ("train", "test"):
        for cls in ("a", "b"):
            d = base / split / cls
            d.mkdir(parents=True)
            if (split, cls) == empty:
                continue
            for i, size in enumerate(sizes):
                Image.new("RGB", (size, size), (i * 40, 0, 0)).save(d / f"{i}.png")
    if extra:
        (base / "train" / "a" / extra).write_text("not an image")
    return base


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "a_file").write_text("a regular file")
    good = {"model": {}, "state": {}}
    torch.save(good, tmp / "full.pt")
    blob = (tmp / "full.pt").read_bytes()
    (tmp / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    torch.save([1, 2, 3], tmp / "not_a_checkpoint.pt")

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp / "pwned"), "w"))

    with open(tmp / "crafted.pt", "wb") as f:
        pickle.dump({"model": Payload()}, f, protocol=2)
    return {
        "tmp": tmp,
        "missing": tmp / "does-not-exist",
        "a_file": tmp / "a_file",
        "truncated_ckpt": tmp / "truncated.pt",
        "not_a_ckpt": tmp / "not_a_checkpoint.pt",
        "crafted_pickle": tmp / "crafted.pt",
        "empty_class": _image_tree(tmp / "empty_class", [8, 8], empty=("train", "b")),
        "non_image": _image_tree(tmp / "non_image", [8, 8], extra="notes.txt"),
        "mixed_sizes": _image_tree(tmp / "mixed_sizes", [8, 16]),
        "finished_run": _finished_run(tmp / "finished_run"),
    }


def _finished_run(run):
    """A finished 1-epoch smoke run: warmup_linear has brought its lr to 0."""
    from tests.conftest import run_recipe

    run_recipe(run, "experiment=smoke", "trainer.epochs=1")
    return run


def run_in_process(args, run_dir):
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args = [*args, f"hydra.run.dir={run_dir}"]
    flags = [a for a in args if a.startswith("-")]  # -m: before the overrides, as Hydra's parser wants
    argv, sys.argv = sys.argv, ["train.py", *flags, "experiment=smoke", *(a for a in args if a not in flags)]
    err, out = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            train.cli()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    return code, err.getvalue()


@pytest.mark.parametrize("number,given,code,says", table_rows(), ids=lambda v: v if str(v).isdigit() else None)
def test_bad_input_row(number, given, code, says, files, tmp_path, monkeypatch):
    if "trainer.device=cuda" in given and torch.cuda.is_available():
        pytest.skip("row 9 is about a machine without CUDA; this one has a GPU")
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    args = given.format(**files).split()
    got, stderr = run_in_process(args, tmp_path / "run")
    assert got == int(code), f"row {number}: exit {got}, stderr:\n{stderr}"
    assert says in stderr, f"row {number}: {says!r} not in stderr:\n{stderr}"
    if got == 2:
        assert stderr.startswith("error: ") and len(stderr.splitlines()) <= 12, stderr
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == "", "a training step ran"
    assert not (files["tmp"] / "pwned").exists(), "code ran from a checkpoint"


def test_ctrl_c_at_start_up_is_one_line_and_exit_130(tmp_path, monkeypatch):
    """KeyboardInterrupt before training (here: while the data loads) ends train.py with one
    line and exit code 130, leaving no empty run directory."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "load_data", interrupted)
    try:
        code, stderr = run_in_process([], tmp_path / "run")
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped train.py (a traceback)")
    assert code == 130 and stderr.startswith("interrupted: Ctrl-C") and stderr.count("\n") == 1, stderr
    assert not (tmp_path / "run").exists()
