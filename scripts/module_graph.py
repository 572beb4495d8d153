#!/usr/bin/env python3
"""Print the import graph of ``dgq_utils`` (stdlib ``ast`` only; nothing is imported or executed).

    python3 scripts/module_graph.py                # subpackage graph: which stage imports which (edge counts)
    python3 scripts/module_graph.py --modules      # module graph, one line per module
    python3 scripts/module_graph.py --function-level   # also count imports made inside functions

Every ``import`` / ``from ... import`` that names a ``dgq_utils`` module is an edge; by default only imports
at module level (including ``if TYPE_CHECKING:`` blocks and ``try:``) count, because those are the ones that make
a cycle at import time. The output ends with the cycles found (strongly connected components), if any.
``tests/test_architecture.py`` uses :func:`module_graph` from this file for its checks.
"""
from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "dgq_utils"


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of ``package`` under ``root``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


class ImportRecord:
    """One import statement: ``target`` module, the ``names`` taken from it, whether inside a function."""

    __slots__ = ("source", "target", "names", "in_function", "lineno")

    def __init__(self, source, target, names, in_function, lineno):
        self.source, self.target, self.names = source, target, names
        self.in_function, self.lineno = in_function, lineno

    def __repr__(self):
        where = "function" if self.in_function else "module"
        return f"{self.source}:{self.lineno} -> {self.target} {self.names} ({where} level)"


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(module: str, path: Path, known: set[str]) -> list[ImportRecord]:
    """The ``dgq_utils`` imports of one module (``from pkg import submodule`` resolves to the submodule)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    records: list[ImportRecord] = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        records.append(ImportRecord(module, alias.name, (), in_function, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, is_package, child.level, child.module)
                if target.split(".")[0] != PACKAGE:
                    continue
                plain = []
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    if sub in known:  # ``from dgq_utils.x import module``
                        records.append(ImportRecord(module, sub, (), in_function, child.lineno))
                    else:
                        plain.append(alias.name)
                if plain or not child.names:
                    records.append(ImportRecord(module, target, tuple(plain), in_function, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return records


def module_graph(root: Path = ROOT) -> tuple[dict[str, Path], list[ImportRecord]]:
    """All modules and all their ``dgq_utils`` imports."""
    files = module_files(root)
    known = set(files)
    records = []
    for mod, path in files.items():
        records += imports_of(mod, path, known)
    return files, records


def stage_of(module: str) -> str:
    """``dgq_utils.model.layers`` -> ``model``; top-level modules (``dgq_utils.paths``) are their own stage."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(root)"


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (or a self-loop), by Tarjan's algorithm."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]
    nodes = set(edges) | {t for ts in edges.values() for t in ts}

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
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
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(nodes):
        if v not in index:
            strong(v)
    return sorted(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", action="store_true", help="module graph instead of the subpackage graph")
    ap.add_argument("--function-level", action="store_true", help="also count imports inside functions")
    args = ap.parse_args(argv)
    files, records = module_graph()
    used = [r for r in records if args.function_level or not r.in_function]
    key = (lambda m: m) if args.modules else stage_of
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in used:
        a, b = key(r.source), key(r.target if r.target in files else r.target.rsplit(".", 1)[0])
        if a != b:
            counts[a][b] += 1
    nodes = sorted({key(m) for m in files})
    width = max(len(n) for n in nodes)
    for n in nodes:
        deps = ", ".join(f"{t} ({c})" for t, c in sorted(counts[n].items()))
        print(f"{n:<{width}} -> {deps or '-'}")
    found = cycles({a: set(bs) for a, bs in counts.items()})
    print()
    print("cycles: " + ("; ".join(" <-> ".join(c) for c in found) if found else "none"))
    in_fn = sum(r.in_function for r in records)
    print(f"imports inside functions: {in_fn} (of {len(records)} dgq_utils imports)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
