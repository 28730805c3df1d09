"""The package layering, read from the source: bench > runtime > {programs, protocol}.

`programs` and `protocol` import nothing of `runtime` (or `bench`), `runtime` nothing of
`bench`, and no module imports, directly or through others, a module that imports it back.
Every import counts, the lazy ones inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("runtime", "programs", "protocol", "bench")
MAX_LINES = 420  # "about 400" per module


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports (the deepest known module of each dotted name)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()

    def add(dotted: str) -> None:
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            candidate = ".".join(parts[:n])
            if candidate in known:
                if candidate != name:
                    out.add(candidate)
                return

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:  # `from pkg import module` imports the submodule
                add(f"{module}.{alias.name}")
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def test_programs_and_protocol_import_nothing_of_runtime_or_bench() -> None:
    graph = _graph()
    bad = [(m, d) for m, deps in graph.items() if m.split(".")[0] in ("programs", "protocol")
           for d in deps if d.split(".")[0] in ("runtime", "bench")]
    assert bad == []
    assert [(m, d) for m, deps in graph.items() if m.startswith("runtime")
            for d in deps if d.startswith("bench")] == []


def test_no_import_cycle() -> None:
    graph = _graph()
    # Tarjan's strongly connected components: any component of two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_detector_sees_a_cycle_and_a_lazy_upward_import(tmp_path, monkeypatch) -> None:
    """The two checks above can fail: a lazy upward import and a two-module cycle are found."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "programs" / "a.py").write_text("def f():\n    from runtime import x\n")
    (tmp_path / "runtime" / "x.py").write_text("from runtime.y import g\n")
    (tmp_path / "runtime" / "y.py").write_text("def g():\n    from . import x\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    graph = _graph()
    assert "runtime.x" in graph["programs.a"] or "runtime" in graph["programs.a"]
    assert graph["runtime.x"] == {"runtime.y"} and graph["runtime.y"] == {"runtime.x"}


def test_no_module_of_the_library_is_much_over_400_lines() -> None:
    long = {name: n for name, path in _modules().items() if not name.startswith("bench")
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_bench_has_no_turn_loop_of_its_own() -> None:
    """The bench drives the runtime's turn: it never streams from a backend to a parser itself."""
    source = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "bench").glob("*.py"))
    assert "StreamParser" not in source and ".feed(" not in source
