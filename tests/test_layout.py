"""The package layout as a contract, read from the source: layering, no import cycle, no private name shared.

- ``rtl_kernels`` never imports ``rtl`` (not even inside a function);
- the method (``rtl`` outside ``rtl.experiments`` and the CLI) never imports the reproduction;
- the modules of ``rtl`` import each other without a cycle at module level;
- no module imports another module's private name (``from .x import _y``); private submodules of a package
  (``from . import _checks``) are the package's own business and allowed;
- the reproduction (``rtl.experiments``, ``rtl.cli``) uses the method's public API only: every name it imports from
  a method module is in that module's ``__all__``.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rtl", "rtl_kernels")
REPRODUCTION = ("rtl.experiments", "rtl.cli", "rtl.__main__")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, level: int, target: str) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(module: str, top_level_only: bool) -> Iterator[Tuple[str, List[str], int]]:
    """(imported module, names imported from it, line) for every import statement of ``module``."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            yield _resolve(module, node.level, node.module or ""), [a.name for a in node.names], node.lineno


def _internal(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _in_reproduction(module: str) -> bool:
    return any(module == r or module.startswith(r + ".") for r in REPRODUCTION)


def test_the_source_tree_is_read():
    assert {"rtl.nn", "rtl.train", "rtl.experiments.protocol", "rtl_kernels.linear"} <= set(MODULES)


def test_rtl_kernels_never_imports_rtl():
    found = [
        f"{m}:{line} imports {target}"
        for m in MODULES
        if m.startswith("rtl_kernels")
        for target, _, line in _imports(m, top_level_only=False)
        if target == "rtl" or target.startswith("rtl.")
    ]
    assert found == []


def test_the_method_never_imports_the_reproduction():
    found = []
    for m in MODULES:
        if not m.startswith("rtl.") or _in_reproduction(m):
            continue
        for target, names, line in _imports(m, top_level_only=False):
            full = [target] + [f"{target}.{n}" for n in names]
            if any(_in_reproduction(t) for t in full):
                found.append(f"{m}:{line} imports {target}")
    assert found == []


def _submodule_targets(target: str, names: List[str]) -> Set[str]:
    """The internal modules an import statement loads: the target, and the names that are submodules of it."""
    out = {target} if target in MODULES else set()
    out |= {f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES}
    return out


def test_no_import_cycle_at_module_level():
    graph: Dict[str, Set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, names, _ in _imports(m, top_level_only=True):
            if _internal(target):
                # a package's __init__ importing its own submodules is how packages are built, not a cycle
                graph[m] |= {t for t in _submodule_targets(target, names) if t != m and not m.startswith(t + ".")}
    cycles = []
    state: Dict[str, int] = {}

    def visit(node: str, path: List[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_no_private_name_is_imported_across_modules():
    found = []
    for m in MODULES:
        for target, names, line in _imports(m, top_level_only=False):
            if not _internal(target):
                continue
            for n in names:
                if n.startswith("_") and f"{target}.{n}" not in MODULES and n != "__version__":
                    found.append(f"{m}:{line} imports {n} from {target}")
    assert found == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _in_reproduction(m)))
def test_the_reproduction_uses_the_public_api_of_the_method(module):
    found = []
    for target, names, line in _imports(module, top_level_only=False):
        if not target.startswith("rtl") or _in_reproduction(target) or target in ("rtl", "rtl_kernels"):
            continue
        if target.startswith("rtl_kernels"):
            public = set(getattr(importlib.import_module(target), "__all__", ()))
        else:
            public = set(importlib.import_module(target).__all__)
        for n in names:
            if f"{target}.{n}" not in MODULES and n not in public:
                found.append(f"{module}:{line} imports {n} from {target}, which {target}.__all__ does not list")
    assert found == []
