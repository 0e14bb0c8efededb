"""Gate labels (method.md §2): matching, each filter rule, 1:1 easy subsampling, the per-fetch draw."""
import random
from collections import Counter

import pytest

from qzoom_agent.training import gate_labels as gl

B4 = [256, 576, 1024, 2304]


def rec(answers, correct, rid="x", subset="s", **kw):
    return {"id": rid, "budgets": B4[-len(answers):] if len(answers) <= 4 else list(range(len(answers))),
            "answers": answers, "gt": ["red"], "correct": correct, "subset": subset, **kw}


def test_normalize_and_containment_either_way():
    assert gl.normalize("  The Code: K7Q-42X. ") == "the code k7q42x"
    assert gl.answers_match("Red.", "the red one")          # a in b
    assert gl.answers_match("the RED one", "red")           # b in a
    assert not gl.answers_match("blue", "red")
    assert not gl.answers_match("", "red") and not gl.answers_match("...", "red")   # empty never matches


def test_is_correct_accepts_scorer_verdict_or_containment():
    assert gl.is_correct("B", [], verdict=True)
    assert not gl.is_correct("B", [], verdict=False)
    assert gl.is_correct("it is red", ["Red"], verdict=False)
    assert not gl.is_correct("blue", ["red"], verdict=None)


def test_make_record_checks_budgets_and_computes_correct():
    r = gl.make_record("a", B4, ["x", "blue", "red", "Red."], ["red"], [None, None, None, None])
    assert r["correct"] == [False, False, True, True]
    with pytest.raises(ValueError):
        gl.make_record("a", [576, 256, 1024], ["a", "b", "c"], ["red"])


def test_unstable_when_top_two_disagree():
    assert gl.classify(rec(["red", "red", "blue", "red"], [True, True, False, True])) == "unstable"


def test_inconsistent_when_consensus_is_not_gt():
    assert gl.classify(rec(["red", "blue", "blue", "blue"], [True, False, False, False])) == "inconsistent"


def test_transition_needs_contiguous_wrong_prefix():
    assert gl.classify(rec(["b", "b", "red", "red"], [False, False, True, True])) == "transition"
    assert gl.classify(rec(["b", "red", "red", "red"], [False, True, True, True])) == "transition"
    assert gl.classify(rec(["red", "b", "red", "red"], [True, False, True, True])) == "non_monotone"


def test_easy_when_all_correct_and_too_few_budgets():
    assert gl.classify(rec(["red"] * 4, [True] * 4)) == "easy"
    assert gl.classify(rec(["red"] * 2, [True] * 2)) == "too_few_budgets"


def test_filter_keeps_one_easy_per_transition_seeded_and_reports_reasons():
    recs = [rec(["b", "red", "red", "red"], [False, True, True, True], rid=f"t{i}", subset="hr") for i in range(3)]
    recs += [rec(["red"] * 4, [True] * 4, rid=f"e{i}", subset="coarse") for i in range(10)]
    recs += [rec(["red", "red", "blue", "red"], [True, True, False, True], rid="u", subset="hr")]
    kept, stats = gl.filter_records(recs, seed=3)
    kinds = Counter(r["kind"] for r in kept)
    assert kinds == {"transition": 3, "easy": 3}
    assert stats["kept"] == 6 and stats["transition_share"] == 0.5
    assert stats["dropped"] == {"easy_surplus": 7, "unstable": 1}
    assert stats["per_subset"]["coarse"]["easy"] == 3 and stats["per_subset"]["hr"]["dropped"] == {"unstable": 1}
    again, _ = gl.filter_records(recs, seed=3)
    assert [r["id"] for r in again] == [r["id"] for r in kept]           # seeded
    other = {r["id"] for r in gl.filter_records(recs, seed=4)[0]}
    assert len(other) == 6


def test_draw_easy_is_label0_outside_top_two_uniform():
    r = dict(rec(["red"] * 4, [True] * 4), kind="easy")
    rng = random.Random(0)
    draws = Counter(gl.draw_label(r, rng) for _ in range(4000))
    assert set(draws) == {(256, 0), (576, 0)}
    assert abs(draws[(256, 0)] / 4000 - 0.5) < 0.04


def test_draw_transition_probabilities():
    # wrong at 256, 576, 1024; the two highest wrong budgets are 576 and 1024; no correct budget outside top 2
    r = dict(rec(["b", "b", "b", "red"], [False, False, False, True]), kind="transition")
    r["answers"][2] = "red"    # (the draw reads only `correct`)
    rng = random.Random(1)
    n = 20000
    draws = Counter(gl.draw_label(r, rng) for _ in range(n))
    assert set(draws) == {(576, 1), (1024, 1), (1024, gl.IGNORE)}
    assert abs((draws[(576, 1)] + draws[(1024, 1)]) / n - 0.9) < 0.01
    assert abs(draws[(576, 1)] / n - 0.45) < 0.015
    assert abs(draws[(1024, gl.IGNORE)] / n - 0.1) < 0.01


def test_draw_transition_negative_uses_a_correct_low_budget():
    r = dict(rec(["b", "red", "red", "red"], [False, True, True, True]), kind="transition")
    rng = random.Random(2)
    n = 20000
    draws = Counter(gl.draw_label(r, rng) for _ in range(n))
    assert set(draws) == {(256, 1), (576, 0)}                 # the only wrong budget; the correct low one
    assert abs(draws[(256, 1)] / n - 0.9) < 0.01


def test_draw_is_seeded_and_redraws_per_fetch():
    r = dict(rec(["b", "b", "red", "red"], [False, False, True, True]), kind="transition")
    a = [gl.draw_label(r, random.Random(5)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = random.Random(5)
    assert len({gl.draw_label(r, rng) for _ in range(50)}) > 1


def test_needs_hr_agreement_counts_drawable_pairs():
    t = dict(rec(["b", "red", "red", "red"], [False, True, True, True]), kind="transition",
             needs_hr={"256": True, "576": False})
    e = dict(rec(["red"] * 4, [True] * 4), kind="easy", needs_hr={"256": True, "576": False})
    out = gl.needs_hr_agreement([t, e])
    # pairs: t (256,1)✓ (576,0)✓ ; e (256,0)✗ (576,0)✓
    assert out["n"] == 4 and out["agreement"] == 0.75
    assert out["label1_given_needs_hr"] == 0.5 and out["needs_hr_given_label1"] == 1.0


def test_records_jsonl_roundtrip_appends(tmp_path):
    p = tmp_path / "r.jsonl"
    gl.write_records(p, [rec(["red"] * 4, [True] * 4, rid="a")])
    gl.write_records(p, [rec(["red"] * 4, [True] * 4, rid="b")])
    assert [r["id"] for r in gl.read_records(p)] == ["a", "b"]


def test_synthhr_target_uses_scorer_for_letters():
    item = {"question_id": "q", "subset": "coarse", "schema": "vstar", "question": "What color?",
            "options": ["green", "red", "pink", "brown"], "answer": "B", "answer_text": "red"}
    prompt, gts, verdict = gl.synthhr_target(item)
    assert "B. red" in prompt and gts == ["red"]
    assert verdict("B") and not verdict("A")
    glyph = dict(item, options=["T", "V", "K", "N"], answer="D", answer_text="N")
    assert gl.synthhr_target(glyph)[1] == []                  # one-letter option text: scorer only
