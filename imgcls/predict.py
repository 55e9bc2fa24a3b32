"""Predict the class of new images with a trained checkpoint.

    python -m imgcls.predict checkpoint=outputs/run1 images=photos/          # a folder (recursive)
    python -m imgcls.predict checkpoint=outputs/run1 images='photos/*.jpg' topk=3 out=preds.csv

Arguments (key=value): checkpoint and images (required), out, topk, batch_size, device
(auto|cpu|cuda), weights (auto|raw|ema|swa). Relative paths are relative to the current directory.

Writes ``out`` (default ``predictions.csv``): file, predicted class, its probability, and the
top-k classes with probabilities. Images are decoded in batches of ``batch_size`` and run on
the device; an image of another size is resized to the training size (said once); a file that
cannot be read is reported by name and skipped; when none can be read, one ``error:`` line,
exit code 2, and no CSV (an existing ``out`` is left as it was). The checkpoint is the same as for
``python -m imgcls.evaluate`` (a run directory means its best.pt, else last.pt).
"""

from __future__ import annotations

import csv
import glob
import os
import sys
from pathlib import Path

import numpy as np
import torch

from imgcls.device import pick_device
from imgcls.evaluate import data_info, load_model, resolve_checkpoint, run_command
from imgcls.precision import autocast, resolve_precision


def list_images(spec) -> list[Path]:
    """A file, a folder (every image file below it, sorted) or a glob pattern."""
    from PIL import Image

    if spec is None or str(spec) == "":
        raise ValueError("images: missing; give images=PATH (an image file, a folder or a glob)")
    p = Path(str(spec)).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        exts = {e.lower() for e in Image.registered_extensions()}
        files = sorted(
            f
            for f in p.rglob("*")
            if f.is_file()
            and f.suffix.lower() in exts
            and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
        if not files:
            raise ValueError(f"images: {p} holds no image files (looked for {', '.join(sorted(exts)[:6])}, ...)")
        return files
    files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    if not files:
        raise ValueError(f"images: {spec!r} is not a file or folder and matches no files as a glob")
    return files


def read_images(files: list, size: tuple[int, int], resized: list) -> tuple[list, list, list]:
    """(names, uint8 [H, W, 3] arrays, (file, skipped-line) pairs) of ``files``, each resized to
    ``size`` (w, h) when it differs (appended to ``resized``; the first one is said once)."""
    from PIL import Image

    w, h = size
    names, arrays, bad = [], [], []
    for file in files:
        try:
            with Image.open(file) as im:
                im = im.convert("RGB")
                if im.size != (w, h):
                    if not resized:
                        print(
                            f"resizing images of another size to the training size {w}x{h} "
                            f"(first: {file}, {im.size[0]}x{im.size[1]})",
                            flush=True,
                        )
                    resized.append(file)
                    im = im.resize((w, h), Image.BILINEAR)
                arrays.append(np.asarray(im, dtype=np.uint8))
            names.append(file)
        except Exception as e:  # one bad file must not stop the others
            bad.append((str(file), f"skipped {file}: not a readable image ({type(e).__name__}: {e})"))
    return names, arrays, bad


def top_k(model, x: torch.Tensor, k: int, precision: str, tta_flip: bool) -> tuple[list, list]:
    """The ``k`` most probable classes of each image of ``x`` (softmax of the logits, averaged with
    the mirror image's under ``tta_flip``), as (probabilities, class indices) lists."""
    with torch.no_grad(), autocast(x.device, precision):
        logits = model(x).float()
        if tta_flip:
            logits = (logits + model(x.flip(-1)).float()) / 2
    top_p, top_i = logits.softmax(1).topk(k, dim=1)
    return top_p.cpu().tolist(), top_i.cpu().tolist()


def predict(args: dict) -> dict:
    device = pick_device(args["device"], key="device")
    path = resolve_checkpoint(args["checkpoint"])
    files = list_images(args["images"])
    model, ckpt, cfg, which = load_model(path, device, args["weights"])
    info = data_info(ckpt, cfg)
    classes = list(info["classes"])
    _, h, w = (int(v) for v in info["size"])
    k = int(args["topk"])
    if k < 1:
        raise ValueError(f"topk: {k} is not accepted; expected an int >= 1")
    k = min(k, len(classes))
    batch = int(args["batch_size"])
    if batch < 1:
        raise ValueError(f"batch_size: {batch} is not accepted; expected an int >= 1")
    mean = torch.tensor(info["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(info["std"], device=device).view(1, -1, 1, 1)
    precision = resolve_precision(cfg.trainer.precision, device)
    out = Path(args["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # becomes out once an image was predicted
    skipped, resized, written = [], [], 0  # resized: the files read at another size
    held = []  # skipped-file lines before the first readable image: none readable -> one error line
    try:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "class", "probability", f"top{k}"])
            for lo in range(0, len(files), batch):
                names, arrays, bad = read_images(files[lo : lo + batch], (w, h), resized)
                held += [line for _, line in bad]
                skipped += [file for file, _ in bad]
                if not arrays:
                    continue
                for line in held:  # an image was readable: the skipped ones are named as usual
                    print(line, file=sys.stderr, flush=True)
                held = []
                x = torch.from_numpy(np.stack(arrays)).to(device).permute(0, 3, 1, 2)
                x = (x.float() / 255 - mean) / std
                top_p, top_i = top_k(model, x, k, precision, bool(cfg.trainer.tta_flip))
                for name, ps, ids in zip(names, top_p, top_i):
                    writer.writerow(
                        [
                            str(name),
                            classes[ids[0]],
                            f"{ps[0]:.6f}",
                            " ".join(f"{classes[i]}:{p:.4f}" for i, p in zip(ids, ps)),
                        ]
                    )
                    written += 1
        if not written:
            first = held[0].split(": ", 1)[1] if held else ""
            raise ValueError(
                f"images: none of the {len(files)} files of {str(args['images'])!r} is a readable image "
                f"(first: {skipped[0]}: {first}); no predictions written"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "checkpoint": str(path),
        "weights": which,
        "out": str(out),
        "written": written,
        "skipped": skipped,
        "resized": len(resized),
    }


def main(argv: list[str] | None = None) -> int:
    defaults = {"checkpoint": None, "images": None, "out": "predictions.csv", "topk": 5}
    defaults |= {"batch_size": 256, "device": "auto", "weights": "auto"}

    def job(args: dict) -> dict:
        if args["data"]:
            raise ValueError(f"data.{next(iter(args['data']))}: not accepted by predict (it reads images=PATH)")
        return predict(args)

    code, r = run_command("predict", __doc__, argv, defaults, job)
    if r is None:
        return code
    print(
        f"predicted {r['written']} images with {r['checkpoint']} ({r['weights']} weights) -> {r['out']}"
        + (f"; skipped {len(r['skipped'])} unreadable" if r["skipped"] else "")
        + (f"; resized {r['resized']}" if r["resized"] else ""),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
