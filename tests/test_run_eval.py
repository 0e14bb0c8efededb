"""eval/run_eval.py end to end on a tiny random model: outputs, resume without duplicates, failures counted."""
import json

import pytest

from eval import run_eval


def _args(tmp_path, **kw):
    base = dict(suite="synthhr-mini", split="dev", subsets="coarse,attr-cue", limit=2,
                methods="base@64,qzoom@64,oracle-crop@64", model="tiny-random", out=str(tmp_path / "run"),
                max_new_tokens=3, n_boot=200)
    base.update(kw)
    return run_eval.EvalArgs(**base)


def _records(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]


def test_run_writes_records_summary_report_and_plots(tmp_path):
    summary = run_eval.run(_args(tmp_path))
    recs = _records(tmp_path)
    assert len(recs) == 3 * 2 * 2
    assert set(summary["runs"]) == {"base@64", "qzoom@64", "oracle-crop@64"}
    for r in recs:
        assert {"score", "visual_tokens", "latency_s", "stage_times", "prefill_flops", "rois_gt",
                "needs_hr", "chance"} <= set(r)
    oracle = [r for r in recs if r["method"] == "oracle-crop"]
    assert all(r["zoomed"] and r["boxes"] for r in oracle)
    base = {r["doc_id"]: r for r in recs if r["method"] == "base"}
    assert all(r["visual_tokens"] > base[r["doc_id"]]["visual_tokens"] for r in oracle)
    rep = tmp_path / "run" / "report"
    assert (rep / "report.md").exists() and (rep / "summary.json").exists()
    assert any(p.suffix == ".png" for p in rep.iterdir())
    assert "| base | 64 |" in (rep / "report.md").read_text()


def test_killed_run_resumes_without_duplicates(tmp_path):
    run_eval.run(_args(tmp_path, methods="base@64"))
    path = tmp_path / "run" / "records.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])   # killed mid-write
    run_eval.run(_args(tmp_path, methods="base@64"))
    recs = _records(tmp_path)
    assert len(recs) == 4 and len({r["doc_id"] for r in recs}) == 4


def test_model_errors_are_counted_not_fatal(tmp_path, monkeypatch):
    def boom(self, *a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(run_eval.QZoomMethod, "__call__", boom, raising=False)
    monkeypatch.setattr(run_eval.Method, "__call__", boom)
    run_eval.run(_args(tmp_path, methods="base@64"))
    recs = _records(tmp_path)
    assert len(recs) == 4 and all(r["failure"] == "model_error" and r["score"] == 0 for r in recs)


def test_unknown_method_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown method"):
        run_eval.parse_methods("magic@64")


def test_config_file_and_cli_override(tmp_path):
    from qzoom_agent.cli_args import parse_args
    from qzoom_agent.errors import QZoomError

    cfg = tmp_path / "c.yaml"
    cfg.write_text("suite: synthhr-mini\nmethods: base@64\nlimit: 5\n")
    args = parse_args(run_eval.EvalArgs, argv=["--config", str(cfg), "--limit", "7"])
    assert args.methods == "base@64" and args.limit == 7
    cfg.write_text("nonsense_flag: 1\n")
    with pytest.raises(QZoomError, match="unknown arguments"):
        parse_args(run_eval.EvalArgs, argv=["--config", str(cfg)])


def test_agent_methods_record_turns_and_tool_calls(tmp_path):
    run_eval.run(_args(tmp_path, subsets="attr-cue", limit=1, methods="agent-qzoom@64,agent-bbox@64",
                       max_new_tokens=8))
    recs = _records(tmp_path)
    assert {r["method"] for r in recs} == {"agent-qzoom", "agent-bbox"}
    for r in recs:
        assert {"turns", "tool_calls", "invalid_calls", "visual_tokens", "latency_s", "stop_reason"} <= set(r)
        assert r["turns"] >= 1 and r["latency_s"] > 0 and r.get("failure") != "model_error", r


def test_ablation_methods_change_the_config_only_during_their_call(tmp_path):
    """qzoom-nogate zooms every item; qzoom-k3 / qzoom-2ndimg run with their box mode / placement and leave the
    model's config as it was."""
    seen = []
    model = run_eval.load_model("tiny-random", "cpu")
    real = type(model).answer

    def spy(self, *a, **k):
        seen.append((self.config.gate_thresh, self.config.box_mode, self.config.max_boxes, self.config.alignment))
        return real(self, *a, **k)

    before = (model.config.gate_thresh, model.config.box_mode, model.config.max_boxes, model.config.alignment)
    methods = run_eval.parse_methods("qzoom-nogate@64,qzoom-k3@64,qzoom-2ndimg@64")
    from PIL import Image

    imgs = [[Image.new("RGB", (256, 256), (120, 30, 30))], [Image.new("RGB", (200, 300), (20, 30, 200))]]
    type(model).answer = spy
    try:
        outs = [m(model, [{}, {}], imgs, ["What colour?", "What colour?"], 3) for m in methods]
    finally:
        type(model).answer = real
    assert seen == [(0.0, before[1], before[2], before[3]), (before[0], "components", 3, before[3]),
                    (before[0], before[1], before[2], "second_image")]
    assert not any(r["fallback"] == "gate_skip" for r in outs[0])      # the gate never skips
    assert (model.config.gate_thresh, model.config.box_mode, model.config.max_boxes,
            model.config.alignment) == before


def test_n_candidates_selects_the_synthhr_level(tmp_path):
    one = run_eval.make_loader(_args(tmp_path, subsets="attr-cue", n_candidates=1))
    default = run_eval.make_loader(_args(tmp_path, subsets="attr-cue"))
    n1 = {d["item"]["n_candidates"] if "item" in d else d["n_candidates"] for d in one.iter_docs()}
    nd = {d["item"]["n_candidates"] if "item" in d else d["n_candidates"] for d in default.iter_docs()}
    assert n1 == {1} and nd and nd != {1}
