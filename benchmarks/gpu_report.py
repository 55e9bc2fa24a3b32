"""One command that measures the GPU recipe and writes docs/benchmarks/<GPU name>.md.

    make gpu-report DATA=../shared/data/cifar10-jpg.tar.gz     # on a CUDA machine, offline
    python benchmarks/gpu_report.py --data PATH [--seeds 5] [--budget-s 570] [--out FILE]
    make gpu-report SMOKE=1      # the same steps scaled down on a CPU: a check that the
                                 # command works, NOT a benchmark (tests/test_gpu_report.py)

DATA is the JPEG copy of CIFAR-10 (a .tar.gz or a folder of train/<class>/, test/<class>/:
`data=image_folder`) or the official `cifar-10-python.tar.gz` (`data=cifar10`, read from the
archive's folder, never downloaded). Steps, in this order; the report is rewritten after each,
so a run stopped part-way keeps what it measured:

1. the GPU test tier, `pytest -m gpu`;
2. `make bench`: the benchmarks' bench_sched.py and bench_train.py (its figures from --json);
3. data: one short run that builds the decoded-image cache (timed apart, not in the figures);
4. `experiment=cifar10_fast` for seeds 0..N-1, eager: test accuracy mean ± std, the training
   loop (train.py's own `train_seconds` in results.json), and the whole process (spawn to exit,
   timed here; results.json's `wall_seconds` is train.py's own, from its module load);
5. the same with `trainer.compile=true`: one run with empty inductor/Triton caches (its loop
   includes compilation), then the seeds with the caches warm; compilation ≈ cold − warm loop;
6. SIGTERM and resume: seed 0 stopped by SIGTERM a third of the way in (exit 143), then resumed
   in place; its lr at every logged step against the uninterrupted seed-0 run of step 4;
7. ablations while --budget-s allows: one trick off at a time (label smoothing, alternating
   flip, flip TTA, channels_last), seed k paired with seed k of step 4, one seed per round.

Every figure comes from a run of this invocation; nothing is carried over or estimated.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent  # benchmarks/: make bench's scripts, beside this one
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import torch  # noqa: E402
from bench_train import provenance  # noqa: E402  (command, date, device, torch, CUDA, git)

# The scaled-down recipe of --smoke: cifar10_fast on a CPU with every GPU switch forced on.
SMOKE_RECIPE = [
    "data=synthetic",
    "data.dataset.train_size=256",
    "data.dataset.test_size=128",
    "trainer.device=cpu",
    "model.width=8",
    "trainer.epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.batch_size=32",
    "trainer.eval_batch_size=128",
    "trainer.log_every=2",
    "trainer.precision=bf16",
    "trainer.channels_last=true",
    "trainer.fused=true",
]
ABLATIONS = {  # name: the override that turns the trick off
    "label smoothing off": "trainer.label_smoothing=0",
    "alternating flip off (random flips)": "augment.alternating_flip=false",
    "flip TTA off": "trainer.tta_flip=false",
    "channels_last off": "trainer.channels_last=false",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="the JPEG copy of CIFAR-10 (.tar.gz or folder) or cifar-10-python.tar.gz")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, synthetic data: a check, not a benchmark")
    p.add_argument("--seeds", type=int, help="seeds of the eager runs (default 5; --smoke 2)")
    p.add_argument("--compile-seeds", type=int, help="seeds of the warm compiled runs (default --seeds; --smoke 1)")
    p.add_argument("--ablation-seeds", type=int, help="most seeds per ablation (default --seeds; --smoke 1)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=570.0,
        help="ablations start only while this many seconds since the start are not used up",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="the report (default docs/benchmarks/<GPU name>.md; --smoke: outputs/gpu-report-smoke.md)",
    )
    p.add_argument("--workdir", type=Path, help="run directories (default outputs/gpu-report/<date-time>)")
    args = p.parse_args(argv)
    if not args.smoke:
        if not torch.cuda.is_available():
            p.error("no CUDA device here: run it on a GPU machine, or pass --smoke (SMOKE=1) for the CPU check")
        if not args.data:
            p.error(
                "--data (make gpu-report DATA=...) is required: the JPEG copy of CIFAR-10 or cifar-10-python.tar.gz"
            )
        if not Path(args.data).expanduser().exists():
            p.error(f"--data: {args.data} does not exist")
    args.seeds = args.seeds or (2 if args.smoke else 5)
    if args.seeds < 2:
        p.error("--seeds: expected an int >= 2 (a standard deviation needs two)")
    args.compile_seeds = args.compile_seeds or (1 if args.smoke else args.seeds)
    args.ablation_seeds = min(args.ablation_seeds or (1 if args.smoke else args.seeds), args.seeds)
    if args.compile_seeds < 1 or args.ablation_seeds < 1:
        p.error("--compile-seeds, --ablation-seeds: expected an int >= 1")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    args.workdir = (args.workdir or ROOT / "outputs" / "gpu-report" / stamp).resolve()
    return args


def data_overrides(args) -> list[str]:
    if args.smoke:
        return []  # SMOKE_RECIPE has synthetic data
    path = Path(args.data).expanduser().resolve()
    if path.name == "cifar-10-python.tar.gz":
        return ["data=cifar10", f"data.dataset.root={path.parent}", "data.dataset.download=false"]
    return ["data=image_folder", f"data.dataset.path={path}"]


# --------------------------------------------------------------------------------------
# running things
# --------------------------------------------------------------------------------------
class Report:
    """Sections of markdown, rewritten to `path` after each step."""

    def __init__(self, path: Path, header: list[str]):
        self.path, self.header, self.sections = path, header, {}

    def set(self, title: str, lines: list[str]) -> None:
        self.sections[title] = lines
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "\n".join(self.header) + "\n"
        for t, body in self.sections.items():
            text += f"\n## {t}\n\n" + "\n".join(body) + "\n"
        self.path.write_text(text)
        print(f"[gpu-report] {t}: written to {self.path}", flush=True)


def run_cmd(cmd: list[str], env: dict | None = None, timeout: float = 900) -> tuple[int, str, float]:
    """(exit code, stdout + stderr, seconds from spawn to exit)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def train_command(run_dir: Path, overrides: list[str]) -> list[str]:
    """A fresh train.py run in run_dir (never a resume of an earlier report's run), no progress bar."""
    return [
        sys.executable,
        str(ROOT / "train.py"),
        *overrides,
        f"hydra.run.dir={run_dir}",
        "resume=never",
        "trainer.progress=false",
    ]


def train(run_dir: Path, overrides: list[str], env: dict | None = None) -> dict:
    """One train.py process: its results.json plus `process_s` (spawn to exit), or its error."""
    cmd = train_command(run_dir, overrides)
    code, out, seconds = run_cmd(cmd, env)
    if code != 0:
        return {"error": f"exit {code}: {last_line(out)}", "process_s": seconds, "command": shlex.join(cmd)}
    return {**json.loads((run_dir / "results.json").read_text()), "process_s": seconds, "command": shlex.join(cmd)}


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4g} (one run)" if values else "-"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def pct(values: list[float]) -> str:
    if len(values) < 2:
        return f"{100 * values[0]:.2f}% (one run)" if values else "-"
    return f"{100 * statistics.mean(values):.2f}% ± {100 * statistics.stdev(values):.2f}"


def runs_table(runs: dict) -> list[str]:
    lines = [
        "| run | test acc | training loop s | process s (spawn to exit) | train.py wall_seconds | img/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        if "error" in r:
            lines.append(f"| {name} | FAILED: {r['error']} | | {r['process_s']:.1f} | | |")
        else:
            lines.append(
                f"| {name} | {100 * r['final_test_acc']:.2f}% | {r['train_seconds']:.2f} | "
                f"{r['process_s']:.2f} | {r['wall_seconds']:.2f} | {r['images_per_second']:,.0f} |"
            )
    ok = [r for r in runs.values() if "error" not in r]
    if len(ok) > 1:
        lines.append(
            f"| **mean ± std ({len(ok)} runs)** | {pct([r['final_test_acc'] for r in ok])} | "
            f"{mean_std([r['train_seconds'] for r in ok])} | {mean_std([r['process_s'] for r in ok])} | "
            f"{mean_std([r['wall_seconds'] for r in ok])} | "
            f"{mean_std([r['images_per_second'] for r in ok])} |"
        )
    return lines


def metrics_lrs(run_dir: Path) -> list:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(m["step"], m["lr"]) for m in lines if "lr" in m]


# --------------------------------------------------------------------------------------
# the steps
# --------------------------------------------------------------------------------------
def gpu_tier(report: Report) -> None:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"]
    code, out, seconds = run_cmd(cmd, timeout=900)
    summary = last_line(out)
    verdict = "passed" if code == 0 else f"FAILED (pytest exit {code})"
    report.set(
        "GPU test tier",
        [
            f"`{shlex.join(cmd[1:])}`: {verdict}, {seconds:.1f} s: `{summary}`",
            "",
            "```",
            *out.strip().splitlines()[-25:],
            "```",
        ],
    )


def bench(report: Report, args, work: Path) -> None:
    small = args.smoke
    sched_cmd = [
        sys.executable,
        str(BENCH_DIR / "bench_sched.py"),
        *(["--steps", "500", "--rounds", "1"] if small else []),
    ]
    train_json = work / "bench_train.json"
    train_cmd = [
        sys.executable,
        str(BENCH_DIR / "bench_train.py"),
        "--json",
        str(train_json),
        *(["--smallest"] if small else []),
    ]
    lines = []
    for cmd in (sched_cmd, train_cmd):
        code, out, seconds = run_cmd(cmd, timeout=900)
        status = "ok" if code == 0 else f"FAILED (exit {code}): {last_line(out)}"
        lines += [
            f"`{shlex.join(cmd[1:])}`: {status}, {seconds:.1f} s",
            "",
            "```",
            *out.strip().splitlines()[-40:],
            "```",
            "",
        ]
    if train_json.is_file():
        r = json.loads(train_json.read_text())
        lines += [
            f"matmul ceiling: {r['matmul']['tflops']:.3g} TFLOP/s ({r['matmul']['dtype']})",
            "",
            "| model | train img/s | eval img/s | measured / FLOP floor |",
            "|---|---|---|---|",
        ]
        for name, m in r["models"].items():
            lines.append(
                f"| {name} (width {m['width']}) | {m['train_images_per_s']:,.0f} | "
                f"{m['eval_images_per_s']:,.0f} | {m['floor_ratio']:.2f} |"
            )
    report.set("make bench", lines)


def seeds_eager(report: Report, args, base: list[str], work: Path) -> dict:
    runs = {f"seed {s}": train(work / f"eager_seed{s}", [*base, f"trainer.seed={s}"]) for s in range(args.seeds)}
    first = next(iter(runs.values()))
    report.set(
        f"cifar10_fast, {args.seeds} seeds, eager",
        [
            f"Command (seed 0): `{first['command']}`",
            "",
            "Test accuracy with flip TTA; training loop = results.json `train_seconds` (the loop, evaluation "
            "excluded); process = this script's clock from spawn to exit (interpreter start, imports, data "
            "load, loop, evaluation, saves).",
            "",
            *runs_table(runs),
        ],
    )
    return runs


def seeds_compiled(report: Report, args, base: list[str], work: Path, eager: dict) -> None:
    cache = {"TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache"), "TRITON_CACHE_DIR": str(work / "triton-cache")}
    compiled = [*base, "trainer.compile=true"]
    cold = train(work / "compiled_cold_seed0", [*compiled, "trainer.seed=0"], env=cache)
    warm = {
        f"seed {s}": train(work / f"compiled_seed{s}", [*compiled, f"trainer.seed={s}"], env=cache)
        for s in range(args.compile_seeds)
    }
    lines = [
        f"Command (seed 0): `{cold['command']}` with TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR set to "
        "fresh folders of this report.",
        "",
        "Cold: the caches empty, so its training loop includes compiling the training step (its evaluation "
        "compiles outside the loop, inside the process time). Warm: the same caches filled by the cold run "
        "(dynamo still traces in each process).",
        "",
        *runs_table({"cold cache, seed 0": cold}),
        "",
        *runs_table({f"warm cache, {k}": r for k, r in warm.items()}),
    ]
    ok = [r for r in warm.values() if "error" not in r]
    if "error" not in cold and ok and "error" not in warm.get("seed 0", {"error": 1}):
        compile_s = cold["train_seconds"] - warm["seed 0"]["train_seconds"]
        lines += [
            "",
            f"Compilation inside the training loop ≈ cold − warm seed 0 = {cold['train_seconds']:.2f} − "
            f"{warm['seed 0']['train_seconds']:.2f} = **{compile_s:.2f} s**; process time cold − warm: "
            f"{cold['process_s'] - warm['seed 0']['process_s']:.2f} s.",
        ]
    eager_ok = [r for r in eager.values() if "error" not in r]
    if eager_ok and ok:
        e = statistics.mean(r["train_seconds"] for r in eager_ok)
        c = statistics.mean(r["train_seconds"] for r in ok)
        lines += [
            f"Training loop, eager {e:.2f} s against compiled (warm) {c:.2f} s: {e / c:.2f}× "
            f"(means over {len(eager_ok)} and {len(ok)} seeds)."
        ]
    report.set("torch.compile against eager", lines)


def sigterm_resume(report: Report, base: list[str], work: Path, reference: dict) -> None:
    run_dir = work / "sigterm_seed0"
    overrides = [*base, "trainer.seed=0"]
    cmd = train_command(run_dir, overrides)
    title = "SIGTERM and resume"
    if "error" in reference:
        report.set(title, [f"not run: the uninterrupted seed-0 run failed ({reference['error']})"])
        return
    at_step = max(1, reference["steps"] // 3)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log, deadline, sent = run_dir / "metrics.jsonl", time.time() + 900, False
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and any(
            json.loads(x).get("step", 0) >= at_step for x in log.read_text().splitlines() if x.strip()
        ):
            proc.send_signal(signal.SIGTERM)
            sent = True
            break
        time.sleep(0.005)
    out, _ = proc.communicate(timeout=900)
    ckpt = run_dir / "checkpoints" / "last.pt"
    saved = torch.load(ckpt, weights_only=True)["state"]["step"] if ckpt.is_file() else None
    lines = [
        f"Command: `{shlex.join(cmd)}`, SIGTERM once metrics.jsonl logged step ≥ {at_step} "
        f"(signal sent: {sent}); exit code **{proc.returncode}** (143 expected); checkpoint at step {saved}; "
        f"`{last_line(out)}`"
    ]
    resumed = train_resume(run_dir, overrides)
    if "error" in resumed:
        lines.append(f"resume FAILED: {resumed['error']}")
    else:
        same = metrics_lrs(run_dir) == metrics_lrs(Path(reference["run_dir"]))
        lines += [
            f"Resumed in place (`resume=auto`): {resumed['steps']} steps, test accuracy "
            f"{100 * resumed['final_test_acc']:.2f}% (uninterrupted seed 0: {100 * reference['final_test_acc']:.2f}%;"
            " CUDA kernels are not deterministic unless trainer.deterministic=true, so these may differ).",
            f"lr at every logged step equal to the uninterrupted run's: **{'yes' if same else 'NO'}** "
            f"({len(metrics_lrs(run_dir))} logged steps).",
        ]
    report.set(title, lines)


def train_resume(run_dir: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}", "trainer.progress=false"]
    code, out, seconds = run_cmd(cmd)
    if code != 0 or "resumed from" not in out:
        return {"error": f"exit {code}: {last_line(out)}"}
    return {**json.loads((run_dir / "results.json").read_text()), "process_s": seconds}


def ablations(report: Report, args, base: list[str], work: Path, eager: dict, started: float) -> None:
    longest = max(r["process_s"] for r in eager.values())
    done: dict[str, dict] = {name: {} for name in ABLATIONS}
    stopped_by_budget = False
    for seed in range(args.ablation_seeds):
        for name, override in ABLATIONS.items():
            if time.perf_counter() - started + 1.5 * longest > args.budget_s:
                stopped_by_budget = True
                break
            slug = re.sub(r"[^a-z0-9]+", "_", name).strip("_")
            done[name][seed] = train(work / f"ablation_{slug}_seed{seed}", [*base, override, f"trainer.seed={seed}"])
        if stopped_by_budget:
            break
    lines = [
        "Each row turns one trick off; seed k is paired with seed k of the eager runs. Δ = ablated − "
        "baseline over the same seeds (negative: the trick helps). With few seeds a Δ smaller than about "
        "two standard deviations of the eager runs is noise.",
        "",
        "| ablation | override | seeds | test acc | Δ acc (points) | training loop s | Δ loop s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, override in ABLATIONS.items():
        runs = {s: r for s, r in done[name].items() if "error" not in r and "error" not in eager[f"seed {s}"]}
        failed = [f"seed {s}: {r['error']}" for s, r in done[name].items() if "error" in r]
        if not runs:
            lines.append(
                f"| {name} | `{override}` | 0 | not run{' (time budget)' if not failed else ''} "
                f"{'; '.join(failed)} | | | |"
            )
            continue
        acc = [r["final_test_acc"] for r in runs.values()]
        base_acc = [eager[f"seed {s}"]["final_test_acc"] for s in runs]
        loop = [r["train_seconds"] for r in runs.values()]
        base_loop = [eager[f"seed {s}"]["train_seconds"] for s in runs]
        lines.append(
            f"| {name} | `{override}` | {len(runs)} | {pct(acc)} | "
            f"{100 * (statistics.mean(acc) - statistics.mean(base_acc)):+.2f} | {mean_std(loop)} | "
            f"{statistics.mean(loop) - statistics.mean(base_loop):+.2f} |"
        )
    lines += [
        "",
        "torch.compile: see the section above. EMA: the template has no weight averaging, so it is not ablated.",
    ]
    if stopped_by_budget:
        lines.append(f"Stopped by the time budget (--budget-s {args.budget_s:.0f}).")
    report.set("Ablations (one trick off at a time)", lines)


# --------------------------------------------------------------------------------------
def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    prov = provenance(device)
    name = prov["device"]
    if args.out is None:
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")
        args.out = (
            ROOT / "outputs" / "gpu-report-smoke.md" if args.smoke else ROOT / "docs" / "benchmarks" / f"{slug}.md"
        )
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    base = ["experiment=cifar10_fast", *(SMOKE_RECIPE if args.smoke else data_overrides(args))]
    if args.smoke:
        title = [
            "# SMOKE CHECK, NOT A BENCHMARK",
            "",
            "**This file comes from `--smoke`: a CPU, a width-8 model, synthetic data, 8 steps. It checks that "
            "`make gpu-report` runs end to end; none of its numbers says anything about a GPU or CIFAR-10.**",
        ]
    else:
        title = [f"# GPU report: {name}"]
    header = [
        *title,
        "",
        f"- command: `{prov['command']}`",
        f"- date: {prov['date_utc']}",
        f"- device: {name}" + (f", CUDA {prov['cuda']}, cuDNN {prov['cudnn']}" if prov["cuda"] else ""),
        f"- torch {prov['torch']}, Python {prov['python']}, git {prov['git']}",
        f"- data: {args.data if not args.smoke else 'synthetic'}; recipe: `{' '.join(base)}`",
        f"- run directories: {work}",
    ]
    report = Report(args.out, header)

    gpu_tier(report)
    bench(report, args, work)
    prep = train(
        work / "data_cache",
        [*base, "trainer.epochs=1", "trainer.limit_train_batches=1", "trainer.limit_eval_batches=1"],
    )
    report.set(
        "Data",
        [
            f"One short run (1 step, 1 evaluation batch) first builds the decoded-image cache and warms "
            f"the file cache: {prep['process_s']:.1f} s"
            + (f", FAILED: {prep['error']}" if "error" in prep else "")
            + ". Not part of any figure below."
        ],
    )
    eager = seeds_eager(report, args, base, work)
    for s, r in eager.items():
        r["run_dir"] = str(work / f"eager_seed{s.split()[-1]}")
    seeds_compiled(report, args, base, work, eager)
    sigterm_resume(report, base, work, eager["seed 0"])
    ablations(report, args, base, work, eager, started)
    report.set("Total", [f"{time.perf_counter() - started:.0f} s for the whole report."])
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
