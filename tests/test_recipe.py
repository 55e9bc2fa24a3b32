"""train.py's recipe in this process (the integration tier): a composed config run by
``train.recipe`` through ``run_recipe`` (tests/conftest.py): what a run writes, exact resume from
a checkpoint, the plateau schedule fed the test loss, resume refusing a changed structure. The
command line, signals, sweeps and faults are the system tier's (tests/test_train.py, ...)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import assert_same_weights, metrics, run_recipe, weights

SMOKE = ["experiment=smoke"]


def test_smoke_run_writes_metrics_results_and_checkpoint(tmp_path):
    run = tmp_path / "run"
    run_recipe(run, *SMOKE)
    lines = metrics(run)
    train_lines = [m for m in lines if "train_loss" in m]
    eval_lines = [m for m in lines if "test_acc" in m]
    assert [m["step"] for m in train_lines] == list(range(2, 17, 2))  # log_every=2, 8 steps x 2 epochs
    assert all(set(m) == {"step", "epoch", "lr", "train_loss"} for m in train_lines)
    assert [m["epoch"] for m in eval_lines] == [1, 2]
    assert train_lines[-1]["lr"] == [0.0]  # warmup_linear decays to 0 at the last step
    results = json.loads((run / "results.json").read_text())
    assert results["final_test_acc"] > 0.3, "synthetic classes are easy: far above chance (0.1)"
    assert results["steps"] == 16 and results["device"] == "cpu"
    for key in ("best_test_acc", "train_seconds", "images_per_second", "wall_seconds"):
        assert results[key] is not None
    assert "steps_per_epoch: 8" in (run / "config.yaml").read_text()
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "state", "rng", "config"} <= set(ckpt)
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])
    assert ckpt["state"]["finished"] and ckpt["config"]["schedule"]["steps_per_epoch"] == 8

    assert "already finished" in run_recipe(run, *SMOKE).stdout

    # results.json's test numbers are those of the saved weights on the in-order, un-augmented
    # test split (a test loader built with training augmentation would change them): what
    # `python -m imgcls.evaluate` scores from the checkpoint
    from imgcls.evaluate import evaluate_checkpoint

    args = {"checkpoint": str(run / "checkpoints" / "last.pt"), "split": "test", "out": str(tmp_path / "eval")}
    again = evaluate_checkpoint({**args, "device": "cpu", "batch_size": None, "weights": "auto", "data": {}})
    assert again["loss"] == pytest.approx(results["final_test_loss"], rel=1e-6)
    assert again["acc"] == results["final_test_acc"]


def test_resume_from_an_epoch_boundary_is_bit_identical(tmp_path):
    # log_every=3: the checkpoint at step 16 (not a multiple of 3) holds the training loss
    # summed over steps 16 (and 15..): the resumed step-18 line must average in the saved part
    common = [*SMOKE, "trainer.epochs=4", "trainer.log_every=3", "trainer.keep_checkpoints=4"]
    full = tmp_path / "full"
    run_recipe(full, *common)
    epoch2 = full / "checkpoints" / "last.2.pt"  # last.pt is epoch 4, last.1 epoch 3, last.2 epoch 2
    assert torch.load(epoch2, weights_only=True)["state"]["epoch"] == 2

    other = tmp_path / "other"
    run_recipe(other, *common, f"resume={epoch2}")
    assert metrics(other) == [m for m in metrics(full) if m["step"] > 16]
    assert [m["step"] for m in metrics(other) if "train_loss" in m][0] == 18
    assert_same_weights(weights(other), weights(full))


def test_plateau_schedule_gets_the_test_loss_and_halves_the_lr(tmp_path):
    """scheduler=warmup_plateau through train.py (the smoke preset's 1 warmup epoch, then ReduceLROnPlateau,
    factor 0.5, patience 2): at an lr too small to train, the test loss does not improve (only
    BatchNorm's running statistics move it), and the lr halves as torch's ReduceLROnPlateau,
    fed the same test losses, says: a run that did not feed it the loss would fail or never halve."""
    run = tmp_path / "run"
    lr = 1e-6  # (ReduceLROnPlateau ignores a change below its eps, 1e-8)
    run_recipe(
        run,
        *SMOKE,
        "scheduler=warmup_plateau",
        "trainer.epochs=10",
        "data.dataset.train_size=256",
        "data.dataset.test_size=128",
        "trainer.log_every=4",
        f"optimizer.lr={lr}",
    )  # 4 steps per epoch
    lines = metrics(run)
    losses = [m["test_loss"] for m in lines if "test_loss" in m]
    epoch_lrs = [m["lr"][0] for m in lines if "train_loss" in m]  # after each epoch's scheduler step
    assert len(losses) == len(epoch_lrs) == 10
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(reference, mode="min", factor=0.5, patience=2)
    expected = []
    for epoch in range(1, 10):  # the phase starts at epoch 1 and is stepped with each epoch's loss
        plateau.step(losses[epoch])
        expected.append(reference.param_groups[0]["lr"])
    assert epoch_lrs[0] == pytest.approx(lr)  # the warmup is over: the peak
    assert epoch_lrs[1:] == pytest.approx(expected, rel=1e-9), (losses, epoch_lrs)
    assert min(expected) <= lr / 2, f"the loss improved, the test proves nothing: {losses}"


def test_changed_structure_is_refused_on_resume(tmp_path):
    run = tmp_path / "run"
    run_recipe(run, *SMOKE, "trainer.epochs=1")
    saved = (run / "checkpoints" / "last.pt").read_bytes()
    refused = run_recipe(run, *SMOKE, "trainer.epochs=2", "model.width=16", check=False)
    assert refused.returncode == 2 and "differing keys: model.width" in refused.stderr
    assert (run / "checkpoints" / "last.pt").read_bytes() == saved
    # warmup_linear had decayed to 0 at the end of the first run: more epochs would train at lr 0,
    # refused (nothing changes) unless forced
    at_zero = run_recipe(run, *SMOKE, "trainer.epochs=2", check=False)
    assert at_zero.returncode == 2 and at_zero.stderr.startswith(
        "error: trainer.epochs: 2 is not accepted for resuming"
    )
    assert "the saved schedule has already brought the lr to 0 (step 8)" in at_zero.stderr
    assert "resume_force=true" in at_zero.stderr and at_zero.stderr.count("\n") == 1
    assert (run / "checkpoints" / "last.pt").read_bytes() == saved
    more = run_recipe(run, *SMOKE, "trainer.epochs=2", "resume_force=true").stdout  # more epochs: a safe change
    assert "config changed" in more and "trainer.epochs" in more
    assert "training at lr 0 (resume_force=true)" in more
    assert json.loads((run / "results.json").read_text())["steps"] == 16


# --- model selection and SWA's BatchNorm (issue 19) ---------------------------
# 128 training images (2 steps of 64 per epoch), 32 validation images, 64 test images
SMALL_VAL = [*SMOKE, "data.dataset.train_size=160", "data.dataset.test_size=64", "data.val_size=32"]
SMALL = [*SMOKE, "data.dataset.train_size=256", "data.dataset.test_size=64"]  # 4 steps per epoch, no val


def script_val_accuracies(monkeypatch, raw: list[float], ema: list[float] | None = None) -> None:
    """Every evaluation of the 32-image validation split (imgcls.evaluate.run_eval, which train.py's
    evaluations run) reports the next of the given accuracies, ``ema`` for the EMA weights (an
    AveragedModel), ``raw`` for the others; its loss, and every test-split evaluation, are real.
    Model selection then faces accuracies that drop or disagree, whatever the numerics."""
    from torch.optim.swa_utils import AveragedModel

    import imgcls.evaluate

    real = imgcls.evaluate.run_eval
    raw, ema = list(raw), list(ema or [])

    def scripted(net, *args, **kw):
        r = real(net, *args, **kw)
        if r["n"] == 32:
            r["acc"] = (ema if isinstance(net, AveragedModel) else raw).pop(0)
        return r

    monkeypatch.setattr(imgcls.evaluate, "run_eval", scripted)


def test_best_pt_keeps_the_earlier_epoch_when_val_accuracy_drops(tmp_path, monkeypatch):
    """best.pt is written when the validation accuracy improves, never after a worse epoch."""
    script_val_accuracies(monkeypatch, raw=[0.5, 0.75, 0.25])  # best: epoch 2
    run = tmp_path / "run"
    run_recipe(run, *SMALL_VAL, "trainer.epochs=3")
    assert [m["val_acc"] for m in metrics(run) if "val_acc" in m] == [0.5, 0.75, 0.25]  # the script ran
    results = json.loads((run / "results.json").read_text())
    assert results["best_val_acc"] == 0.75 and results["best_epoch"] == 2
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert best["state"]["epoch"] == 2 and best["state"]["step"] == 4
    last = weights(run)
    assert any(not torch.equal(best["model"][k], last[k]) for k in last)  # epoch 2's weights, not epoch 3's


def test_with_ema_best_is_selected_on_the_ema_accuracy(tmp_path, monkeypatch):
    """trainer.ema_decay: "best" (best_val_acc, best_epoch, best.pt) is the EMA weights', here epoch 1,
    though the raw weights were best at epoch 2."""
    script_val_accuracies(monkeypatch, raw=[0.25, 0.75], ema=[0.625, 0.5])
    run = tmp_path / "run"
    run_recipe(run, *SMALL_VAL, "trainer.ema_decay=0.9")
    evals = [m for m in metrics(run) if "val_acc" in m]
    assert [(m["val_acc"], m["ema_val_acc"]) for m in evals] == [(0.25, 0.625), (0.75, 0.5)]
    results = json.loads((run / "results.json").read_text())
    assert results["weights"] == "ema"
    assert results["best_val_acc"] == 0.625 and results["best_epoch"] == 1
    assert torch.load(run / "checkpoints" / "best.pt", weights_only=True)["state"]["epoch"] == 1


def test_a_finished_swa_run_has_batchnorm_statistics_of_the_averaged_weights(tmp_path):
    """SWA's BatchNorm statistics are recomputed at the end over the training split (update_bn on
    the averaged weights): not the raw model's, and what update_bn over that epoch's batches gives."""
    from torch.optim.swa_utils import update_bn

    from imgcls.averaging import averaged_weights
    from tests.conftest import build_recipe

    overrides = [*SMALL, "trainer.swa_start=0.0"]  # epochs 1 and 2 averaged
    run = tmp_path / "run"
    run_recipe(run, *overrides)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert int(ckpt["averaging"]["swa"]["n_averaged"]) == 2
    swa, which = averaged_weights(ckpt)
    assert which == "swa"
    stats = [k for k in swa if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.equal(swa[k], ckpt["model"][k]) for k in stats)  # not the raw model's

    cfg, _, data, model, _, _ = build_recipe(*overrides)
    model.load_state_dict(swa)
    update_bn((x for x, _ in data.train.epoch_batches(cfg.trainer.epochs)), model)  # as the run's end does
    expected = model.state_dict()
    for k in stats:
        torch.testing.assert_close(swa[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(expected[k], ckpt["model"][k]) for k in stats)
