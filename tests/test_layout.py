"""The package's shape, read with ``ast`` (every import, lazy ones included):

- no import circle between modules, so that each can be read, tested and imported on its own;
- imports flow one way through the layers: ``core`` <- ``models`` / ``contrast`` / ``data`` <- ``methods``
  <- ``runtime`` <- ``system`` <- ``callbacks`` <- the public API; the tooling (``tools``) and the entry
  points (``train``, ``bench``, ...) sit on top: nothing another Lightning project imports depends on ``tools``;
- no module over 400 lines (the aim is 300; the few above it say why in their docstring)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mcl_lightning"


def module_name(path: Path) -> str:
    parts = ["mcl_lightning", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (``from a.b import c`` names a.b.c when c is a module)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
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
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    # a package's __init__ re-exporting its modules is not a circle: only module <-> module counts
    graph = import_graph()
    found = cycles(graph)
    assert not found, f"import circles: {found}"


def test_the_checker_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# What each part of the package may import besides itself (see the module docstring).
# ``entry``: the commands a training run uses (train, evaluate, export) and the thin ``python -m`` shims
# of the tooling (bench, report, reproduce, gpu_evidence), whose code is in ``tools``.
ENTRY_POINTS = {"train", "evaluate", "export", "report", "reproduce", "gpu_evidence", "bench"}
LIBRARY = {"core", "models", "contrast", "data", "methods", "runtime", "system", "callbacks"}
MAY_IMPORT = {
    "core": set(),
    "models": {"core"},
    "contrast": {"core"},
    "data": {"core"},
    "methods": {"core", "models", "contrast"},
    "runtime": {"core", "models", "contrast", "data", "methods"},
    "system": {"core", "models", "contrast", "data", "methods", "runtime"},
    "callbacks": {"core", "runtime", "system"},
    "tools": LIBRARY | {"entry"},  # bench reads a checkpoint's overrides as evaluate does
    "entry": LIBRARY | {"tools", "entry"},
    "api": LIBRARY,
}
MAX_LINES = 400


def part(module: str) -> str:
    name = module.split(".")[1] if "." in module else ""
    if not name:
        return "api"
    return "entry" if name in ENTRY_POINTS else name


def test_imports_flow_one_way_through_the_layers():
    graph = import_graph()
    unknown = sorted({part(m) for m in graph} - set(MAY_IMPORT) - {"conf"})
    assert not unknown, f"modules outside the known parts {sorted(MAY_IMPORT)}: {unknown}; add the part to MAY_IMPORT"
    against = sorted(f"{a} imports {b}" for a, targets in graph.items() for b in targets
                     if part(b) != part(a) and part(b) not in MAY_IMPORT[part(a)])
    assert not against, "imports against the layering:\n" + "\n".join(against)


def test_no_module_is_over_400_lines():
    lengths = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    too_long = {name: n for name, n in sorted(lengths.items()) if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them by job): {too_long}"


def test_the_layer_checker_sees_an_upward_import():
    assert part("mcl_lightning.models.peers") == "models" and part("mcl_lightning.tools.bench.cli") == "tools"
    assert part("mcl_lightning.bench") == "entry" and "tools" not in MAY_IMPORT["api"] | MAY_IMPORT["runtime"]
    assert "runtime" not in MAY_IMPORT["models"] and part("mcl_lightning") == "api"
