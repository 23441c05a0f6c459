"""The tree explains the architecture (docs/ARCHITECTURE.md): imports flow downward only, no
module imports a script, no import circles, and no function of product code is over 80 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

# The layers, top to bottom; a module may import its own layer or a lower one.
SCRIPTS = {"train", "generate", "evaluate", "export", "ablate", "gmm_exp", "preprocessing.encode"}
LAYERS = [
    ("scripts", lambda m: m in SCRIPTS or m.startswith(("tools.", "bench."))),
    ("training", lambda m: m == "training" or m.startswith("training.")),
    ("evaluation", lambda m: m == "evaluation" or m.startswith("evaluation.")),
    ("components", lambda m: m.split(".")[0] in {"losses", "models", "preprocessing", "samplers"}),
    ("base", lambda m: m in {"configs", "common", "runtime"}),
]
MAX_LINES = 80


def layer(module: str) -> int:
    for i, (_, test) in enumerate(LAYERS):
        if test(module):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py")


def product_modules() -> dict[str, Path]:
    """Every module of the product (tests excluded), by dotted name."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in {"tests", "docs"} or any(p.startswith(".") for p in rel.parts):
            continue
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


def project_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (relative imports resolved; ``from pkg import mod``
    counted as pkg.mod when that is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in [*parts, base] if p)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = product_modules()
    return {n: project_imports(n, p, set(mods)) for n, p in mods.items()}


def test_the_rule_has_teeth():
    """The checker sees a relative import and an upward one."""
    g = {"training.loop": project_imports("training.loop", ROOT / "training" / "loop.py",
                                          set(product_modules()))}
    assert "training.run" in g["training.loop"] and "common" in g["training.loop"]
    assert layer("train") < layer("training") < layer("evaluation") < layer("losses.terms")
    assert layer("preprocessing.encode") == 0 and layer("preprocessing.shards") == 3


def test_imports_flow_downward_and_no_module_imports_a_script(graph):
    bad = [f"{a} -> {b}" for a, deps in graph.items() for b in deps
           if b in SCRIPTS or layer(b) < layer(a)]
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_no_import_circles(graph):
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):]
                                                                      + [m, d]))
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_no_function_over_80_lines():
    long = []
    for name, path in product_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, "\n".join(long)
