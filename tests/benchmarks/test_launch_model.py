"""benchmarks/launch_model.py, the predicted time of each kernel of a decode step, on
launch lists written out by hand, and render_results.py's table of it, predicted beside
measured. No kernel runs here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import launch_model  # noqa: E402
import render_results  # noqa: E402

SMALL = launch_model.Shapes(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16,
                            intermediate=160, vocab=512)
REAL = launch_model.ARTICLE


def layer(component: str = "model.layers") -> list[dict]:
    return [dict(component=component, kind="cublas", name="aten::linear", bytes=1, mm=[64, 128]),
            dict(component=component, kind="triton", name="attn_decode_kernel", bytes=1)]


EVENTS = [dict(component="model.other", kind="aten", name="aten::embedding", bytes=1),
          *layer(), *layer(),
          dict(component="sampler", kind="triton", name="chunk_kernel", bytes=1),
          dict(component="sampler", kind="aten", name="aten::to", bytes=7)]


@pytest.mark.parametrize("splits", [1, 3])
def test_the_real_step_is_the_small_one_with_the_real_layers_and_splits(splits):
    batch, ctx = 64, 512
    p = launch_model.predict_step(EVENTS, SMALL, REAL, batch, ctx, splits)
    rows = {k["name"]: k for k in p["kernels"]}
    # One attention launch per layer at any split count; the splits size its bytes.
    assert p["launches"] == 3 + REAL.layers * 2
    # The small [64, 128] matmul is the real hidden -> qkv one: (12 + 6) * 64 = 1152 wide.
    qkv = rows["matmul hidden->qkv"]
    assert qkv["bytes"] == 2 * (768 * 1152 + batch * (768 + 1152)) * REAL.layers
    # Each kernel: max(bytes / 3.6 TB/s, floor), summed over its launches.
    chunk = rows["chunk_kernel"]
    assert chunk["bytes"] == 2 * batch * REAL.vocab
    assert chunk["predicted_us"] == pytest.approx(max(chunk["bytes"] / 3.6e12 * 1e6, 2.5))
    assert qkv["predicted_us"] == pytest.approx(REAL.layers * max(
        qkv["bytes"] / REAL.layers / 3.6e12 * 1e6, 4.5))
    # The attention reads the context's K and V, not a whole cache.
    # With several splits each writes its float32 records, which the last one reads back.
    kv = 2 * 2 * batch * ctx * REAL.kv_heads * REAL.head_dim
    records = 0 if splits == 1 else 2 * batch * REAL.heads * splits * (REAL.head_dim + 2) * 4
    assert kv + records < rows["attn_decode_kernel"]["bytes"] / REAL.layers \
        < 1.1 * (kv + records)
    assert rows["aten::to"]["bytes"] == 7 and rows["aten::to"]["rule"] == "counted"
    total = sum(k["bytes"] for k in p["kernels"])
    assert p["bytes"] == total
    assert p["roofline_share"] == pytest.approx(total / 3.6e12 * 1e6 / p["predicted_us"])


def test_layers_that_differ_are_refused():
    with pytest.raises(ValueError, match="alike layers"):
        launch_model.predict_step(EVENTS[:-3], SMALL, REAL, 1, 512, 1)


def test_measured_kernels_are_sorted_by_kind():
    ours = {"attn_decode_kernel"}
    assert launch_model.measured_kind("attn_decode_kernel", ours) == "triton"
    assert launch_model.measured_kind("nvjet_tst_64x8_64x16_4x1_v_bz_TNT", ours) == "cublas"
    assert launch_model.measured_kind("sm90_xmma_gemm_bf16bf16_bf16f32", ours) == "cublas"
    assert launch_model.measured_kind("void at::native::elementwise_kernel<128, 2>", ours) \
        == "aten"


def test_render_puts_the_measured_times_beside_the_predicted_ones():
    p = dict(model="article", gpu="h200", batch=1, context=512, splits=4,
             shapes=vars(REAL), **launch_model.predict_step(EVENTS, SMALL, REAL, 1, 512, 4))
    measured = {"attn_decode_kernel": dict(kind="triton", launches=12.0, us=61.5),
                "nvjet_tst_x": dict(kind="cublas", launches=12.0, us=100.25)}
    config = dict(hidden_size=768, num_hidden_layers=12, vocab_size=50000)
    row = dict(backend="triton", batch=1, context=512, measured=measured,
               by_kind=dict(cublas=49.0, aten=3.0, triton=77.0), total=129.0)
    payload = dict(kind="bench_launches", config=config, results=[row], predicted=[p])
    md = "\n".join(render_results.render_predicted(payload))
    assert "Predicted, not measured on a GPU" in md
    line = next(x for x in md.splitlines() if x.startswith("| attn_decode_kernel"))
    assert line.endswith("| 61.5 |")
    assert next(x for x in md.splitlines() if x.startswith("| all cublas")).endswith("| 100.2 |")
    kinds = "\n".join(render_results.render_launch_kinds([row]))
    assert "| triton | 1 | 512 | 49.0 | 3.0 | 77.0 | 129.0 |" in kinds
    # Another model's run: nothing measured to put beside the prediction.
    payload["config"] = dict(config, hidden_size=2048)
    md = "\n".join(render_results.render_predicted(payload))
    assert next(x for x in md.splitlines() if x.startswith("| attn_decode_kernel")).endswith(
        "| - |")
