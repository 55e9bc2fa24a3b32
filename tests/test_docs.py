"""Every command of README.md and docs/*.md is checked, so the docs cannot rot.

The rule (docs/tests.md, "The docs are tested"): each ```bash block is read line by line (a
trailing backslash continues a line, # starts a comment, leading VAR=value settings are dropped).
A block right after the line `<!-- docs-test: run -->` runs for real, in order, in a scratch
directory shared by the run blocks of its page (CPU-sized commands only). Every other command is
checked without a long run: train.py's overrides compose as its start-up composes them; preview's
options parse and its overrides compose; evaluate's and predict's arguments are accepted; make
targets exist; pip extras exist; files named exist. A ```yaml block whose first line is
`# conf/<path>.yaml` and a `cp conf/... conf/...` command write into a scratch copy of conf/
that the page's later commands compose with ("Make it yours"). Anything else fails until a rule
is added here.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import imgcls.config
from tests.conftest import ROOT

RUN_MARKER = "<!-- docs-test: run -->"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>\w+)\n(?P<body>.*?)^(?P=indent)```$", re.M | re.S)
PYTHONS = {"python", "python3", ".venv/bin/python"}
PREVIEW_FLAGS_WITH_VALUE = {"--out", "--steps-per-epoch", "--every"}


def blocks(page: Path):
    """(language, run?, lines) of each fenced block of a page, in order."""
    text = page.read_text()
    for m in BLOCK.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        body = "\n".join(line[len(m["indent"]) :] for line in m["body"].splitlines())
        yield m["lang"], before == RUN_MARKER, body


def commands(body: str) -> list[list[str]]:
    """The commands of a bash block as argument lists (quotes removed, comments dropped)."""
    out, pending = [], ""
    for line in body.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        argv = shlex.split(pending + line, comments=True)
        pending = ""
        while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):  # OMP_NUM_THREADS=1 python ...
            argv = argv[1:]
        if argv:
            out.append(argv)
    return out


def make_targets() -> set[str]:
    listed = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"^\s*make (\S+)", listed, re.M))


def extras() -> set[str]:
    from setuptools.config.pyprojecttoml import read_configuration  # tomllib is 3.11+

    return set(read_configuration(ROOT / "pyproject.toml")["project"]["optional-dependencies"])


def call(fn, *args) -> tuple[int, str]:
    """fn(*args) in this process: (exit code, stdout + stderr)."""
    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            result = fn(*args)
            code = result if isinstance(result, int) else 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue()


def compose(overrides: list[str]) -> tuple[int, str]:
    """train.py's start-up composition (imgcls.config.preflight; -m: the sweep's first job)."""
    return call(imgcls.config.preflight, overrides)


def train_cli(argv: list[str]) -> tuple[int, str]:
    import train

    saved, sys.argv = sys.argv, ["train.py", *argv]
    try:
        return call(train.cli)
    finally:
        sys.argv = saved


def compose_preview(args: list[str], module: str = "imgcls.preview") -> tuple[int, str]:
    """preview's (or lr_find's) options parse (its parser exits 2 on one it does not take) and its
    overrides compose."""
    import importlib

    parse_args = importlib.import_module(module).parse_args
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            overrides = parse_args([*args, "--no-plot"] if module == "imgcls.preview" else args).overrides
    except SystemExit as e:
        return e.code, err.getvalue()
    return compose(overrides)


def module_main(module: str):
    import importlib

    return importlib.import_module(module).main


def check(argv: list[str], run: bool, conf: Path) -> str | None:
    """None if the command is fine, else what is wrong."""
    words = list(argv)
    if {"&&", "||", "|", ";"} & set(words):
        return "one command per line (no &&, ||, | or ;)"
    if words[0] == "srun" and not run:  # srun --option=value ... COMMAND: the command, checked as below
        return check(next(words[i:] for i, w in enumerate(words) if i and not w.startswith("-")), run, conf)
    if words[0] in PYTHONS and words[1:2] == ["train.py"]:
        code, out = train_cli(words[2:]) if run else compose(words[2:])
        return None if code == 0 else f"exit {code}: {out.strip()[-600:]}"
    if words[0] == "torchrun":
        script = next(i for i, w in enumerate(words) if w.endswith(".py"))
        code, out = compose(words[script + 1 :])
        return None if code == 0 else f"exit {code}: {out.strip()[-600:]}"
    if words[0] in PYTHONS and words[1:2] == ["-m"] and words[2] in ("imgcls.preview", "imgcls.lr_find"):
        if run:
            code, out = call(module_main(words[2]), words[3:])
        else:
            code, out = compose_preview(words[3:], words[2])
        return None if code == 0 else f"exit {code}: {out.strip()[-600:]}"
    if words[0] in PYTHONS and words[1:2] == ["-m"] and words[2] in ("imgcls.evaluate", "imgcls.predict"):
        code, out = call(module_main(words[2]), words[3:])
        if run:
            return None if code == 0 else f"exit {code}: {out.strip()[-600:]}"
        # Not run: in an empty directory the checkpoint is absent; that must be the only complaint.
        if code == 0 or "is not accepted" in out or "checkpoint" not in out:
            return f"exit {code}: {out.strip()[-600:]}"
        return None
    if words[0] in PYTHONS and words[1:3] == ["-m", "imgcls.plot"]:
        # In an empty directory the runs are absent: that must be the only complaint.
        code, out = call(module_main("imgcls.plot"), words[3:])
        if run:
            return None if code == 0 else f"exit {code}: {out.strip()[-600:]}"
        return None if code == 2 and "has no metrics.jsonl" in out else f"exit {code}: {out.strip()[-600:]}"
    if words[0] == "make":
        target = next((w for w in words[1:] if "=" not in w), "help")
        if target not in make_targets():
            return f"make {target}: not a target `make help` lists"
        args = next((w.split("=", 1)[1].split() for w in words[1:] if w.startswith("ARGS=")), [])
        if target == "train":
            code, out = compose(args)
        elif target == "preview":
            code, out = compose_preview(args)
        else:
            return None
        return None if code == 0 else f"exit {code}: {out.strip()[-600:]}"
    if words[0] == "pip" or words[1:3] == ["-m", "pip"]:
        named = {e for w in words if (m := re.fullmatch(r"\.\[(.*)\]", w)) for e in m[1].split(",")}
        missing = named - extras()
        return f"no such extra in pyproject.toml: {sorted(missing)}" if missing or not named else None
    if words[0] == "cp" and len(words) == 3 and all(w.startswith("conf/") for w in words[1:]):
        if not (conf / words[1][5:]).is_file():
            return f"no such file: {words[1]}"
        (conf / words[2][5:]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(conf / words[1][5:], conf / words[2][5:])
        return None
    if words[0].endswith("pre-commit"):
        return None if (ROOT / ".pre-commit-config.yaml").is_file() else "no .pre-commit-config.yaml"
    files = [w.split("::")[0] for w in words[1:] if re.search(r"\.(py|sh)$|^tests/|^\.ci/", w.split("::")[0])]
    missing = [f for f in files if not (ROOT / f).exists()]
    if words[0] == "pytest" or (words[0] in PYTHONS and words[1:3] == ["-m", "pytest"]):
        return f"no such file: {missing}" if missing else None  # no file: the whole suite
    if words[0] == "bash" or (words[0] in PYTHONS and files):
        return f"no such file: {missing}" if missing or not files else None
    return "no rule in tests/test_docs.py for this command"


def test_every_page_has_a_command():
    """The extraction itself can fail: a page's fences are found, and the README runs its quick start."""
    readme = list(blocks(ROOT / "README.md"))
    assert sum(lang == "bash" for lang, _, _ in readme) >= 10
    assert any(run for _, run, _ in readme), f"the README's quick start lost its {RUN_MARKER} line"


@pytest.mark.parametrize(
    "page",
    # The README's quick start trains two smoke runs (~15 s on a 2-core CPU); a page of
    # composed commands takes about a second.
    [pytest.param(p, marks=pytest.mark.slow) if any(run for _, run, _ in blocks(p)) else p for p in PAGES],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_every_command_of_the_page(page, tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    monkeypatch.setattr(imgcls.config, "CONF_DIR", conf)  # "Make it yours" adds options here
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    scratch = tmp_path / "run"  # relative paths of the run blocks land here
    empty = tmp_path / "empty"  # commands checked without running see no outputs/
    scratch.mkdir()
    empty.mkdir()
    failures, checked = [], 0
    for lang, run, body in blocks(page):
        first = body.splitlines()[0] if body else ""
        if lang == "yaml" and (m := re.fullmatch(r"# conf/(\S+\.yaml)", first.strip())):
            (conf / m[1]).parent.mkdir(parents=True, exist_ok=True)
            (conf / m[1]).write_text(body)
            continue
        if lang != "bash":
            continue
        for argv in commands(body):
            monkeypatch.chdir(scratch if run else empty)
            why = check(argv, run, conf)
            checked += 1
            if why is not None:
                failures.append(f"{shlex.join(argv)}\n    -> {why}")
    monkeypatch.chdir(ROOT)
    assert not failures, f"{page.relative_to(ROOT)}: {len(failures)} of {checked} commands fail:\n" + "\n".join(
        failures
    )


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_resolves():
    """Relative links of README.md and docs/*.md name files that exist, and headings that exist."""
    broken = []
    for page in PAGES:
        for target, anchor in re.findall(r"\]\((?!https?:)([^)#\s]*)(?:#([^)\s]+))?\)", page.read_text()):
            path = (page.parent / target).resolve() if target else page
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} does not exist")
            elif anchor and path.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", path.read_text(), re.M)
                if anchor not in {slug(h) for h in headings}:
                    broken.append(f"{page.relative_to(ROOT)}: {target}#{anchor}: no such heading")
    assert not broken, "\n".join(broken)


def test_readme_is_a_front_door():
    """Issue 21's measure: at most 300 lines, at least a quarter of them runnable code (the lines
    inside bash, python and yaml blocks; the file tree is not counted)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    code = sum(
        len(body.splitlines()) for lang, _, body in blocks(ROOT / "README.md") if lang in ("bash", "python", "yaml")
    )
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; the depth belongs in docs/"
    assert code / len(lines) >= 0.25, (
        f"README.md: {code} of {len(lines)} lines are runnable code ({code / len(lines):.0%})"
    )
