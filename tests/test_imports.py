"""The shape of the package: every module imports, and lmgen_fast's imports form no cycle.

The rule (also in docs/architecture.md): the imports between lmgen_fast modules, at module
level and inside functions alike, form a directed acyclic graph. A module imports what it
builds on at module level. An import inside a function is allowed only where it is listed in
:data:`LAZY` with its reason (an optional or slow dependency behind it). A core module that
must reach a plugin (the transformers adapter) does so through a registry table that names
the plugin's module; the plugin imports the core and registers itself.

Implicit imports of a parent package (importing ``lmgen_fast.x`` runs ``lmgen_fast``'s
``__init__`` first) are not edges: Python resolves them before the module body runs.
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

# (importer, imported) -> why the import waits until a function runs.
LAZY = {
    ("lmgen_fast.sampling", "lmgen_fast.kernel_sampler"):
        "the Triton launcher is loaded only when the triton backend is chosen",
    ("lmgen_fast.kernel_sampler", "lmgen_fast.kernels.sampling"):
        "imports triton (slow, and absent off Linux) only when a kernel first runs",
    ("lmgen_fast.fused_ops", "lmgen_fast.kernels.decode"):
        "imports triton only when a fused decode kernel first runs",
    ("lmgen_fast.kernel_sampler", "lmgen_fast.kernels.window"):
        "as above, for the sampler's set-up kernel",
    ("lmgen_fast.bookkeeping", "lmgen_fast.kernels.bookkeeping"):
        "imports triton only when the bookkeeping kernel first runs",
    ("lmgen_fast.kernel_compile", "lmgen_fast.kernels.bookkeeping"):
        "the compile check imports the kernels it compiles, with triton, when it runs",
    ("lmgen_fast.kernel_compile", "lmgen_fast.kernels.decode"):
        "as above, for the decode-step kernels",
    ("lmgen_fast.kernel_compile", "lmgen_fast.fused_ops"):
        "as above: the launch shapes of the decode-step kernels",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "lmgen_fast").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    # kernels/ installs as lmgen_fast.kernels (pyproject's package-dir).
    for path in sorted((ROOT / "kernels").glob("*.py")):
        found["lmgen_fast.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return found


MODULES = _modules()


def _edges() -> list[tuple[str, str, bool, int]]:
    """``(importer, imported, inside_a_function, line)`` for every lmgen_fast import."""
    edges = []
    for name, path in MODULES.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]

        def visit(node, lazy, name=name, package=package):
            for child in ast.iter_child_nodes(node):
                inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                   ast.Lambda))
                targets: list[str] = []
                if isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    if child.level:
                        base = package.split(".")[: len(package.split(".")) - child.level + 1]
                        module = ".".join(base + ([child.module] if child.module else []))
                    else:
                        module = child.module or ""
                    subs = [f"{module}.{a.name}" for a in child.names
                            if f"{module}.{a.name}" in MODULES]
                    # `from . import jobs` imports the submodule; `from . import __version__`
                    # the package itself.
                    targets = subs + ([module] if len(subs) < len(child.names) else [])
                for target in targets:
                    if target.split(".")[0] == "lmgen_fast" and target != name:
                        edges.append((name, target, lazy, child.lineno))
                visit(child, inner)

        visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return edges


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


def test_every_import_names_a_module_of_the_package():
    unknown = {(a, b) for a, b, *_ in _edges() if b not in MODULES}
    assert not unknown, unknown


def test_module_level_imports_form_a_dag():
    cycle = _cycle([e for e in _edges() if not e[2]])
    assert cycle is None, " -> ".join(cycle)


def test_no_cycle_even_through_function_level_imports():
    cycle = _cycle(_edges())
    assert cycle is None, " -> ".join(cycle)


def test_function_level_imports_are_the_justified_ones():
    lazy = {(a, b): line for a, b, is_lazy, line in _edges() if is_lazy}
    unexplained = {f"{a} -> {b} (line {line})" for (a, b), line in lazy.items()
                   if (a, b) not in LAZY}
    assert not unexplained, f"justify these in LAZY or import at module level: {unexplained}"
    stale = set(LAZY) - set(lazy)
    assert not stale, f"no longer lazy, drop from LAZY: {stale}"


def test_the_cycles_the_issue_named_are_gone():
    pairs = {(a, b) for a, b, *_ in _edges()}
    for a, b in [("lmgen_fast.cli", "lmgen_fast.jobs"), ("lmgen_fast.decoder", "lmgen_fast.hf"),
                 ("lmgen_fast.models.llama", "lmgen_fast.hf")]:
        assert not ((a, b) in pairs and (b, a) in pairs), (a, b)


def test_plain_import_leaves_the_optional_extras_alone():
    code = ("import sys, lmgen_fast, lmgen_fast.cli, lmgen_fast.jobs; "
            "print(sorted(m for m in ('transformers', 'lmgen_fast.hf') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_registry_tables_name_modules_that_register_themselves():
    pytest.importorskip("transformers")
    from lmgen_fast import decoder
    from lmgen_fast.models import llama

    for module in {*decoder.ADAPTER_MODULES.values(), *llama.CONVERTER_MODULES.values()}:
        assert module in MODULES
        importlib.import_module(module)
    hf = importlib.import_module("lmgen_fast.hf")
    assert hf.hf_adapter in decoder.ADAPTERS
    assert llama.CONVERTERS == {"from_hf": hf.from_hf, "to_hf": hf.to_hf}
    # The plugin depends on the core, never the reverse.
    pairs = {(a, b) for a, b, *_ in _edges()}
    assert ("lmgen_fast.hf", "lmgen_fast.decoder") in pairs
    assert not any(b == "lmgen_fast.hf" for _a, b in pairs)


OWNED_MAX_LINES = 450


@pytest.mark.parametrize("name", [
    "lmgen_fast.cli", "lmgen_fast.cli_options", "lmgen_fast.jobs", "lmgen_fast.job_runner",
    "lmgen_fast.job_input",
    "lmgen_fast.manifest", "lmgen_fast.progress", "lmgen_fast.jsonl", "lmgen_fast.train",
    "lmgen_fast.train_data", "lmgen_fast.loss_plot", "lmgen_fast.decoder", "lmgen_fast.hf",
    "lmgen_fast.models.llama",
])
def test_job_cli_and_model_modules_stay_small(name):
    lines = MODULES[name].read_text(encoding="utf-8").count("\n")
    assert lines <= OWNED_MAX_LINES, f"{name}: {lines} lines; split it where a seam exists"
