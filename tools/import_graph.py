"""Draw the import graph of a package (default: deploykit/) and check that it runs one way.

Every import counts, also the ones inside functions and under ``if TYPE_CHECKING:``: a
deferred import is still a dependency, and one that points up the layers is usually a cycle
dodged at run time. Layers come from the module-level imports alone (layer 0 imports nothing
of the package; a module sits one layer above the highest module it imports; see ``layers``).

- cycle: a strongly connected set of modules, over all imports;
- upward import: an import of the package that encloses the importer (``deploykit.pipeline``
  importing ``deploykit``), or of a module at the same or a higher layer (what a deferred
  import hides).

Usage::

    python tools/import_graph.py            # modules by layer, edges, cycles, upward imports
    python tools/import_graph.py --json     # the same as JSON
    python tools/import_graph.py --quiet    # nothing unless a cycle or an upward import; exit 1 then
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    line: int
    deferred: bool  # inside a function or under TYPE_CHECKING


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The longest known module that ``name`` is or lies inside (``a.b.C`` -> ``a.b``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def edges_of(path: Path, mod: str, is_package: bool, modules: set[str]) -> list[Edge]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out: list[Edge] = []

    def visit(node: ast.AST, deferred: bool) -> None:
        for child in ast.iter_child_nodes(node):
            child_deferred = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit_stmt(stmt, True)
                for stmt in child.orelse:
                    visit_stmt(stmt, deferred)
                continue
            visit_stmt(child, child_deferred, recurse=True)

    def visit_stmt(stmt: ast.AST, deferred: bool, recurse: bool = True) -> None:
        targets: list[str] = []
        if isinstance(stmt, ast.Import):
            targets = [a.name for a in stmt.names]
        elif isinstance(stmt, ast.ImportFrom):
            if stmt.level:
                base_parts = mod.split(".") if is_package else mod.split(".")[:-1]
                base_parts = base_parts[: len(base_parts) - (stmt.level - 1)]
                base = ".".join(base_parts + ([stmt.module] if stmt.module else []))
            else:
                base = stmt.module or ""
            # "from pkg import sub" imports the submodule sub when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in stmt.names]
        for t in targets:
            dst = _resolve(t, modules)
            if dst is not None and dst != mod:
                out.append(Edge(mod, dst, getattr(stmt, "lineno", 0), deferred))
        if recurse:
            visit(stmt, deferred)

    visit(tree, False)
    return out


def graph(root: Path) -> tuple[list[str], list[Edge]]:
    files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    names = {module_name(p, root): p for p in files}
    modules = set(names)
    edges: list[Edge] = []
    for mod, path in names.items():
        edges += edges_of(path, mod, path.name == "__init__.py", modules)
    return sorted(modules), edges


def cycles(modules: list[str], edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    adj: dict[str, set[str]] = {m: set() for m in modules}
    for e in edges:
        adj[e.src].add(e.dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in modules:
        if start in index:
            continue
        work = [(start, iter(sorted(adj[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(adj[nxt]))))
                elif nxt in on:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return sorted(out)


def _ancestor(src: str, dst: str) -> bool:
    """``dst`` is a package that contains ``src`` (its ``__init__`` runs before ``src`` and is the API above it)."""
    return src.startswith(dst + ".")


def layers(modules: list[str], edges: list[Edge]) -> dict[str, int]:
    """Layer of each module: one above the highest module it imports. Imports of an enclosing
    package are left out (always upward); the modules of a cycle are ordered by their
    module-level imports alone (what Python runs first)."""
    kept = [e for e in edges if not _ancestor(e.src, e.dst)]
    comp_of: dict[str, int] = {}
    for i, comp in enumerate(cycles(modules, kept)):
        for m in comp:
            comp_of[m] = i
    deps: dict[str, set[str]] = {m: set() for m in modules}
    for e in kept:
        same = e.src in comp_of and comp_of.get(e.dst) == comp_of[e.src]
        if not same or not e.deferred:
            deps[e.src].add(e.dst)
    layer: dict[str, int] = {}

    def get(m: str, seen: frozenset[str]) -> int:
        if m in layer:
            return layer[m]
        value = 1 + max((get(d, seen | {m}) for d in deps[m] if d not in seen), default=-1)
        layer[m] = value
        return value

    sys.setrecursionlimit(max(1000, 10 * len(modules)))
    for m in modules:
        get(m, frozenset())
    return layer


def upward(edges: list[Edge], layer: dict[str, int]) -> list[Edge]:
    """Imports of an enclosing package, and imports of a module at the same or a higher layer."""
    seen: set[tuple[str, str]] = set()
    out = []
    for e in edges:
        if (_ancestor(e.src, e.dst) or layer[e.dst] >= layer[e.src]) and (e.src, e.dst) not in seen:
            seen.add((e.src, e.dst))
            out.append(e)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", nargs="?", default=str(Path(__file__).resolve().parents[1] / "deploykit"))
    parser.add_argument("--json", action="store_true", help="print the graph as JSON")
    parser.add_argument("--quiet", action="store_true", help="print only problems; exit 1 on a cycle or upward import")
    args = parser.parse_args(argv)
    root = Path(args.package).resolve()
    modules, edges = graph(root)
    cyc = cycles(modules, edges)
    layer = layers(modules, edges)
    up = upward(edges, layer)
    unique_edges = sorted({(e.src, e.dst) for e in edges})
    if args.json:
        print(json.dumps({"modules": {m: layer[m] for m in modules}, "edges": [list(e) for e in unique_edges],
                          "cycles": cyc, "upward": [[e.src, e.dst, e.line] for e in up]}, indent=2))
    elif not args.quiet:
        print(f"{len(modules)} modules, {len(unique_edges)} edges, {len(cyc)} cycles, {len(up)} upward imports")
        for n in range(max(layer.values(), default=-1) + 1):
            print(f"layer {n}: " + " ".join(sorted(m for m in modules if layer[m] == n)))
        print("edges:")
        for src, dst in unique_edges:
            print(f"  {src} -> {dst}")
    if args.quiet or not args.json:
        for c in cyc:
            print("cycle: " + " <-> ".join(c))
        for e in up:
            how = "deferred " if e.deferred else ""
            print(f"upward import: {e.src} (layer {layer[e.src]}) -> {e.dst} (layer {layer[e.dst]}), "
                  f"{how}import at line {e.line}")
    return 1 if (cyc or up) else 0


if __name__ == "__main__":
    sys.exit(main())
