"""Q-Zoom Stage 2, targeted fine-tuning (method.md §4): mining rule, response-only loss on the fused aligned
sequence, training = inference positions, what trains, resume, and the tool end to end (tiny random models, CPU)."""
import json
import sys
from pathlib import Path

import pytest
import torch

from qzoom_agent.engine import Answer
from qzoom_agent.testing import build_tiny_model
from qzoom_agent.training.targeted_sft import (IGNORE, MineConfig, SFTTrainConfig, fused_batch, fused_hidden,
                                               gate_forced_open, keep_regression, mine, response_loss,
                                               target_ids, train_targeted_sft, untie_lm_head)
from tests.conftest import make_qzoom

FAMILY = "qwen2_5_vl"
Q = "What is the code on the red tag?"


def fresh_model(family=FAMILY, **kw):
    """A QZoomModel on its own tiny trunk (training changes decoder layers; the session fixture must not change)."""
    return make_qzoom({family: build_tiny_model(family, qk_gain=4.0)}, family, **kw)


def mined_record(model, image, answer_text="A7 blue", rid="r0"):
    """A record as `mine` writes it: the twig's boxes from a gate-forced-open answer, the base answer as target."""
    with gate_forced_open(model):
        b = model.answer(image, Q)
    assert b.zoomed
    c = model.config
    return {"id": rid, "subset": "s", "question": Q, "base_answer": answer_text, "roi_answer": b.text,
            "boxes": [list(r.box) for r in b.boxes], "box_cells": [list(r.box_cells) for r in b.boxes],
            "budget": [c.min_visual_tokens, c.max_visual_tokens]}


# ------------------------------------------------------------------------------------------------ mining
class _StubModel:
    """answer() by question: "XY" → base answer X, RoI answer Y ("R" right, "W" wrong); "WR-noroi" never zooms."""

    def __init__(self):
        from types import SimpleNamespace

        self.roi_head, self.gate_head = object(), "gate"
        self.config = SimpleNamespace(min_visual_tokens=16, max_visual_tokens=64)
        self.calls = []

    def answer(self, images, questions, mode, **kw):
        self.calls.append((mode, list(questions), self.gate_head))
        out = []
        for q in questions:
            text = q[0] if mode == "base" else q[1]
            zoomed = mode == "qzoom" and not q.endswith("noroi")
            out.append(Answer(text=text, zoomed=zoomed, boxes=[] if not zoomed else [_roi()]))
        return out


def _roi():
    from qzoom_agent.roi import RoI

    return RoI(box=(0, 0, 56, 56), score=1.0, box_cells=(0, 0, 2, 2))


def test_mining_keeps_only_base_right_and_roi_wrong(tmp_path):
    cases = ["RR", "RW", "WR", "WW", "RW-noroi"]
    items = [{"id": c, "subset": "a" if i < 3 else "b", "question": c, "image": None,
              "judge": lambda t: t == "R"} for i, c in enumerate(cases)]
    stub = _StubModel()
    res = mine(stub, items, tmp_path, MineConfig(batch_size=2), progress=False)
    kept = [json.loads(line) for line in (tmp_path / "mined.jsonl").read_text().splitlines()]
    assert [r["id"] for r in kept] == ["RW"]
    assert kept[0]["base_answer"] == "R" and kept[0]["roi_answer"] == "W" and kept[0]["boxes"] == [[0, 0, 56, 56]]
    assert res["counts"]["a"] == {"n": 3, "base_right": 2, "roi_right": 2, "no_roi": 0, "kept": 1}
    assert res["counts"]["b"]["kept"] == 0 and res["counts"]["b"]["no_roi"] == 1
    assert all(gate is None for mode, _, gate in stub.calls if mode == "qzoom")        # gate forced open
    assert all(gate == "gate" for mode, _, gate in stub.calls if mode == "base") and stub.gate_head == "gate"
    stub.calls.clear()                                                                  # resume: nothing re-asked
    assert mine(stub, items, tmp_path, MineConfig(batch_size=2), progress=False) == res and stub.calls == []
    assert keep_regression(True, False, True) and not keep_regression(True, False, False)


# ------------------------------------------------------------------------------------------------ loss
def test_labels_cover_only_the_response_and_nothing_else_reaches_the_loss(rng_image):
    model = fresh_model()
    img = rng_image(300, 200, seed=1)
    rec = mined_record(model, img)
    fb = fused_batch(model, [rec], [img])
    ids, labels = fb.batch.input_ids[0], fb.labels[0]
    tgt = target_ids(model, rec["base_answer"])
    n = len(tgt)
    assert fb.has_roi == [True] and labels[-n:].tolist() == tgt                       # hand check of the targets
    assert (labels[:-n] == IGNORE).all() and int((labels != IGNORE).sum()) == n
    assert tgt[-1] == model.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    vs = model.backbone.vision_start_id
    assert (ids == vs).sum() == 2 and (labels[fb.batch.visual[0]] == IGNORE).all()     # global + RoI block, −100

    hidden = fused_hidden(model, fb.batch).detach().requires_grad_(True)
    loss, n_tok = response_loss(hidden, fb.labels, model.backbone.logits)
    assert n_tok == n
    logits = model.backbone.logits(hidden[0, -n - 1:-1]).float()
    hand = torch.nn.functional.cross_entropy(logits, torch.tensor(tgt))
    torch.testing.assert_close(loss, hand)
    loss.backward()
    assert hidden.grad[0, :-n - 1].abs().max() == 0                                   # prompt/image/RoI states: no grad
    other = hidden.detach().clone()
    other[0, :-n - 1] = torch.randn_like(other[0, :-n - 1])                            # change every non-target state
    assert response_loss(other, fb.labels, model.backbone.logits)[0].item() == pytest.approx(loss.item(), abs=0)
    no_roi = dict(rec, boxes=[], box_cells=[])
    fb2 = fused_batch(model, [no_roi], [img])
    assert fb2.has_roi == [False] and (fb2.labels == IGNORE).all() and (fb2.batch.input_ids == vs).sum() == 1
    assert response_loss(fused_hidden(model, fb2.batch), fb2.labels, model.backbone.logits)[1] == 0


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_training_sequence_positions_equal_engine_inference(family, rng_image):
    """Same image + box: the fused prompt's ids/positions equal the engine's fused prefill, the response positions
    equal its decode positions, and the logits before the response equal the engine's first-token logits."""
    model = fresh_model(family)
    img = rng_image(320, 240, seed=5)
    rec = mined_record(model, img)
    calls = []
    rotary = model.backbone.rotary
    model.backbone.rotary = lambda h, pos: calls.append(pos.detach().cpu().clone()) or rotary(h, pos)
    with gate_forced_open(model):
        ans = model.answer(img, Q, return_logits=True, max_new_tokens=4)
    model.backbone.rotary = rotary
    assert ans.zoomed and [list(r.box_cells) for r in ans.boxes] == rec["box_cells"]
    fused_pos = calls[1][:, 0]                                     # [coarse, fused, decode steps...]
    decode_pos = [c[:, 0, 0] for c in calls[2:]]
    rec["base_answer"] = "x y z"
    fb = fused_batch(model, [rec], [img])
    n = len(target_ids(model, rec["base_answer"]))
    pos = fb.batch.position_ids[:, 0]
    L = pos.shape[1]
    assert ans.fused_tokens == L - n
    torch.testing.assert_close(pos[:, :L - n], fused_pos[:, -(L - n):], atol=0, rtol=0)
    for k, p in enumerate(decode_pos[:n]):
        torch.testing.assert_close(pos[:, L - n + k], p, atol=0, rtol=0)
    online = fused_batch(model, [rec], [img], online_boxes=True)
    assert torch.equal(online.batch.position_ids, fb.batch.position_ids)
    assert torch.equal(online.batch.input_ids, fb.batch.input_ids)
    with torch.no_grad():
        h = fused_hidden(model, fb.batch)
        first = model.backbone.logits(h[0, L - n - 1]).float()
    torch.testing.assert_close(first, ans.first_logits, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ training
def _cfg(**kw):
    base = dict(steps=4, batch_size=1, lr=1e-3, warmup_ratio=0.0, ckpt_every=2, log_every=1)
    base.update(kw)
    return SFTTrainConfig(**base)


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_only_decoder_layers_and_lm_head_change(tmp_path, rng_image):
    model = fresh_model()
    img = rng_image(300, 200, seed=2)
    rec = mined_record(model, img)
    frozen = {"vit": model.base.model.visual, "embed": model.backbone.lm.embed_tokens,
              "norm": model.backbone.lm.norm, "roi": model.roi_head, "gate": model.gate_head}
    before = {k: _snapshot(m) for k, m in frozen.items()}
    layers_before, head_before = _snapshot(model.backbone.layers), model.base.lm_head.weight.detach().clone()
    train_targeted_sft(model, [rec], _cfg(steps=2), tmp_path, image_fn=lambda r: img, progress=False)
    for k, m in frozen.items():
        after = m.state_dict()
        assert all(torch.equal(v, after[n]) for n, v in before[k].items()), k
    after = model.backbone.layers.state_dict()
    for i in range(model.backbone.num_layers):
        assert any(not torch.equal(v, after[n]) for n, v in layers_before.items() if n.startswith(f"{i}.")), i
    assert not torch.equal(head_before, model.base.lm_head.weight)


def test_loss_falls_on_a_planted_target(tmp_path, rng_image):
    model = fresh_model()
    img = rng_image(300, 200, seed=3)
    rec = mined_record(model, img, answer_text="B9 red")
    res = train_targeted_sft(model, [rec], _cfg(steps=20, lr=1e-2, ckpt_every=100), tmp_path, image_fn=lambda r: img,
                             progress=False)
    assert res["done"] and res["losses"][-1] < 0.2 * res["losses"][0]
    assert [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()] \
        == list(range(1, 21))


def test_resume_equals_uninterrupted_run(tmp_path, rng_image):
    imgs = [rng_image(300, 200, seed=4), rng_image(240, 240, seed=6)]
    recs = [mined_record(fresh_model(), im, txt, rid=f"r{i}") for i, (im, txt) in enumerate(zip(imgs, ["a1", "b2"]))]
    image_fn = lambda r: imgs[int(r["id"][1])]  # noqa: E731
    full = fresh_model()
    train_targeted_sft(full, recs, _cfg(), tmp_path / "full", image_fn=image_fn, progress=False)
    part = fresh_model()
    r1 = train_targeted_sft(part, recs, _cfg(stop_after_steps=2), tmp_path / "part", image_fn=image_fn,
                            progress=False)
    assert r1["step"] == 2 and not r1["done"]
    again = fresh_model()
    r2 = train_targeted_sft(again, recs, _cfg(), tmp_path / "part", image_fn=image_fn, progress=False)
    assert r2["step"] == 4 and r2["done"]
    want, got = full.base.state_dict(), again.base.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in want.items())


def test_tied_lm_head_is_untied_and_embeddings_stay_frozen(tmp_path, rng_image):
    """Tied case (e.g. Qwen2.5-VL-3B; the testbed is untied): lm_head gets its own copy, trains, and reloads as is."""
    from qzoom_agent import QZoomModel

    model = fresh_model()
    hf = model.base
    hf.lm_head.weight = model.backbone.lm.embed_tokens.weight
    hf.config.tie_word_embeddings = True
    emb_before = model.backbone.lm.embed_tokens.weight.detach().clone()
    img = rng_image(300, 200, seed=7)
    rec = mined_record(model, img)
    assert untie_lm_head(model) and not untie_lm_head(model)
    train_targeted_sft(model, [rec], _cfg(steps=2), tmp_path, image_fn=lambda r: img, progress=False)
    assert torch.equal(model.backbone.lm.embed_tokens.weight, emb_before)
    assert not torch.equal(hf.lm_head.weight, emb_before)
    model.save_pretrained(tmp_path / "model")
    back = QZoomModel.from_pretrained(tmp_path / "model")
    assert torch.equal(back.base.lm_head.weight, hf.lm_head.weight)
    assert torch.equal(back.backbone.lm.embed_tokens.weight, emb_before)


# ------------------------------------------------------------------------------------------------ tool
def test_tool_end_to_end_on_two_synthhr_items(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import targeted_sft as tool

    from qzoom_agent import QZoomModel
    from qzoom_agent.errors import QZoomError

    src = fresh_model()
    src.save_pretrained(tmp_path / "rpn")
    out = tmp_path / "out"
    common = ["--model", str(tmp_path / "rpn"), "--out_dir", str(out), "--subsets", "doc-code,attr-cue",
              "--n_pool", "1", "--steps", "2", "--batch_size", "2", "--lr", "1e-3", "--device", "cpu",
              "--max_new_tokens", "4", "--mine_batch_size", "2"]
    summary = tool.main(common)
    judged = [json.loads(line) for line in (out / "judged.jsonl").read_text().splitlines()]
    assert len(judged) == 2 and set(summary["mined"]["counts"]) == {"doc-code", "attr-cue"}
    # a random model mines nothing: train on the two judged items as if mined, with a hand box in the middle
    from qzoom_agent.roi import pixels_to_cells
    from qzoom_agent.training.targeted_sft import record_image

    rows = []
    for r in judged:
        W, H = record_image(r).size
        resized = src.backbone.resized_hw((H, W), *r["budget"])
        grid = (resized[0] // 28, resized[1] // 28)
        box = [W // 4, H // 4, W // 2, H // 2]
        rows.append(dict(r, base_answer="A", boxes=[box], box_cells=[list(pixels_to_cells(box, 28, resized, (H, W),
                                                                                           grid))]))
    mined = tmp_path / "hand_mined.jsonl"
    mined.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = tool.main(common + ["--mined", str(mined), "--out_dir", str(tmp_path / "o2")])
    assert summary["train"]["step"] == 2 and set(summary["before"]) >= {"roi_acc", "roi_matches_target", "base_acc"}
    log = [json.loads(line) for line in (tmp_path / "o2" / "train_log.jsonl").read_text().splitlines()]
    assert [r["n_roi"] for r in log] == [2, 2] and all(r["n_target"] > 0 and r["grad_norm"] > 0 for r in log)
    back = QZoomModel.from_pretrained(tmp_path / "o2" / "model")
    assert back.roi_head is not None and back.gate_head is not None
    assert torch.equal(back.heads_state_dict()["roi.qk.q_proj.weight"], src.heads_state_dict()["roi.qk.q_proj.weight"])
    assert json.loads((tmp_path / "o2" / "summary.json").read_text())["train"]["done"]
    no_head = make_qzoom({FAMILY: build_tiny_model(FAMILY)}, FAMILY, has_roi_head=False)
    no_head.save_pretrained(tmp_path / "plain")
    with pytest.raises(QZoomError, match="no RoI head"):
        tool.main(["--model", str(tmp_path / "plain"), "--out_dir", str(tmp_path / "o3")])
