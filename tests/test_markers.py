"""The speed markers: the MARKS table of conftest names tests that exist, `make quick` leaves
out every marker that may be slow, and the unmarked-time limit of CI (tests/time_limit.py)
fails a session for an unmarked slow test, names it, and leaves other outcomes alone."""

from __future__ import annotations

import ast
import re
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

import time_limit
from conftest import MARKS, TESTS, marks_of

ROOT = TESTS.parent

SLEEPY = """
import time

import pytest


def test_fast():
    pass


def test_sleepy():
    time.sleep(0.15)


@pytest.mark.slow
def test_sleepy_but_marked():
    time.sleep(0.15)
"""


def _run(pytester: pytest.Pytester, monkeypatch, limit: str | None) -> pytest.RunResult:
    if limit is None:
        monkeypatch.delenv(time_limit.ENV, raising=False)
    else:
        monkeypatch.setenv(time_limit.ENV, limit)
    # Only the plugin under test: the installed ones (benchmark, hypothesis) cost start-up.
    return pytester.runpytest("-p", "time_limit", "-p", "no:cacheprovider",
                              "--disable-plugin-autoload")


def test_an_unmarked_test_over_the_limit_fails_the_session_by_name(pytester, monkeypatch):
    pytester.makepyfile(test_sleepy=SLEEPY)
    result = _run(pytester, monkeypatch, "0.05")
    result.assert_outcomes(passed=3)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    text = result.stdout.str()
    assert "unmarked tests over 0.05 s" in text
    offenders = [line for line in result.outlines if re.match(r"\s*\d+\.\d+ s  ", line)]
    assert len(offenders) == 1 and offenders[0].endswith("test_sleepy.py::test_sleepy")
    assert float(offenders[0].split()[0]) >= 0.15


def test_no_limit_without_the_variable_or_under_it(pytester, monkeypatch):
    pytester.makepyfile(test_sleepy=SLEEPY)
    assert _run(pytester, monkeypatch, None).ret == pytest.ExitCode.OK
    result = _run(pytester, monkeypatch, "30")
    assert result.ret == pytest.ExitCode.OK
    assert "unmarked tests over" not in result.stdout.str()


def test_no_tests_collected_stays_exit_5_and_failures_stay_1(pytester, monkeypatch):
    pytester.makepyfile(test_empty="")
    assert _run(pytester, monkeypatch, "0.05").ret == pytest.ExitCode.NO_TESTS_COLLECTED
    pytester.makepyfile(test_empty="import time\n\ndef test_x():\n    time.sleep(0.1)\n"
                                   "    assert False\n")
    assert _run(pytester, monkeypatch, "0.05").ret == pytest.ExitCode.TESTS_FAILED


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_row_of_the_table_names_a_test_that_exists():
    files = {p.relative_to(TESTS).as_posix(): _test_names(p) for p in TESTS.rglob("test_*.py")}
    for file, pattern, marks in MARKS:
        # The function name: the pattern up to its parameters ("[[]" is a literal "[").
        function = pattern.split("[[]")[0]
        assert set(marks) <= set(time_limit.MARKED), (file, pattern, marks)
        found = [rel for rel, names in files.items() if fnmatchcase(rel, file)
                 and any(fnmatchcase(n, function) or fnmatchcase(n, pattern) for n in names)]
        assert found, f"MARKS row ({file!r}, {pattern!r}) matches no test"


def test_table_gives_parametrized_tests_their_markers():
    assert marks_of("engine/test_slots.py",
                    "test_unseeded_rows_through_slots_draw_from_the_exact_distribution"
                    "[triton]") == {"interpreter", "statistical"}
    assert marks_of("engine/test_slots.py",
                    "test_unseeded_rows_through_slots_draw_from_the_exact_distribution"
                    "[reference]") == {"statistical"}
    assert marks_of("sampling/test_kernel.py", "test_chi_square_batch_invariance_and_graph"
                    "[gpu]") == {"interpreter", "statistical"}
    assert marks_of("core/test_params.py", "test_defaults") == set()


def test_make_quick_leaves_out_every_slow_marker_and_all_are_registered(pytestconfig):
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    quick = re.search(r"^QUICK := (.+)$", makefile, re.M).group(1)
    left_out = set(re.findall(r"not (\w+)", quick))
    assert left_out == set(time_limit.MARKED) - {"gpu"}
    registered = {line.split(":")[0] for line in pytestconfig.getini("markers")}
    assert set(time_limit.MARKED) <= registered
    assert re.search(r"^quick: .*\n\t.*pytest -q -m \"\$\(QUICK\)\"", makefile, re.M)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert f"{time_limit.ENV}=3 make test" in ci



MARKERS_PLUGIN = """
import os


def pytest_collection_finish(session):
    with open(os.environ["LMGEN_MARKERS_OUT"], "w") as f:
        for item in session.items:
            marks = ",".join(sorted({m.name for m in item.iter_markers()}))
            f.write(f"{item.nodeid}\\t{marks}\\n")
"""


def collected_markers(tmp_path: Path) -> dict[str, set[str]]:
    """Every test of the suite (node id) with its markers, as a collection gives them."""
    import os
    import subprocess
    import sys

    (tmp_path / "lmgen_markers_plugin.py").write_text(MARKERS_PLUGIN)
    out = tmp_path / "markers.tsv"
    env = dict(os.environ, LMGEN_MARKERS_OUT=str(out),
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", "-p", "lmgen_markers_plugin", "tests"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    return {node: set(filter(None, marks.split(","))) for node, marks in rows}


def test_every_gpu_test_has_an_interpreter_twin(tmp_path):
    """`pytest -m gpu` (what benchmarks/device_check.sh runs) selects each GPU test, and each
    has a twin of the same name in the same file that runs under the interpreter on the
    CPU (conftest's kernel_device pairs: test_x[gpu] and test_x[interpreter])."""
    items = collected_markers(tmp_path)
    base = {node: node.split("[")[0] for node in items}
    twins = {base[n] for n, marks in items.items() if "interpreter" in marks and "gpu" not in marks}
    gpu = {base[n] for n, marks in items.items() if "gpu" in marks}
    assert any("[gpu" in n for n in items) and twins, "no kernel_device pair was collected"
    unpaired = {(b.split("::")[0].removeprefix("tests/"), b.split("::")[-1])
                for b in gpu - twins}
    assert not unpaired, sorted(unpaired)
    # Each pair's [gpu] half carries the marker, its [interpreter] half does not.
    for node, marks in items.items():
        if "[gpu" in node or "-gpu" in node:
            assert "gpu" in marks, node
        if "[interpreter" in node or "-interpreter" in node:
            assert "gpu" not in marks, node
