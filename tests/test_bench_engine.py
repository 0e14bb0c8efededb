"""eval/bench_engine.py: the core function on its smallest setting, output schema, and the FLOPs check."""
import json

import pytest

from eval.bench_engine import PATHS, BenchArgs, run_bench, to_markdown, write_results
from qzoom_agent.engine import STAGES


@pytest.fixture(scope="module")
def result():
    args = BenchArgs(budgets="64", image_sizes="224x224", batch_sizes="1", repeats=1, warmup=0, max_new_tokens=2,
                     hidden=64, layers=4, heads=4, kv_heads=2, vision_depth=2, twig_K=2, twig_T=2, gate_T=1)
    return run_bench(args, progress=False)


def test_schema(result):
    meta = result["meta"]
    for key in ("nproc", "cpu_model", "torch", "transformers", "date_utc", "torch_threads", "model"):
        assert key in meta
    rows = result["settings"]
    assert [r["path"] for r in rows] == list(PATHS)
    for r in rows:
        assert (r["image"], r["budget"], r["batch"]) == ("224x224", 64, 1)
        assert set(r["stages_s"]) == set(STAGES) and all(v >= 0 for v in r["stages_s"].values())
        assert r["total_s"] > 0 and r["samples_per_s"] > 0
        assert r["flops_total"] == pytest.approx(r["flops_llm"] + r["flops_vit"])
    base, qzoom, no_reuse = rows
    assert base["zoom_rate"] == 0 and base["stages_s"]["gate"] == 0
    assert qzoom["zoom_rate"] == 1 and qzoom["visual_tokens"] > base["visual_tokens"]
    assert qzoom["reused_tokens"] > 0 and no_reuse["reused_tokens"] == 0
    assert no_reuse["flops_llm"] > qzoom["flops_llm"]          # reuse skips layers 0..K-1 over the prefix


def test_flop_check_matches_flop_counter(result):
    fc = result["flop_check"]
    assert fc["qzoom"]["zoomed"] and not fc["base"]["zoomed"]
    assert fc["base"]["ratio_causal"] < 1                         # §4.2 counts half of the T×T attention
    # 1e-4, not exact: transformers 5.17's text rotary is a matmul (inv_freq @ position ids) that FlopCounterMode
    # counts, 3·head_dim FLOPs per prompt token (-0.006 % here); 5.23 multiplies elementwise, which it does not count
    assert fc["base"]["ratio_full_attention"] == pytest.approx(1.0, abs=1e-4)
    # qzoom: also the ViT's full attention per image (global, crop); left: q_last·k, the gate's Linear and the
    # crop's partial ViT windows (a 224x168 crop: 12x16 patches in 8x8 windows), which §4.2 counts as full
    assert fc["qzoom"]["ratio_full_attention"] == pytest.approx(1.0, abs=5e-3)


def test_outputs_written(result, tmp_path):
    write_results(result, tmp_path / "b.json", tmp_path / "b.md")
    assert json.loads((tmp_path / "b.json").read_text())["settings"][0]["path"] == "base"
    md = (tmp_path / "b.md").read_text()
    assert md == to_markdown(result) and "| 224x224 | 64 | 1 | qzoom |" in md and "FlopCounterMode" in md
