"""The package's layout holds: its folders are layers that import only downward (docs/design.md), and no two
modules import each other, directly or around a loop, at module level or inside functions."""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "presets")

# Top to bottom; a package may import its own modules and those of the layers below it.
LAYERS = [
    ["inference"],  # entry points where Kaito's images expect them
    ["servers"],  # one per server: wires a family to its APIs
    ["api"],  # routes and request checks
    ["models"],  # the model families
    ["process"],  # settings, ranks, the process's life
    ["http", "engine"],  # the HTTP front end; batching and scheduling for any model
    ["errors"],  # the one error type
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of presets/ outside tools/ (tools may import anything)."""
    found = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py") and "tools" not in os.path.relpath(folder, ROOT).split(os.sep):
                rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(ROOT))[:-3]
                found[rel.replace(os.sep, ".").removesuffix(".__init__")] = os.path.join(folder, f)
    return found


def imports(path: str, known: set[str]) -> set[str]:
    """The presets modules a file imports anywhere in it (`from presets.x import y` counts presets.x.y when that
    is a module)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(path, set(mods)) - {m} for m, path in mods.items()}


def package(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_every_package_has_a_layer():
    assert {package(m) for m in graph() if m != "presets"} <= set(RANK)


def test_packages_import_only_downward():
    upward = [
        f"{m} imports {d}"
        for m, deps in graph().items()
        for d in deps
        if m != "presets" and package(d) != package(m) and RANK[package(d)] <= RANK[package(m)]
    ]
    assert not upward, "imports against the layers of docs/design.md:\n" + "\n".join(sorted(upward))


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """A loop of imports in g, or None (depth-first search with three colours)."""
    colour, stack = {}, []

    def visit(m):
        colour[m] = "grey"
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if colour.get(d) == "grey":
                return stack[stack.index(d) :] + [d]
            if d not in colour and (loop := visit(d)):
                return loop
        colour[m] = "black"
        stack.pop()
        return None

    for m in sorted(g):
        if m not in colour and (loop := visit(m)):
            return loop
    return None


def test_no_import_cycle():
    assert find_cycle(graph()) is None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
