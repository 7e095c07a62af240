"""The package's layout rules (docs/architecture.md), checked on the import graph: data flows
one way, models stay pure PyTorch, serving never pulls in Ray Train, modules stay small."""

import ast
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "t2i"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            # `from t2i.data import shapes`: the submodule is what gets imported
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: {m for m in imports_of(path) if m in MODULES or not m.startswith("t2i")}
         for name, path in MODULES.items()}


def reachable(start: str) -> set[str]:
    """Every module ``start`` loads, transitively through t2i's own modules."""
    seen, todo = set(), [start]
    while todo:
        for target in GRAPH.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                if target in MODULES:
                    todo.append(target)
    return seen


def under(modules: set[str], prefix: str) -> set[str]:
    return {m for m in modules if m == prefix or m.startswith(prefix + ".")}


def test_the_layout_rules_see_every_package():
    packages = {name.split(".")[1] for name in MODULES if name.count(".") >= 1}
    assert {"data", "models", "training", "runtime", "evaluation", "serving", "generation"} <= packages


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("t2i.models")))
def test_models_import_neither_ray_nor_data_code(name):
    loaded = reachable(name)
    assert not under(loaded, "ray") and not under(loaded, "t2i.data"), sorted(under(loaded, "ray") | under(loaded, "t2i.data"))


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("t2i.serving")))
def test_serving_never_loads_ray_train(name):
    assert not under(reachable(name), "ray.train")


@pytest.mark.parametrize("name", ["t2i.data.dataset", "t2i.data.feed"])
def test_the_data_read_path_never_loads_the_writer(name):
    assert "t2i.data.prepare" not in reachable(name)


def test_evaluation_and_generation_run_without_ray():
    for name in under(set(MODULES), "t2i.evaluation") | under(set(MODULES), "t2i.generation"):
        if name != "t2i.evaluation.table2":  # trains missing rows through the driver, imported lazily
            assert not under(reachable(name), "ray"), name


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_grows_past_its_size(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES
