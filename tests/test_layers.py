"""The structure of bcnp, as a specification: layers that import one way, no cycles, and a wheel with every package.

Read from the bottom up; a module imports only modules of its own layer or the layers below it:
"""
import ast
import glob
import tomllib

from conftest import FIXTURES

REPO = FIXTURES.parent.parent
PACKAGE = REPO / "bcnp"

LAYERS = {
    "facts": ["errors", "config", "layout", "torch_pow"],               # pure data and the numbers they imply
    "forward": ["forward"],                                             # the math, `xp` everywhere
    "kernels": ["quant", "_quant", "_dtypes", "gpu.kernels"],           # NumPy specification, Cython, CUDA: leaves
    "weights": ["tensor", "torch_bin", "checkpoint", "weights", "gpu.weights"],  # readers and dict -> dict passes
    "engine": ["cache", "sampling", "tokenizer", "chat", "engine", "gpu", "gpu.cache", "gpu.ops", "gpu.graphs"],
    "api": ["api", ""],                                                 # Model, and `from bcnp import Model`
    "faces": ["cli", "generate", "convert", "inspect", "serve", "demo", "scoring", "perplexity", "eval",
              "benchmarks", "server", "server.http", "server.loop", "server.protocol", "server.text"],
}
COMPILED = {"bcnp._quant", "bcnp._dtypes"}          # built from csrc/; optional (bcnp.quant falls back to NumPy)


def module_name(path):
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules():
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def layer_of(module):
    short = module[len("bcnp."):] if module.startswith("bcnp.") else ""
    return next(i for i, names in enumerate(LAYERS.values()) if short in names)


def imports(module, path, known):
    """[(imported bcnp module, at the top level of the file?)] of one source file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        top = node in tree.body
        if isinstance(node, ast.Import):
            found += [(a.name, top) for a in node.names if a.name.split(".")[0] == "bcnp"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base.split(".")[0] != "bcnp":
                continue
            for alias in node.names:                                  # `from . import checkpoint`: a module
                name = f"{base}.{alias.name}"
                found.append((name if name in known else base, top))
    return found


def import_graph():
    modules = source_modules()
    known = set(modules) | COMPILED
    return {m: {name for name, _ in imports(m, path, known)} for m, path in modules.items()}


def cycles(graph):
    """Every module that lies on an import cycle."""
    on_cycle, state = set(), {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                on_cycle.update(stack[stack.index(nxt):])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])
    return on_cycle


# --- the layers ------------------------------------------------------------------------------------------------------

def test_every_module_has_its_place_in_one_layer():
    placed = ["bcnp." + n if n else "bcnp" for names in LAYERS.values() for n in names]
    assert len(placed) == len(set(placed))
    assert sorted(set(source_modules()) | COMPILED) == sorted(placed)


def test_imports_go_down_the_layers_only():
    graph = import_graph()
    upward = [(m, layer_names(m), n, layer_names(n)) for m, targets in graph.items() for n in targets
              if layer_of(n) > layer_of(m)]
    assert upward == []


def layer_names(module):
    return list(LAYERS)[layer_of(module)]


def test_there_is_no_import_cycle():
    assert cycles(import_graph()) == set()


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {"a", "b", "c"}
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == set()


def test_the_forward_pass_is_math_only_and_the_configuration_pure_data():
    modules = source_modules()
    tree = ast.parse(modules["bcnp.forward"].read_text(encoding="utf-8"))
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert imported <= {"functools", "math"}                            # no numpy: `xp` everywhere
    graph = import_graph()
    assert graph["bcnp.forward"] <= {"bcnp.config"}
    assert graph["bcnp.config"] <= {"bcnp.errors"} and graph["bcnp.errors"] == set()


def test_below_the_faces_every_import_of_bcnp_is_at_the_top_of_its_file():
    """No import hidden in a function to dodge a cycle (the faces may import lazily, for a quick --help); the
    compiled modules are optional and imported where they are used."""
    modules = source_modules()
    known = set(modules) | COMPILED
    hidden = [(m, name) for m, path in modules.items() if layer_names(m) != "faces"
              for name, top in imports(m, path, known) if not top and name not in COMPILED]
    assert hidden == []


# --- the wheel -------------------------------------------------------------------------------------------------------

def test_the_wheel_holds_every_package_and_the_cuda_source():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    packages = {module_name(path.parent / "__init__.py") for path in PACKAGE.rglob("__init__.py")}
    assert set(setuptools["packages"]) == packages
    data = setuptools["package-data"]["bcnp"]
    shipped = {path for pattern in data for path in glob.glob(str(PACKAGE / pattern))}
    assert set(glob.glob(str(PACKAGE / "cuda" / "*.cu"))) <= shipped and shipped
