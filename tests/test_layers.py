"""The import graph of imgcls/: layered as imgcls.LAYERS says, acyclic, and following the
import policy of imgcls/__init__.py. Reads the source with ast; imports nothing it checks."""

from __future__ import annotations

import ast
from pathlib import Path

import imgcls

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "imgcls"
HEAVY = ("torch", "numpy", "PIL", "torchvision", "matplotlib")  # not at start-up


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"}


def imported(node: ast.AST) -> list[str]:
    """Top-level package names (``torch``) and project modules (``imgcls.config``) of one import."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        if node.module == "imgcls":
            return [f"imgcls.{a.name}" for a in node.names]
        return [node.module]
    return []


def project(names: list[str]) -> set[str]:
    return {n.split(".")[1] for n in names if n.startswith("imgcls.")}


def graph(trees: dict[str, ast.Module], top_level_only: bool = False) -> dict[str, set[str]]:
    out = {}
    for name, tree in trees.items():
        nodes = tree.body if top_level_only else ast.walk(tree)
        out[name] = {m for node in nodes for m in project(imported(node))} & set(trees)
    return out


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``g`` as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == "open":
                return stack[stack.index(m) :] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(g):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_has_one_layer():
    placed = [m for layer in imgcls.LAYERS for m in layer]
    assert len(placed) == len(set(placed)), "a module is in two layers of imgcls.LAYERS"
    assert set(placed) == set(modules()), "imgcls.LAYERS must list every module of imgcls/ exactly once"


def test_imports_form_no_cycle():
    cycle = find_cycle(graph(modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down_the_layers():
    level = {m: i for i, layer in enumerate(imgcls.LAYERS) for m in layer}
    upward = [
        f"imgcls.{a} (layer {level[a]}) imports imgcls.{b} (layer {level[b]})"
        for a, targets in graph(modules()).items()
        for b in sorted(targets)
        if level[b] >= level[a]
    ]
    assert not upward, "; ".join(upward)


def start_up_modules(trees: dict[str, ast.Module]) -> set[str]:
    """What ``python train.py --help`` imports of imgcls/: train.py's top-level imports and theirs."""
    top = graph(trees, top_level_only=True)
    train = ast.parse((ROOT / "train.py").read_text())
    todo = [m for node in train.body for m in project(imported(node))]
    seen: set[str] = set()
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(top[m])
    return seen


def test_start_up_modules_import_no_torch_at_the_top():
    trees = modules()
    start = start_up_modules(trees)
    assert {"config", "exits"} <= start  # the walk works
    heavy = [
        f"imgcls/{m}.py imports {name} at the top"
        for m in sorted(start)
        for node in trees[m].body
        for name in imported(node)
        if name.split(".")[0] in HEAVY
    ]
    assert not heavy, "; ".join(heavy) + " (train.py --help would load it: import it where it is used)"


def test_other_modules_import_the_project_at_the_top():
    trees = modules()
    start = start_up_modules(trees)
    inner = [
        f"imgcls/{m}.py imports imgcls.{name} inside a function"
        for m, tree in trees.items()
        if m not in start
        for node in ast.walk(tree)
        if node not in tree.body
        for name in sorted(project(imported(node)))
    ]
    assert not inner, "; ".join(inner) + " (only start-up modules import lazily: imgcls/__init__.py)"


def test_one_loss_definition():
    """Training, evaluation and the benchmarks take their loss from imgcls/loss.py only."""
    sources = [ROOT / "train.py", *PACKAGE.glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    elsewhere = [
        str(p.relative_to(ROOT))
        for p in sources
        if p.name != "loss.py" and ("cross_entropy" in p.read_text() or "CrossEntropyLoss" in p.read_text())
    ]
    assert not elsewhere, f"a loss defined outside imgcls/loss.py: {elsewhere}"
