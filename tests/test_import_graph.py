"""The project's import graph: no circle anywhere, and imports between apps only in the directions below.

Every ``import`` counts, at module level or inside a function (a late import is still a dependency); only
imports under ``if TYPE_CHECKING:`` are left out. The graph is read from the source with ``ast``.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("config", "explain", "studies", "analysis")

# The allowed directions, written once. An app may import itself, and:
ALLOWED = {
    "config": {"explain", "studies", "analysis"},  # the project: URLs and the Celery app
    "explain": {"config"},
    "studies": {"explain", "config"},
    "analysis": {"explain", "studies", "config"},  # reads rows
}
# explain's outer layer may import studies: the precompute layer (the one place that knows both a Study and
# torch), the admin and the management commands. explain's models, data and services never do.
EXPLAIN_OUTER = ("explain.precompute", "explain.admin", "explain.management")
# studies and analysis use explain's public surface only.
EXPLAIN_PUBLIC = (
    "explain.models",
    "explain.methods",
    "explain.selectors",
    "explain.services",
    "explain.precompute",
)
# The Django-free numerical code imports only itself (tests/test_django_free.py keeps Django out).
PURE = ("explain.methods", "explain.nets", "explain.data", "explain.stimuli")


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``module`` imports (the deepest existing module of each imported name)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def add(name: str) -> None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")
                    base = ".".join(up[: len(up) - child.level + 1] + ([base] if base else []))
                for alias in child.names:
                    add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {module: _imports(module, path, modules) for module, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
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
            strong(v)
    return found


def test_the_graph_is_read_and_finds_a_circle():
    """The reader sees these modules' imports, and the circle finder finds a planted circle."""
    graph = import_graph()
    assert "explain.models" in graph["studies.models"] or "explain.methods" in graph["studies.models"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle_anywhere_in_the_project():
    assert circles(import_graph()) == []


def test_apps_import_each_other_only_in_the_allowed_directions():
    wrong = []
    for module, imported in sorted(import_graph().items()):
        app = module.split(".")[0]
        for target in sorted(imported):
            other = target.split(".")[0]
            if other == app:
                if _within(module, PURE) and not _within(target, PURE):
                    wrong.append(f"{module} -> {target} (pure numerical code imports a Django module)")
                continue
            if other not in ALLOWED[app] and not (
                app == "explain" and other == "studies" and _within(module, EXPLAIN_OUTER)
            ):
                wrong.append(f"{module} -> {target} ({app} may not import {other})")
            elif other == "explain" and app in {"studies", "analysis"} and target not in EXPLAIN_PUBLIC:
                wrong.append(f"{module} -> {target} (outside explain's public surface {EXPLAIN_PUBLIC})")
    assert wrong == []
