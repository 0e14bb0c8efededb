"""tools/make_agent_traces.py: SynthHR agent traces (zoom on needs_hr items, direct answers on coarse ones) and the
cold-start SFT loop, which trains assistant tokens only and fuses the crops through the seam."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import make_agent_traces as mat  # noqa: E402
from test_rl_train_grpo import one_thread  # noqa: E402,F401  (autouse: one torch thread)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("traces")
    argv = ["--model", "tiny-random", "--n", "6", "--out", str(out), "--budget_tokens", "64", "--needs_hr_budget",
            "256", "--subsets", "attr-cue,coarse,doc-code", "--sft_steps", "8", "--sft_batch", "3", "--sft_lr", "3e-3",
            "--sft_output", str(out / "sft"), "--eval_n", "2"]
    return out, mat.main(argv)


def test_traces_follow_the_agent_protocol(run):
    out, report = run
    records = mat.read_traces(out)
    assert report["traces"]["n"] == 6 and len(records) == 6
    assert report["traces"]["zoom"] == sum(bool(r["needs_hr"]) for r in records) > 0
    for r in records:
        item = json.loads(r["item"])
        roles = [m["role"] for m in r["messages"]]
        assert r["messages"][-1] == {"role": "assistant", "content": f"<answer>{item['answer']}</answer>"}
        if r["needs_hr"]:
            assert roles == ["system", "user", "assistant", "tool", "assistant"] and len(r["images"]) == 2
            call = r["messages"][2]["tool_calls"][0]["function"]
            assert call == {"name": "zoom", "arguments": {"query": item["question"]}}
            texts = [b["text"] for b in r["messages"][3]["content"] if b["type"] == "text"]
            assert texts[0].startswith("<zoom src=0 cells=") and r["crop_source"] in ("tool", "oracle")
        else:
            assert roles == ["system", "user", "assistant"] and len(r["images"]) == 1


def test_sft_trains_assistant_tokens_with_fused_crops(run, tmp_path):
    from qzoom_agent import QZoomModel
    from qzoom_agent.aligned_positions import install_aligned_positions, aligned_stats
    from rl.train_grpo import match_processor_budget

    out, report = run
    assert report["sft"]["last_loss"] < report["sft"]["first_loss"]
    assert set(report["format_check"]) == {"needs_hr", "coarse"} == set(report["format_check_before"])
    assert {"direct_answered", "direct_accuracy"} <= set(report["format_check"]["coarse"])
    qzoom = QZoomModel.from_pretrained(out / "sft")
    assert qzoom.config.max_visual_tokens == 64
    match_processor_budget(qzoom.processor, qzoom)
    records = [r for r in mat.read_traces(out) if r["needs_hr"]][:2]
    x = mat.encode_batch(qzoom, records, mat.tool_schemas(qzoom)[1])
    tok = qzoom.processor.tokenizer
    mask = mat.assistant_mask(x["input_ids"], tok)
    for b in range(len(records)):
        text = tok.decode(x["input_ids"][b][mask[b]].tolist(), skip_special_tokens=False)
        answer = records[b]["messages"][-1]["content"]
        assert text.startswith("<tool_call>") and text.endswith(f"{answer}<|im_end|>")
        assert "<tool_response>" not in text and "<zoom" not in text
    install_aligned_positions(qzoom.base, tok)
    qzoom.base(**x)
    stats = aligned_stats(qzoom.base)
    assert stats["aligned"] == len(records) and stats["ignored"] == 0  # every crop fused in the SFT forward


def test_parquet_round_trip(run, tmp_path):
    out, _ = run
    records = mat.read_traces(out)
    mat.write_traces(records, tmp_path, "parquet")
    back = mat.read_traces(tmp_path)
    assert [r["messages"] for r in back] == [r["messages"] for r in records]
    assert [[im.size for im in r["images"]] for r in back] == [[im.size for im in r["images"]] for r in records]


def test_deepeyes_traces_write_padded_oracle_boxes(run):
    from rl.data import SynthHRRows
    from rl.train_grpo import PolicyConfig, ScriptArguments, load_policy, match_processor_budget

    out, _ = run
    qzoom = load_policy(PolicyConfig(model_name_or_path="tiny-random"), ScriptArguments(budget_tokens=64),
                        str(out / "de"))
    match_processor_budget(qzoom.processor, qzoom)
    args = mat.TraceArgs(tool="deepeyes", fuse_crops=False, size_hint=True)
    rows = SynthHRRows("mini", ["attr-cue"], 1_000_000, 256)
    row = next(r for r in (rows.row(k) for k in range(4)) if r["needs_hr"])
    rec = mat.make_trace(qzoom, row, args)
    item = json.loads(row["item"])
    user, call, tool_msg = rec["messages"][1], rec["messages"][2], rec["messages"][3]
    assert user["content"][-1] == {"type": "text", "text": f"(The image is {item['width']}x{item['height']} pixels.)"}
    fn = call["tool_calls"][0]["function"]
    assert fn["name"] == "image_zoom_in_tool" and tool_msg["name"] == "image_zoom_in_tool"
    x0, y0, x1, y1 = fn["arguments"]["bbox_2d"]
    e = item["evidence_union"]
    assert x0 <= e[0] and y0 <= e[1] and x1 >= e[2] and y1 >= e[3] and x1 - x0 >= 56
    text = next(b["text"] for b in tool_msg["content"] if b["type"] == "text")
    assert "<zoom" not in text and rec["crop_source"] == "oracle"
    assert row["prompt"][-1]["content"][-1]["type"] == "text" and len(row["prompt"][-1]["content"]) == 2  # untouched
    schemas = mat.tool_schemas(qzoom, "deepeyes")
    assert [s[0]["function"]["name"] for s in schemas] == ["image_zoom_in_tool"] * 2


def test_query_none_traces_call_zoom_without_arguments(run):
    from rl.data import SynthHRRows
    from rl.train_grpo import PolicyConfig, ScriptArguments, load_policy, match_processor_budget

    out, _ = run
    qzoom = load_policy(PolicyConfig(model_name_or_path="tiny-random"), ScriptArguments(budget_tokens=64),
                        str(out / "qn"))
    match_processor_budget(qzoom.processor, qzoom)
    rows = SynthHRRows("mini", ["attr-cue"], 1_000_000, 256)
    row = next(r for r in (rows.row(k) for k in range(4)) if r["needs_hr"])
    rec = mat.make_trace(qzoom, row, mat.TraceArgs(query="none"))
    assert rec["messages"][2]["tool_calls"][0]["function"] == {"name": "zoom", "arguments": {}}
    assert rec["messages"][3]["content"][1]["text"].startswith("<zoom src=0 cells=")


def test_rendered_rows_with_workers_keep_the_stream_order():
    from rl.data import SynthHRRows

    rows = SynthHRRows("mini", ["coarse", "attr-cue"], 1_000_000, 576, n_candidates=1)
    serial = [r["item"] for r in mat.rendered(rows, range(4), workers=0)]
    parallel = list(mat.rendered(rows, range(4), workers=2))
    assert [r["item"] for r in parallel] == serial
    assert parallel[1]["images"][0].tobytes() == rows.row(1)["images"][0].tobytes()


def test_format_check_scores_direct_answers(run):
    """`direct_accuracy` is the eval's score of answers given without a tool call: right letters score 1, wrong 0
    (the guard that would have flagged the first GPU cold start, which halved the policy's accuracy)."""
    import torch

    from rl.data import SynthHRRows
    from rl.train_grpo import PolicyConfig, ScriptArguments, load_policy, match_processor_budget

    out, _ = run
    qzoom = load_policy(PolicyConfig(model_name_or_path="tiny-random"), ScriptArguments(budget_tokens=64),
                        str(out / "fc"))
    match_processor_budget(qzoom.processor, qzoom)
    rows = [r for r in (SynthHRRows("mini", ["coarse"], 2_000_000, 256).row(k) for k in range(2))]
    tok = qzoom.processor.tokenizer

    def answering(letter_of, tagged=True):
        def generate(input_ids=None, **kw):
            row = rows[calls.pop(0)]
            letter = letter_of(json.loads(row['item']))
            text = (f"<answer>{letter}</answer>" if tagged else letter) + "<|im_end|>"
            new = torch.tensor([tok.encode(text, add_special_tokens=False)])
            return torch.cat([input_ids, new], dim=1)
        return generate

    for letter_of, want in ((lambda it: it["answer"], 1.0), (lambda it: "D" if it["answer"] != "D" else "C", 0.0)):
        calls = [0, 1]
        qzoom.base.generate = answering(letter_of)
        res = mat.format_check(qzoom, rows, mat.TraceArgs())
        assert res["coarse"]["direct_answered"] == 2 and res["coarse"]["direct_accuracy"] == want
        assert res["coarse"]["direct_answer_rate"] == 1.0 and res["coarse"]["tool_call_rate"] == 0.0
    calls = [0, 1]  # bare letters: scored alike; a direct answer only where bare answers are the format
    qzoom.base.generate = answering(lambda it: it["answer"], tagged=False)
    res = mat.format_check(qzoom, rows, mat.TraceArgs())
    assert res["coarse"]["direct_accuracy"] == 1.0 and res["coarse"]["direct_answer_rate"] == 0.0
    calls = [0, 1]
    res = mat.format_check(qzoom, rows, mat.TraceArgs(answer_format="bare"))
    assert res["coarse"]["direct_accuracy"] == 1.0 and res["coarse"]["direct_answer_rate"] == 1.0
    calls = [0, 1]  # a call TRL cannot parse (here its JSON without the tag) is neither a call nor an answer
    qzoom.base.generate = answering(lambda it: '{"name": "zoom", "arguments": "arguments": {}}', tagged=False)
    res = mat.format_check(qzoom, rows, mat.TraceArgs(answer_format="bare"))
    assert res["coarse"]["malformed_call_rate"] == 1.0 and res["coarse"]["direct_answered"] == 0
    assert res["coarse"]["direct_accuracy"] is None and res["coarse"]["tool_call_rate"] == 0.0


def test_cold_start_that_costs_answers_is_refused(tmp_path, monkeypatch):
    """--max_accuracy_drop: when the SFT lowers direct accuracy on coarse items by more than the limit, the script
    stops with a clear error, keeps report.json, and does not save the policy."""
    from qzoom_agent.errors import QZoomError

    checks = iter([{"needs_hr": {"direct_accuracy": None}, "coarse": {"direct_accuracy": 0.5}},
                   {"needs_hr": {"direct_accuracy": None}, "coarse": {"direct_accuracy": 0.2}}])
    monkeypatch.setattr(mat, "format_check", lambda *a, **k: next(checks))
    monkeypatch.setattr(mat, "sft", lambda *a, **k: [2.0, 1.0])
    out = tmp_path / "t"
    argv = ["--model", "tiny-random", "--n", "2", "--out", str(out), "--budget_tokens", "64", "--needs_hr_budget",
            "256", "--subsets", "coarse", "--sft_steps", "1", "--sft_output", str(tmp_path / "sft"), "--eval_n", "1",
            "--max_accuracy_drop", "0.2"]
    with pytest.raises(QZoomError, match="cold start refused: coarse direct accuracy fell by 0.30"):
        mat.main(argv)
    report = json.loads((out / "report.json").read_text())
    assert report["sft"]["coarse_direct_accuracy_drop"] == pytest.approx(0.3)
    assert not (tmp_path / "sft").exists()
    checks = iter([{"needs_hr": {}, "coarse": {"direct_accuracy": 0.5}},
                   {"needs_hr": {}, "coarse": {"direct_accuracy": 0.4}}])
    assert mat.main(argv[:-2] + ["--n", "0"])["sft"]["coarse_direct_accuracy_drop"] == pytest.approx(0.1)
    assert (tmp_path / "sft" / "qzoom_config.json").exists()


def test_head_warm_up_moves_only_the_output_projection(run):
    """--sft_head_steps (LP-FT): the head-only phase lowers the loss and leaves every other weight as it was, so the
    features the policy's answers rely on are untouched until the (gentler) SFT proper."""
    import torch

    from rl.train_grpo import PolicyConfig, ScriptArguments, load_policy, match_processor_budget

    out, _ = run
    qzoom = load_policy(PolicyConfig(model_name_or_path="tiny-random"), ScriptArguments(budget_tokens=64),
                        str(out / "lp"))
    match_processor_budget(qzoom.processor, qzoom)
    before = {k: v.clone() for k, v in qzoom.base.state_dict().items()}
    args = mat.TraceArgs(sft_head_steps=6, sft_head_lr=3e-2, sft_steps=0, sft_batch=3)
    losses = mat.sft(qzoom, mat.read_traces(out), args, log=lambda *_: None)
    assert len(losses) == 6 and losses[-1] < losses[0]
    changed = {k for k, v in qzoom.base.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"lm_head.weight"}


def test_bare_answer_format(run):
    """--answer_format bare: the final turn is the answer alone, where a policy that never saw the tags answers."""
    item = {"answer": "C"}
    assert mat.answer_text(item) == "<answer>C</answer>" and mat.answer_text(item, "bare") == "C"
    with pytest.raises(mat.QZoomError, match="--answer_format must be tagged or bare"):
        mat.answer_text(item, "boxed")
    with pytest.raises(mat.QZoomError, match="--answer_format must be tagged or bare, not 'boxed'"):
        mat.main(["--model", "tiny-random", "--n", "0", "--out", str(run[0] / "x"), "--answer_format", "boxed"])
    assert not (run[0] / "x").exists()  # refused before anything is loaded or written


def test_sft_batches_encoded_in_workers_are_the_same_batches(run):
    """--workers encodes SFT batches in other processes (the processor bounds a step); the draws, and so the
    training, are the same as in-process."""
    from rl.train_grpo import PolicyConfig, ScriptArguments, load_policy, match_processor_budget

    out, _ = run
    losses = []
    for workers in (0, 2):
        qzoom = load_policy(PolicyConfig(model_name_or_path="tiny-random"), ScriptArguments(budget_tokens=64),
                            str(out / f"w{workers}"))
        match_processor_budget(qzoom.processor, qzoom)
        args = mat.TraceArgs(sft_head_steps=3, sft_head_lr=3e-2, sft_steps=0, sft_batch=2, workers=workers)
        losses.append(mat.sft(qzoom, mat.read_traces(out), args, log=lambda *_: None))
    assert len(losses[0]) == 3 and losses[0] == losses[1]


def test_sft_rounds_continue_until_the_call_format_is_learned(tmp_path, monkeypatch):
    """--max_malformed_rate / --sft_rounds: more SFT (without the head warm-up) while too many needs_hr items get a
    malformed call, at most --sft_rounds rounds; the report keeps each round and whether the format was learned."""
    def check(rate):
        return {"needs_hr": {"malformed_call_rate": rate, "direct_accuracy": None},
                "coarse": {"direct_accuracy": 0.5}}

    out = tmp_path / "t"
    argv = ["--model", "tiny-random", "--n", "2", "--out", str(out), "--budget_tokens", "64", "--needs_hr_budget",
            "256", "--subsets", "coarse", "--sft_steps", "2", "--sft_head_steps", "1", "--sft_output",
            str(tmp_path / "sft"), "--eval_n", "1", "--max_malformed_rate", "0.1", "--sft_rounds", "3"]
    cases = (([0.0, 0.8, 0.4, 0.05], 3, True), ([0.0, 0.8, 0.6, 0.5], 3, False), ([0.0, 0.05], 1, True))
    for i, (rates, want_rounds, learned) in enumerate(cases):  # rates: before the SFT, then after each round
        checks, calls = iter(check(r) for r in rates), []
        monkeypatch.setattr(mat, "format_check", lambda *a, **k: next(checks))
        monkeypatch.setattr(mat, "sft", lambda q, recs, args, **k: calls.append(args.sft_head_steps) or [3.0, 2.0])
        report = mat.main(argv if i == 0 else argv[:3] + ["0"] + argv[4:])  # traces once, then reused
        assert [r["malformed"] for r in report["sft"]["rounds"]] == rates[1:]
        assert len(report["sft"]["rounds"]) == want_rounds and report["sft"]["format_learned"] is learned
        assert calls == [1] + [0] * (want_rounds - 1)  # the head warm-up runs once
        assert report["format_check"]["needs_hr"]["malformed_call_rate"] == rates[-1]
