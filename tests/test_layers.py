"""The layering the README claims: no import circles, only the CLI knows click, and the library does not
import the benchmarks or the test support."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "kdcache"


def _imports() -> dict[str, set[str]]:
    """Module -> the kdcache modules it imports (at module or function level)."""
    files = {".".join(f.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): f
             for f in ROOT.rglob("*.py")}
    out = {}
    for name, f in files.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdcache"):
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in files]
                deps.update(subs if subs and len(subs) == len(node.names) else [node.module])
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("kdcache") or a.name == "click")
            if isinstance(node, ast.ImportFrom) and node.module == "click":
                deps.add("click")
        out[name] = deps - {name}
    return out


def test_no_module_imports_one_that_imports_it_back():
    graph = _imports()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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
                circles.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    assert circles == []


def test_only_the_cli_knows_click_and_the_library_leaves_bench_and_testing_alone():
    graph = _imports()
    assert sorted(m for m, deps in graph.items() if "click" in deps) == ["kdcache.cli"]
    tools = ("kdcache.bench", "kdcache.testing", "kdcache.cli", "kdcache.__main__")
    for m, deps in graph.items():
        if m.startswith(tools):
            continue
        assert not [d for d in deps if d.startswith(tools)], m
