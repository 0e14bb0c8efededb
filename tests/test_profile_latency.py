"""eval/profile_latency.py end to end on a tiny architecture on CPU: ViT timings, a decode row per setting, a
failing mode recorded (not raised), results written atomically as JSON + markdown."""
import json

from eval.profile_latency import ProfileArgs, run


def test_profile_latency_tiny_cpu(tmp_path):
    args = ProfileArgs(arch="tiny_qwen2_5_vl", device="cpu", dtype="float32", vit_tokens=64, contexts="64",
                       batches="1", decode_modes="plain,static,graph", packed="packed_math,sdpa", new_tokens=3,
                       repeats=1, out_dir=str(tmp_path), tag="t")
    run(args, "pytest")
    res = json.loads((tmp_path / "profile_latency_t.json").read_text())
    assert res["vit"]["tokens"] == 64 and res["vit"]["fast"]["wall_ms"] > 0
    rows = {(r["mode"], r["packed"]): r for r in res["decode"]}
    assert set(rows) == {("plain", "sdpa"), ("static", "packed_math"), ("static", "sdpa"), ("graph", "packed_math"),
                         ("graph", "sdpa")}
    assert rows[("static", "packed_math")]["ms_per_step"] > 0
    assert "needs a CUDA model" in rows[("graph", "sdpa")]["error"]
    assert "| 64 | 1 | static | packed_math |" in (tmp_path / "profile_latency_t.md").read_text()
