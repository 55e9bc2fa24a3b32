"""`sched` is also a standard-library module: the project's must win wherever the project runs."""

from __future__ import annotations

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


def test_hydra_target_from_elsewhere(tmp_path):
    code = (
        "from hydra.utils import instantiate; from omegaconf import OmegaConf; import torch\n"
        "opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)\n"
        "cfg = OmegaConf.create({'_target_': 'sched.SequentialLR', '_partial_': True, 'milestones': [2],"
        " 'schedulers': [{'_target_': 'torch.optim.lr_scheduler.ConstantLR', '_partial_': True, 'factor': 0.5},"
        " {'_target_': 'torch.optim.lr_scheduler.ExponentialLR', '_partial_': True, 'gamma': 0.9}]})\n"
        "s = instantiate(cfg)(opt); print(type(s).__module__)\n"
    )
    assert _py(["-c", code], tmp_path).strip() == "sched.sequential"


def test_torchrun_worker(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(PRINT + "\n")
    out = _py(["-m", "torch.distributed.run", "--nproc_per_node=1", "--standalone", str(script)], tmp_path)
    assert OURS in out


def test_nothing_the_project_imports_needs_the_standard_library_sched():
    code = (
        "import sys; import torch, torchvision, hydra, omegaconf, tqdm, PIL\n"
        "import imgcls.data, imgcls.models, imgcls.checkpoint, imgcls.config\n"
        "m = sys.modules.get('sched'); print(getattr(m, '__file__', None))\n"
    )
    out = _py(["-c", code], ROOT).strip()
    assert out in ("None", OURS), f"something imported the standard-library sched: {out}"
