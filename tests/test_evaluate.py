"""python -m imgcls.evaluate / imgcls.predict on a small checkpoint made here (no train.py needed)."""

from __future__ import annotations

import csv
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls import evaluate, predict
from imgcls.checkpoint import save_checkpoint
from imgcls.data import synthetic
from imgcls.loader import Augment, BatchFormat, DeviceLoader

CONFIG = {
    "model": {"_target_": "imgcls.models.resnet9", "_partial_": True, "width": 4, "scale_out": 0.125},
    "data": {
        "dataset": {"_target_": "imgcls.data.synthetic", "train_size": 128, "test_size": 64, "num_classes": 4},
        "num_classes": 4,
        "val_size": 32,
    },
    "trainer": {"precision": "fp32", "tta_flip": False, "eval_batch_size": 50, "seed": 0},
}


def make_checkpoint(path, config=CONFIG, steps=3):
    """A resnet9 trained a few steps on the synthetic data, saved as train.py saves it."""
    from imgcls.models import resnet9

    ds = synthetic(128, 64, num_classes=4, seed=0).load()
    torch.manual_seed(0)
    model = resnet9(num_classes=4, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    loader = DeviceLoader(ds.train_images, ds.train_labels, 32, "cpu", BatchFormat(ds.mean, ds.std), Augment())
    for step in range(steps):
        for x, y in loader.epoch_batches(step):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            break
    save_checkpoint(
        {
            "model": model.state_dict(),
            "config": config,
            "state": {"finished": True},
            "data_info": {
                "classes": ds.classes,
                "mean": list(ds.mean),
                "std": list(ds.std),
                "size": list(ds.train_images.shape[1:]),
            },
        },
        path,
    )
    return model, ds


def test_evaluate_writes_metrics_confusion_and_matches_a_direct_evaluation(tmp_path, capsys):
    run = tmp_path / "run"
    model, ds = make_checkpoint(run / "checkpoints" / "last.pt")
    assert evaluate.main([f"checkpoint={run}"]) == 0
    out = run / "eval" / "last-test"
    m = json.loads((out / "metrics.json").read_text())
    loader = DeviceLoader(ds.test_images, ds.test_labels, 50, "cpu", BatchFormat(ds.mean, ds.std))
    direct = evaluate.run_eval(model, loader.epoch_batches(0), torch.device("cpu"), "fp32", False)
    assert m["acc"] == direct["acc"] and m["loss"] == pytest.approx(direct["loss"], rel=1e-6)
    assert m["images"] == 64 and m["split"] == "test" and m["weights"] == "raw"
    rows = list(csv.reader(open(out / "confusion.csv")))
    matrix = np.array([[int(v) for v in r[1:]] for r in rows[1:]])
    assert matrix.sum() == 64 and np.trace(matrix) / 64 == m["acc"]
    for i, c in enumerate(ds.classes):
        assert m["per_class_acc"][c] == pytest.approx(matrix[i, i] / matrix[i].sum())
    assert Image.open(out / "confusion.png").size[0] > 4 * 24
    printed = capsys.readouterr().out
    assert f"accuracy {m['acc']:.4f}" in printed and "class0" in printed

    assert evaluate.main([f"checkpoint={run}", "split=val", f"out={tmp_path / 'v'}"]) == 0
    assert json.loads((tmp_path / "v" / "metrics.json").read_text())["images"] == 32


def test_run_dir_means_best_pt(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt", steps=1)
    make_checkpoint(run / "checkpoints" / "best.pt", steps=2)
    assert evaluate.resolve_checkpoint(run) == run / "checkpoints" / "best.pt"
    assert evaluate.resolve_checkpoint(run / "checkpoints" / "last.pt") == run / "checkpoints" / "last.pt"


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize(
    "kind",
    [
        "missing",
        "garbage",
        "crafted",
        "foreign_target",
        "foreign_data",
        "imported_name",
        "nested_target",
        "class_mismatch",
        "empty_dir",
    ],
)
def test_bad_checkpoints_and_data_exit_2_in_one_line(tmp_path, capsys, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "c.pt"
    args = [f"checkpoint={ckpt}"]
    if kind == "garbage":
        ckpt.write_bytes(b"not a checkpoint at all")
    elif kind == "crafted":
        ckpt.write_bytes(pickle.dumps({"model": _Evil()}))
    elif kind == "foreign_target":
        make_checkpoint(ckpt, config={**CONFIG, "model": {**CONFIG["model"], "_target_": "os.system"}}, steps=0)
    elif kind == "foreign_data":
        dataset = {"_target_": "os.system", "command": "touch PWNED"}
        make_checkpoint(ckpt, config={**CONFIG, "data": {**CONFIG["data"], "dataset": dataset}}, steps=0)
    elif kind == "imported_name":  # a name imgcls.data imports, not a builder it defines
        dataset = {"_target_": "imgcls.data.np.save", "file": "PWNED", "arr": [1]}
        make_checkpoint(ckpt, config={**CONFIG, "data": {**CONFIG["data"], "dataset": dataset}}, steps=0)
    elif kind == "nested_target":  # a builder of imgcls.models with code to run inside its arguments
        model = {**CONFIG["model"], "width": {"_target_": "os.system", "command": "touch PWNED"}}
        make_checkpoint(ckpt, config={**CONFIG, "model": model}, steps=0)
    elif kind == "class_mismatch":
        make_checkpoint(ckpt, steps=0)
        args.append("data.dataset.num_classes=5")
    elif kind == "empty_dir":
        args = [f"checkpoint={tmp_path}"]
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    expected = {
        "missing": "does not exist",
        "garbage": "cannot be loaded",
        "crafted": "weights_only",
        "foreign_target": "model._target_ 'os.system' is not accepted",
        "foreign_data": "data.dataset._target_ 'os.system' is not accepted",
        "imported_name": "data.dataset._target_ 'imgcls.data.np.save' is not accepted",
        "nested_target": "model._target_ 'imgcls.models.resnet9' is not accepted",
        "class_mismatch": "do not match",
        "empty_dir": "without checkpoints/best.pt",
    }[kind]
    assert expected in err
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "PWNED.npy").exists()


def _png(path, size, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_predict_folder_resizes_once_skips_unreadable_and_writes_topk(tmp_path, capsys):
    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt", steps=0)
    imgs = tmp_path / "imgs"
    _png(imgs / "a.png", (32, 32), (200, 10, 10))
    _png(imgs / "sub" / "b.png", (40, 30), (10, 200, 10))
    _png(imgs / "c.png", (64, 64), (10, 10, 200))
    (imgs / "broken.png").write_bytes(b"\x89PNG garbage")
    out = tmp_path / "p.csv"
    assert predict.main([f"checkpoint={run}", f"images={imgs}", f"out={out}", "topk=3", "batch_size=2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("resizing images of another size to the training size 32x32") == 1
    assert "broken.png" in captured.err and "skipped" in captured.err
    rows = list(csv.DictReader(open(out)))
    assert [r["file"].rsplit("/", 1)[1] for r in rows] == ["a.png", "c.png", "b.png"]
    for r in rows:
        top = r["top3"].split()
        assert len(top) == 3 and top[0].split(":")[0] == r["class"]
        assert float(r["probability"]) == pytest.approx(float(top[0].split(":")[1]), abs=1e-4)
    # a glob and a single file
    assert predict.main([f"checkpoint={run}", f"images={imgs}/*.png", f"out={out}"]) == 0
    assert len(list(csv.DictReader(open(out)))) == 2
    assert predict.main([f"checkpoint={run}", f"images={imgs / 'a.png'}", f"out={out}"]) == 0


def test_predict_writes_the_softmax_of_the_model_output(tmp_path):
    """probability and the top-k column are class probabilities: the softmax of the model's
    logits (each in [0, 1], the top k summing to at most 1), not the logits themselves."""
    run = tmp_path / "run"
    model, ds = make_checkpoint(run / "checkpoints" / "last.pt")
    images = ds.test_images[:16]
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):  # PNG: lossless, predict reads the same pixels
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:02d}.png")
    out = tmp_path / "p.csv"
    assert predict.main([f"checkpoint={run}", f"images={folder}", f"out={out}", "topk=3"]) == 0
    mean, std = torch.tensor(ds.mean).view(1, -1, 1, 1), torch.tensor(ds.std).view(1, -1, 1, 1)
    model.eval()
    with torch.no_grad():
        expected = model((images.float() / 255 - mean) / std).float().softmax(1)
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 16
    for row, probs in zip(rows, expected):
        top = [pair.split(":") for pair in row["top3"].split()]
        ps = [float(p) for _, p in top]
        assert all(0.0 <= p <= 1.0 for p in [*ps, float(row["probability"])])
        assert sum(ps) <= 1.0 + 2e-4  # (4 decimals each)
        want_p, want_i = probs.topk(3)
        assert [c for c, _ in top] == [ds.classes[i] for i in want_i] and row["class"] == top[0][0]
        assert float(row["probability"]) == pytest.approx(float(want_p[0]), abs=1e-6)
        assert ps == pytest.approx(want_p.tolist(), abs=1e-4)


def test_evaluate_under_bf16_reproduces_the_runs_results(tmp_path):
    """evaluate scores as the run did, in its trainer.precision: a bf16 run's last.pt gives
    results.json's final_test_acc and final_test_loss exactly (fp32 would move the loss)."""
    from tests.conftest import run_recipe

    run = tmp_path / "run"
    run_recipe(
        run,
        "experiment=smoke",
        "trainer.precision=bf16",
        "trainer.epochs=1",
        "data.dataset.train_size=192",
        "data.dataset.test_size=128",
        "data.val_size=64",
    )
    results = json.loads((run / "results.json").read_text())
    assert evaluate.main([f"checkpoint={run / 'checkpoints' / 'last.pt'}", f"out={tmp_path / 'e'}"]) == 0
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert (m["acc"], m["loss"]) == (results["final_test_acc"], results["final_test_loss"])


def test_predict_empty_folder_exits_2(tmp_path, capsys):
    make_checkpoint(tmp_path / "c.pt", steps=0)
    (tmp_path / "empty").mkdir()
    assert predict.main([f"checkpoint={tmp_path / 'c.pt'}", f"images={tmp_path / 'empty'}"]) == 2
    assert "holds no image files" in capsys.readouterr().err


def test_evaluate_on_other_data_has_its_own_output_and_records_the_data(tmp_path):
    """data.* overrides score other data: eval/<ckpt>-<split>-data-<digest>/, never the run's own
    eval/<ckpt>-<split>/, and metrics.json says which data it scored."""
    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt", steps=0)
    assert evaluate.main([f"checkpoint={run}"]) == 0
    own = (run / "eval" / "last-test" / "metrics.json").read_text()
    assert json.loads(own)["data_overrides"] == {} and json.loads(own)["data"]["dataset"]["test_size"] == 64
    assert evaluate.main([f"checkpoint={run}", "data.dataset.test_size=32"]) == 0
    assert (run / "eval" / "last-test" / "metrics.json").read_text() == own  # untouched
    other = list((run / "eval").glob("last-test-data-*"))
    assert len(other) == 1 and other[0].name == f"last-test-data-{evaluate.data_digest({'dataset.test_size': 32})}"
    m = json.loads((other[0] / "metrics.json").read_text())
    assert m["data_overrides"] == {"dataset.test_size": 32} and m["data"]["dataset"]["test_size"] == 32
    assert m["images"] == 32


@pytest.mark.parametrize("override", ["data.val_size=64", "data.dataset.train_size=96"])
def test_split_val_refuses_overrides_that_change_the_split(tmp_path, capsys, override):
    """split=val scores the images the run held out: an override that would hold out others
    (possibly training images) is refused in one line naming it."""
    make_checkpoint(tmp_path / "c.pt", steps=0)
    assert evaluate.main([f"checkpoint={tmp_path / 'c.pt'}", "split=val", override]) == 2
    err = capsys.readouterr().err
    key = override.split("=")[0]
    assert err.startswith(f"error: {key}: ") and "is not accepted with split=val" in err and err.count("\n") == 1
    assert (
        evaluate.main([f"checkpoint={tmp_path / 'c.pt'}", "split=val", "data.dataset.train_size=128"]) == 0
    )  # as saved


def test_class_mismatch_names_the_differing_classes():
    trained = [f"class{i}" for i in range(10)]
    msg = evaluate.class_mismatch([*trained[:9], "lion", "zebra"], trained)
    assert "missing ['class9']" in msg and "extra ['lion', 'zebra']" in msg and "\n" not in msg
    swapped = [*trained[:7], "class8", "class7", "class9"]
    assert "class 7 is 'class8', trained as 'class7'" in evaluate.class_mismatch(swapped, trained)


@pytest.mark.parametrize("module", ["imgcls.evaluate", "imgcls.predict"])
def test_help_prints_usage_and_exits_0(module):
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith(f"usage: python -m {module} key=value") and "checkpoint=" in proc.stdout


def test_predict_with_no_readable_image_one_error_line_no_csv(tmp_path, capsys):
    make_checkpoint(tmp_path / "c.pt", steps=0)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in ("a.png", "b.jpg"):
        (imgs / name).write_bytes(b"not an image")
    out = tmp_path / "p.csv"
    assert predict.main([f"checkpoint={tmp_path / 'c.pt'}", f"images={imgs}", f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: images: none of the 2 files") and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob(".p.csv*"))


@pytest.mark.parametrize("module,function", [(evaluate, "evaluate_checkpoint"), (predict, "predict")])
def test_ctrl_c_is_one_line_and_exit_130(module, function, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, function, interrupted)
    try:
        code = module.main([f"checkpoint={tmp_path}", f"images={tmp_path}"][: 2 if module is predict else 1])
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped (a traceback)")
    assert code == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: ") and err.count("\n") == 1, err
