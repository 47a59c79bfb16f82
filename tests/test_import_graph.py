"""The import graph of `longrl` points one way (../shared/DESIGN.md, "Arrows point one way").

Imports are read with `ast` from every module of src/longrl, at module level and inside
functions alike (a lazy import inside a function is still an edge: it only hides a cycle
until the function runs). Relative imports are resolved against the importing module.

Checked here:
- no import cycle among longrl's modules;
- `rl`, `rewards`, `media` and `data` import no recipe, no rollout engine, no policy;
  `data` imports no reward code either, and `rl` no model;
- `rollout` imports neither `rl` nor `recipes`;
- nothing outside `longrl.bench` imports a benchmark;
- no module imports another module's private (`_name`) function or class.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "longrl"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, known: set[str]) -> list[tuple[str, str | None, int]]:
    """(imported longrl module, imported name or None, line) for every import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "longrl"]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            if target.split(".")[0] != "longrl":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                # `from longrl.x import y` imports module longrl.x.y when y is a submodule
                out.append((sub, None, node.lineno) if sub in known else (target, a.name, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        for target, _, _ in _imports(m, path, known):
            # importing longrl.a.b also runs longrl.a's __init__; the edge that matters is to b
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != m:
                graph[m].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def _layer(module: str) -> str:
    """'longrl.rollout.hf' -> 'rollout'; top-level modules ('longrl.config') -> their name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


FORBIDDEN = {
    # DESIGN.md: rl, rewards, media and data import no recipe, no engine, no policy
    **{low: {"recipes", "rollout", "policy", "bench"} for low in ("rl", "rewards", "media", "data")},
    # data sits below rewards: the scorer is chosen above both (recipes/tasks.py)
    "data": {"recipes", "rollout", "policy", "bench", "rewards"},
    # rl is pure tensor functions: it knows no model
    "rl": {"recipes", "rollout", "policy", "bench", "models"},
    # rollout knows nothing of losses (rl) or of the loops above it
    "rollout": {"rl", "recipes", "bench"},
}


def test_helpers_see_a_planted_cycle_and_a_planted_private_import(tmp_path):
    """The checks below can fail: a two-module cycle and a private import are found."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from longrl.x import _hidden, shown\n    from . import y\n")
    found = _imports("longrl.pkg.m", f, known={"longrl.x", "longrl.pkg.y"})
    assert (("longrl.x", "_hidden", 2) in found and ("longrl.x", "shown", 2) in found
            and ("longrl.pkg.y", None, 3) in found)


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles in longrl: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_point_one_way(layer):
    bad = [f"{m} imports {t}" for m, targets in _graph().items() if _layer(m) == layer
           for t in sorted(targets) if _layer(t) in FORBIDDEN[layer]]
    assert not bad, f"{layer}/ must not import {sorted(FORBIDDEN[layer])}: " + "; ".join(bad)


def test_library_never_imports_a_benchmark():
    bad = [f"{m} imports {t}" for m, targets in _graph().items() if _layer(m) != "bench"
           for t in sorted(targets) if _layer(t) == "bench"]
    assert not bad, "; ".join(bad)


def test_no_private_names_across_modules():
    """`from longrl.x import _name` from another module: make the name public or move it."""
    mods = _modules()
    bad = []
    for m, path in mods.items():
        for target, name, line in _imports(m, path, set(mods)):
            if name and name.startswith("_") and target != m:
                bad.append(f"{path.relative_to(SRC)}:{line} imports {target}.{name}")
    assert not bad, "; ".join(bad)


def test_no_private_attributes_of_other_longrl_modules():
    """`module._name` where `module` is an imported longrl module (e.g. `dist._world`)."""
    mods = _modules()
    bad = []
    for m, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        aliases = {}  # local name -> longrl module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("longrl.") and a.asname:
                        aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(m, path, node)
                for a in node.names:
                    if f"{target}.{a.name}" in mods:
                        aliases[a.asname or a.name] = f"{target}.{a.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and aliases.get(node.value.id, m) != m):
                bad.append(f"{path.relative_to(SRC)}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "; ".join(bad)


def test_no_private_attributes_of_objects_from_other_modules():
    """`obj._name` outside `self`/`cls`, where `_name` is an attribute that only another
    longrl module sets on its own objects (e.g. a recipe reading a scheduler's `_counter`)."""
    owners: dict[str, set[Path]] = {}  # private attribute -> modules that assign self._attr
    uses = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                if isinstance(node.ctx, ast.Store):
                    owners.setdefault(node.attr, set()).add(path)
            else:
                uses.append((path, node.lineno, node.attr))
    bad = [f"{p.relative_to(SRC)}:{line} uses ._{attr[1:]} of {sorted(str(o.relative_to(SRC)) for o in owners[attr])}"
           for p, line, attr in uses if attr in owners and p not in owners[attr]]
    assert not bad, "; ".join(bad)
