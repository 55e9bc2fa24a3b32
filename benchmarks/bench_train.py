"""Benchmark: training and evaluation throughput of train.py's recipe, against a matmul floor.

    make bench     (or: .venv/bin/python benchmarks/bench_train.py [--device auto|cpu|cuda]
                    [--models resnet9,resnet18] [--batch 512] [--steps 100] [--warmup 20]
                    [--width 64] [--compile] [--json PATH])

Made for one CUDA GPU (an H100: bf16 autocast, channels_last, fused SGD, as train.py does
there). On a CPU it scales itself down (width 16, batch 64, 3 warmup + 5 timed steps, fp32)
so that it finishes in a minute or two; those figures say nothing about a GPU.

What it measures, in this order:

1. the matmul ceiling: mean of 10 large random matmuls (bf16 8192^3 on CUDA, fp32 on a CPU);
2. per model, training images/s: the training step of train.py (autocast, loss with label
   smoothing, backward, SGD step, zero_grad(set_to_none=True), the loss summed on the
   device, scheduler.step() every step), fed by a DeviceLoader over a synthetic uint8 dataset
   held on the device (crop + flip + normalise included); on CUDA timed with CUDA events
   and no host sync inside the timed loop;
3. evaluation images/s: no_grad, the same autocast, the test loader, as train.py evaluates
   (imgcls.evaluate.evaluate_split);
4. the floor: training FLOPs per image = 3 x forward FLOPs (count_flops), divided by the
   matmul rate; measured time per image / floor time per image says how far off it is;
5. where the time goes: a SEPARATE pass of as many steps that synchronises between phases
   (loader batch, forward+backward, optimizer, scheduler), and once: an evaluation pass, a
   checkpoint write, import torch, Hydra compose, the dataset's move to the device, the
   first step against a steady one (and with --compile the compile time).

The model, optimizer and scheduler come from conf/ (model=<name> optimizer=sgd
scheduler=warmup_linear), built as train.py builds them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
if str(ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(ROOT))  # the project's `sched`, not the standard library's

import torch  # noqa: E402

MODELS = ("resnet9", "resnet18")
NUM_CLASSES = 10
# defaults per device: (CUDA, CPU)
DEFAULTS = {
    "batch": (512, 64),  # images per training step
    "eval_batch": (1024, 128),  # images per evaluation batch (trainer.eval_batch_size on CUDA)
    "width": (64, 16),  # resnet9 width (resnet18's is fixed)
    "warmup": (20, 3),  # steps after the first one, before timing
    "steps": (100, 5),  # timed steps (and as many in the breakdown pass)
    "train_images": (50_000, 1024),  # synthetic dataset: CIFAR-10's sizes on CUDA
    "test_images": (10_000, 256),
    "matmul_n": (8192, 2048),
    "eval_passes": (3, 1),  # timed evaluation passes (after one untimed)
}


# --------------------------------------------------------------------------------------
# set-up
# --------------------------------------------------------------------------------------
# --smallest: ResNet-9 width 8 on the CPU, 2 timed steps of 16 images, a 512 x 512 matmul.
SMALLEST = {"device": "cpu", "models": "resnet9", "width": 8, "batch": 16, "steps": 2, "warmup": 1, "matmul_n": 512}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: resnet9,resnet18")
    p.add_argument("--batch", type=int, help="training images per step (CUDA 512, CPU 64)")
    p.add_argument("--steps", type=int, help="timed steps (CUDA 100, CPU 5)")
    p.add_argument("--warmup", type=int, help="untimed steps after the first (CUDA 20, CPU 3)")
    p.add_argument("--width", type=int, help="resnet9 width (CUDA 64, CPU 16)")
    p.add_argument("--matmul-n", type=int, help="matmul size n for n x n @ n x n (CUDA 8192, CPU 2048)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (as trainer.compile=true)")
    p.add_argument("--json", type=Path, help="write every figure to this JSON file")
    p.add_argument(
        "--smallest",
        action="store_true",
        help="a seconds-long CPU check that every figure comes out: "
        "the SMALLEST settings (the test and make gpu-report SMOKE=1 use it)",
    )
    args = p.parse_args(argv)
    if args.smallest:
        p.set_defaults(**SMALLEST)
        args = p.parse_args(argv)  # flags given still win over SMALLEST
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.models:
        if m not in MODELS:
            p.error(f"--models: {m!r} is not one of {list(MODELS)}")
    for key in ("batch", "steps", "width", "matmul_n"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')}: expected an int >= 1")
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup: expected an int >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here; use --device cpu or auto")
    return args


def resolve_settings(args) -> dict:
    """The run's settings: the flags given, else the defaults of the device."""
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    s = {k: v[0] if cuda else v[1] for k, v in DEFAULTS.items()}
    for key in ("batch", "steps", "warmup", "width", "matmul_n"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    s["train_images"] = max(s["train_images"], s["batch"])
    s.update(
        device="cuda" if cuda else "cpu",
        models=args.models,
        compile=args.compile,
        precision="bf16 autocast" if cuda else "fp32",
        channels_last=cuda,
    )
    return s


def provenance(device: torch.device) -> dict:
    """Where and when the figures were taken: enough to cite them."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name = f"CPU: {name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        commit = (commit + (" + uncommitted changes" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(),
        "git": commit,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds that fn() takes: CUDA events around it on CUDA (no sync inside), else perf_counter."""
    if device.type == "cuda":
        sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # elapsed_time is in ms
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------
# 1. matmul ceiling
# --------------------------------------------------------------------------------------
def matmul_ceiling(device: torch.device, n: int, warmup: int = 3, reps: int = 10) -> dict:
    """Mean rate of `reps` n x n @ n x n matmuls of random data (bf16 on CUDA, fp32 on CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        torch.matmul(a, b, out=out)

    def run():
        for _ in range(reps):
            torch.matmul(a, b, out=out)

    seconds = timed(run, device) / reps  # per matmul
    flops = 2 * n**3  # multiply-adds x 2
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "n": n,
        "reps": reps,
        "seconds_mean": seconds,
        "tflops": flops / seconds / 1e12,
    }


# --------------------------------------------------------------------------------------
# start-up costs
# --------------------------------------------------------------------------------------
def import_torch_seconds() -> float:
    """`import torch` in a fresh interpreter (the file cache is warm: this process loaded it)."""
    code = "import time; t=time.perf_counter(); import torch; print(time.perf_counter()-t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def compose(overrides: list[str]):
    """conf/config.yaml composed with `overrides` (the project's one composition function)."""
    from imgcls.config import compose_config

    return compose_config(overrides)[0]


# --------------------------------------------------------------------------------------
# the recipe's pieces, built as train.py builds them
# --------------------------------------------------------------------------------------
def make_loaders(cfg, ds, device: torch.device, batch: int, eval_batch: int):
    """Train and test DeviceLoaders as imgcls.build.load_data makes them (dataset moved to device)."""
    import hydra

    from imgcls.loader import BatchFormat, DeviceLoader

    fmt = BatchFormat(ds.mean, ds.std, channels_last=device.type == "cuda")
    augment = hydra.utils.instantiate(cfg.augment, seed=cfg.trainer.seed, num_classes=len(ds.classes))
    train = DeviceLoader(ds.train_images, ds.train_labels, batch, device, fmt, augment)
    test = DeviceLoader(ds.test_images, ds.test_labels, eval_batch, device, fmt)
    return train, test


def build(cfg, device: torch.device):
    """Model, optimizer and scheduler from cfg, as imgcls.build.build_model/_optimizer/_scheduler."""
    import inspect

    import hydra

    model = hydra.utils.instantiate(cfg.model)(num_classes=NUM_CLASSES)
    fwd_flops = count_forward_flops(model)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    factory = hydra.utils.instantiate(cfg.optimizer, _convert_="all")
    extra = {}
    if device.type == "cuda" and "fused" in inspect.signature(factory.func).parameters:
        extra["fused"] = True
    optimizer = factory(model.parameters(), **extra)
    scheduler = hydra.utils.instantiate(cfg.scheduler, _convert_="all")(optimizer)
    return model, optimizer, scheduler, fwd_flops


def count_forward_flops(model) -> int:
    from imgcls.models import count_flops

    return count_flops(model, (1, 3, 32, 32))  # FLOPs (2 x multiply-adds) per image


def describe_recipe(optimizer, scheduler) -> str:
    g = optimizer.param_groups[0]
    phases = [type(s).__name__ for s in getattr(scheduler, "_schedulers", [])]
    return (
        f"{type(optimizer).__name__}(lr={g['initial_lr']}, momentum={g['momentum']}, "
        f"nesterov={g['nesterov']}, weight_decay={g['weight_decay']}, fused={bool(g.get('fused'))}), "
        f"{type(scheduler).__name__}({', '.join(phases)}) stepped per step"
    )


def endless_batches(loader):
    """The loader's batches, epoch after epoch, as train.py's loop walks them."""
    epoch = 0
    while True:
        yield from loader.epoch_batches(epoch)
        epoch += 1


# --------------------------------------------------------------------------------------
# 2-5. one model
# --------------------------------------------------------------------------------------
def bench_model(
    name: str,
    s: dict,
    device: torch.device,
    train_loader,
    test_loader,
    compose_overrides: list[str],
    matmul_tflops: float,
) -> dict:
    from omegaconf import open_dict

    from imgcls.checkpoint import save_checkpoint
    from imgcls.distributed import unwrap_model
    from imgcls.evaluate import evaluate_split
    from imgcls.loss import training_loss
    from imgcls.step import StepSettings, train_step

    overrides = [*compose_overrides, f"model={name}"] + ([f"model.width={s['width']}"] if name == "resnet9" else [])
    cfg = compose(overrides)
    torch.manual_seed(cfg.trainer.seed)
    with open_dict(cfg):
        cfg.schedule.steps_per_epoch = len(train_loader)
    model, optimizer, scheduler, fwd_flops = build(cfg, device)
    bf16 = device.type == "cuda"  # trainer.precision=auto
    settings = StepSettings("bf16" if bf16 else "fp32")
    loss_fn = training_loss(cfg.trainer)
    net = torch.compile(model) if s["compile"] else model
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    batches = endless_batches(train_loader)
    print(
        f"\n{name}: width {cfg.model.get('width', 64)}, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters, {fwd_flops / 1e9:.3f} GFLOP forward per image; {describe_recipe(optimizer, scheduler)}",
        flush=True,
    )

    def step_fn(x, y):  # the step train.py runs (trainer.skip_nonfinite=false, the default)
        return train_step(net, optimizer, loss_fn, x, y, settings)

    def train_steps(n: int):  # train.py's loop body, without its bookkeeping on the host
        nonlocal loss_sum
        for _ in range(n):
            x, y = next(batches)
            loss_sum += step_fn(x, y).float()
            scheduler.step()

    # first step (cudnn autotune on CUDA, compilation with --compile), then warmup
    model.train()
    sync(device)
    t0 = time.perf_counter()
    train_steps(1)
    sync(device)
    first_step_s = time.perf_counter() - t0
    train_steps(s["warmup"])

    # 2. throughput pass: no host sync inside
    train_s = timed(lambda: train_steps(s["steps"]), device)
    steady_step_s = train_s / s["steps"]
    train_ips = s["batch"] * s["steps"] / train_s
    print(
        f"  train: {train_ips:,.0f} images/s ({steady_step_s * 1e3:.2f} ms/step over {s['steps']} steps; "
        f"first step {first_step_s:.3f} s)",
        flush=True,
    )

    # 5. breakdown pass: the same steps, synchronised between phases (this pass only)
    phases = {"data": 0.0, "forward_backward": 0.0, "optimizer": 0.0, "scheduler": 0.0}  # seconds, summed
    sync(device)
    for _ in range(s["steps"]):
        t0 = time.perf_counter()
        x, y = next(batches)  # crop + flip + normalise on the device
        sync(device)
        t1 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(net(x), y)
        loss.backward()
        loss_sum += loss.detach().float()
        sync(device)
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        t3 = time.perf_counter()
        scheduler.step()
        sync(device)
        t4 = time.perf_counter()
        phases["data"] += t1 - t0
        phases["forward_backward"] += t2 - t1
        phases["optimizer"] += t3 - t2
        phases["scheduler"] += t4 - t3
    breakdown_ms = {k: v / s["steps"] * 1e3 for k, v in phases.items()}  # ms per step
    breakdown_ms["sum"] = sum(breakdown_ms.values())
    if not torch.isfinite(loss_sum):
        raise FloatingPointError(f"{name}: the training loss became {loss_sum.item()} during the benchmark")

    # 3. evaluation: one untimed pass (autotune / recompile for eval), then timed passes
    def evaluate():  # train.py's evaluation, with the config's trainer settings
        return evaluate_split(net, test_loader, cfg.trainer, device, settings.precision)

    sync(device)
    t0 = time.perf_counter()
    evaluate()
    first_eval_pass_s = time.perf_counter() - t0
    eval_pass_s = timed(lambda: [evaluate() for _ in range(s["eval_passes"])], device) / s["eval_passes"]
    eval_ips = test_loader.n / eval_pass_s
    model.train()
    print(f"  eval: {eval_ips:,.0f} images/s ({eval_pass_s:.3f} s per pass over {test_loader.n} images)", flush=True)

    # once: a checkpoint write of model + optimizer + scheduler state
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        path = Path(tmp) / "checkpoints" / "last.pt"
        t0 = time.perf_counter()
        save_checkpoint(
            {
                "model": unwrap_model(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
            },
            path,
        )
        checkpoint_write_s = time.perf_counter() - t0
        checkpoint_mb = path.stat().st_size / 1e6

    # 4. the floor
    train_flops = 3 * fwd_flops  # per image: forward + backward (2x forward)
    floor_s = train_flops / (matmul_tflops * 1e12)  # seconds per image at the matmul rate
    measured_s = 1.0 / train_ips
    eval_floor_s = fwd_flops / (matmul_tflops * 1e12)
    peak_gb = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return {
        "width": int(cfg.model.get("width", 64)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "forward_flops_per_image": fwd_flops,
        "train_flops_per_image": train_flops,
        "train_images_per_s": train_ips,
        "eval_images_per_s": eval_ips,
        "floor_us_per_image": floor_s * 1e6,
        "measured_us_per_image": measured_s * 1e6,
        "floor_ratio": measured_s / floor_s,
        "eval_floor_ratio": (1.0 / eval_ips) / eval_floor_s,
        "first_step_s": first_step_s,
        "steady_step_s": steady_step_s,
        "compile_s": first_step_s - steady_step_s if s["compile"] else None,
        "breakdown_ms_per_step": breakdown_ms,
        "first_eval_pass_s": first_eval_pass_s,
        "eval_pass_s": eval_pass_s,
        "checkpoint_write_s": checkpoint_write_s,
        "checkpoint_mb": checkpoint_mb,
        "peak_memory_gb": peak_gb,
        "recipe": describe_recipe(optimizer, scheduler),
    }


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------
def print_header(prov: dict, s: dict) -> None:
    print("bench_train: train.py's training step, evaluation and start-up costs")
    print(f"  command : {prov['command']}")
    print(f"  date    : {prov['date_utc']}")
    print(f"  device  : {prov['device']}")
    cuda = f", CUDA {prov['cuda']}, cuDNN {prov['cudnn']}" if prov["cuda"] else ""
    print(f"  torch   : {prov['torch']}{cuda}, Python {prov['python']}")
    print(f"  git     : {prov['git']}")
    print(
        f"  settings: batch {s['batch']}, eval batch {s['eval_batch']}, resnet9 width {s['width']}, "
        f"first step + {s['warmup']} warmup + {s['steps']} timed steps, {s['precision']}, "
        f"channels_last {s['channels_last']}, compile {s['compile']}; synthetic data "
        f"{s['train_images']} train / {s['test_images']} test 3x32x32 uint8 on the device"
    )
    if s["device"] == "cpu":
        print(
            "  CPU run: scaled down (CUDA defaults: width 64, batch 512, 20 warmup + 100 timed steps, "
            "bf16); these fp32 CPU figures say nothing about a GPU."
        )
        print("  The GPU figures need a CUDA machine: run `python benchmarks/bench_train.py` on one.")
    sys.stdout.flush()


def print_table(results: dict) -> None:
    mm, st, models = results["matmul"], results["startup"], results["models"]
    print("\n=== summary " + "=" * 78)
    print(
        f"matmul ceiling: {mm['tflops']:.3f} TFLOP/s ({mm['dtype']} {mm['n']}^3, mean of {mm['reps']}, "
        f"{mm['seconds_mean'] * 1e3:.2f} ms each)"
    )
    print(
        f"start-up (s): import torch {st['import_torch_s']:.2f} (fresh process) | Hydra import "
        f"{st['hydra_import_s']:.3f} + compose {st['hydra_compose_s']:.3f} | dataset to device "
        f"{st['dataset_to_device_s']:.4f} ({st['dataset_mb']:.1f} MB)"
    )
    print("\nthroughput (steady state)      train       eval    train GFLOP   floor    measured  measured")
    print("model      width  batch      img/s      img/s      per image  us/img      us/img   / floor")
    for name, r in models.items():
        print(
            f"{name:<10} {r['width']:>5} {results['settings']['batch']:>6} {r['train_images_per_s']:>10,.0f} "
            f"{r['eval_images_per_s']:>10,.0f} {r['train_flops_per_image'] / 1e9:>14.3f} "
            f"{r['floor_us_per_image']:>7.2f} {r['measured_us_per_image']:>11.2f} {r['floor_ratio']:>9.2f}"
        )
    print("\nper training step, ms (a separate breakdown pass, synchronised between phases; the throughput")
    print("pass has no sync inside, so on CUDA, where host and GPU overlap, the sum exceeds a steady step)")
    print("model        data  fwd+bwd  optimizer  scheduler      sum   steady step")
    for name, r in models.items():
        b = r["breakdown_ms_per_step"]
        print(
            f"{name:<10} {b['data']:>6.2f} {b['forward_backward']:>8.2f} {b['optimizer']:>10.2f} "
            f"{b['scheduler']:>10.3f} {b['sum']:>8.2f} {r['steady_step_s'] * 1e3:>13.2f}"
        )
    print("\nonce, s         first step  steady step  compile  1st eval  eval pass  checkpoint (MB)")
    for name, r in models.items():
        comp = f"{r['compile_s']:.2f}" if r["compile_s"] is not None else "-"
        print(
            f"{name:<15} {r['first_step_s']:>10.3f} {r['steady_step_s']:>12.4f} {comp:>8} "
            f"{r['first_eval_pass_s']:>9.3f} {r['eval_pass_s']:>10.3f} {r['checkpoint_write_s']:>8.3f} "
            f"({r['checkpoint_mb']:.1f})"
        )
    sys.stdout.flush()


def main(argv=None) -> None:
    args = parse_args(argv)
    s = resolve_settings(args)
    device = torch.device(s["device"])
    prov = provenance(device)
    print_header(prov, s)
    if device.type == "cuda":  # as imgcls.build.seed_everything (trainer.deterministic=false)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    startup = {"import_torch_s": import_torch_seconds()}
    t0 = time.perf_counter()
    import hydra  # noqa: F401  (timed: train.py imports it at start-up)

    startup["hydra_import_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    compose([])  # conf/config.yaml as it stands
    startup["hydra_compose_s"] = time.perf_counter() - t0

    matmul = matmul_ceiling(device, s["matmul_n"])
    print(f"\nmatmul ceiling: {matmul['tflops']:.3f} TFLOP/s ({matmul['dtype']} {matmul['n']}^3)", flush=True)

    from imgcls.data import synthetic

    overrides = [
        "data=synthetic",
        "optimizer=sgd",
        "scheduler=warmup_linear",
        f"trainer.batch_size={s['batch']}",
        f"trainer.eval_batch_size={s['eval_batch']}",
        f"trainer.device={s['device']}",
        f"data.dataset.train_size={s['train_images']}",
        f"data.dataset.test_size={s['test_images']}",
    ]
    ds = synthetic(s["train_images"], s["test_images"], num_classes=NUM_CLASSES, seed=0).load()
    data_cfg = compose(overrides)
    sync(device)
    t0 = time.perf_counter()
    train_loader, test_loader = make_loaders(data_cfg, ds, device, s["batch"], s["eval_batch"])
    sync(device)
    startup["dataset_to_device_s"] = time.perf_counter() - t0
    startup["dataset_mb"] = (ds.train_images.numel() + ds.test_images.numel()) / 1e6  # uint8: 1 byte each

    models = {}
    for name in s["models"]:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        models[name] = bench_model(name, s, device, train_loader, test_loader, overrides, matmul["tflops"])

    results = {"provenance": prov, "settings": s, "matmul": matmul, "startup": startup, "models": models}
    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nall figures in {args.json}")


if __name__ == "__main__":
    main()
