"""The package's import structure: no import cycles, and the layers of docs/DESIGN.md ("Architecture").

The graph is read from the source with `ast` (nothing is imported): an edge A -> B for every import of
package module B in module A, at module level or deferred inside a function (a deferred import is the
usual way to hide a cycle, so it counts), and for ``importlib.import_module`` calls whose name is a
string or f-string ending in ``.<module>``. Imports under ``if TYPE_CHECKING:`` are left out (they never
run). ``from pkg import name`` is an edge to the submodule ``pkg.name`` when there is one, else to
``pkg``. The compiled extension ``_C`` counts as a module (its interface is ``_C.pyi``).
"""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "mamlpp_fast"
EXTENSIONS = ("_C",)  # compiled modules of the package (not .py files)

# Layers, bottom to top; a module belongs to the first layer with a matching prefix.
LAYERS = {
    "errors": ("mamlpp_fast.errors",),
    "kernels": ("mamlpp_fast.ops", "mamlpp_fast.triton", "mamlpp_fast._native", "mamlpp_fast._C"),
    "base": ("mamlpp_fast.config", "mamlpp_fast.common", "mamlpp_fast.experiment"),
    "data": ("mamlpp_fast.data",),
    "learners": ("mamlpp_fast.network", "mamlpp_fast.learner_core", "mamlpp_fast.reference", "mamlpp_fast.fast"),
    "app": ("mamlpp_fast.trainer", "mamlpp_fast.distributed", "mamlpp_fast.plots", "mamlpp_fast.cli",
            "mamlpp_fast.__main__", "mamlpp_fast"),
}
# Which layers each layer may import (its own included).
MAY_IMPORT = {
    "errors": {"errors"},
    "kernels": {"errors", "kernels"},
    "base": {"errors", "base"},
    "data": {"errors", "base", "data"},
    "learners": {"errors", "base", "kernels", "learners"},
    "app": set(LAYERS),
}
# Finer rules inside the kernels layer: module prefix -> the prefixes it may import.
KERNEL_RULES = {
    "mamlpp_fast.triton": ("mamlpp_fast.triton", "mamlpp_fast.errors"),
    "mamlpp_fast._native": ("mamlpp_fast._C", "mamlpp_fast.errors"),
}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> str:
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if module == prefix or (prefix != PKG and _within(module, prefix)):
                return layer
    raise AssertionError(f"{module} belongs to no layer of tests/test_architecture.py: add it to LAYERS "
                         f"(and to docs/DESIGN.md, 'Architecture')")


def package_modules(root: Path, pkg: str, extensions=()) -> dict[str, tuple[Path | None, bool]]:
    """module name -> (source file, is a package), for every .py file under root/pkg."""
    mods: dict[str, tuple[Path | None, bool]] = {}
    for f in sorted((root / pkg).rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    for ext in extensions:
        mods[f"{pkg}.{ext}"] = (None, False)
    return mods


def _type_checking_blocks(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                yield node


def _import_module_target(call: ast.Call, pkg: str) -> str | None:
    """The module named by importlib.import_module("pkg.x") / (f"{_PKG}.x"), when readable."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name != "import_module" or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[-1], ast.Constant):
        tail = str(arg.values[-1].value)
        if tail.startswith(".") and len(arg.values) == 2:  # f"{_PKG}.x": the package's own name first
            return pkg + tail
    return None


def import_graph(root: Path, pkg: str, extensions=()) -> dict[str, set[str]]:
    mods = package_modules(root, pkg, extensions)
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        targets: set[str] = set()
        if path is not None:
            tree = ast.parse(path.read_text(), filename=str(path))
            skip = {id(n) for block in _type_checking_blocks(tree) for n in ast.walk(block) if n is not block}
            skip -= {id(n) for block in _type_checking_blocks(tree) for n in ast.walk(block.test)}
            base = name.split(".") if is_pkg else name.split(".")[:-1]
            for node in ast.walk(tree):
                if id(node) in skip:
                    continue
                if isinstance(node, ast.Import):
                    targets.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        up = base[:len(base) - (node.level - 1)]
                        mod = ".".join(up + ([node.module] if node.module else []))
                    else:
                        mod = node.module or ""
                    for alias in node.names:
                        sub = f"{mod}.{alias.name}"
                        targets.add(sub if sub in mods else mod)
                elif isinstance(node, ast.Call):
                    target = _import_module_target(node, pkg)
                    if target:
                        targets.add(target)
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected component
    of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v):  # Tarjan's algorithm
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for comp in components:  # a path from the first module back to itself inside the component
        members, start = set(comp), comp[0]
        paths = {start: [start]}
        frontier = [start]
        cycle = None
        while frontier and cycle is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        cycle = paths[v] + [start]
                        break
                    if w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
                if cycle:
                    break
            frontier = nxt
        cycles.append(cycle)
    return cycles


GRAPH = import_graph(ROOT, PKG, EXTENSIONS)


def test_graph_is_read():
    """The reader sees the imports it must see (else an empty graph would pass the tests below)."""
    assert "mamlpp_fast.ops.backend" in GRAPH["mamlpp_fast.ops.per_step_bn"]
    assert "mamlpp_fast.ops.torch_backend" in GRAPH["mamlpp_fast.ops.backend"]   # deferred import
    assert "mamlpp_fast._native" in GRAPH["mamlpp_fast.ops.backend"]             # importlib.import_module
    assert "mamlpp_fast._C" in GRAPH["mamlpp_fast._native"]
    assert "mamlpp_fast.fast" in GRAPH["mamlpp_fast"]


def test_no_import_cycles():
    cycles = find_cycles(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_layers():
    bad = []
    for module, targets in sorted(GRAPH.items()):
        layer = layer_of(module)
        for target in sorted(targets):
            if layer_of(target) not in MAY_IMPORT[layer]:
                bad.append(f"{module} ({layer}) imports {target} ({layer_of(target)})")
        for prefix, allowed in KERNEL_RULES.items():
            if _within(module, prefix):
                bad += [f"{module} imports {t} (allowed: {', '.join(allowed)})"
                        for t in sorted(targets) if not any(_within(t, a) for a in allowed)]
    assert not bad, "imports across layers (docs/DESIGN.md, 'Architecture'):\n" + "\n".join(bad)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_checker_finds_a_deferred_cycle_and_names_it(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import g\n",
        "pkg/b.py": "def g():\n    from . import a\n",
        "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n",
        "pkg/sub/__init__.py": "import importlib\nimportlib.import_module(f'{__name__}.x')\n",
        "pkg/d.py": "import importlib\n_P = 'pkg'\ndef f():\n    return importlib.import_module(f'{_P}.c')\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.c"] == set()                      # TYPE_CHECKING imports never run
    assert graph["pkg.d"] == {"pkg.c"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_every_module_has_a_layer(module):
    assert layer_of(module) in MAY_IMPORT


# ----------------------------------------------------------------------------------------------------
# The backend contract, written once (mamlpp_fast.ops.backend.BackendFunctions)
# ----------------------------------------------------------------------------------------------------
def _protocol_params():
    import inspect

    from mamlpp_fast.ops.backend import FUNCTIONS, BackendFunctions
    return {f: list(inspect.signature(getattr(BackendFunctions, f)).parameters)[1:] for f in FUNCTIONS}


def test_protocol_lists_the_five_functions():
    assert list(_protocol_params()) == ["bn_forward", "bn_backward", "bn_double_backward", "lslr_forward",
                                        "lslr_backward"]


@pytest.mark.parametrize("module", ["mamlpp_fast.ops.torch_backend", "mamlpp_fast.triton"])
def test_python_backends_implement_the_protocol(module):
    import importlib
    import inspect

    from mamlpp_fast.ops.backend import BackendFunctions
    mod = importlib.import_module(module)
    assert isinstance(mod, BackendFunctions)
    for name, params in _protocol_params().items():
        got = [p.name for p in inspect.signature(getattr(mod, name)).parameters.values()
               if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        assert got == params, f"{module}.{name}{tuple(got)} differs from BackendFunctions.{name}{tuple(params)}"


def test_extension_schemas_match_the_protocol():
    """The schemas of the extension's registered kernels (csrc/extension.cpp, mamlpp::native_*) name the
    protocol's parameters, in order, and so do the Python wrappers of the native backend; when the
    extension loads, the registered ops carry those schemas; _C.pyi describes what the module holds."""
    import re

    source = (ROOT / "csrc" / "extension.cpp").read_text()
    schemas = {}
    for m in re.finditer(r'm\.def\(\s*"native_(\w+)\(((?:[^)"]|"\s*")*)\)', source):
        args = re.sub(r'"\s*"', "", m.group(2))
        schemas[m.group(1)] = [a.split()[-1] for a in args.split(",")]
    from mamlpp_fast import _native
    for name, params in _protocol_params().items():
        assert schemas.get(name) == params, f"native_{name}{schemas.get(name)} vs BackendFunctions {params}"
        got = list(inspect.signature(getattr(_native.NativeFunctions, name)).parameters)
        assert got == params, f"NativeFunctions.{name}{got} vs BackendFunctions {params}"
    tree = ast.parse((ROOT / PKG / "_C.pyi").read_text())
    stub = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert stub == {"cuda_built", "cuda_arch"}
    if _native.is_loaded():
        import torch
        from mamlpp_fast.ops.backend import BackendFunctions
        assert isinstance(_native.get(), BackendFunctions)
        for name, params in _protocol_params().items():
            schema = getattr(torch.ops.mamlpp, f"native_{name}").default._schema
            assert [a.name for a in schema.arguments] == params
        assert all(callable(getattr(_native._C, n)) for n in stub)


def test_backend_names_agree_across_layers():
    """The config key and the CLI (lower/upper layers that may not import the registry at load time)
    accept exactly the registry's names."""
    from mamlpp_fast import config
    from mamlpp_fast.cli import build_parser
    from mamlpp_fast.ops.backend import BACKEND_NAMES
    assert set(config._CHOICES["backend"]) == set(BACKEND_NAMES)
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    (flag,) = [a for a in train._actions if "--backend" in a.option_strings]
    assert set(flag.choices) == set(BACKEND_NAMES)


# ----------------------------------------------------------------------------------------------------
# One learner core, composed (mamlpp_fast.learner_core)
# ----------------------------------------------------------------------------------------------------
def test_the_learners_are_composed_not_chained():
    """The fast learner neither imports nor subclasses the reference (the oracle it is checked against);
    both hold a LearnerCore; the data-parallel learner wraps a learner instead of subclassing one."""
    assert "mamlpp_fast.reference" not in GRAPH["mamlpp_fast.fast"]
    assert "mamlpp_fast.fast" not in GRAPH["mamlpp_fast.reference"]
    from mamlpp_fast.distributed import DistributedMAMLFewShotClassifier
    from mamlpp_fast.fast import MAMLFewShotClassifier as Fast
    from mamlpp_fast.learner_core import LearnerCore
    from mamlpp_fast.reference import MAMLFewShotClassifier as Reference
    assert not issubclass(Fast, Reference) and not issubclass(Reference, Fast)
    assert not issubclass(DistributedMAMLFewShotClassifier, (Fast, Reference))
    from mamlpp_fast.config import default_args
    args = default_args(cnn_num_filters=4, num_stages=1, number_of_training_steps_per_iter=1,
                        number_of_evaluation_steps_per_iter=1, batch_size=1)
    for cls in (Fast, Reference):
        model = cls((1, 1, 28, 28), "cpu", args)
        assert isinstance(model.core, LearnerCore) and model.core.learner is model
        assert model.optimizer is model.core.optimizer
