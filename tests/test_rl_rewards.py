"""rl/rewards.py and rl/callbacks.py: accuracy through the eval's scorers, format, zoom cost, conditional bonus,
collapse guard, per-batch stats and the collapse alarm."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from rl.rewards import (CollapseGuard, RolloutScore, ZoomRewards, batch_stats, bonus_term, final_answer,
                        format_term, looks_like_tool_call, rollout_text, score_answer, score_rollout, zoom_cost_term)


@pytest.fixture(scope="module")
def items():
    from eval.synthhr import SynthHRConfig, make_items

    cfg = SynthHRConfig(scale="mini")
    return {s: make_items(cfg, subset=s, split="train", n=1)[0] for s in ("attr-cue", "doc-code", "doc-table",
                                                                         "fsp-4k", "coarse")}


def assistant(text="", calls=None):
    m = {"role": "assistant", "content": text}
    if calls:
        m["tool_calls"] = [{"type": "function", "function": {"name": "zoom", "arguments": a}} for a in calls]
    return m


def tool(content):
    return {"role": "tool", "name": "zoom", "content": content}


CROP = [{"type": "image", "image": None}, {"type": "text", "text": "<zoom src=0 cells=1,1,3,3>\nz1: crop"}]


def zoomed(answer):
    return [assistant(calls=[{"query": "the flag"}]), tool(CROP), assistant(answer)]


# ------------------------------------------------------------------------------------------------ accuracy

def test_accuracy_multiple_choice_uses_the_vstar_scorer(items):
    item = items["attr-cue"]  # V* schema: the answer is a letter
    right = item["answer"]
    wrong = next(c for c in "ABCD" if c != right)
    assert score_answer(item, f"<answer>{right}</answer>") == 1.0
    assert score_answer(item, right) == 1.0
    assert score_answer(item, f"The answer is ({right}) {item['answer_text']}.") == 1.0
    assert score_answer(item, f"<answer>{wrong}</answer>") == 0.0
    assert score_answer(item, None) == 0.0
    hr = items["fsp-4k"]  # HR-Bench schema
    assert score_answer(hr, f"<answer>{hr['answer']}</answer>") == 1.0
    assert score_answer(hr, "<answer>Z</answer>") == 0.0


def test_accuracy_open_answers_anls_and_relaxed(items):
    code = items["doc-code"]  # ANLS
    assert score_answer(code, f"<answer>{code['answer']}</answer>") == 1.0
    near = code["answer"][:-1] + ("X" if code["answer"][-1] != "X" else "Y")
    assert 0.5 < score_answer(code, near) < 1.0
    assert score_answer(code, "nothing like it at all") == 0.0
    table = items["doc-table"]  # relaxed accuracy (numbers within 5%)
    value = float(table["answer"])
    assert score_answer(table, f"<answer>{table['answer']}</answer>") == 1.0
    assert score_answer(table, str(round(value * 1.03, 1))) == 1.0
    assert score_answer(table, str(round(value * 1.5, 1))) == 0.0


def test_item_may_be_json_text(items):
    item = items["attr-cue"]
    assert score_answer(json.dumps(item), f"<answer>{item['answer']}</answer>") == 1.0


# ------------------------------------------------------------------------------------------------ rollouts and terms

def test_final_answer_reading():
    assert final_answer(zoomed("<answer>B</answer>")) == "<answer>B</answer>"
    assert final_answer([assistant(calls=[{"query": "x"}])]) is None  # ended on a call (truncated / limit)
    assert final_answer([assistant('<tool_call>\n{"name": "zoom", "arguments": {\n</tool_call>')]) is None
    assert final_answer("plain") == "plain"


def test_format_penalises_malformed_and_failed_calls(items):
    item = items["attr-cue"]
    C = item["answer"]
    clean = score_rollout(zoomed(f"<answer>{C}</answer>"), item, needs_hr=True)
    assert (clean.calls, clean.invalid, clean.tagged, clean.accuracy) == (1, 0, True, 1.0)
    assert format_term(clean) == 0.0
    untagged = score_rollout(zoomed(C), item, needs_hr=True)
    assert untagged.accuracy == 1.0 and format_term(untagged) == -0.5
    assert format_term(untagged, answer_tag=False) == 0.0  # a bare-answer policy (--answer_format bare)
    malformed = score_rollout([assistant('<tool_call>\n{"name": "zoom", "arguments": {"query": \n</tool_call>')],
                              item, needs_hr=True)
    assert (malformed.calls, malformed.invalid, malformed.answered) == (1, 1, False)
    assert format_term(malformed) == -1.0 == format_term(malformed, answer_tag=False)
    for text in ('{"name": "zoom", "arguments": "arguments": {}}\n</tool_call>', '{"name": {}}", "arguments": {',
                 '{" "zoom'):  # what the policy wrote on the device: the call's JSON without its tag
        untagged_call = score_rollout([assistant(text)], item, needs_hr=True)
        assert (untagged_call.calls, untagged_call.invalid, untagged_call.answered) == (1, 1, False), text
        assert format_term(untagged_call, answer_tag=False) == -1.0
    for answer in (C, f"<answer>{C}</answer>", "The flag is red."):
        assert not looks_like_tool_call(answer)
    failed = score_rollout([assistant(calls=[{"k": 9}]), tool("{'error': 'k must be between 1 and 3, got 9'}"),
                            assistant(f"<answer>{C}</answer>")], item, needs_hr=True)
    assert (failed.calls, failed.invalid, failed.crops) == (1, 1, 0)
    assert format_term(failed) == -0.5
    unknown_tool = score_rollout([assistant(calls=[{}]), tool("{'error': 'Tool crop not found.'}"),
                                  assistant(f"<answer>{C}</answer>")], item)
    assert unknown_tool.invalid == 1
    no_answer = score_rollout([assistant(calls=[{"query": "x"}]), tool(CROP)], item)
    assert format_term(no_answer) == -1.0 == format_term(no_answer, answer_tag=False) and no_answer.accuracy == 0.0


def test_zoom_cost_only_where_the_coarse_view_sufficed():
    def s(calls, needs_hr, invalid=0):
        return RolloutScore(calls=calls, invalid=invalid, crops=calls - invalid, needs_hr=needs_hr)

    assert zoom_cost_term(s(1, False)) == -1.0        # coarse item: every call costs
    assert zoom_cost_term(s(0, False)) == 0.0
    assert zoom_cost_term(s(1, True)) == 0.0          # needed: free up to free_calls
    assert zoom_cost_term(s(2, True)) == 0.0
    assert zoom_cost_term(s(3, True)) == -1.0         # over-zoom
    assert zoom_cost_term(s(3, None)) == -1.0         # unknown need: only the excess costs
    assert zoom_cost_term(s(2, False, invalid=2)) == 0.0  # refused calls cost format, not zoom
    assert zoom_cost_term(s(3, True), free_calls=3) == 0.0


def test_tool_bonus_is_conditional():
    def s(crops, acc, needs_hr):
        return RolloutScore(calls=crops, crops=crops, accuracy=acc, needs_hr=needs_hr)

    assert bonus_term(s(1, 1.0, True)) == 1.0
    assert bonus_term(s(1, 0.0, True)) == 0.0   # zoomed but wrong: nothing to farm
    assert bonus_term(s(0, 1.0, True)) == 0.0   # right without zooming: no bonus
    assert bonus_term(s(1, 1.0, False)) == 0.0  # zoom on a coarse item: no bonus
    assert bonus_term(s(1, 1.0, False), needs_hr_only=False) == 1.0  # DeepEyes' original rule
    assert bonus_term(s(1, 1.0, None)) == 1.0   # unlabelled data: DeepEyes' rule


def test_collapse_guard_scales_bonus_until_calls_return():
    g = CollapseGuard(floor=0.2, growth=2.0, max_scale=8.0, momentum=0.0)
    assert [g.update(0.0) for _ in range(4)] == [2.0, 4.0, 8.0, 8.0]
    assert g.update(float("nan")) == 8.0  # no needs_hr item in the batch: unchanged
    assert [g.update(0.5) for _ in range(4)] == [4.0, 2.0, 1.0, 1.0]


def test_batch_stats():
    scores = [RolloutScore(calls=1, crops=1, needs_hr=True, accuracy=1.0),
              RolloutScore(calls=0, needs_hr=True),
              RolloutScore(calls=2, invalid=1, crops=1, needs_hr=False),
              RolloutScore(calls=0, needs_hr=False, accuracy=1.0)]
    st = batch_stats(scores)
    assert st["call_rate"] == 0.5 and st["call_rate_needs_hr"] == 0.5 and st["call_rate_coarse"] == 0.5
    assert st["calls_on_needs_hr_share"] == 0.5  # 1 valid call on needs_hr, 1 on coarse
    assert st["coarse_no_zoom_rate"] == 0.5 and st["invalid_rate"] == pytest.approx(1 / 3)
    assert st["accuracy_needs_hr"] == 0.5 and st["crops_per_item"] == 0.5


def test_reward_funcs_score_each_batch_once_and_log(items):
    item = json.dumps(items["attr-cue"])
    C = items["attr-cue"]["answer"]
    A = next(c for c in "ABCD" if c != C)
    seen, metrics = [], {}
    suite = ZoomRewards(sinks=[lambda scores, stats: seen.append(stats)])
    funcs = suite.funcs()
    assert [f.__name__ for f in funcs] == ["accuracy", "format", "zoom_cost", "tool_bonus"]
    completions = [zoomed(f"<answer>{C}</answer>"), [assistant(f"<answer>{C}</answer>")], zoomed(f"<answer>{A}</answer>"),
                   [assistant(C)]]
    env = SimpleNamespace(log=SimpleNamespace(crops=1, crop_tokens=64, seconds=0.01))
    kwargs = dict(item=[item] * 4, needs_hr=[True, True, False, False], subset=["attr-cue"] * 4,
                  environments=[env, None, env, None], trainer_state=SimpleNamespace(global_step=3),
                  log_metric=lambda k, v: metrics.setdefault(k, v))
    out = {f.__name__: f(prompts=[None] * 4, completions=completions, completion_ids=[[1] * 10] * 4, **kwargs)
           for f in funcs}
    assert out["accuracy"] == [1.0, 1.0, 0.0, 1.0]
    assert out["format"] == [0.0, 0.0, 0.0, -0.5]
    assert out["zoom_cost"] == [0.0, 0.0, -1.0, 0.0]
    assert out["tool_bonus"] == [1.0, 0.0, 0.0, 0.0]
    assert len(seen) == 1 and seen[0]["step"] == 3  # one scoring per batch, however many reward functions
    assert metrics["zoom/call_rate"] == 0.5 and metrics["zoom/crop_tokens_per_item"] == 32.0
    assert "zoom/samples" not in metrics  # text goes to the stats file, not to the trainer's metrics
    hr, coarse = seen[0]["samples"]  # the first rollout of a needs_hr item, then of a coarse one
    call = 'assistant: {"name": "zoom", "arguments": {"query": "the flag"}} | tool: <zoom src=0 cells=1,1,3,3>\n'
    assert hr == call + f"z1: crop[image] | assistant: <answer>{C}</answer>"
    assert coarse == call + f"z1: crop[image] | assistant: <answer>{A}</answer>"
    assert rollout_text("x" * 500) == "x" * 400  # a line of the log, not the whole rollout
    funcs[0](prompts=None, completions=list(completions), completion_ids=None, **kwargs)
    assert len(seen) == 2  # a new batch (new list) is scored again


# ------------------------------------------------------------------------------------------------ callback

def test_callback_warns_on_zero_call_rate_and_writes_outputs(tmp_path, caplog):
    from rl.callbacks import ZoomStatsCallback, plot_curves

    cb = ZoomStatsCallback(str(tmp_path), patience=2)
    caplog.set_level(logging.WARNING, logger="rl.zoom_stats")
    for step, rate in enumerate([0.5, 0.0, 0.0, 0.25]):
        cb.record([None] * 4, {"call_rate": rate, "call_rate_needs_hr": rate, "step": step, "bonus_scale": 1.0,
                               "accuracy": 0.5})
    msgs = [r for r in caplog.records if "tool-call rate is 0" in r.getMessage()]
    assert len(msgs) == 2 and msgs[-1].levelno == logging.ERROR and "collapsed" in msgs[-1].getMessage()
    assert cb.zero_batches == 2 and cb.zero_streak == 0
    assert len((tmp_path / "zoom_stats.jsonl").read_text().splitlines()) == 4
    s = cb.summary()
    assert s["min_call_rate"] == 0.0 and s["call_rate"]["last"] == 0.25
    history = [{"step": i, "reward": 0.1 * i, "zoom/call_rate": 0.5, "zoom/call_rate_needs_hr": 0.6} for i in range(3)]
    png = plot_curves(history, tmp_path / "curves.png")
    assert png.stat().st_size > 1000


def test_log_history_from_text_reads_printed_metrics(tmp_path):
    from rl.callbacks import log_history_from_text, plot_curves

    text = ("noise {'loss': '-0.006', 'reward': '0.25', 'zoom/call_rate': '0.5'}\r 2%|x| 1/400 "
            "{'loss': '0.01', 'reward': '0.41', 'zoom/call_rate': '0.75'}\n"
            "{'train_runtime': '12.4'} {'loss': broken}")
    hist = log_history_from_text(text)
    assert [h["step"] for h in hist] == [1, 2] and [h["reward"] for h in hist] == [0.25, 0.41]
    assert hist[1]["zoom/call_rate"] == 0.75
    assert plot_curves(hist, tmp_path / "c.png").exists()
