"""The import graph of jalign reads top-down: no cycle, no library module importing the CLI
or a layer above it, no jalign import hidden inside a function."""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jalign")
# Layers, top first: a module may import only modules of its own layer or below.
LAYERS = (("jalign.train", "jalign.aot", "jalign.convert"), ("jalign.sweep", "jalign.overopt"),
          ("jalign.pipeline",), ("jalign.loop",), ("jalign.algorithms",))


def _modules():
    mods = {}
    for directory, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(directory, f)
                name = "jalign" + path[len(ROOT):-3].replace(os.sep, ".")
                mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(mods):
    """module -> [(imported jalign module, line, inside a function)]."""
    out = {}
    for name, path in mods.items():
        found = []
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jalign"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.append((full if full in mods else node.module, node.lineno,
                                  node.col_offset > 0))
            elif isinstance(node, ast.Import):
                found += [(a.name, node.lineno, node.col_offset > 0) for a in node.names
                          if a.name.startswith("jalign")]
        out[name] = found
    return out


def _layer(module):
    for depth, layer in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in layer):
            return depth
    return len(LAYERS)


def test_no_import_cycle():
    mods = _modules()
    graph = {m: {t for t, _, _ in edges if t in mods and t != "jalign"}
             for m, edges in _imports(mods).items() if m != "jalign"}
    state = {}

    def visit(module, path):
        state[module] = "open"
        for target in graph.get(module, ()):
            assert state.get(target) != "open", " -> ".join(path + [module, target])
            if target not in state:
                visit(target, path + [module])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])


def test_modules_only_import_their_layer_or_below_and_never_inside_a_function():
    mods = _modules()
    for module, edges in _imports(mods).items():
        for target, line, nested in edges:
            where = f"{mods[module]}:{line} imports {target}"
            assert not nested, f"{where} inside a function"
            if module != "jalign":
                assert _layer(target) >= _layer(module), f"{where}, a layer above it"
