"""The package's import tree: no module imports one that imports it back (lazy and type-only
imports count), the graph-library seam is the only importer of DGL and PyG, and reading data,
graphs or the command line loads no torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import hgc

PACKAGE = Path(hgc.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path) -> list[str]:
    """Every module name an import statement of ``path`` mentions (relative ones resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            found += [base] + [f"{base}.{a.name}" for a in node.names]
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for m, path in modules.items():
        for target in _imports(m, path):
            while target and target not in modules:  # `from pkg import name`: the package itself
                target = target.rpartition(".")[0]
            if target and target != m and not m.startswith(target + "."):  # a package's parents are not imports
                edges[m].add(target)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that reach each other (Tarjan's strongly connected components > 1)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in edges:
        if v not in index:
            visit(v)
    return groups


def test_no_module_imports_one_that_imports_it_back():
    edges = _graph()
    assert len(edges) > 60 and edges["hgc.train.fit"] >= {"hgc.train.config", "hgc.graph.fold"}  # the graph is real
    assert _cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_graph_library_seam_imports_dgl_and_pyg():
    outside = sorted(m for m, path in _modules().items() if not m.startswith("hgc.nn.graphlib")
                     and any(t.split(".")[0] in ("dgl", "torch_geometric") for t in _imports(m, path)))
    assert outside == []


def test_data_graphs_and_the_command_line_load_without_torch():
    code = "import sys, hgc.data, hgc.graph, hgc.cli, hgc.nn.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
