"""The package's import structure: no module of haed/ reaches itself through its imports (no import cycle),
counting every import statement wherever it stands, inside functions and `if` blocks too. Read from the
source with `ast`, nothing imported."""

import ast
from pathlib import Path

HAED = Path(__file__).resolve().parent.parent / "haed"


def _module_name(path: Path) -> str:
    parts = path.relative_to(HAED.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(HAED.rglob("*.py"))}


def _imported(node: ast.AST, module: str, is_package: bool, modules: dict) -> set[str]:
    """The haed modules one import statement names: `from a.b import c` is the module a.b.c where that is a
    module (a submodule import), else a.b; a relative import is resolved from `module`."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    found = set()
    for alias in node.names:
        if f"{source}.{alias.name}" in modules:
            found.add(f"{source}.{alias.name}")
        elif source in modules:
            found.add(source)
    return found


def import_graph() -> dict[str, set[str]]:
    """haed module -> the haed modules it imports anywhere in its source."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _imported(node, module, path.name == "__init__.py", modules)
        graph[module] = edges - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("def f():\n    from haed.x import y\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert _imported(node, "haed.z", False, {"haed.x": None, "haed.x.y": None}) == {"haed.x.y"}
    assert _imported(node, "haed.z", False, {"haed.x": None}) == {"haed.x"}


def test_haed_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "haed.trainer" in graph["haed.train"]  # the graph was read
    found = cycles(graph)
    assert not found, "import cycles in haed/: " + "; ".join(" <-> ".join(c) for c in found)
