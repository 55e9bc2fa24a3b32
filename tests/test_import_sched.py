"""`sched` is also a standard-library module: the project's must win wherever the project runs
in a checkout; an installed copy (`pip install .`) gives the scheduler as `seqlr`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = str(ROOT / "sched" / "__init__.py")
PRINT = "import sched, sys; print(sched.__file__); assert hasattr(sched, 'SequentialLR')"


def _py(args, cwd, **kw):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, **kw)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_in_pytest():
    import sched

    assert sched.__file__ == OURS


def test_python_from_the_root():
    assert _py(["-c", PRINT], ROOT).strip() == OURS


def test_python_from_elsewhere(tmp_path):
    """A launcher worker, a SLURM job or a notebook started in another directory."""
    out = _py(["-c", PRINT], tmp_path)
    if out.strip() != OURS:
        pytest.fail(f"{out.strip()} found first: run `make install` (it writes the .pth that puts the project first)")


def test_script_in_another_directory(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(PRINT + "\n")
    assert _py([str(script)], tmp_path).strip() == OURS


@pytest.mark.slow
def test_hydra_target_from_elsewhere(tmp_path):
    code = (
        "from hydra.utils import instantiate; from omegaconf import OmegaConf; import torch\n"
        "opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)\n"
        "cfg = OmegaConf.create({'_target_': 'sched.SequentialLR', '_partial_': True, 'milestones': [2],"
        " 'schedulers': [{'_target_': 'torch.optim.lr_scheduler.ConstantLR', '_partial_': True, 'factor': 0.5},"
        " {'_target_': 'torch.optim.lr_scheduler.ExponentialLR', '_partial_': True, 'gamma': 0.9}]})\n"
        "s = instantiate(cfg)(opt); print(type(s).__module__)\n"
    )
    assert _py(["-c", code], tmp_path).strip() == "seqlr.sequential"


def test_sched_is_seqlr():
    import sched
    import seqlr

    assert sched.SequentialLR is seqlr.SequentialLR and sched.__all__ == seqlr.__all__


@pytest.mark.slow
def test_torchrun_worker(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(PRINT + "\n")
    out = _py(["-m", "torch.distributed.run", "--nproc_per_node=1", "--standalone", str(script)], tmp_path)
    assert OURS in out


@pytest.mark.slow
def test_nothing_the_project_imports_needs_the_standard_library_sched():
    code = (
        "import sys; import torch, torchvision, hydra, omegaconf, tqdm, PIL\n"
        "import imgcls.data, imgcls.models, imgcls.checkpoint, imgcls.config\n"
        "m = sys.modules.get('sched'); print(getattr(m, '__file__', None))\n"
    )
    out = _py(["-c", code], ROOT).strip()
    assert out in ("None", OURS), f"something imported the standard-library sched: {out}"


INSTALLED = """
import importlib.util, json, sys, sysconfig
import sched
from hydra.utils import instantiate
from omegaconf import OmegaConf
import torch
import seqlr
from seqlr import SequentialLR

opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
cfg = OmegaConf.create({"_target_": "seqlr.SequentialLR", "_partial_": True, "milestones": [2],
    "schedulers": [{"_target_": "torch.optim.lr_scheduler.ConstantLR", "_partial_": True, "factor": 0.5},
                   {"_target_": "torch.optim.lr_scheduler.ExponentialLR", "_partial_": True, "gamma": 0.9}]})
s = instantiate(cfg)(opt)
lrs = []
for _ in range(4):
    lrs.append(s.get_last_lr()[0]); opt.step(); s.step()
print(json.dumps({"seqlr": seqlr.__file__, "sched": sched.__file__, "cls": type(s).__module__,
                  "stdlib": sysconfig.get_paths()["stdlib"], "lrs": lrs}))
"""


@pytest.mark.slow
def test_installed_wheel_gives_seqlr_from_another_directory(tmp_path):
    """Build the wheel, install it (no editable link, no .pth to the checkout) into a fresh
    virtual environment whose other packages (torch, hydra) come from this one, and import the
    scheduler from another directory, also as a Hydra ``_target_``."""
    import shutil
    import sysconfig

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "seqlr", "sched", "imgcls"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next((tmp_path / "dist").glob("*.whl"))
    fresh = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True, timeout=120)
    python = fresh / "bin" / "python"
    subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # torch, hydra, omegaconf from this environment: a plain path entry (its .pth files, the
    # editable link and the checkout-first line among them, are not processed).
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = json.loads(_py_with(python, ["-c", INSTALLED], elsewhere).strip().splitlines()[-1])
    assert out["seqlr"].startswith(str(site)), out
    assert out["cls"] == "seqlr.sequential"
    assert out["lrs"] == pytest.approx([0.05, 0.05, 0.1, 0.09])
    # The installed `sched` is behind the standard library's, as the README says.
    assert out["sched"].startswith(out["stdlib"]), out


def _py_with(python, args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
