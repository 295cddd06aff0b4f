# -*- test-case-name: tests.test_layout -*-
"""
The shape of the C{imgresume} package, read from its source with L{ast}:
no import circles (imports under C{if TYPE_CHECKING:} and inside functions
count too), and no module that imports another package's C{_private}
module (a package shares what others may use through its C{__init__} or a
public module).
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import imgresume

Edges = dict[str, set[str]]


def module_files(package: Path, name: str) -> dict[str, Path]:
    """Every module under the directory C{package} (named C{name}), by dotted name."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = [name, *path.relative_to(package).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imported(module: str, is_package: bool, node: ast.AST) -> list[str]:
    """The dotted names an import statement names, candidates first."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = module.split(".")
        if not is_package:
            base.pop()
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    # "from a import b" imports module a.b if there is one, else a name of a.
    return [f"{source}.{alias.name}" for alias in node.names] + [source]


def import_graph(modules: dict[str, Path]) -> Edges:
    """
    Which module of C{modules} imports which others, from every import
    statement in its source (conditional and function-level ones included).
    """
    edges: Edges = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            candidates = _imported(name, is_package, node)
            if isinstance(node, ast.ImportFrom):
                targets = [c for c in candidates[:-1] if c in modules]
                if len(targets) < len(candidates) - 1 and candidates[-1] in modules:
                    targets.append(candidates[-1])
            else:
                targets = [c for c in candidates if c in modules]
            edges[name].update(t for t in targets if t != name)
    return edges


def circles(edges: Edges) -> list[list[str]]:
    """
    The import circles of a graph: its strongly connected components of more
    than one module (Tarjan's algorithm), each sorted, in sorted order.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def private_imports(edges: Edges) -> set[tuple[str, str]]:
    """
    The imports of a private module (one whose dotted name has a part
    starting with a single C{_}) from outside the package that owns it (the
    name up to that part).  The top package's own private modules
    (C{imgresume._options}) are shared by all of it.
    """
    found = set()
    for importer, targets in edges.items():
        for target in targets:
            parts = target.split(".")
            private = [
                i for i, part in enumerate(parts)
                if part.startswith("_") and not part.startswith("__")
            ]
            if not private:
                continue
            owner = ".".join(parts[: private[0]])
            if importer != owner and not importer.startswith(owner + "."):
                found.add((importer, target))
    return found


class LayoutTests(SynchronousTestCase):
    """
    The import structure of the installed C{imgresume} package.
    """

    def setUp(self) -> None:
        package = Path(imgresume.__file__).parent
        self.edges = import_graph(module_files(package, "imgresume"))

    def test_graph(self) -> None:
        """
        The graph is read from the source: relative, absolute,
        C{from package import module} and C{TYPE_CHECKING} imports all count.
        """
        self.assertIn("imgresume.balancer._scheduler", self.edges["imgresume.balancer._proxy"])
        self.assertIn("imgresume.addresses", self.edges["imgresume.balancer._proxy"])
        self.assertIn("imgresume.protocol._auth", self.edges["imgresume.protocol._client"])
        self.assertIn("imgresume.client._session", self.edges["imgresume.client._batch"])

    def test_noCircles(self) -> None:
        """
        No module imports, directly or through others, a module that imports
        it, not even for type annotations only.
        """
        self.assertEqual(circles(self.edges), [])

    def test_noPrivateImports(self) -> None:
        """
        No module imports another package's private module.
        """
        self.assertEqual(sorted(private_imports(self.edges)), [])


class CheckerTests(SynchronousTestCase):
    """
    The checks themselves, on made-up graphs, so that a clean result above
    means something.
    """

    def test_circles(self) -> None:
        """
        A circle of any length is found, once; a chain or a self-import is
        not a circle.
        """
        edges = {
            "p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"},
            "p.d": {"p.e"}, "p.e": {"p.d"},
            "p.f": {"p.a", "p.f"},
        }
        self.assertEqual(circles(edges), [["p.a", "p.b", "p.c"], ["p.d", "p.e"]])

    def test_private(self) -> None:
        """
        A private module may be imported from inside its package only; the
        top package's private modules from anywhere in it.
        """
        edges = {
            "p.x._a": {"p.x._b", "p.y._c", "p._top", "p.y"},
            "p.x": {"p.x._a"},
            "p.z": {"p.x._a._deeper"},
        }
        self.assertEqual(
            private_imports(edges),
            {("p.x._a", "p.y._c"), ("p.z", "p.x._a._deeper")},
        )
