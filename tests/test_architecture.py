"""The rooms and their borders, read from the source's import statements (every import, at any depth, counts).

* ``planners/``, ``policies/``, ``ros_nodes/`` and ``ghil/`` run on a robot: they never import pybullet or
  ``sim_eval`` (privileged simulator code lives on the simulator side).
* The core (``ghil/``) imports no model room (``policies``, ``planners``, ``ros_nodes``): models plug in through
  configs and the ``ghil.models`` entry points.
* No import cycles between the project's modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ghil", "planners", "policies", "ros_nodes", "sim_eval")
ROBOT_SIDE = ("ghil", "planners", "policies", "ros_nodes")
SIMULATOR_ONLY = ("sim_eval", "pybullet", "pybullet_data", "calvin_env")
MODEL_ROOMS = ("policies", "planners", "ros_nodes")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module named by an import statement in ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            # `from pkg import mod` names the submodule when it is one of ours
            for alias in node.names:
                if (REPO / Path(*f"{base}.{alias.name}".split("."))).with_suffix(".py").exists():
                    found.add(f"{base}.{alias.name}")
    return found


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


SOURCES = _sources()
GRAPH = {name: {imp for imp in _imports(path) if imp.split(".")[0] in PACKAGES} for name, path in SOURCES.items()}


def _is_in(module: str, roots: tuple[str, ...]) -> bool:
    return any(module == r or module.startswith(r + ".") for r in roots)


@pytest.mark.parametrize("module", sorted(m for m in SOURCES if _is_in(m, ROBOT_SIDE)))
def test_robot_side_never_imports_the_simulator(module):
    bad = sorted(imp for imp in _imports(SOURCES[module]) if _is_in(imp, SIMULATOR_ONLY))
    assert not bad, f"{module} imports simulator-only code {bad}; privileged code belongs in sim_eval/"


@pytest.mark.parametrize("module", sorted(m for m in SOURCES if _is_in(m, ("ghil",))))
def test_the_core_names_no_model_room(module):
    bad = sorted(imp for imp in GRAPH[module] if _is_in(imp, MODEL_ROOMS))
    assert not bad, f"{module} imports {bad}: the core must not depend on a model room"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    # A package's __init__ re-exporting its own submodules is not a cycle of the design: drop those edges.
    graph = {m: {i for i in deps if not (SOURCES[m].name == "__init__.py" and i.startswith(m + "."))}
             for m, deps in GRAPH.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
