"""Crash-safe checkpoints: one dict per file, written atomically, loaded without pickle code.

A checkpoint is ONE dict with named keys (model / optimizer / scheduler state_dicts,
epoch and step counters, `rng_state()`, ...) holding only what
`torch.load(path, weights_only=True)` accepts: tensors, dicts, lists, tuples, str,
int, float, bool, None. Loading never runs `weights_only=False`, so a checkpoint
from an untrusted place cannot execute code.

Writes go to a hidden temp file in the same directory, are fsync'ed, and then
`os.replace`d over the final name, so a crash or full disk at any instant leaves
either the old or the new checkpoint complete, never a half-written one. With
`keep > 1` the previous files survive as `last.1.pt`, `last.2.pt`, ... (newest
first) and `find_resumable` falls back to them if `last.pt` is unreadable.

The second half is train.py's policy on top of that: what a run's checkpoint holds (`State`
and `_save`), resuming from it with fallback (`resume`), trimming metrics.jsonl back to it,
when to save (`checkpoint_due`) and which rank writes (`save`).
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from imgcls import distributed
from imgcls.config import flatten_config
from imgcls.io import WriteFault, free_bytes, fsync_dir, human_bytes, torch_save, truncate_jsonl

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "find_resumable",
    "backup_path",
    "rng_state",
    "set_rng_state",
    "State",
    "Extras",
    "checkpoint_path",
    "resume",
    "save",
    "checkpoint_due",
    "CheckpointWriteError",
]


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be used (corrupt, truncated, unsafe, not a dict)."""


def _check_keep(keep: int) -> None:
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise ValueError(
            f"keep={keep!r} is invalid; expected an int >= 1 "
            "(1 = only the latest checkpoint, n = latest plus n-1 backups)"
        )


def backup_path(path: str | Path, index: int) -> Path:
    """The index-th backup of `path`: last.pt -> last.1.pt (newest backup), last.2.pt, ..."""
    path = Path(path)
    assert index >= 1, index
    return path.with_name(f"{path.stem}.{index}{path.suffix}")


def _rotate_backups(path: Path, keep: int, tmp_paths: list[Path]) -> None:
    """Shift last.(k-1).pt -> last.k.pt, then make last.1.pt a copy of the current `path`.

    `path` itself is never moved or modified here: the newest backup is a hard link (or,
    where links are unsupported, a fsync'ed copy) put in place with os.replace, so if the
    final replace of the new checkpoint fails, `path` still holds the previous one.
    Every step is an os.replace, so each name always refers to a complete file.
    """
    for i in range(keep - 1, 1, -1):
        older = backup_path(path, i - 1)
        if older.exists():
            os.replace(older, backup_path(path, i))
    fd, link_tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".bak.tmp")
    os.close(fd)
    link_tmp = Path(link_tmp)
    tmp_paths.append(link_tmp)
    link_tmp.unlink()  # os.link needs a free name; mkstemp only reserved a unique one
    try:
        os.link(path, link_tmp)
    except OSError:
        shutil.copyfile(path, link_tmp)
        with open(link_tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(link_tmp, backup_path(path, 1))


def save_checkpoint(state: dict, path: str | Path, keep: int = 1) -> Path:
    """Atomically write `state` to `path`; with keep > 1 keep keep-1 numbered backups.

    Steps: torch.save into `.<name>.<random>.tmp` in the same directory (same filesystem,
    so the rename is atomic), flush + fsync it, rotate backups if keep > 1 and `path`
    exists, os.replace the temp file onto `path`, fsync the directory.

    On any failure (full disk, read-only directory, unpicklable value, Ctrl-C) the temp
    files are removed, `path` is left byte-identical, and an OSError (for OS errors,
    same errno) or RuntimeError naming `path` is raised (KeyboardInterrupt is re-raised
    as is). If the failure hits after backups were rotated, last.1.pt already equals
    `path` and the oldest backup has been dropped; every file is still complete.
    Backups numbered >= keep from an earlier run with a larger keep are left alone.

    Returns the final path.
    """
    if not isinstance(state, dict):
        raise ValueError(f"state={type(state).__name__} is invalid; expected a dict of named entries")
    _check_keep(keep)
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise ValueError(f"path={str(path)!r} is invalid; expected a file path such as 'ckpt/last.pt'")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot create checkpoint directory {path.parent} for {path}: {e}") from e

    # A process killed mid-save (SIGKILL, power loss) leaves its temp file: the only writer of
    # this path is us, so any left over is stale.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    tmp_paths: list[Path] = []
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp_paths.append(Path(tmp))
        if hasattr(os, "fchmod"):  # mkstemp makes 0600; give checkpoints the usual rw-r--r--
            os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            torch_save(state, f)  # a full disk is an OSError(ENOSPC), not torch's "unexpected pos"
            f.flush()
            os.fsync(f.fileno())
        if keep > 1 and path.exists():
            _rotate_backups(path, keep, tmp_paths)
        os.replace(tmp, path)
    except BaseException as e:
        for p in tmp_paths:
            try:
                p.unlink(missing_ok=True)
            except OSError:
                pass
        if not isinstance(e, Exception):  # KeyboardInterrupt / SystemExit: don't mask them
            raise
        room = ""
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = free_bytes(path.parent)
            room = f" (it needs about {human_bytes(_nbytes(state))}" + (
                f", {human_bytes(free)} free on the disk under {path.parent})" if free is not None else ")"
            )
        msg = (
            f"could not save checkpoint to {path}: {type(e).__name__}: {e}{room}; "
            f"the previous checkpoint at {path} (if any) is intact"
        )
        if isinstance(e, OSError):
            raise (OSError(e.errno, msg) if e.errno is not None else OSError(msg)) from e
        raise RuntimeError(msg) from e
    fsync_dir(path.parent)
    return path


def _nbytes(obj) -> int:
    """Bytes of tensor data in a checkpoint dict (what its file needs, give or take the metadata)."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes() if obj.device.type != "meta" else 0
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _short_reason(e: Exception) -> str:
    """One informative line of a torch.load error.

    torch's weights_only refusal is a long message whose first lines suggest retrying
    with weights_only=False (which this module never does); the line that says what
    was refused starts with "WeightsUnpickler error:". ANSI escapes are stripped.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    marker = "WeightsUnpickler error:"
    if marker in text:
        # the reason may sit on the same line or after blank lines
        rest = [ln.strip() for ln in text.split(marker, 1)[1].splitlines() if ln.strip()]
        return f"{marker} {rest[0]}" if rest else marker
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else "(no message)"


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint dict onto the CPU with `weights_only=True` (never runs pickle code).

    Raises CheckpointError naming the file and the reason if it is missing, truncated,
    not a torch/pickle file, contains anything but plain data and tensors (e.g. a
    pickle whose __reduce__ would call a function), or is not a dict.
    Tensors come back on the CPU; move them with model.load_state_dict / optimizer
    .load_state_dict, which copy into the parameters' own devices.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... here
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded with weights_only=True "
            f"(truncated, corrupt, or holds non-data objects): {type(e).__name__}: {_short_reason(e)}"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}; expected a dict of named entries")
    return state


def find_resumable(path: str | Path, keep: int) -> tuple[dict, Path] | None:
    """First loadable of `path`, backup_path(path, 1), ..., backup_path(path, keep-1).

    Returns (state, file) or None when none of those files exists (a fresh run).
    Each existing but unloadable file is skipped with a UserWarning naming it; if all
    existing files are unloadable, raises CheckpointError listing them with reasons
    (better to stop than to silently restart from scratch over a long run).
    """
    _check_keep(keep)
    path = Path(path)
    candidates = [path] + [backup_path(path, i) for i in range(1, keep)]
    existing = [p for p in candidates if p.exists()]
    if not existing:
        return None
    if existing[0] != path:
        warnings.warn(
            f"checkpoint {path} does not exist; trying backups {[str(p) for p in existing]}", UserWarning, stacklevel=2
        )
    failures = []
    for p in existing:
        try:
            return load_checkpoint(p), p
        except CheckpointError as e:
            failures.append(str(e))
            warnings.warn(f"skipping corrupt checkpoint {p}: {e}", UserWarning, stacklevel=2)
    raise CheckpointError(f"no loadable checkpoint among {[str(p) for p in existing]}:\n  " + "\n  ".join(failures))


def rng_state() -> dict:
    """Every RNG that can affect a run, as weights_only-loadable data.

    Keys: "python" (random.getstate() as [version, list of 625 ints, gauss_next]),
    "torch" (CPU generator, uint8 tensor), and "cuda" (list of uint8 tensors, one per
    visible device) only when CUDA is available. numpy is not used by this project.
    DataLoader workers are seeded from the torch CPU generator, so they follow.
    """
    version, internal, gauss_next = random.getstate()
    state = {
        "python": [version, list(internal), gauss_next],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state()` captured. A "cuda" entry is ignored without CUDA;
    with a different number of GPUs, the common ones are restored and a warning is given."""
    for key in ("python", "torch"):
        if key not in state:
            raise ValueError(f"rng state lacks key {key!r}; got keys {sorted(state)}, expected those of rng_state()")
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        n = torch.cuda.device_count()
        if len(saved) != n:
            warnings.warn(
                f"rng state has {len(saved)} CUDA generator(s) but {n} device(s) are visible; "
                f"restoring the first {min(len(saved), n)}",
                UserWarning,
                stacklevel=2,
            )
        for i, s in enumerate(saved[:n]):
            torch.cuda.set_rng_state(s.cpu(), i)


# --------------------------------------------------------------------------------------
# The run's checkpoint policy (train.py): what a checkpoint holds, resuming with fallback
# to a backup, trimming metrics.jsonl to the checkpoint, when to save, who writes.
# --------------------------------------------------------------------------------------
class State:
    """Counters that a checkpoint carries, besides the model, optimizer and scheduler."""

    def __init__(self):
        self.step = 0  # optimizer steps done
        self.epoch = 0  # epoch in progress
        self.batch = 0  # next batch of that epoch
        self.finished = False
        self.best_acc = None  # best accuracy so far on the evaluated split (val, else test)
        self.best_epoch = None  # ...after this many epochs (checkpoints/best.pt, with a val split)
        self.last_eval = None  # {"val_loss", "val_acc", ...} of the latest evaluation
        self.run_id = None  # made at a fresh start, kept by every resume (see newer_in_run_dir)
        self.loss_sum = 0.0  # training loss summed since the last log line...
        self.loss_count = 0  # ...over this many steps
        self.train_seconds = 0.0
        self.images = 0  # training images processed (for images per second)
        self.skipped_steps = 0  # steps whose loss was NaN/inf, dropped (trainer.skip_nonfinite)
        self.logger_runs = {}  # tracker run ids ({"wandb": id, "mlflow": id}): a resume continues them
        self.early_stop_best = None  # the selection metric's best by more than early_stop_min_delta...
        self.early_stop_wait = 0  # ...and the evaluations since (trainer.early_stop_patience)
        self.stopped_early = None  # the epoch after which early stopping ended the run

    def to_dict(self) -> dict:
        return dict(vars(self))

    def load(self, d: dict) -> None:
        for k in vars(self):
            if k in d:
                setattr(self, k, d[k])


@dataclass
class Extras:
    """The run's parts a checkpoint holds besides the model, optimizer, scheduler and counters:
    the fp16 grad scaler (imgcls/precision.py), the EMA/SWA weights (imgcls/averaging.py), and
    the data info imgcls.evaluate / imgcls.predict need (classes, mean, std, image size)."""

    precision: str  # fp32 | bf16 | fp16
    scaler: object  # torch.amp.GradScaler (disabled unless fp16)
    averaging: object  # imgcls.averaging.Averaging
    info: dict


# --------------------------------------------------------------------------------------
# What a checkpoint holds: ONE definition. `contents` writes each entry and `restore` reads it
# back, side by side; a new entry is one line in each (tests/test_checkpoint.py pins the keys).
# --------------------------------------------------------------------------------------
def contents(run) -> dict:
    """The checkpoint of ``run`` (train.py's Run) as one dict that torch.load(weights_only=True) reads."""
    ckpt = {
        "model": distributed.unwrap_model(run.model).state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "state": run.state.to_dict(),  # the counters (State)
        "rng": rng_state(),
        "config": OmegaConf.to_container(run.cfg, resolve=True, enum_to_str=True),  # plain: weights_only loads it
        "config_unresolved": OmegaConf.to_container(run.cfg, resolve=False, enum_to_str=True),
    }
    if run.extras is not None:
        ckpt["scaler"] = run.extras.scaler.state_dict()
        ckpt["averaging"] = run.extras.averaging.state_dict()
        ckpt["data_info"] = run.extras.info  # read by imgcls.evaluate / imgcls.predict, not restored
    return ckpt


def restore(run, ckpt: dict, path) -> State:
    """Load ``ckpt`` (from ``path``) into ``run``'s parts; returns its counters. The config entries
    are checked before (check_resume_config), not restored: the run's own config is used."""
    try:
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise ValueError(f"resume: checkpoint {path} does not fit this model/optimizer/scheduler: {e}") from e
    if run.extras is not None:
        if run.extras.scaler.is_enabled() and ckpt.get("scaler"):  # an fp32/bf16 checkpoint has no scale
            run.extras.scaler.load_state_dict(ckpt["scaler"])
        run.extras.averaging.load_state_dict(ckpt.get("averaging") or {}, path)
    set_rng_state(ckpt["rng"])
    state = State()
    state.load(ckpt["state"])
    return state


def checkpoint_path(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.pt"


def best_path(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "best.pt"


def resume(run) -> State:
    """The run's counters, from its checkpoint (resume=auto: the run directory's, falling back to
    a backup; resume=PATH) into ``run``'s model, optimizer and scheduler; a fresh State when there
    is none. ``run``: train.py's Run (cfg, run_dir, model, optimizer, scheduler, dist, extras);
    what is restored: ``restore``."""

    cfg, run_dir, dist, scheduler = run.cfg, run.run_dir, run.dist, run.scheduler
    metrics = run_dir / "metrics.jsonl"
    if cfg.resume == "never":
        return fresh_start(metrics, dist)
    if cfg.resume == "auto":
        found = find_resumable(checkpoint_path(run_dir), cfg.trainer.keep_checkpoints)
        if found is None:
            return fresh_start(metrics, dist)
        ckpt, path = found
        set_aside_unreadable(checkpoint_path(run_dir), path, dist)
    else:
        path = Path(cfg.resume).expanduser()
        ckpt, path = newer_in_run_dir(cfg, run_dir, load_checkpoint(path), path, dist)
    check_resume_config(ckpt, cfg, path)
    state = restore(run, ckpt, path)
    if state.epoch < cfg.trainer.epochs and all(float(lr) == 0.0 for lr in scheduler.get_last_lr()):
        # refused before any file changes (a refused start leaves the run directory as it was)
        said = (
            f"the saved schedule has already brought the lr to 0 (step {state.step}); the epochs from "
            f"{state.epoch} to {cfg.trainer.epochs} would train at lr 0 (a checkpoint's schedule keeps its lengths)"
        )
        if not cfg.resume_force:
            raise ValueError(
                f"trainer.epochs: {cfg.trainer.epochs} is not accepted for resuming {path}: {said}; start a "
                f"new run directory to train longer, or pass resume_force=true to train at lr 0 anyway"
            )
        print(f"warning: resume: {said}: training at lr 0 (resume_force=true)", flush=True)
    if dist.is_main:
        trim_metrics(run_dir / "metrics.jsonl", state.step)
    print(f"resumed from {path} at step {state.step} (epoch {state.epoch}, batch {state.batch})", flush=True)
    return state


def fresh_start(metrics: Path, dist) -> State:
    """Starting from step 0: drop what a run killed before its first checkpoint logged; a new
    run id (the same on every rank)."""
    if dist.is_main:
        trim_metrics(metrics, 0)
    state = State()
    state.run_id = distributed.broadcast(uuid.uuid4().hex, dist)
    return state


def newer_in_run_dir(cfg: DictConfig, run_dir: Path, ckpt: dict, path: Path, dist) -> tuple[dict, Path]:
    """resume=PATH run again in the same run directory (a stopped `resume=PATH
    hydra.run.dir=run2`, repeated): continue from run2's own newer checkpoint of the same run
    (the same run id, more steps), saying so, instead of from PATH again. (ckpt, path)."""
    own = checkpoint_path(run_dir)
    if not own.exists() or own.resolve() == path.resolve():
        return ckpt, path
    found = find_resumable(own, cfg.trainer.keep_checkpoints)
    if found is None:
        return ckpt, path
    mine, mine_path = found
    run_id = (ckpt.get("state") or {}).get("run_id")
    if run_id is None or mine["state"].get("run_id") != run_id or mine["state"]["step"] <= ckpt["state"]["step"]:
        return ckpt, path
    print(
        f"resume: {run_dir} holds a newer checkpoint of the run {path} belongs to: continuing from "
        f"{mine_path} (step {mine['state']['step']}), not {path} (step {ckpt['state']['step']})",
        flush=True,
    )
    set_aside_unreadable(own, mine_path, dist)
    return mine, mine_path


def set_aside_unreadable(last: Path, resumed_from: Path, dist) -> None:
    """Resumed from a backup because last.pt is unreadable: rename it to last.pt.unreadable so
    that the next save does not rotate it over the good backup it resumed from."""
    if dist.is_main and resumed_from != last and last.exists():
        os.replace(last, last.with_name(last.name + ".unreadable"))
        print(f"resume: {last} was unreadable; kept as {last.name}.unreadable", flush=True)


def trim_metrics(path: Path, step: int) -> None:
    """Drop metrics lines written after the checkpoint (a run killed between checkpoints), and a
    torn last line (a kill or a full disk in mid-write)."""
    torn = truncate_jsonl(path, lambda record: record["step"] <= step, what="metrics")
    if torn is not None:
        print(f"{path}: dropped its torn last line {torn!r} (a kill or a full disk in mid-write)", flush=True)


def save(run, last: bool = True, best: bool = False) -> None:
    """Save ``run`` (train.py's Run: its model, optimizer, scheduler, state, config, and its
    extras: grad scaler, averaged weights, data info). Rank 0 writes (every rank holds the same
    weights); the others wait for it. ``last``: last.pt (with its backups); ``best``: best.pt
    (the best validation accuracy so far)."""
    if not run.dist.is_main:
        distributed.barrier(run.dist)
        return
    try:
        _save(run, last, best)
    except OSError as e:
        raise CheckpointWriteError(e.strerror or str(e), checkpoint_path(run.run_dir), e.errno) from e
    distributed.barrier(run.dist)


class CheckpointWriteError(WriteFault):
    """A checkpoint could not be written (disk full, read-only...); the previous one is intact."""


def _save(run, last: bool, best: bool) -> None:
    cfg = run.cfg
    ckpt = contents(run)
    if last:
        save_checkpoint(ckpt, checkpoint_path(run.run_dir), keep=cfg.trainer.keep_checkpoints)
    if best:
        save_checkpoint(ckpt, best_path(run.run_dir))


def checkpoint_due(t, state: State) -> bool:
    """After an epoch: every trainer.checkpoint_every epochs and at the end (and on a stop)."""
    return state.finished or state.epoch % t.checkpoint_every == 0


# --------------------------------------------------------------------------------------
# Resume: which config changes a checkpoint tolerates.
# --------------------------------------------------------------------------------------
STRUCTURAL = ("model", "optimizer", "scheduler", "schedule.interval", "data", "augment")
SAFE_DATA_KEYS = ("data.dataset.root", "data.dataset.download")  # where the same data lives


def config_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(structural, safe) keys whose value differs between two unresolved configs."""
    a, b = flatten_config(saved), flatten_config(current)
    changed = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    changed = [k for k in changed if not k.startswith(("hydra.", "resume", "schedule.steps_per_epoch"))]
    structural = [k for k in changed if k.startswith(STRUCTURAL) and not k.startswith(SAFE_DATA_KEYS)]
    return structural, [k for k in changed if k not in structural]


def check_resume_config(ckpt: dict, cfg: DictConfig, path) -> None:
    """Refuse to resume across a structural config change unless resume_force=true."""
    saved = ckpt.get("config_unresolved")
    if saved is None:
        raise ValueError(f"resume: {path} has no config_unresolved entry; it was not written by train.py")
    structural, safe = config_changes(saved, OmegaConf.to_container(cfg, resolve=False, enum_to_str=True))
    if structural and not cfg.resume_force:
        raise ValueError(
            f"resume: {path} was written with a different model/optimizer/scheduler/data/augment config; "
            f"differing keys: {', '.join(structural)}. Start a new run directory, or pass "
            f"resume_force=true to load it anyway."
        )
    if structural or safe:
        print(f"resume: config changed since {path}: {', '.join(structural + safe)}", flush=True)
    if any(k.startswith("trainer.epochs") for k in safe):
        print(
            "resume: the schedule continues as saved (its lengths are in the checkpoint); "
            "its last phase runs on for the extra epochs",
            flush=True,
        )
