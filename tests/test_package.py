"""The package as a next engineer meets it: no import circle, and importing a module changes nothing else."""

from __future__ import annotations

import ast
import subprocess
import sys

from .conftest import REPO

PACKAGE = REPO / "ensemble"


def imports_of(module: str) -> set[str]:
    """The ensemble modules a module imports, anywhere in it (inside functions too)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ensemble"):
            found |= (
                {node.module.removeprefix("ensemble.")} if node.module != "ensemble" else {a.name for a in node.names}
            )
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("ensemble.") for a in node.names if a.name.startswith("ensemble.")}
    return found


def test_the_package_has_no_import_circle() -> None:
    graph = {path.stem: imports_of(path.stem) for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, f"import circle: {' -> '.join([*path, module])}"
        if module in done:
            return
        for imported in graph.get(module, ()):
            visit(imported, [*path, module])
        done.add(module)

    for module in graph:
        visit(module, [])


# The libraries first (TensorFlow, Ray and h5py set variables of their own when imported), then the package.
IMPORT_ALL = """
import os, sys, matplotlib
matplotlib.use("svg")
import keras, tensorflow, jax, ray, ray.train, ray.tune, ray.tune.search.optuna, optuna, sklearn, scipy, pyarrow.csv
import tensorboardX, mlxtend.data
before = dict(os.environ)
import pkgutil, importlib, ensemble
names = [m.name for m in pkgutil.iter_modules(ensemble.__path__)]
for name in names:
    importlib.import_module(f"ensemble.{name}")
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(len(names), changed, matplotlib.get_backend())
"""


def test_importing_any_module_leaves_the_environment_and_matplotlib_alone() -> None:
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    count, changed, backend = result.stdout.strip().rsplit("\n", 1)[-1].split(" ", 2)
    assert int(count) >= 15 and changed == "[]" and backend == "svg", result.stdout
