"""The shape of the package (docs/architecture.md): layers whose imports point down only,
no use of another module's private names, no cycle, and modules and functions of a size a
reader takes in at once.

Every import between lmgen_fast modules counts, at module level and inside functions alike.
An import inside a function is allowed only where :data:`LAZY` lists it with its reason (an
optional or slow dependency behind it). A core module that must reach a plugin (the
transformers adapter) does so through a registry table that names the plugin's module; the
plugin imports the core and registers itself.

Implicit imports of a parent package (importing ``lmgen_fast.x.y`` runs ``lmgen_fast`` and
``lmgen_fast.x`` first) are not edges: Python resolves them before the module body runs.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top: a module imports modules of its own layer (without a cycle) or of the
# layers below it. The package itself and its public alias modules sit on top.
LAYERS = ("core", "runtime", "kernels", "sampling", "models", "engine", "speculative", "api",
          "jobs", "cli", "train", "integrations", "")
# The training code builds on these layers only (it never runs the decoder).
TRAIN_IMPORTS = {"core", "models", "train"}

# (importer, imported) -> why the import waits until a function runs.
LAZY = {
    ("lmgen_fast.models.fused_mlp", "lmgen_fast.kernels.mlp"):
        "imports triton only when the fused MLP kernel first runs",
    ("lmgen_fast.sampling.dispatch", "lmgen_fast.sampling.kernel"):
        "the Triton launcher is loaded only when the triton backend is chosen",
    ("lmgen_fast.sampling.kernel_launch", "lmgen_fast.kernels.chunk"):
        "imports triton (slow, and absent off Linux) only when a kernel first runs",
    ("lmgen_fast.sampling.kernel_launch", "lmgen_fast.kernels.merge"):
        "as above, for the sampler's merge kernel",
    ("lmgen_fast.models.fused_ops", "lmgen_fast.kernels.decode"):
        "imports triton only when a fused decode kernel first runs",
    ("lmgen_fast.sampling.kernel_launch", "lmgen_fast.kernels.window"):
        "as above, for the sampler's set-up kernel",
    ("lmgen_fast.engine.bookkeeping", "lmgen_fast.kernels.bookkeeping"):
        "imports triton only when the bookkeeping kernel first runs",
    ("lmgen_fast.cli.kernel_compile", "lmgen_fast.kernels.bookkeeping"):
        "the compile check imports the kernels it compiles, with triton, when it runs",
    ("lmgen_fast.cli.kernel_compile", "lmgen_fast.kernels.decode"):
        "as above, for the decode-step kernels",
    ("lmgen_fast.cli.kernel_compile", "lmgen_fast.models.fused_ops"):
        "as above: the launch shapes of the decode-step kernels",
    ("lmgen_fast.engine.grammar", "xgrammar"):
        "the structured extra: imported when a run first compiles a grammar or opens a matcher",
    ("lmgen_fast.core.plot", "matplotlib"):
        "the plot extra: imported when a figure is first made, so lmgen-fast runs without it",
}
# Third-party packages of an optional extra: every import of one sits inside a function and
# is listed in LAZY as (importer, package), like the lazy imports between our modules.
OPTIONAL = {"matplotlib", "xgrammar"}

# The most lines a module, and a function or class (its docstring not counted), may take.
MODULE_MAX_LINES = 450
DEF_MAX_LINES = 80
# A longer function or class says why in its docstring, in a line that starts with this.
LONG_REASON = "Length:"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "lmgen_fast").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts[-1] == "__main__":
            continue
        found[".".join(parts)] = path
    # kernels/ installs as lmgen_fast.kernels (pyproject's package-dir).
    for path in sorted((ROOT / "kernels").glob("*.py")):
        found["lmgen_fast.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return found


MODULES = _modules()


def layer(module: str) -> str:
    """The layer of ``lmgen_fast.<layer>.x`` ("" for the package and its top-level aliases)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and module in _PACKAGES) else ""


_PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def _resolve(node: ast.ImportFrom, package: str) -> str:
    if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))
    return node.module or ""


def _scan(name: str, path: Path):
    """``(edges, private_uses)`` of one module: ``(imported, inside_a_function, line)`` for
    every lmgen_fast import, ``(what, line)`` for every use of another module's private name."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    edges, private, aliases = [], [], {}

    def visit(node, lazy):
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                               ast.Lambda))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
                for a in child.names:
                    if a.name in MODULES:
                        aliases[a.asname or a.name.split(".")[0]] = a.name
            elif isinstance(child, ast.ImportFrom):
                module = _resolve(child, package)
                subs = []
                for a in child.names:
                    full = f"{module}.{a.name}"
                    if full in MODULES:
                        subs.append(full)
                        aliases[a.asname or a.name] = full
                    elif (module.startswith("lmgen_fast") and a.name.startswith("_")
                          and not a.name.startswith("__")):
                        private.append((f"from {module} import {a.name}", child.lineno))
                # `from x import submodule` imports the submodule; other names the module.
                targets = subs + ([module] if len(subs) < len(child.names) else [])
            for target in targets:
                if target.split(".")[0] == "lmgen_fast" and target != name:
                    edges.append((target, lazy, child.lineno))
            visit(child, inner)

    visit(tree, False)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and aliases[node.value.id] != name
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            private.append((f"{aliases[node.value.id]}.{node.attr}", node.lineno))
    return edges, private


SCANS = {name: _scan(name, path) for name, path in MODULES.items()}


def _optional_imports(name: str, path: Path) -> list[tuple[str, str, bool, int]]:
    """``(importer, package, inside_a_function, line)`` for each import of an
    :data:`OPTIONAL` package in one module."""
    found = []

    def visit(node, lazy):
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                               ast.Lambda))
            names = [a.name for a in child.names] if isinstance(child, ast.Import) else \
                [child.module or ""] if isinstance(child, ast.ImportFrom) and not child.level \
                else []
            found.extend((name, n.split(".")[0], lazy, child.lineno) for n in names
                         if n.split(".")[0] in OPTIONAL)
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


OPTIONAL_IMPORTS = [i for name, path in MODULES.items() for i in _optional_imports(name, path)]


def _edges() -> list[tuple[str, str, bool, int]]:
    """``(importer, imported, inside_a_function, line)`` for every lmgen_fast import."""
    return [(name, *edge) for name, (edges, _) in SCANS.items() for edge in edges]


def _cycle(edges) -> list[str] | None:
    graph = defaultdict(set)
    for a, b, *_ in edges:
        graph[a].add(b)
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (found := dfs(v)):
                return found
        stack.pop()
        state[u] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := dfs(module)):
            return found
    return None


def test_every_module_imports():
    for name in MODULES:
        importlib.import_module(name)


def test_every_module_has_a_layer():
    unknown = {name: layer(name) for name in MODULES if layer(name) not in LAYERS}
    assert not unknown, f"put these in a layer of LAYERS (docs/architecture.md): {unknown}"


def test_every_import_names_a_module_of_the_package():
    unknown = {(a, b) for a, b, *_ in _edges() if b not in MODULES}
    assert not unknown, unknown


def test_imports_point_down_the_layers():
    up = {f"{a} -> {b} (line {line})" for a, b, _lazy, line in _edges()
          if LAYERS.index(layer(b)) > LAYERS.index(layer(a))}
    assert not up, f"these imports point up a layer: {sorted(up)}"


def test_training_builds_on_core_and_models_only():
    wide = {f"{a} -> {b}" for a, b, *_ in _edges()
            if layer(a) == "train" and layer(b) not in TRAIN_IMPORTS}
    assert not wide, wide


def test_no_module_uses_another_modules_private_names():
    uses = {f"{name}:{line}: {what}" for name, (_, private) in SCANS.items()
            for what, line in private}
    assert not uses, f"make these public where they belong, or move them: {sorted(uses)}"


def test_module_level_imports_form_a_dag():
    cycle = _cycle([e for e in _edges() if not e[2]])
    assert cycle is None, " -> ".join(cycle)


def test_no_cycle_even_through_function_level_imports():
    cycle = _cycle(_edges())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycles_the_issue_named_are_gone():
    pairs = {(a, b) for a, b, *_ in _edges()}
    for a, b in [("lmgen_fast.cli.main", "lmgen_fast.cli.run"),
                 ("lmgen_fast.models.decoder", "lmgen_fast.models.hf"),
                 ("lmgen_fast.models.llama", "lmgen_fast.models.hf")]:
        assert not ((a, b) in pairs and (b, a) in pairs), (a, b)


def test_function_level_imports_are_the_justified_ones():
    lazy = {(a, b): line for a, b, is_lazy, line in _edges() if is_lazy}
    unexplained = {f"{a} -> {b} (line {line})" for (a, b), line in lazy.items()
                   if (a, b) not in LAZY}
    assert not unexplained, f"justify these in LAZY or import at module level: {unexplained}"
    stale = set(LAZY) - set(lazy) - {(a, b) for a, b, *_ in OPTIONAL_IMPORTS}
    assert not stale, f"no longer lazy, drop from LAZY: {stale}"


def test_optional_extras_are_imported_inside_functions_and_justified(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import matplotlib.pyplot\ndef f():\n    from matplotlib import ticker\n")
    assert _optional_imports("p", probe) == [("p", "matplotlib", False, 1),
                                             ("p", "matplotlib", True, 3)]
    eager = [f"{a}:{line} imports {b}" for a, b, lazy, line in OPTIONAL_IMPORTS if not lazy]
    assert not eager, f"import these inside the functions that need them: {eager}"
    unexplained = {(a, b) for a, b, *_ in OPTIONAL_IMPORTS} - set(LAZY)
    assert not unexplained, f"justify these in LAZY: {unexplained}"


def python_in_checkout(code: str, *flags: str) -> subprocess.CompletedProcess:
    """``python FLAGS -c CODE`` in a fresh interpreter, from the repository root."""
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_no_command_imports_matplotlib_until_it_draws():
    code = ("import sys, lmgen_fast.cli.main, lmgen_fast.train.loop, lmgen_fast.core.plot; "
            "print('matplotlib' in sys.modules)")
    done = python_in_checkout(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_the_checks_catch_what_they_forbid(tmp_path):
    """The scanner sees an upward import, a private import and a private attribute."""
    path = tmp_path / "probe.py"
    path.write_text("from lmgen_fast.cli.main import main\n"
                    "from lmgen_fast.engine.loop import _hidden\n"
                    "from lmgen_fast.models import decoder as d\n"
                    "d._round(3)\n")
    edges, private = _scan("lmgen_fast.core.probe", path)
    assert ("lmgen_fast.cli.main", False, 1) in edges
    assert {what for what, _ in private} == {"from lmgen_fast.engine.loop import _hidden",
                                            "lmgen_fast.models.decoder._round"}
    assert LAYERS.index(layer("lmgen_fast.cli.main")) > LAYERS.index(layer("lmgen_fast.core.x"))


def test_plain_import_leaves_the_optional_extras_alone():
    code = ("import sys, lmgen_fast, lmgen_fast.cli, lmgen_fast.cli.run; "
            "print(sorted(m for m in ('transformers', 'lmgen_fast.models.hf') "
            "if m in sys.modules))")
    done = python_in_checkout(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_registry_tables_name_modules_that_register_themselves():
    pytest.importorskip("transformers")
    from lmgen_fast.models import decoder, llama

    for module in {*decoder.ADAPTER_MODULES.values(), *llama.CONVERTER_MODULES.values()}:
        assert module in MODULES
        importlib.import_module(module)
    hf = importlib.import_module("lmgen_fast.models.hf")
    assert hf.hf_adapter in decoder.ADAPTERS
    assert llama.CONVERTERS == {"from_hf": hf.from_hf, "to_hf": hf.to_hf}
    # The plugin depends on the core, never the reverse.
    pairs = {(a, b) for a, b, *_ in _edges()}
    assert ("lmgen_fast.models.hf", "lmgen_fast.models.decoder") in pairs
    assert not any(b == "lmgen_fast.models.hf" for _a, b in pairs)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    lines = MODULES[name].read_text(encoding="utf-8").count("\n")
    assert lines <= MODULE_MAX_LINES, f"{name}: {lines} lines; split it where a seam exists"


def _long_definitions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        span = node.end_lineno - node.lineno + 1
        doc = ast.get_docstring(node, clean=True)
        if doc is not None:
            first = node.body[0]
            span -= first.end_lineno - first.lineno + 1
        if span > DEF_MAX_LINES and not any(line.startswith(LONG_REASON)
                                            for line in (doc or "").splitlines()):
            yield f"{node.name} ({span} lines)"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_long_functions_and_classes_say_why(name):
    long = list(_long_definitions(MODULES[name]))
    assert not long, (f"{name}: {long}: split them, or give the reason in a docstring line "
                      f"starting with {LONG_REASON!r}")


def test_only_the_harness_plugin_imports_lm_eval():
    """lm_eval (the eval extra) is imported by lmgen_fast.integrations.lm_eval alone, which
    nothing imports: the plugin registers itself when the user imports it."""
    found = {name for name, path in MODULES.items()
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if (isinstance(node, ast.Import)
                 and any(a.name.split(".")[0] == "lm_eval" for a in node.names))
             or (isinstance(node, ast.ImportFrom) and not node.level
                 and (node.module or "").split(".")[0] == "lm_eval")}
    assert found == {"lmgen_fast.integrations.lm_eval"}
    assert not [e for e in _edges() if e[1].startswith("lmgen_fast.integrations")]


def test_a_bare_kernels_import_from_the_checkout_is_never_these_sources():
    """Run from the repository root (cwd first on sys.path), ``import kernels`` gives the
    index's ``kernels`` package that transformers imports (installed with the hf extra):
    transformers' hub-kernels module loads; without that package it fails as a missing
    module does. The sources still load as lmgen_fast.kernels."""
    code = ("import transformers.integrations.hub_kernels, kernels, lmgen_fast.kernels as ours; "
            "print(kernels.__file__); print(hasattr(kernels, 'CUDAProperties')); "
            "print(ours.__file__)")
    done = python_in_checkout(code)
    assert done.returncode == 0, done.stderr
    theirs, has_api, ours = done.stdout.split("\n")[:3]
    assert Path(theirs).parent != ROOT / "kernels" and has_api == "True"
    assert Path(ours) == ROOT / "kernels" / "__init__.py"
    # Without site-packages (-S) the bare name is missing, not our folder.
    code = "import sys; sys.path.insert(0, ''); import kernels"
    done = python_in_checkout(code, "-S")
    assert done.returncode == 1 and "ModuleNotFoundError: No module named 'kernels'" in \
        done.stderr, done.stderr
