"""The house rules of DESIGN.md's layout, checked on the source: every import of an smviz module (at
module level and inside functions) goes to the same layer or below, no modules import each other in a
circle at run time (an import under `if TYPE_CHECKING:` runs for type checkers only), no `_name` is
imported from another module, and no module is over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "smviz"
MAX_LINES = 400

# DESIGN.md, "Layout (the house, series 2)": lowest first. Keys are module prefixes; the longest wins.
LAYERS = {
    "smviz.errors": 1, "smviz.config": 1, "smviz.io": 1, "smviz.lazy": 1, "smviz.device": 1, "smviz.distributed": 1, "smviz.workspace.layout": 1,
    "smviz.memory": 2, "smviz.kernels": 2,
    "smviz.model": 3,
    "smviz.data": 4,
    "smviz.record": 5, "smviz.trace": 5, "smviz.usage": 5,
    "smviz.stats": 6,
    "smviz.evaluate": 7,
    "smviz.train": 8,
    "smviz.analysis": 9,
    "smviz.figures": 10,
    "smviz.report": 11,
    "smviz.workspace.stages": 12, "smviz.workspace": 12,
    "smviz.cli": 13, "smviz.serve": 13, "smviz.__main__": 13, "smviz": 13,
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer_of(module: str) -> int:
    prefix = module
    while prefix:
        if prefix in LAYERS:
            return LAYERS[prefix]
        prefix = prefix.rpartition(".")[0]
    raise AssertionError(f"{module} has no layer in DESIGN.md's list; add it there and to LAYERS")


def existing(name: str) -> str:
    """The module an import statement names: the longest prefix of `name` that is a module."""
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (annotations only: nothing imported at run time)."""
    guarded = [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")]
    return {id(sub) for g in guarded for stmt in g.body for sub in ast.walk(stmt)}


def imports(module: str, *, runtime: bool = False) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every smviz import in `module`; `runtime`: only
    those executed at run time (not under `if TYPE_CHECKING:`)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_only(tree) if runtime else set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(existing(a.name), "", node.lineno) for a in node.names if a.name.split(".")[0] == "smviz"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "smviz":
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                target = full if full in MODULES else existing(source)
                found.append((target, "" if full in MODULES else alias.name, node.lineno))
    return found


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_upward_import():
    bad = [f"{m}:{line} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
           for m in MODULES for t, _, line in imports(m)
           # a package's __init__ may re-export its own modules, whatever their layer
           if layer_of(t) > layer_of(m) and not (MODULES[m].name == "__init__.py" and t.startswith(m + "."))]
    assert not bad, "imports from a higher layer:\n" + "\n".join(bad)


def test_no_private_import():
    bad = [f"{m}:{line} imports {name} from {t}" for m in MODULES for t, name, line in imports(m)
           if t != m and (name.startswith("_") or t.rpartition(".")[2].startswith("_") and t != "smviz.__main__")]
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


def test_no_import_circle():
    graph = {m: {t for t, _, _ in imports(m, runtime=True) if t != m} for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                circles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not circles, "import circles:\n" + "\n".join(circles)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module]} has {lines} lines (> {MAX_LINES}): split it into a package"


def test_no_unused_logger():
    """A module that makes a logger logs something with it (an unused one is dead code)."""
    bad = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        names = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                 if isinstance(t, ast.Name) and isinstance(node.value, ast.Call) and ast.unparse(node.value.func) == "logging.getLogger"}
        used = {n.value.id for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
        bad += [f"{module}: {name}" for name in names - used]
    assert not bad, "loggers made and never used:\n" + "\n".join(bad)


def test_the_checker_sees_violations(tmp_path):
    """The checks above find what they look for: an upward import inside a function, a circle, a private name."""
    pkg = tmp_path / "smviz"
    (pkg / "train").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("def f():\n    from smviz.train import x\n")
    (pkg / "train" / "__init__.py").write_text("from smviz.errors import _hidden\nimport smviz.memory\n")
    (pkg / "memory.py").write_text("import smviz.train\n")
    global MODULES
    saved = MODULES
    try:
        MODULES = {module_name(p, pkg): p for p in sorted(pkg.rglob("*.py"))}
        with pytest.raises(AssertionError, match="smviz.errors:2"):
            test_no_upward_import()
        with pytest.raises(AssertionError, match="_hidden"):
            test_no_private_import()
        with pytest.raises(AssertionError, match="smviz.train -> smviz.memory -> smviz.train"):
            test_no_import_circle()
    finally:
        MODULES = saved


@pytest.mark.parametrize("guarded", [True, False])
def test_an_import_for_type_checkers_only_makes_no_circle(tmp_path, guarded):
    pkg = tmp_path / "smviz"
    (pkg / "trace").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "trace" / "__init__.py").write_text("from smviz.trace.index import SlotIndex\n")
    back = "from smviz.trace import Trace\n"
    (pkg / "trace" / "index.py").write_text(
        "from typing import TYPE_CHECKING\n" + ("if TYPE_CHECKING:\n    " + back if guarded else back))
    global MODULES
    saved = MODULES
    try:
        MODULES = {module_name(p, pkg): p for p in sorted(pkg.rglob("*.py"))}
        if guarded:
            test_no_import_circle()
        else:
            with pytest.raises(AssertionError, match="smviz.trace -> smviz.trace.index -> smviz.trace"):
                test_no_import_circle()
    finally:
        MODULES = saved
