"""benchmarks/render_results.py turns the benchmarks' JSON into RESULTS.md markdown.

The fast tests build the JSON with the scripts' own writer functions (the numbers are made
up: only the format matters); the slow one runs the scripts in their CPU modes
(bench_sampler's interpreter smoke run, bench_decode's tiny model) and renders what they
wrote. Not speed tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmgen_fast.models import LlamaConfig

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_decode  # noqa: E402
import bench_sampler  # noqa: E402
import render_results  # noqa: E402

from _common import write_json  # noqa: E402

INFO = {"device": "NVIDIA H200", "torch": "2.11.0+cu128", "triton": "3.6.0",
        "date": "2026-12-02 10:00:00 UTC", "command": "python benchmarks/bench_sampler.py"}
COPY_GBS = 4000.0


def sampler_file(tmp_path: Path) -> Path:
    configs = bench_sampler.grid("quick")
    rows = [bench_sampler.make_row(c, chunk=4096, chunk_warps=8, kernel_us=10.0 + i,
                                   copy_gbs=COPY_GBS, slow_rows=0, kernel_eager_us=30.0,
                                   eager_us=200.0, hf_us=100.0, compile_us=None)
            for i, c in enumerate(configs[:10])]
    payload = bench_sampler.make_payload("quick", {**INFO, "command": INFO["command"] +
                                                   " --quick"}, COPY_GBS, configs,
                                         configs[:10], rows, ["budget of 25 s spent"])
    return write_json(str(tmp_path / "bench_sampler_quick.json"), payload)


def tune_file(tmp_path: Path) -> Path:
    configs = bench_sampler.grid("tune")
    times = {(2048, 4): 9.0, (2048, 8): 8.0, (4096, 8): 7.0, (4096, 16): 6.5, (8192, 16): 8.5}
    rows = []
    for c in configs:
        extra = {"slow_rows": 0} if c.chunk == 2048 and c.chunk_warps == 4 else \
            {"slow_rows": 0, "tokens_match": True}
        us = times[(c.chunk, c.chunk_warps)] * (1 if c.B == 1 else 4)
        if c.B == 64 and c.chunk == 8192:
            us, extra["tokens_match"] = 1.0, False  # fastest but wrong: never the best
            extra["bad_rows"] = 3
        rows.append(bench_sampler.make_row(c, chunk=c.chunk, chunk_warps=c.chunk_warps,
                                           kernel_us=us, copy_gbs=COPY_GBS, **extra))
    payload = bench_sampler.make_payload("tune", {**INFO, "command": INFO["command"] +
                                                  " --tune"}, COPY_GBS, configs, configs,
                                         rows, [], {"chunk": 4096, "chunk_warps": 8})
    return write_json(str(tmp_path / "bench_sampler_tune.json"), payload)


def decode_file(tmp_path: Path) -> Path:
    model = bench_decode.build("cpu", tiny=True)
    results = [
        {"batch": 1, "tok_s": {"lmgen-fast": 900.0, "lmgen-fast, no graphs": 300.0,
                               "transformers": 100.0, "naive article loop": 50.0},
         "sampler_us": 12.0, "step_us": 1000.0, "sampler_share": 0.012,
         "roofline_ratio": 2.5},
        {"batch": 64, "tok_s": {"lmgen-fast": 40000.0, "lmgen-fast, no graphs": 9000.0},
         "sampler_us": 30.0, "step_us": 1600.0, "sampler_share": 0.019,
         "roofline_ratio": 3.1},
    ]
    profiles = {1: {"kernels_per_step": 150.0, "us_per_step": 800.0,
                    "top": [{"name": "ampere_bf16_gemm|x", "per_step": 30.0, "us": 400.0}]}}
    payload = bench_decode.make_payload(
        {**INFO, "command": "python benchmarks/bench_decode.py --batches 1 64 256"}, model,
        tokens=256, naive_tokens=32, repeats=2, bandwidth=COPY_GBS, batches=[1, 64, 256],
        complete=False, results=results, notes=["B=64: transformers skipped (budget)"],
        profiles=profiles)
    return write_json(str(tmp_path / "bench_decode_cuda.json"), payload)


def launches_file(tmp_path: Path) -> Path:
    config = LlamaConfig().to_dict()  # the article's, as bench_launches.py counts it
    results = [
        {"backend": "reference", "batch": 1, "fused": False, "steps": 2, "per_layer": 27.0,
         "model_other": 14.0, "model": 338.0, "sampler": 260.0, "bookkeeping": 26.0,
         "total": 624.0, "profiler_kernels": 610.0,
         "triton": {"model.layers": 0.0, "model.other": 0.0, "sampler": 0.0,
                    "bookkeeping": 0.0}},
        {"backend": "triton", "batch": 1, "fused": True, "steps": 2, "per_layer": 9.0,
         "model_other": 4.0, "model": 112.0, "sampler": 3.0, "bookkeeping": 1.0,
         "total": 116.0, "profiler_kernels": 117.5,
         "triton": {"model.layers": 60.0, "model.other": 1.0, "sampler": 3.0,
                    "bookkeeping": 1.0}},
    ]
    payload = {"kind": "bench_launches", **INFO,
               "command": "python benchmarks/bench_launches.py --device cuda",
               "config": config, "dtype": "torch.bfloat16", "prompt_len": 16, "tokens": 3,
               "results": results, "notes": ["counted per component"]}
    return write_json(str(tmp_path / "bench_launches_cuda.json"), payload)


def test_renders_every_known_kind_and_skips_the_rest(tmp_path):
    paths = [sampler_file(tmp_path), tune_file(tmp_path), decode_file(tmp_path),
             launches_file(tmp_path)]
    unknown = tmp_path / "bench_future.json"
    unknown.write_text(json.dumps({"kind": "bench_future", "rows": [{"kernels": 3}]}))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    md = render_results.render_files([*paths, unknown, broken], "benchmarks/device_check.sh")
    lines = md.splitlines()
    assert lines[0] == "## NVIDIA H200, torch 2.11.0+cu128, triton 3.6.0 (2026-12-02)"
    assert "Recorded by `benchmarks/device_check.sh`." in md
    # Sections in a fixed order: tuning, sampler, decode, launches; each headed with its run.
    heads = [line for line in lines if line.startswith("### ")]
    assert [h.split(" (")[0] for h in heads] == [
        "### The chunk kernel's launch", "### One sampling step", "### The decode engine",
        "### Kernels per decode step"]
    assert md.count("**NVIDIA H200**, torch 2.11.0+cu128, triton 3.6.0, 2026-12-02") == 4
    assert "`python benchmarks/bench_sampler.py --tune`" in md

    # The sampler: one row per measured configuration, the cut short noted.
    assert "| 1 | 128256 | bfloat16 | k=50 | 4096/8 | 10.0 | 26 | 0.6% | 0 | 30.0 | 200.0 " \
           "| - | 100.0 | 20.0x | 10.0x | - |" in md
    assert "| 64 | 128256 | bfloat16 | k=50 | 4096/8 | 11.0 | 1492 | 37% |" in md
    assert len([x for x in lines if x.count("|") == 17 and x[2:3].isdigit()]) == 10
    assert "_Cut short (budget or timeout): 10 of 12 configurations measured" in md
    assert "- note: budget of 25 s spent" in md

    # The tuning grid: ten rows, the default marked, the best per B named, the wrong
    # launch flagged and never best.
    tune = md.split("### The chunk kernel's launch")[1].split("### ")[0]
    tune_rows = [x for x in tune.splitlines() if x.startswith("| 1 |") or x.startswith("| 64 |")]
    assert len(tune_rows) == 10
    assert "| 1 | 4096 | 8 | 7.0 | 37 | 0.9% | yes | default |" in tune
    assert "| 1 | 4096 | 16 | 6.5 | 39 | 1.0% | yes | **best** |" in tune
    assert "| 64 | 8192 | 16 | 1.0 | 16417 | 410% | **NO** |  |" in tune
    assert "| 1 | 2048 | 4 | 9.0 | 29 | 0.7% | (first) |  |" in tune
    assert "- Best at B = 1: chunk 4096, 16 warps, 6.5 µs (1.0% of copy); the default 4096/8 " \
           "takes 7.0 µs." in tune
    assert "- Best at B = 64: chunk 4096, 16 warps, 26.0 µs" in tune
    assert "- note: **3 of 64 rows returned an error status** at B=64 V=128256 bfloat16 k=50" \
        in tune

    # The decode engine: tok/s with lmgen-fast's speed-up, the GPU columns, the profile.
    decode = md.split("### The decode engine")[1]
    assert "| B | lmgen-fast | lmgen-fast, no graphs | transformers | naive article loop " \
           "| step µs | sampler share | roofline x |" in decode
    assert "| 1 | 900.0 | 300.0 (lmgen-fast 3.0x) | 100.0 (lmgen-fast 9.0x) | " \
           "50.0 (lmgen-fast 18.0x) | 1000.0 | 1.2% | 2.50 |" in decode
    assert "| 64 | 40000.0 | 9000.0 (lmgen-fast 4.4x) | - | - | 1600.0 | 1.9% | 3.10 |" in decode
    assert "batch sizes [1, 64] of [1, 64, 256] measured" in decode
    assert "- note: B=64: transformers skipped (budget)" in decode
    assert "B = 1: one eager decode step runs 150 kernels (800 µs busy)" in decode
    assert "| 400.0 | 30.0 | `ampere_bf16_gemm\\|x` |" in decode

    # Kernels per step: both paths, Triton launches in brackets, the profiler's count.
    launches = md.split("### Kernels per decode step")[1]
    assert "`python benchmarks/bench_launches.py --device cuda`" in launches
    assert "hidden size 768, hidden layers 12, attention heads 12, key value heads 3" \
        in launches
    assert "| backend | B | fused | per layer | model other | model | sampler | bookkeeping " \
           "| total | profiler |" in launches
    assert "| reference | 1 | no | 27.0 | 14.0 | 338.0 | 260.0 | 26.0 | 624.0 | 610.0 |" \
        in launches
    assert "| triton | 1 | yes | 9.0 | 4.0 | 112.0 | 3.0 (3) | 1.0 (1) | 116.0 | 117.5 |" \
        in launches
    assert "- note: counted per component" in launches

    # Unknown kinds and unreadable files: skipped with a note, the rest rendered.
    assert "_Skipped `" + str(unknown) + "`: kind 'bench_future' has no renderer yet._" in md
    assert "_Skipped `" + str(broken) + "`: not readable JSON" in md


def test_main_reads_the_files_it_is_given(tmp_path, capsys):
    path = tune_file(tmp_path)
    assert render_results.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## NVIDIA H200") and "Best at B = 64" in out


def test_files_written_before_kinds_are_recognised(tmp_path):
    old = {"device": "NVIDIA H100", "torch": "2.5", "results": [{"batch": 1, "tok_s":
                                                                 {"lmgen-fast": 1.0}}]}
    assert render_results.kind_of(old) == "bench_decode"
    assert render_results.kind_of({"rows": [{"kernel_us": 1.0}]}) == "bench_sampler"
    assert render_results.kind_of([1, 2]) is None
    path = tmp_path / "bench_decode_cuda.json"
    path.write_text(json.dumps(old))
    md = render_results.render_files([path])
    assert "| 1 | 1.0 |" in md and "(file date)" in md


def test_renders_what_the_scripts_write_on_the_cpu(tmp_path, monkeypatch, capsys):
    quick, tune, decode = (tmp_path / n for n in ("quick.json", "tune.json", "decode.json"))
    assert bench_sampler.main(["--quick", "--smoke", "--iters", "1", "--limit", "2",
                               "--json", str(quick)]) == 0
    assert bench_sampler.main(["--tune", "--smoke", "--iters", "1", "--json", str(tune)]) == 0
    monkeypatch.setattr(sys, "argv", [
        "bench_decode.py", "--device", "cpu", "--tiny", "--tokens", "3", "--batches", "1",
        "--naive-tokens", "2", "--repeats", "1", "--no-hf", "--json", str(decode)])
    bench_decode.main()
    capsys.readouterr()
    md = render_results.render_files([quick, tune, decode])
    assert md.count("\n### ") == 3
    assert "| 1 | 2048 | bfloat16 | k=50 | 1024/4 |" in md
    assert "| 2 | 2048 | bfloat16 | k=50 | 1024/4 |" in md
    tune_rows = [x for x in md.split("### One sampling step")[0].splitlines()
                 if x.startswith(("| 1 | ", "| 2 | "))]
    assert len(tune_rows) == 4 and "(first)" in tune_rows[0] and "| yes |" in tune_rows[2]
    assert "Best at B = 1" in md and "Best at B = 2" in md
    assert "| B | lmgen-fast | naive article loop |" in md
    assert "one eager decode step runs" in md
    for path in (quick, tune, decode):
        assert json.loads(path.read_text())["complete"] is True
