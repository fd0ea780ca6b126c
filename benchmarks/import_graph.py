"""The package's import graph, counted from the sources (nothing is imported or run):

    python benchmarks/import_graph.py            # figures, the cycles and the imports made inside functions
    python benchmarks/import_graph.py --json     # the same as JSON

An edge A -> B is a `from ... import` / `import` of one lora_diffusion module by another, at any depth of A's code
(inside functions too: a deferred import is still a dependency); `from pkg import name` is an edge to pkg.name when
that is a module, else to pkg. Package faces (`__init__.py`) count as modules. A cycle is a strongly connected set
of two modules or more. Lazy imports of optional heavy packages are not package-internal and are not counted.
"""

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lora_diffusion"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(known: dict[str, Path]):
    """[(importer, imported, inside_a_function)] for every package-internal import."""
    found = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = absolute(name, path.name == "__init__.py", node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for target in targets:
                while target and target not in known:  # `import lora_diffusion.x.y` -> the deepest known module
                    target = target.rpartition(".")[0]
                if target.startswith(PACKAGE) and target != name:
                    found.append((name, target, id(node) in nested))
    return found


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of two modules or more."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10_000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def measure() -> dict:
    known = modules()
    found = imports(known)
    edges = {(a, b) for a, b, _ in found}
    top = sorted({m.split(".")[1] for m in known if m.count(".") >= 1})
    return {
        "modules": len(known),
        "edges": len(edges),
        "cycles": cycles(edges),
        "imports_inside_functions": sorted({f"{a} -> {b}" for a, b, inner in found if inner}),
        "top_level": top,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    figures = measure()
    if args.json:
        print(json.dumps(figures, indent=1))
        return 0
    print(f"{figures['modules']} modules, {figures['edges']} import edges, {len(figures['cycles'])} cycles, "
          f"{len(figures['imports_inside_functions'])} package-internal imports inside functions")
    print("top of the package:", " ".join(figures["top_level"]))
    for component in figures["cycles"]:
        print("cycle:", " <-> ".join(component))
    for line in figures["imports_inside_functions"]:
        print("inside a function:", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
