"""The package's shape, as issue 32's closing note reports it: lines and modules, import cycles
(strongly connected groups of modules, every import counted, function-level ones included),
function-level imports of depthprune's own modules (inside and outside `cli/`), and the
largest modules. Reads the source tree; imports nothing of it but through grimp's parser.

    python bench/structure.py [ROOT]    # ROOT: the folder holding depthprune/ (default: this checkout)
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import grimp


def cycles(graph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    mods = sorted(graph.modules)
    edges = {m: sorted(set(graph.find_modules_directly_imported_by(m)) & set(mods)) for m in mods}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for m in mods:
        if m not in index:
            visit(m)
    return found


def function_level_imports(pkg: Path) -> tuple[int, int]:
    """Imports of depthprune's own modules inside functions: (in the command line, elsewhere)."""
    cli = other = 0
    for path in pkg.rglob("*.py"):
        seen: set[int] = set()
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if id(node) in seen or not isinstance(node, ast.ImportFrom):
                    continue
                seen.add(id(node))
                if node.level > 0 or (node.module or "").startswith("depthprune"):
                    in_cli = "cli" in path.relative_to(pkg).parts or path.name.startswith("cli")
                    cli, other = (cli + 1, other) if in_cli or path.name == "demo.py" else (cli, other + 1)
    return cli, other


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]).resolve()
    sys.path.insert(0, str(root))
    pkg = root / "depthprune"
    files = [p for p in pkg.rglob("*.py") if "decilm" not in p.parts]  # decilm: NVIDIA's code, shipped as data
    sizes = sorted(((len(p.read_text().splitlines()), p.relative_to(root)) for p in files), reverse=True)
    graph = grimp.build_graph("depthprune", cache_dir=None)
    found = cycles(graph)
    cli, other = function_level_imports(pkg)
    print(f"lines {sum(n for n, _ in sizes):,d} in {len(files)} modules (export/decilm excluded)")
    print(f"import cycles {len(found)}" + "".join(f"\n  {' <-> '.join(c)}" for c in found))
    print(f"function-level imports of depthprune modules: {cli + other} ({cli} in the command line, {other} elsewhere)")
    print("largest modules: " + ", ".join(f"{p} ({n})" for n, p in sizes[:3]))


if __name__ == "__main__":
    main()
