"""The config: composing it from conf/ (the ONE composition function), turning composition
errors into one line naming the key, and validating a composed config once, before any
data is read or step taken. The schedule-length resolvers themselves are imgcls.schedule's;
the device choice is imgcls.device's; what a resume tolerates is imgcls.checkpoint's.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from imgcls import schema
from imgcls.device import SWITCHES
from imgcls.exits import EXIT_BAD_INPUT, one_line
from imgcls.schedule import _epochs, _mul, _run_fraction, _run_remainder, fill_steps_per_epoch

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _project_dir(sub: str = "") -> str:
    """``${project_dir:data}``: a folder of the project (the one holding conf/), absolute; the
    default data root, the same wherever train.py is launched from."""
    return str(CONF_DIR.parent / sub) if sub else str(CONF_DIR.parent)


def _pid() -> int:
    """This process's id, for a default run directory of its own (two runs started in the same
    second get two); under torchrun the launcher's, which every local rank shares."""
    import os

    return os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else os.getpid()


def register_resolvers() -> None:
    """Register the schedule-length resolvers (imgcls.schedule) and the path ones above (idempotent)."""
    for name, fn in {
        "epochs": _epochs,
        "run_fraction": _run_fraction,
        "run_remainder": _run_remainder,
        "mul": _mul,
        "pid": _pid,
        "project_dir": _project_dir,
    }.items():
        OmegaConf.register_new_resolver(name, fn, replace=True)


# --------------------------------------------------------------------------------------
# Composition: the ONE function that turns overrides into the config train.py would get
# (used by the preview, the tests and the benchmarks; train.py's own Hydra composes the same
# files, and `preflight` refuses a bad command line before it).
# --------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A config that cannot be composed: one line naming the key, the value and what is accepted."""


def setup() -> None:
    """The resolvers and the schema (idempotent): what composing conf/ needs."""

    register_resolvers()
    schema.register_configs()
    _memoize_help_group_options()
    _reuse_preflight_mode()


# (overrides, hydra.mode) of the command line preflight composed: Hydra's get_mode composes the
# whole config again only to read hydra.mode (~0.3 s of every run on a 2-core CPU)
_PREFLIGHT_MODE: list = []


def _reuse_preflight_mode() -> None:
    """Hydra's ``get_mode`` answers from preflight's composition of the same overrides (a plain
    run; a multirun's preflight composes its first job only, so Hydra composes it again)."""
    from hydra._internal.hydra import Hydra

    if getattr(Hydra.get_mode, "_imgcls_reused", False):
        return
    original = Hydra.get_mode

    def get_mode(self, config_name, overrides):
        if _PREFLIGHT_MODE and config_name == "config" and _PREFLIGHT_MODE[0] == tuple(overrides):
            return _PREFLIGHT_MODE[1]
        return original(self, config_name, overrides)

    get_mode._imgcls_reused = True
    Hydra.get_mode = get_mode


def _memoize_help_group_options() -> None:
    """``--help`` lists every config group: Hydra's ``app_help`` asks for the options of each
    group (and sub-group) several times, and each ask deep-copies the whole config repository
    (101 copies for conf/, ~1 s). Within one ``app_help`` call the repository cannot change,
    so remember each answer for that call only: the same text, once per group (idempotent)."""
    from hydra._internal.hydra import Hydra
    from hydra.core.object_type import ObjectType

    if getattr(Hydra.app_help, "_imgcls_memoized", False):
        return
    original = Hydra.app_help

    def app_help(self, *args, **kwargs):
        loader = self.config_loader
        ask = loader.get_group_options
        answers: dict = {}

        def get_group_options(group_name, results_filter=ObjectType.CONFIG, config_name=None, overrides=None):
            key = (group_name, results_filter, config_name, tuple(overrides or ()))
            if key not in answers:
                answers[key] = ask(group_name, results_filter, config_name, overrides)
            return list(answers[key])

        loader.get_group_options = get_group_options
        try:
            return original(self, *args, **kwargs)
        finally:
            del loader.get_group_options  # back to the class's method

    app_help._imgcls_memoized = True
    Hydra.app_help = app_help


def compose_config(overrides, return_hydra_config: bool = False) -> tuple[DictConfig, dict]:
    """The config train.py would get for ``overrides`` (schema-checked), and the chosen option
    of each group. ConfigError (one line) if it cannot be composed."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    setup()
    overrides = list(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="compose"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(composition_error(e, overrides)) from e
    check_schema(cfg)
    choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra/")}
    if not return_hydra_config:
        from omegaconf import open_dict

        with open_dict(cfg):
            del cfg["hydra"]  # train.py's cfg has no hydra node either
    return cfg, choices


def _override_of(key: str, overrides) -> tuple[str, str | None]:
    """(the key as the override wrote it, its value) of the override that sets ``key`` or below."""
    for o in overrides:
        k, eq, v = o.partition("=")
        k = k.lstrip("+~").split("@")[0]
        if eq and (k == key or k.startswith(key + ".")):
            return k, v
    return key, None


def _schema_of(cfg: DictConfig, key: str):
    """The dataclass of the node at ``key`` (None for a free-form node)."""
    import dataclasses

    node = cfg if not key else OmegaConf.select(cfg, key, default=None)
    kind = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    return kind if kind is not None and dataclasses.is_dataclass(kind) else None


def _accepted_keys(kind) -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(kind)]


def unknown_key_message(key: str, value, accepted: list[str], given: str | None = None) -> str:
    """``given`` (default ``key``): the key as written, which may go below the unknown ``key``."""
    parent, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, accepted, n=1, cutoff=0.6)
    hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
    where = parent or "the top level"
    return (
        f"{given or key}: {value} is not accepted: {where} has no key {leaf!r}{hint}; accepted: {', '.join(accepted)}"
    )


_TYPE_WORDS = {
    "int": "an int",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "Optional[int]": "an int or null",
    "Optional[float]": "a number or null",
    "List[int]": "a list of ints",
    "Any": "any value",
}


def _expected_type(kind, leaf: str) -> str:
    import dataclasses

    for f in dataclasses.fields(kind):
        if f.name == leaf:
            name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            choice = getattr(schema, name, None)
            if isinstance(choice, type) and issubclass(choice, schema.Choice):  # a typed key: its values
                return "one of " + ", ".join(choice.__members__)
            return _TYPE_WORDS.get(name, name)
    return "a value of the schema's type"


def composition_error(e: BaseException, overrides) -> str:
    """One line for an error Hydra/OmegaConf raised while composing ``overrides``."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = e.__cause__ if e.__cause__ is not None else e
    if isinstance(e, MissingConfigException):
        missing = e.missing_cfg_file or ""
        group, _, option = missing.rpartition("/")
        if group and e.options:
            return f"{group}: {option!r} is not an option of conf/{group}/; accepted: {', '.join(sorted(e.options))}"
        return one_line(e)
    if isinstance(e, OverrideParseException):
        bad = _bad_override(overrides)
        return f"{bad}: {one_line(e)}"
    key = getattr(cause, "full_key", None)
    kind = getattr(cause, "object_type", None)
    if key and isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        given, value = _override_of(key, overrides)
        import dataclasses

        if kind is not None and dataclasses.is_dataclass(kind):
            accepted = _accepted_keys(kind)
        else:  # a free-form node: its keys in the config composed without this override
            accepted = _keys_without(key, overrides)
        return unknown_key_message(key, value, accepted, given)
    if key and isinstance(cause, ValidationError):
        _, value = _override_of(key, overrides)
        leaf = key.rpartition(".")[2]
        expected = _expected_type(kind, leaf) if kind is not None else "another type"
        return f"{key}: {value} is not accepted; expected {expected}"
    return _named(one_line(e) + (f": {one_line(cause)}" if cause is not e else ""), overrides)


def _keys_without(key: str, overrides) -> list[str]:
    parent = key.rpartition(".")[0]
    rest = [o for o in overrides if o.partition("=")[0].lstrip("+~") != key]
    try:
        cfg, _ = compose_config(rest)
    except ConfigError:
        return []
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _bad_override(overrides) -> str:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for o in overrides:
        try:
            parser.parse_override(o)
        except Exception:
            return f"override {o!r}"
    return "overrides"


def _named(message: str, overrides) -> str:
    """``message`` prefixed with the override it quotes (Hydra names the key, not the value)."""
    for o in overrides:
        if f"'{o}'" in message:
            return message
        key = o.split("=", 1)[0].lstrip("+~")
        if key and f"'{key}'" in message:
            return f"override {o!r}: {message}"
    return message


def check_schema(cfg: DictConfig) -> None:
    """Refuse keys a schema node does not have. OmegaConf refuses them on a plain override;
    this catches those Hydra's ``+key=value`` adds with the struct flag lifted."""
    for prefix in ("", "trainer", "schedule", "data"):
        kind = _schema_of(cfg, prefix)
        if kind is None:
            continue
        node = OmegaConf.select(cfg, prefix) if prefix else cfg
        accepted = _accepted_keys(kind)
        for k in node.keys():
            if k not in accepted and not (prefix == "" and k == "hydra"):
                key = f"{prefix}.{k}" if prefix else str(k)
                raise ConfigError(
                    unknown_key_message(key, OmegaConf.select(cfg, key, throw_on_missing=False), accepted)
                )


def preflight(argv) -> None:
    """train.py's command line, composed as Hydra will compose it, before Hydra (and torch)
    start: a refused config ends here with one ``error:`` line and exit code 2. Also answers
    ``--cfg job --resolve`` (with schedule.steps_per_epoch counted from the data config)."""
    import os

    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(list(argv))
    if (
        args.help
        or args.hydra_help
        or args.info
        or args.shell_completion
        or args.config_path
        or args.config_name
        or args.config_dir
        or args.experimental_rerun
    ):
        return
    try:
        cfg, _ = compose_config(_one_job(args.overrides) if args.multirun else args.overrides, return_hydra_config=True)
        if not args.multirun:
            _PREFLIGHT_MODE[:] = [tuple(args.overrides), cfg.hydra.mode]
        check_filled_in(cfg)
        if args.multirun:
            check_sweeper_objective(cfg)
        from omegaconf import open_dict

        with open_dict(cfg):
            del cfg["hydra"]
        if args.cfg == "job" and args.resolve and not args.package:
            fill_steps_per_epoch(cfg)
            OmegaConf.resolve(cfg)
            print(OmegaConf.to_yaml(cfg), end="", flush=True)
            sys.exit(0)
    except ValueError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


def check_filled_in(cfg: DictConfig) -> None:
    """``schedule.steps_per_epoch`` is train.py's to fill in from the data: a value given is refused
    (it would be silently replaced)."""
    if not OmegaConf.is_missing(cfg.schedule, "steps_per_epoch"):
        raise ConfigError(
            f"schedule.steps_per_epoch: {cfg.schedule.steps_per_epoch} is not accepted: train.py fills it in "
            f"from the data (training images // trainer.batch_size, or trainer.limit_train_batches)"
        )


def check_sweeper_objective(cfg: DictConfig) -> None:
    """A searching sweeper (Optuna) maximises what train.py returns: the best validation
    accuracy, or the test accuracy without a validation split. Refused then: it would tune on
    the test split."""
    target = str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="") or "")
    if "optuna" in target.lower() and not cfg.data.get("val_size", 0):
        raise ConfigError(
            f"data.val_size: {cfg.data.get('val_size', 0)} is not accepted with the Optuna sweeper: without a "
            f"validation split it would tune on the test split; hold some training images out, e.g. "
            f"data.val_size=0.1 (a fraction) or data.val_size=5000 (images)"
        )


def _one_job(overrides) -> list[str]:
    """A multirun's overrides with each sweep replaced by its first value (one job to check)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for text in overrides:
        try:
            o = parser.parse_override(text)
        except Exception:
            out.append(text)  # composing reports it
            continue
        if not o.is_sweep_override():
            out.append(text)
        elif o.is_choice_sweep() and o.value_type.name != "GLOB_CHOICE_SWEEP" or o.is_range_sweep():
            first = next(iter(o.sweep_string_iterator()), None)
            if first is not None:
                out.append(f"{o.get_key_element()}={first}")
    return out


# --------------------------------------------------------------------------------------
# Start-up validation: every bad value fails here, before any data is read or step taken.
# --------------------------------------------------------------------------------------
def _switch(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if value != "auto" and not isinstance(value, bool):  # 1/0 are not bools: refused too
        raise ValueError(f"{key}: {value!r} is not accepted; expected auto, true or false")


def _int_at_least(cfg: DictConfig, key: str, low: int, optional: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        accepted = f"an int >= {low}" + (" or null" if optional else "")
        raise ValueError(f"{key}: {value!r} is not accepted; expected {accepted}")


def _targets(node) -> list[str]:
    """Every ``_target_`` in a (plain, unresolved) config subtree."""
    if isinstance(node, dict):
        found = [node["_target_"]] if "_target_" in node else []
        return found + [t for k, v in node.items() if k != "_target_" for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def check_averaging(ema_decay, swa_start) -> None:
    """ValueError naming the key for a value outside what is accepted."""
    if ema_decay is not None and (
        isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0.0 < ema_decay < 1.0
    ):
        raise ValueError(
            f"trainer.ema_decay: {ema_decay!r} is not accepted; expected null (off) or a number in (0, 1), e.g. 0.999"
        )
    if swa_start is not None and (
        isinstance(swa_start, bool) or not isinstance(swa_start, (int, float)) or not 0.0 <= swa_start < 1.0
    ):
        raise ValueError(
            f"trainer.swa_start: {swa_start!r} is not accepted; expected null (off) or the "
            f"fraction of the run after which SWA averages, in [0, 1), e.g. 0.75"
        )


def check_early_stop(cfg: DictConfig) -> None:
    """trainer.early_stop_patience (null, or evaluations >= 1) and its min_delta (>= 0): it stops on
    the validation split (never the test split, read once at the end), so it needs one; SWA
    averages up to the planned end, so not both."""
    t = cfg.trainer
    _int_at_least(cfg, "trainer.early_stop_patience", 1, optional=True)
    delta = t.early_stop_min_delta
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 <= delta < 1.0:
        raise ValueError(f"trainer.early_stop_min_delta: {delta!r} is not accepted; expected a number in [0, 1)")
    if t.early_stop_patience is None:
        return
    if not cfg.data.get("val_size", 0):
        raise ValueError(
            f"trainer.early_stop_patience: {t.early_stop_patience} is not accepted without a validation "
            f"split (data.val_size is 0): it would stop on the test split; set data.val_size (e.g. 0.1)"
        )
    if t.swa_start is not None:
        raise ValueError(
            f"trainer.early_stop_patience: {t.early_stop_patience} is not accepted with trainer.swa_start "
            f"(SWA averages up to the planned end of the run); turn one off"
        )


def validate_config(cfg: DictConfig) -> None:
    """Check the composed config: what its schema cannot express (ranges, choices, how the
    parts fit together). Touches no file and no device: see pick_device and check_writable."""
    check_schema(cfg)
    missing = [
        f"{part}.{k}"
        for part in ("data", "data.dataset", "trainer")
        for k in OmegaConf.select(cfg, part)
        if OmegaConf.is_missing(OmegaConf.select(cfg, part), k)
    ]
    if missing:
        hint = " (the folder or archive with train/<class>/*, test/<class>/*)" if missing[0].endswith(".path") else ""
        raise ValueError(
            f"{missing[0]}: ??? (no value) is not accepted; this option needs one: pass {missing[0]}=...{hint}"
        )
    for key in (
        "trainer.epochs",
        "trainer.batch_size",
        "trainer.accumulate_grad_batches",
        "trainer.eval_batch_size",
        "trainer.eval_every",
        "trainer.log_every",
        "trainer.checkpoint_every",
        "trainer.keep_checkpoints",
    ):
        _int_at_least(cfg, key, 1)
    _int_at_least(cfg, "trainer.seed", 0)
    _int_at_least(cfg, "trainer.limit_train_batches", 1, optional=True)
    _int_at_least(cfg, "trainer.limit_eval_batches", 1, optional=True)
    _int_at_least(cfg, "augment.crop_padding", 0)  # and < the image size: train.py, once the data is known
    _int_at_least(cfg, "augment.cutout", 0)
    # trainer.device, trainer.precision, schedule.interval: typed (imgcls/schema.py), refused at composition
    for key in SWITCHES:
        _switch(cfg, key)
    from imgcls.precision import check_clip
    from imgcls.splits import val_count

    check_clip(cfg.trainer.get("grad_clip_norm"))
    check_averaging(cfg.trainer.get("ema_decay"), cfg.trainer.get("swa_start"))
    val_count(cfg.data.get("val_size", 0), 1 << 62)  # its type here; its size against the data in train.py
    check_early_stop(cfg)
    lr = OmegaConf.select(cfg, "optimizer.lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or lr != lr or lr == float("inf"):
        raise ValueError(f"optimizer.lr: {lr!r} is not accepted; expected a finite number > 0")
    smoothing = cfg.trainer.label_smoothing
    if not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing < 1.0:
        raise ValueError(f"trainer.label_smoothing: {smoothing!r} is not accepted; expected a number in [0, 1)")
    scheduler = OmegaConf.to_container(cfg.scheduler)
    if any(t.endswith("ReduceLROnPlateau") for t in _targets(scheduler)):
        if cfg.schedule.interval != "epoch" or cfg.trainer.eval_every != 1:
            raise ValueError(
                "scheduler: a ReduceLROnPlateau phase needs the test loss every epoch: set "
                f"schedule.interval=epoch (is {cfg.schedule.interval!r}) and trainer.eval_every=1 "
                f"(is {cfg.trainer.eval_every!r})"
            )
    if cfg.schedule.warmup is not None and "schedule.warmup" not in str(scheduler):
        raise ValueError(
            f"schedule.warmup: {cfg.schedule.warmup} is not accepted: this scheduler option "
            f"does not read it (only options whose YAML uses ${{schedule.warmup}} do)"
        )
    resume = cfg.resume
    if resume not in ("auto", "never"):
        if not isinstance(resume, str) or not Path(resume).expanduser().is_file():
            raise ValueError(
                f"resume: {resume!r} is not accepted; expected auto, never or the path of a checkpoint file"
            )


def check_writable(run_dir) -> None:
    """Create <run dir>/checkpoints and probe it: an unwritable run directory fails at start-up."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        probe = ckpt_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        from imgcls.io import WriteFault, is_write_fault

        msg = f"hydra.run.dir: cannot write checkpoints into {ckpt_dir}: {e.strerror or e}"
        if is_write_fault(e):  # a full or read-only file system: the write fault (exit 4)
            raise WriteFault(msg, ckpt_dir, e.errno) from e
        raise ValueError(msg) from e


def flatten_config(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(flatten_config(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    if isinstance(d, list):
        out = {}
        for i, v in enumerate(d):
            out.update(flatten_config(v, f"{prefix}{i}."))
        return out or {prefix[:-1]: []}
    return {prefix[:-1]: d}
