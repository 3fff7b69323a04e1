"""The package's import graph has no cycle, and its packages sit in layers that import only downwards.

Imports are read from the source (no module is executed), including those deferred into functions:
a deferred import that closes a cycle still ties the two modules together. For cycles, imports under
`if TYPE_CHECKING:` are left out (they never run); the layer check counts them (a type hint that
names an upper layer is a dependency all the same). A submodule's import of its own parent package
is left out of both (Python imports the parent first anyway).
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "diffkd"


def module_name(path: Path, root: Path = PACKAGE_ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return skipped


# The top-level packages and modules of diffkd, bottom layer first. A package imports only from the
# layers below its own (not from a sibling in its layer); a new top-level package must be placed here.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("diffkd", "runtime", "config"),  # "diffkd": the package's own __init__
    ("data",),
    ("models",),
    ("distill",),  # the distillation objective runs the classifiers (features and logits in one pass)
    ("evaluate",),
    ("train",),
    ("synth",),
    ("experiments",),
    ("commands",),
    ("cli", "testing"),
)


def imported_names(path: Path, module: str, type_checking: bool = False) -> set[str]:
    """Every dotted name the module imports (a `from a import b` counts as `a` and `a.b`); imports
    under `if TYPE_CHECKING:` only when `type_checking` is set."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = set() if type_checking else _type_checking_nodes(tree)
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path = PACKAGE_ROOT, type_checking: bool = False) -> dict[str, set[str]]:
    paths = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for module, path in paths.items():
        graph[module] = {name for name in imported_names(path, module, type_checking)
                         if name in paths and name != module and not module.startswith(name + ".")}
    return graph


def top_level(module: str) -> str:
    """The top-level package or module `module` belongs to ("diffkd" for the package's own __init__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def package_edges(graph: dict[str, set[str]]) -> dict[tuple[str, str], list[str]]:
    """Import edges between top-level packages, each with the module imports that make it."""
    edges: dict[tuple[str, str], list[str]] = {}
    for module, names in sorted(graph.items()):
        for name in sorted(names):
            if top_level(module) != top_level(name):
                edges.setdefault((top_level(module), top_level(name)), []).append(f"{module} -> {name}")
    return edges


def layering_errors(graph: dict[str, set[str]], layers: tuple[tuple[str, ...], ...]) -> list[str]:
    """Package-level edges that do not point to a lower layer, and packages no layer holds."""
    layer_of = {name: index for index, members in enumerate(layers) for name in members}
    errors = [f"{name} is in no layer: place it in LAYERS"
              for name in sorted({top_level(m) for m in graph} - set(layer_of))]
    for (importer, imported), why in package_edges(graph).items():
        if importer in layer_of and imported in layer_of and layer_of[imported] >= layer_of[importer]:
            where = "a sibling in its layer" if layer_of[imported] == layer_of[importer] else "an upper layer"
            errors.append(f"{importer} (layer {layer_of[importer]}) imports {where}, {imported} "
                          f"(layer {layer_of[imported]}): {'; '.join(why)}")
    return errors


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def _edges_within(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    members = set(component)
    return [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50  # the walk found the package
    found = cycles(graph)
    assert not found, "import cycles (move the shared definition one layer down):\n" + "\n".join(
        "  " + "; ".join(_edges_within(graph, c)) for c in found)


def test_the_checker_finds_a_cycle_through_a_deferred_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import a\n")
    (package / "sub" / "a.py").write_text("from pkg.b import thing\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n"
                                  "def thing():\n    from .sub.a import x\n")
    (package / "c.py").write_text("import pkg.b\n")
    graph = import_graph(package)
    assert graph["pkg.sub"] == {"pkg.sub.a"} and graph["pkg.c"] == {"pkg.b"}
    assert cycles(graph) == [["pkg.b", "pkg.sub.a"]]  # the TYPE_CHECKING import of c is not a cycle


def test_packages_import_only_from_lower_layers():
    graph = import_graph(type_checking=True)
    errors = layering_errors(graph, LAYERS)
    assert not errors, ("imports that point up or sideways (move the shared definition down, or the caller "
                        "up):\n" + "\n".join("  " + e for e in errors))


def test_the_layer_check_finds_an_upward_edge_a_sideways_one_and_an_unplaced_package(tmp_path):
    package = tmp_path / "pkg"
    for sub in ("low", "mid", "high", "side"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "mid" / "a.py").write_text("from pkg.low import x\n"
                                          "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.high\n")
    (package / "high" / "b.py").write_text("def f():\n    from pkg.mid import a\n    from pkg.side import c\n")
    (package / "loose.py").write_text("")
    layers = (("pkg", "low"), ("mid",), ("high", "side"))
    assert layering_errors(import_graph(package), layers) == [
        "loose is in no layer: place it in LAYERS",
        "high (layer 2) imports a sibling in its layer, side (layer 2): pkg.high.b -> pkg.side"]
    errors = layering_errors(import_graph(package, type_checking=True), layers)
    assert "mid (layer 1) imports an upper layer, high (layer 2): pkg.mid.a -> pkg.high" in errors
