"""The package's import graph has no circle (docs/ARCHITECTURE.md "Layout"), and no module outgrows
the few hundred lines a module should hold (data files aside)."""

from __future__ import annotations

import ast
from pathlib import Path

import constitutional

ROOT = Path(constitutional.__file__).parent
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(unresolved: list | None = None) -> dict[str, set[str]]:
    """module -> the package modules it imports, at top level or inside functions. `from X import y`
    counts as an import of `X.y` when that is a module, else of `X`. Relative imports that name no
    module of the package go to `unresolved` as (module, target)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
                if node.level and unresolved is not None:
                    unresolved += [(name, t) for t in targets if t not in modules]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_relative_imports_resolve():
    """A relative import inside a function runs only when called: a moved module's must still resolve."""
    unresolved: list = []
    import_graph(unresolved)
    assert unresolved == []


def test_modules_stay_short():
    long = {module_name(p): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


if __name__ == "__main__":  # print the graph: python tests/unit/test_imports.py
    for mod, deps in sorted(import_graph().items()):
        print(mod, "->", ", ".join(sorted(deps)) or "-")
    print("circles:", cycles(import_graph()) or "none")
