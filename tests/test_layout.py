"""The import contract: arrows point down, and nothing imports in a circle.

A short AST walk over every project module (imports inside functions included), so the
layering in docs/architecture.md stays true without a third-party tool:

    engine.cli (the command line: main, demo)
        -> loadtest (load tools) -> engine.app (serving shell: service, server, ray_app,
           client, ready line) -> engine.store, stages -> engine.core -> indexes
        -> model_export (offline: data, training, export, eval) -> engine.store, stages, engine.core
    protos stand alone

Stage kinds are plugins: the registry finds the `stages` package by name at run time
(engine.core.registry.STAGE_PACKAGES), not by an import.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "stages", "indexes", "model_export", "loadtest", "protos")

# room -> rooms it may import (besides itself)
ALLOWED = {
    "engine.core": {"indexes", "engine"},
    "engine.store": {"engine.core", "engine"},
    "stages": {"engine.core", "engine"},
    "indexes": set(),
    "protos": set(),
    "model_export": {"engine.core", "engine.store", "stages", "indexes", "engine"},
    "engine.app": {"engine.core", "engine.store", "stages", "indexes", "protos", "engine"},
    "loadtest": {"engine.app", "engine.core", "engine.store", "stages", "indexes", "model_export", "protos",
                 "engine"},
    "engine.cli": {"engine.app", "engine.core", "engine.store", "stages", "indexes", "model_export", "loadtest",
                   "protos", "engine"},
    "engine": set(),
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            if "_gen" in parts:
                continue
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `name` imports, resolved to the longest known module name."""
    found = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            parts = t.split(".")
            for i in range(len(parts), 0, -1):
                cand = ".".join(parts[:i])
                if cand in known:
                    if cand != name:
                        found.add(cand)
                    break
    return found


def _room(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "engine" and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on.discard(x)
                        comp.append(x)
                        if x == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif w not in index:
                index[w] = low[w] = counter[0]
                counter[0] += 1
                stack.append(w)
                on.add(w)
                work.append((w, iter(sorted(graph.get(w, ())))))
            elif w in on:
                low[v] = min(low[v], index[w])
    return out


def test_no_module_imports_in_a_circle():
    assert _cycles(_graph()) == []


def test_no_package_imports_in_a_circle():
    rooms: dict[str, set[str]] = {}
    for m, deps in _graph().items():
        rooms.setdefault(_room(m), set()).update(_room(d) for d in deps if _room(d) != _room(m))
    assert _cycles(rooms) == []


def test_arrows_point_down():
    wrong = sorted(f"{m} imports {d}" for m, deps in _graph().items() for d in deps
                   if _room(d) != _room(m) and _room(d) not in ALLOWED[_room(m)])
    assert wrong == []


def test_the_walk_sees_real_imports():
    """Guards the guard: a known downward arrow and a known module are found."""
    g = _graph()
    assert "engine.core.runner" in g and "engine.core.candidates" in g["engine.core.runner"]
    assert "engine.core.registry" in g["stages.filter"]
