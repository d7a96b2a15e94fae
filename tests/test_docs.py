"""README and docs stand alone: no path outside the repository, links that resolve, and
speed figures that agree with benchmarks/RESULTS.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_path_outside_the_repository(doc):
    text = doc.read_text(encoding="utf-8")
    assert "../" not in text
    assert not re.search(r"(?<![\w.])/(work|home|tmp|Users)/", text)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_and_named_files_exist(doc):
    text = doc.read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)", text) if "://" not in t]
    # Paths quoted in code spans: `benchmarks/RESULTS.md`, `lmgen_fast/philox.py`, ...
    targets += re.findall(r"`((?:lmgen_fast|benchmarks|docs|tests|kernels)/[\w./-]+\.\w+)`",
                          text)
    missing = [t for t in targets if not (doc.parent / t).exists() and not (ROOT / t).exists()]
    assert not missing, missing


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end >= 0 else None]


def test_readme_speed_figures_are_those_of_results_and_name_their_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    speed = _section(readme, "## Speed")
    rows = [line for line in speed.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) >= 4
    for row in rows[1:]:
        what, model, command, result = (cell.strip() for cell in row.strip("|").split("|"))
        assert model and result
        command = command.strip("`")
        assert command.startswith(("lmgen-fast bench", "python benchmarks/")), row
        assert command.split(" ", 1)[-1] in results or command in results, command
        for number in re.findall(r"\d+\.\d+", result):
            assert number in results, (number, row)
    assert "Intel Xeon, 2 cores" in speed and "Intel Xeon, 2 cores" in results


def test_semantics_covers_the_contract():
    text = (ROOT / "docs" / "semantics.md").read_text(encoding="utf-8")
    for heading in ("## 1. The drop-in call", "## 2. One sampling step",
                    "## 3. Extensions, in the order they act", "## 4. Noise and seeds",
                    "## 5. The article's model"):
        assert heading in text
    for name in ("base_model.embed_tokens.weight", "lm_head.weight", "penalty_scope",
                 "penalty_mode", "top_p", "min_p", "frequency_penalty", "Philox"):
        assert name in text, name
    assert "docs/semantics.md" in (ROOT / "README.md").read_text(encoding="utf-8")
