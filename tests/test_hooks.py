"""A fork's own checks, run offline: the CI workflow passes actionlint and tests the Python
versions pyproject.toml claims by running the README's `make test`; `pre-commit run
--all-files` (local hooks only) passes on a scratch copy of this work tree, and fails on a
trailing space and on a file over the size limit."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT

BIN = Path(sys.executable).parent  # the environment's scripts: actionlint, pre-commit
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


def tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{path} is missing: `make install` installs it (pyproject.toml's dev extra)"
    return str(path)


def test_workflow_passes_actionlint():
    proc = subprocess.run([tool("actionlint"), str(WORKFLOW)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_finds_a_broken_workflow(tmp_path):
    """The check above can fail: an unknown matrix key and a bad expression are reported."""
    bad = WORKFLOW.read_text().replace("matrix.python-version", "matrix.python_versoin")
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    (tmp_path / ".github" / "workflows" / "ci.yml").write_text(bad)
    proc = subprocess.run(
        [tool("actionlint"), ".github/workflows/ci.yml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "python_versoin" in proc.stdout, proc.stdout + proc.stderr


def test_workflow_runs_make_test_on_the_claimed_pythons():
    from setuptools.config.pyprojecttoml import read_configuration  # tomllib is 3.11+

    project = read_configuration(ROOT / "pyproject.toml")["project"]
    claimed = sorted(
        c.rsplit(" :: ", 1)[1]
        for c in project["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    )
    job = yaml.safe_load(WORKFLOW.read_text())["jobs"]["test"]
    assert sorted(job["strategy"]["matrix"]["python-version"]) == claimed
    assert project["requires-python"] == f">={claimed[0]}", "the oldest version tested is the oldest accepted"
    setup = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python"))
    assert setup["with"]["cache"] == "pip"
    assert [s["run"] for s in job["steps"] if "run" in s] == ["make test"], "CI runs what the README says"


def scratch_copy(dest: Path) -> Path:
    """The work tree's files as git sees them (tracked, and new files not ignored), in a fresh
    repository; .venv is linked, as `make install` would have made it there."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():  # a deleted, not yet committed file is still listed
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    return dest


def pre_commit(repo: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PRE_COMMIT_HOME": str(home), "NO_COLOR": "1"}
    return subprocess.run(
        [tool("pre-commit"), "run", "--all-files", "--color", "never"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )


def test_pre_commit_passes_offline_and_catches_what_it_should(tmp_path):
    repo = scratch_copy(tmp_path / "repo")
    proc = pre_commit(repo, tmp_path / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for hook in ("ruff check", "ruff format", "no trailing whitespace", "no file over 500 KB"):
        assert re.search(rf"^{re.escape(hook)}\.+Passed$", proc.stdout, re.M), proc.stdout

    (repo / "notes.md").write_text("a trailing space \n")
    (repo / "weights.bin").write_bytes(b"\0" * 600 * 1024)
    (repo / "sloppy.py").write_text("import os\nx=1\n")  # an unused import; not formatted
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    proc = pre_commit(repo, tmp_path / "home")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "notes.md:1:a trailing space" in proc.stdout, proc.stdout
    assert "weights.bin: 600 KB is over the 500 KB limit" in proc.stdout, proc.stdout
    assert re.search(r"^ruff check\.+Failed$", proc.stdout, re.M) and "F401" in proc.stdout, proc.stdout
    assert re.search(r"^ruff format\.+Failed$", proc.stdout, re.M), proc.stdout


def test_make_help_lists_every_target():
    makefile = (ROOT / "Makefile").read_text()
    phony = set(re.search(r"^\.PHONY:(.*)$", makefile, re.M)[1].split())
    defined = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    listed = set(
        re.findall(
            r"^\s*make (\S+)",
            subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True).stdout,
            re.M,
        )
    )
    assert defined <= phony, f"targets missing from .PHONY: {sorted(defined - phony)}"
    assert listed == phony, f"make help lists {sorted(listed)}; the targets are {sorted(phony)}"
