"""tools/train_qzoom_heads.py: every Q-Zoom stage end to end on a tiny random model (CPU), resumable stage by stage,
stopping cleanly before a stage that would not fit --max_minutes, and clear errors for bad configs."""
import json
import sys
from pathlib import Path

import pytest

from qzoom_agent.errors import QZoomError

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import train_qzoom_heads as tq  # noqa: E402

BUDGET = 16


def _log(out):
    return [json.loads(x) for x in (out / "pipeline_log.jsonl").read_text().splitlines()]


def _events(out, since=0):
    return [(r["event"], r.get("stage")) for r in _log(out)[since:]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from qzoom_agent import QZoomConfig
    from qzoom_agent.testing import save_tiny_model

    src = tmp_path_factory.mktemp("tiny") / "model"
    save_tiny_model(src, "qwen2_5_vl")
    QZoomConfig(family="qwen2_5_vl", twig_K=2, twig_T=2, gate_T=1, has_roi_head=False, has_gate=False,
                sink_min_cells=16, gate_thresh=0.5, min_visual_tokens=BUDGET, max_visual_tokens=64,
                max_new_tokens=3).save(src / "qzoom_config.json")
    return src


def _argv(model, out, **kw):
    base = dict(model=model, out_dir=out, device="cpu", render_workers=1, overhead_minutes=0.0,
                pseudo_subsets="attr-cue", pseudo_n=2, pseudo_head_n=1, pseudo_budget=BUDGET, pseudo_batch=2,
                rpn_steps=2, rpn_batch_size=2, rpn_lr=1e-3, sft_tool="tools/no_such_sft.py",
                gate_subsets="coarse,attr-cue", gate_n_per_subset=1, gate_budgets="16,24,32,64",
                gate_label_batch=4, gate_max_new_tokens=3, gate_steps=2, gate_batch_size=2, gate_warmup_steps=1,
                gate_eval_n_per_subset=1, gate_eval_budget=BUDGET,
                eval_methods=f"base@{BUDGET},qzoom@{BUDGET},oracle-crop@{BUDGET}", eval_subsets="attr-cue",
                eval_n=1, eval_batch_size=2)
    base.update(kw)
    argv = []
    for k, v in base.items():
        argv += [f"--{k}", str(v)]
    return argv


@pytest.fixture(scope="module")
def chain(tiny, tmp_path_factory):
    """Call 1 stops inside rpn (its own minutes limit), call 2 resumes it and finishes every stage."""
    import os

    os.environ["TQDM_DISABLE"] = "1"
    out = tmp_path_factory.mktemp("run") / "heads"
    first = tq.main(_argv(tiny, out, rpn_minutes=1e-6))
    n_first = len(_log(out))
    second = tq.main(_argv(tiny, out))
    return out, first, n_first, second


def test_chain_runs_every_stage_and_reports_what_it_could_not_do(chain):
    out, first, n_first, second = chain
    assert first["status"] == "paused" and first["ran"] == ["pseudo", "rpn"]
    assert ("incomplete", "rpn") in _events(out)[:n_first] and first["stages"]["rpn"] is None
    rpn_log = [json.loads(x) for x in (out / "rpn" / "train_log.jsonl").read_text().splitlines()]
    assert {"event": "resume", "step": 1} in rpn_log                   # call 2 resumed the checkpoint
    assert second["status"] == "done" and second["ran"] == ["rpn", "gate_labels", "gate", "eval", "export"]
    st = second["stages"]
    assert st["pseudo"]["rows"] == 2 and st["rpn"]["step"] == 2 and st["sft"] is None
    # the random model's attention is flat: every row is wholly ignored, and the pipeline says the head learns nothing
    assert st["pseudo"]["usable_rows"] == 0 and ("warning", "pseudo") in _events(out)
    skip = [r for r in _log(out) if r["event"] == "skip" and r["stage"] == "sft"]
    assert skip and "tools/no_such_sft.py is missing" in skip[-1]["reason"]
    # a random tiny model answers nothing right: the filter keeps no record and the pipeline says so
    assert st["gate_labels"]["kept"] == 0 and st["gate"] == {"complete": True, "trained": False, "kept": 0,
                                                             "seconds": st["gate"]["seconds"]}
    assert any(r["event"] == "gate_not_trained" for r in _log(out))
    assert st["eval"]["model"] == str(out / "rpn" / "model")           # no gate or SFT model: the RPN one
    assert len(st["eval"]["runs"]) == 3, st["eval"]["runs"]
    report = out / "eval" / "report"
    assert (report / "summary.json").exists() and (report / "report.md").exists() and list(report.glob("*.png"))
    assert json.loads((out / "pipeline.json").read_text())["status"] == "done"


def test_resume_skips_finished_stages(chain, tiny):
    out = chain[0]
    n = len(_log(out))
    mtimes = {p: p.stat().st_mtime for p in out.rglob("*") if p.is_file() and p.name != "pipeline.json"
              and p.name != "pipeline_log.jsonl"}
    again = tq.main(_argv(tiny, out, skip_sft=True))
    assert again["status"] == "done" and again["ran"] == []
    ev = _events(out, n)
    assert [s for e, s in ev if e == "skip"] == list(tq.STAGES)
    assert [r["reason"] for r in _log(out)[n:] if r.get("stage") == "sft"] == ["--skip_sft"]
    assert all(p.stat().st_mtime == t for p, t in mtimes.items())      # no stage touched its files


def test_a_stage_stopped_on_its_own_limit_resumes_in_the_same_call_when_time_is_left(tiny, tmp_path):
    out = tmp_path / "heads"
    res = tq.main(_argv(tiny, out, max_minutes=30.0, rpn_minutes=1e-6, skip_sft=True, eval_methods=f"base@{BUDGET}"))
    ev = _events(out)
    assert ("incomplete", "rpn") not in ev and ("resume", "rpn") in ev and ("done", "rpn") in ev
    assert res["status"] == "done" and res["stages"]["rpn"]["step"] == 2
    export = res["stages"]["export"]
    assert export["dtype"] == "bfloat16" and export["source"] == str(out / "rpn" / "model")
    from qzoom_agent import QZoomModel

    m = QZoomModel.from_pretrained(out / "export")
    assert next(m.base.parameters()).dtype.is_floating_point and m.roi_head is not None
    assert {p.dtype for p in m.base.parameters()} == {__import__("torch").bfloat16}


def test_max_minutes_stops_before_a_stage_that_would_not_fit(chain, tiny, tmp_path):
    out = chain[0]
    (out / "eval" / tq.DONE).unlink()
    n = len(_log(out))
    res = tq.main(_argv(tiny, out, max_minutes=1.0, eval_minutes=5.0))
    assert res["status"] == "paused" and res["ran"] == [] and res["stages"]["eval"] is None
    stop = [r for r in _log(out)[n:] if r["event"] == "stop"]
    assert stop[0]["stage"] == "eval" and stop[0]["need_minutes"] == 5.0 and stop[0]["left_minutes"] <= 1.0
    fresh = tq.main(_argv(tiny, tmp_path / "fresh", max_minutes=0.5, pseudo_minutes=1.0))
    assert fresh["ran"] == [] and _events(tmp_path / "fresh")[1] == ("stop", "pseudo")
    assert not (tmp_path / "fresh" / "pseudo").exists()


def test_bad_config_gives_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rpn_stepz: 3\n")
    with pytest.raises(QZoomError, match="unknown arguments.*rpn_stepz"):
        tq.main(["--config", str(bad)])
    bad.write_text("rpn_steps: 0\n")
    with pytest.raises(QZoomError, match="rpn_steps must be ≥ 1"):
        tq.main(["--config", str(bad), "--out_dir", str(tmp_path / "o")])
    with pytest.raises(QZoomError, match="eval_methods: unknown method 'zoom'"):
        tq.main(["--eval_methods", "zoom@256", "--out_dir", str(tmp_path / "o")])
    with pytest.raises(QZoomError, match="gate_minutes must be > 0"):
        tq.main(["--gate_minutes", "0", "--out_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()                               # nothing ran


def test_testbed_config_parses_and_fits_the_device_plan():
    from qzoom_agent.cli_args import parse_args

    args = parse_args(tq.HeadsArgs, argv=["--config", str(TOOLS / "configs" / "qzoom_heads_testbed.yaml")])
    tq.validate(args)
    need = {s: getattr(args, f"{s}_minutes") + args.overhead_minutes for s in tq.STAGES}
    calls = [["pseudo", "rpn", "sft"], ["gate_labels", "gate", "eval", "export"]]
    for call in calls:                                                 # each call fits, the next stage does not
        assert sum(need[s] for s in call) <= args.max_minutes <= 10
    assert need["pseudo"] + need["rpn"] + need["sft"] + need["gate_labels"] > args.max_minutes
    assert set(tq.EVAL_METHODS.split(",")) <= set(args.eval_methods.split(","))
    assert args.n_candidates == 1 and args.eval_nosft_methods


def test_sft_stage_runs_the_real_tool_as_a_subprocess(chain, tiny, tmp_path):
    """tools/targeted_sft.py on the tiny RPN model: nothing is mined (a random model is never right), which the
    pipeline reports, and the later stages keep the RPN model."""
    import shutil

    out = tmp_path / "heads"
    for stage in ("pseudo", "rpn"):
        shutil.copytree(chain[0] / stage, out / stage)
    res = tq.main(_argv(tiny, out, sft_tool="tools/targeted_sft.py", sft_subsets="attr-cue", sft_n_pool=1,
                        sft_minutes=1.0, max_minutes=3.0, gate_labels_minutes=10.0))
    assert res["ran"] == ["sft"] and res["status"] == "paused"
    assert res["stages"]["sft"]["trained"] is False and any(r["event"] == "sft_not_trained" for r in _log(out))
    assert _events(out)[-2] == ("stop", "gate_labels")
    assert tq.stage_model(out, "gate_labels", tq.HeadsArgs()) == str(out / "rpn" / "model")
