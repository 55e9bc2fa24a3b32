"""Evaluate a checkpoint: loss, accuracy, per-class accuracy and a confusion matrix.

    python -m imgcls.evaluate checkpoint=outputs/run1              # its best.pt (else last.pt), test split
    python -m imgcls.evaluate checkpoint=outputs/run1/checkpoints/last.pt split=val
    python -m imgcls.evaluate checkpoint=outputs/run1 data.dataset.path=/other/folder   # same classes
    python -m imgcls.evaluate checkpoint=outputs/run1 weights=raw     # not the EMA/SWA weights

Arguments (key=value): checkpoint (required), split (test|val), out, device (auto|cpu|cuda),
batch_size, weights (auto|raw|ema|swa), and data.<key> overrides of the run's data config.
Relative paths are relative to the current directory.

The model is rebuilt from the config saved in the checkpoint (no overrides needed); ``data.*``
overrides change where the images come from (``split=val`` takes none that changes which images
are held out). Writes ``metrics.json`` (with the data it scored: ``data``, ``data_overrides``),
``confusion.csv`` and ``confusion.png`` into ``out=`` (default
``<run dir>/eval/<checkpoint>-<split>/``; with ``data.*`` overrides
``<checkpoint>-<split>-data-<digest of the overrides>/``, so other data never overwrites the
run's own evaluation). The checkpoint is loaded with ``weights_only=True``: a crafted file cannot run code, and the
model's ``_target_`` must be a function of ``imgcls.models``.

``run_eval`` is also what train.py evaluates with, so the accuracy printed here for a run's
final checkpoint is the test accuracy of its ``results.json``.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import torch

from imgcls.averaging import averaged_weights
from imgcls.checkpoint import CheckpointError, load_checkpoint
from imgcls.data import load_configured
from imgcls.device import pick_device
from imgcls.exits import EXIT_BAD_INPUT, interrupted
from imgcls.loader import BatchFormat, DeviceLoader
from imgcls.loss import classification_loss
from imgcls.precision import autocast, resolve_precision
from imgcls.splits import val_indices

MODEL_PREFIX = "imgcls.models."  # the only model builders a checkpoint may name
DATA_PREFIX = "imgcls.data."  # the only data builders a checkpoint may name


def names_only_a_builder(node, prefix: str) -> bool:
    """A checkpoint's ``model``/``data.dataset`` node names a function DEFINED in the module of
    ``prefix`` (not one it imports: ``imgcls.data.np.save`` is refused) and no other ``_target_``
    below it (Hydra would instantiate a nested one): a checkpoint names no other code to run."""
    import importlib

    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(node) if OmegaConf.is_config(node) else node
    target = tree.get("_target_") if isinstance(tree, dict) else None
    module, _, name = str(target).rpartition(".")
    if module != prefix[:-1] or name.startswith("_"):
        return False
    builder = getattr(importlib.import_module(module), name, None)
    if not callable(builder) or getattr(builder, "__module__", None) != module:
        return False

    def nested(v) -> bool:
        if isinstance(v, dict):
            return "_target_" in v or any(nested(x) for x in v.values())
        return isinstance(v, list) and any(nested(x) for x in v)

    return not any(nested(v) for k, v in tree.items() if k != "_target_")


# --------------------------------------------------------------------------------------
# the evaluation loop (shared with train.py)
# --------------------------------------------------------------------------------------
def run_eval(net, batches, device, precision: str, tta_flip: bool, num_classes: int | None = None) -> dict:
    """Loss and accuracy of ``net`` over ``batches`` (an iterable of (x, y)), summed on the device
    and read once. ``num_classes``: also the confusion matrix (rows: true class, columns:
    predicted), an int64 tensor. Flip TTA averages the logits of each image and its mirror."""
    net.eval()
    loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    confusion = torch.zeros(num_classes * num_classes if num_classes else 1, device=device, dtype=torch.long)
    n = 0
    with torch.no_grad(), autocast(device, precision):
        for x, y in batches:
            logits = net(x).float()
            if tta_flip:
                logits = (logits + net(x.flip(-1)).float()) / 2
            loss += classification_loss(logits, y, reduction="sum")  # unsmoothed: imgcls/loss.py
            pred = logits.argmax(1)
            correct += (pred == y).sum()
            if num_classes:
                confusion += torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes)
            n += len(y)
    out = {"loss": loss.item() / n, "acc": correct.item() / n, "n": n}
    if num_classes:
        out["confusion"] = confusion.view(num_classes, num_classes).cpu()
    return out


def evaluate_split(net, loader, t, device, precision: str, prefix: str = "test") -> dict:
    """Loss and accuracy on ``loader`` (a DeviceLoader; flip TTA if trainer ``t.tta_flip``) as
    ``{prefix}_loss``, ``{prefix}_acc``: train.py's evaluations and its final test.
    trainer.limit_eval_batches is applied by imgcls.build.load_data (a fixed, class-balanced subset)."""
    r = run_eval(net, loader.epoch_batches(0), device, precision, t.tta_flip)
    return {f"{prefix}_loss": r["loss"], f"{prefix}_acc": r["acc"]}


# --------------------------------------------------------------------------------------
# checkpoint -> model
# --------------------------------------------------------------------------------------
def resolve_checkpoint(arg) -> Path:
    """A checkpoint file, or a run directory (its checkpoints/best.pt, else checkpoints/last.pt),
    or a checkpoints/ directory (best.pt, else last.pt)."""
    if arg is None or str(arg) == "":
        raise ValueError("checkpoint: missing; give checkpoint=PATH (a checkpoint file or a run directory)")
    p = Path(str(arg)).expanduser()
    if p.is_dir():
        for d in (p / "checkpoints", p):
            for name in ("best.pt", "last.pt"):
                if (d / name).is_file():
                    return d / name
        raise ValueError(
            f"checkpoint: {p} is a directory without checkpoints/best.pt or checkpoints/last.pt; "
            f"give a run directory of train.py or a checkpoint file"
        )
    if not p.exists():
        raise ValueError(f"checkpoint: {p} does not exist; give a checkpoint file or a run directory")
    return p


def load_model(path: Path, device: torch.device, weights: str = "auto"):
    """(model on device in eval mode, checkpoint dict, saved config, which weights) of a checkpoint."""
    import hydra
    from omegaconf import OmegaConf

    ckpt = load_checkpoint(path)
    for key in ("model", "config"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path} has no {key!r} entry; it was not written by train.py")
    cfg = OmegaConf.create(ckpt["config"])
    target = str(OmegaConf.select(cfg, "model._target_", default=""))
    if not names_only_a_builder(cfg.get("model"), MODEL_PREFIX):
        raise CheckpointError(
            f"checkpoint {path}: model._target_ {target!r} is not accepted; expected a "
            f"builder in {MODEL_PREFIX[:-1]} (a checkpoint names no other code to run)"
        )
    num_classes = int(cfg.data.num_classes)
    model = hydra.utils.instantiate(cfg.model)(num_classes=num_classes)
    state_dict, which = averaged_weights(ckpt, weights)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(
            f"checkpoint {path}: its weights do not fit model {target} "
            f"({first[1].strip() if len(first) > 1 else first[0]})"
        ) from e
    return model.to(device).eval(), ckpt, cfg, which


def data_info(ckpt: dict, cfg) -> dict:
    """classes, mean, std, image size (C, H, W) the model was trained with: saved in the
    checkpoint by train.py (``data_info``)."""
    info = ckpt.get("data_info")
    if not isinstance(info, dict) or not {"classes", "mean", "std", "size"} <= set(info):
        raise CheckpointError(
            "checkpoint has no data_info entry (classes, mean, std, image size); it was written by an older train.py"
        )
    return info


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
def parse_args(argv: list[str], allowed: dict) -> dict:
    """``key=value`` arguments (values parsed as YAML); ``data.*`` keys are collected under
    "data". Unknown keys are refused, naming what is accepted."""
    import yaml

    out = dict(allowed)
    data = {}
    for arg in argv:
        if "=" not in arg:
            raise ValueError(
                f"argument {arg!r} is not accepted; expected key=value with key in {sorted(allowed)} or data.<key>"
            )
        key, value = arg.split("=", 1)
        parsed = yaml.safe_load(value) if value != "" else None
        if key.startswith("data."):
            data[key[len("data.") :]] = parsed
        elif key in allowed:
            out[key] = parsed if key not in ("checkpoint", "images", "out") else value
        else:
            raise ValueError(f"argument {key!r} is not accepted; expected one of {sorted(allowed)} or data.<key>")
    out["data"] = data
    return out


def default_out(path: Path, name: str) -> Path:
    """<run dir>/eval/<name> for a checkpoint in <run dir>/checkpoints/, else beside the file."""
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return run_dir / "eval" / name


# data.* keys that say where the same data lives: split=val may change them
WHERE_DATA_LIVES = ("dataset.root", "dataset.download", "dataset.path")


def check_val_overrides(d, data_overrides: dict) -> None:
    """``split=val`` scores the run's own held-out images: refuse a ``data.*`` override that would
    change which images those are (``data.val_size``, the dataset's own keys): they could be
    training images."""
    from omegaconf import OmegaConf

    for key, value in data_overrides.items():
        saved = OmegaConf.select(d, key, default=None)
        if key in WHERE_DATA_LIVES or value == saved:
            continue
        raise ValueError(
            f"data.{key}: {value!r} is not accepted with split=val (the run used {saved!r}): the "
            f"validation split is the images the run held out, and this would hold out others, "
            f"possibly training images; drop it, or score other data with split=test"
        )


def data_digest(data_overrides: dict) -> str:
    """A short digest of the ``data.*`` overrides: the output folder of an evaluation on other data."""
    import hashlib

    return hashlib.sha256(json.dumps(data_overrides, sort_keys=True, default=str).encode()).hexdigest()[:8]


def class_mismatch(classes, trained) -> str:
    """One line naming how the data's classes differ from the checkpoint's."""
    classes, trained = list(classes), list(trained)
    missing = [c for c in trained if c not in classes]
    extra = [c for c in classes if c not in trained]
    if missing or extra:
        diff = "; ".join(
            part
            for part in (
                f"missing {missing} (trained on, not in the data)" if missing else "",
                f"extra {extra} (in the data, not trained on)" if extra else "",
            )
            if part
        )
    else:
        i = next(i for i, (a, b) in enumerate(zip(classes, trained)) if a != b)
        diff = f"the same {len(classes)} names in another order: class {i} is {classes[i]!r}, trained as {trained[i]!r}"
    return (
        f"data: the {len(classes)} classes of the data do not match the {len(trained)} classes the "
        f"checkpoint was trained on: {diff}; evaluate on data with the same class folders"
    )


def load_split(cfg, data_overrides: dict, split: str):
    """(images uint8 [N,3,H,W], labels, class names) of the run's data with ``data.*`` overrides."""
    from omegaconf import OmegaConf, open_dict

    d = cfg.data
    target = str(OmegaConf.select(d, "dataset._target_", default=""))
    if not names_only_a_builder(d.get("dataset"), DATA_PREFIX):
        raise CheckpointError(
            f"checkpoint config: data.dataset._target_ {target!r} is not accepted; expected a builder in "
            f"{DATA_PREFIX[:-1]} (a checkpoint names no other code to run; one without data.dataset was "
            "written by an older train.py)"
        )
    if split == "val":
        check_val_overrides(d, data_overrides)
    with open_dict(d):
        for k, v in data_overrides.items():
            OmegaConf.update(d, k, v, merge=False)
    ds = load_configured(d)
    if split == "test":
        return ds.test_images, ds.test_labels, ds.classes
    _, held = val_indices(ds.train_labels, d.get("val_size", 0))
    if len(held) == 0:
        raise ValueError("split: 'val' but data.val_size is 0 for this run (no validation split); use split=test")
    return ds.train_images[held], ds.train_labels[held], ds.classes


def evaluate_checkpoint(args: dict) -> dict:
    from omegaconf import OmegaConf

    split = args["split"]
    if split not in ("test", "val"):
        raise ValueError(f"split: {split!r} is not accepted; expected test or val")
    device = pick_device(args["device"], key="device")
    path = resolve_checkpoint(args["checkpoint"])
    model, ckpt, cfg, which = load_model(path, device, args["weights"])
    info = data_info(ckpt, cfg)
    images, labels, classes = load_split(cfg, args["data"], split)
    if list(classes) != list(info["classes"]):
        raise ValueError(class_mismatch(classes, info["classes"]))
    batch = int(args["batch_size"] or cfg.trainer.eval_batch_size)
    loader = DeviceLoader(images, labels, batch, device, BatchFormat(info["mean"], info["std"]))
    precision = resolve_precision(cfg.trainer.precision, device)
    r = run_eval(model, loader.epoch_batches(0), device, precision, bool(cfg.trainer.tta_flip), len(classes))
    confusion = r.pop("confusion")
    totals = confusion.sum(1)
    per_class = {
        c: (float(confusion[i, i]) / int(totals[i]) if int(totals[i]) else None) for i, c in enumerate(classes)
    }
    result = {
        "checkpoint": str(path),
        "weights": which,
        "split": split,
        "images": r["n"],
        "loss": r["loss"],
        "acc": r["acc"],
        "per_class_acc": per_class,
        "data": OmegaConf.to_container(cfg.data, resolve=True),  # what was scored, overrides applied
        "data_overrides": args["data"],
    }
    name = f"{path.stem}-{split}" + ("" if args["weights"] == "auto" else f"-{which}")
    if args["data"]:  # other data: an output of its own, never the run's own evaluation's
        name += f"-data-{data_digest(args['data'])}"
    out = Path(args["out"]) if args["out"] else default_out(path, name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(out / "confusion.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true\\predicted", *classes])
        for i, c in enumerate(classes):
            w.writerow([c, *confusion[i].tolist()])
    confusion_png(confusion, classes, out / "confusion.png")
    result["out"] = str(out)
    return result


def confusion_png(confusion: torch.Tensor, classes: list[str], path: Path, cell: int = 24) -> None:
    """The confusion matrix as a heat map (row-normalised, white = 0, dark blue = 1), with
    class names; drawn with PIL (no plotting dependency)."""
    from PIL import Image, ImageDraw

    k = len(classes)
    rows = confusion.double() / confusion.sum(1, keepdim=True).clamp_min(1)
    margin = 8 + 6 * min(max((len(c) for c in classes), default=1), 16)
    img = Image.new("RGB", (margin + k * cell + 4, margin + k * cell + 4), "white")
    draw = ImageDraw.Draw(img)
    for i in range(k):
        draw.text((2, margin + i * cell + cell // 3), classes[i][:16], fill="black")
        for j in range(k):
            v = float(rows[i, j])
            colour = (int(255 * (1 - v)), int(255 * (1 - 0.8 * v)), 255)
            x0, y0 = margin + j * cell, margin + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour, outline=(220, 220, 220))
    for j in range(k):  # predicted-class initials along the top
        draw.text((margin + j * cell + 4, margin - 14), classes[j][:3], fill="black")
    img.save(path)


def wants_help(argv) -> bool:
    """``--help`` / ``-h`` (or ``help``): the module's usage, exit 0."""
    return any(a in ("--help", "-h", "help") for a in argv)


def usage(module: str, doc: str) -> str:
    return f"usage: python -m {module} key=value ...\n\n{doc.strip()}"


def run_command(name: str, doc: str, argv: list[str] | None, defaults: dict, job) -> tuple[int, dict | None]:
    """``python -m imgcls.<name> key=value ...`` (evaluate, predict): ``--help`` prints ``doc``
    (exit 0); bad input is one ``error:`` line (exit 2); Ctrl-C one line (exit 130); else
    ``job(args)``'s result with exit 0."""
    from omegaconf.errors import OmegaConfBaseException

    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(usage(f"imgcls.{name}", doc))
        return 0, None
    try:
        return 0, job(parse_args(argv, defaults))
    except (ValueError, FileNotFoundError, OmegaConfBaseException) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT, None
    except KeyboardInterrupt:
        return interrupted(name), None


def main(argv: list[str] | None = None) -> int:
    defaults = {
        "checkpoint": None,
        "split": "test",
        "out": None,
        "device": "auto",
        "batch_size": None,
        "weights": "auto",
    }
    code, r = run_command("evaluate", __doc__, argv, defaults, evaluate_checkpoint)
    if r is None:
        return code
    print(
        f"{r['split']} of {r['checkpoint']} ({r['weights']} weights): {r['images']} images, "
        f"loss {r['loss']:.4f}, accuracy {r['acc']:.4f}"
    )
    width = max(len(c) for c in r["per_class_acc"])
    for c, a in r["per_class_acc"].items():
        print(f"  {c:<{width}}  {'-' if a is None else f'{a:.4f}'}")
    print(f"wrote {r['out']}/metrics.json, confusion.csv, confusion.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
