"""Gate training (method.md §2, §4 Stage 3): only the gate trains, the loss learns a planted rule, resume is exact,
and the two tools run end to end on CPU and reload with the gate."""
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import make_qzoom
from qzoom_agent.training import gate_labels as gl
from qzoom_agent.training import gate_train as gt

BUDGETS = [16, 24, 32, 64]
TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tool(name):
    sys.path.insert(0, str(TOOLS))
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def colour_toy(n=8):
    """Red images → easy (label 0); blue images → transition wrong at the two lowest budgets (label 1 or −100)."""
    recs, imgs = [], {}
    for i in range(n):
        blue = i % 2 == 1
        rid = f"{'blue' if blue else 'red'}{i}"
        imgs[rid] = Image.new("RGB", (120, 90), (20, 40, 220) if blue else (220, 30, 20))
        correct = [False, False, True, True] if blue else [True] * 4
        recs.append({"id": rid, "budgets": BUDGETS, "answers": ["x"] * 4, "gt": ["x"], "correct": correct,
                     "prompt": "What colour is it?", "kind": "transition" if blue else "easy"})
    return gt.GateDataset(recs, imgs.__getitem__)


def gate_only(tiny_models):
    """A tiny QZoomModel with a fresh gate and no RoI head (the shared backbone is not modified)."""
    from qzoom_agent import QZoomConfig, QZoomModel

    hf, proc = tiny_models["qwen2_5_vl"]
    cfg = QZoomConfig(family="qwen2_5_vl", twig_K=2, twig_T=2, gate_T=1, has_roi_head=False, has_gate=False,
                      gate_thresh=0.5, min_visual_tokens=16, max_visual_tokens=64, max_new_tokens=3)
    torch.manual_seed(1)
    model = QZoomModel.from_backbone(hf, proc, cfg)
    gt.enable_gate(model)
    return model


@pytest.fixture
def gated(tiny_models):
    flags = {n: p.requires_grad for n, p in tiny_models["qwen2_5_vl"][0].named_parameters()}
    yield gate_only(tiny_models)
    for n, p in tiny_models["qwen2_5_vl"][0].named_parameters():   # training froze the shared backbone
        p.requires_grad_(flags[n])


def test_enable_gate_keeps_other_heads(tiny_models):
    model = make_qzoom(tiny_models, "qwen2_5_vl")
    roi = model.roi_head
    model.gate_head = None
    model.config.has_gate = False
    gt.enable_gate(model)
    assert model.roi_head is roi and model.gate_head is not None and model.config.has_gate
    assert float(model.gate_head.head.weight.detach().abs().sum()) == 0.0          # zero-init linear


def test_gate_loss_ignores_minus_100():
    logits = torch.tensor([0.0, 5.0, -3.0])
    labels = torch.tensor([1, -100, 0])
    ref = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([0.0, -3.0]), torch.tensor([1.0, 0.0]))
    assert torch.allclose(gt.gate_loss(logits, labels), ref)
    assert float(gt.gate_loss(logits, torch.tensor([-100] * 3))) == 0.0


def test_gate_logits_match_the_engine(tiny_models, rng_image):
    gated = make_qzoom(tiny_models, "qwen2_5_vl")
    img = rng_image(200, 150)
    with torch.no_grad():
        gated.gate_head.head.weight.normal_()
        logit = gt.gate_logits(gated, [img], ["Where?"], [32])
    prob = gated.answer(img, "Where?", mode="qzoom", max_visual_tokens=32, min_visual_tokens=32).gate_prob
    assert abs(float(torch.sigmoid(logit[0])) - prob) < 1e-5


def test_only_gate_params_change_and_lr_schedule(gated, tmp_path):
    before = {n: p.detach().clone() for n, p in gated.named_parameters()}
    cfg = gt.GateTrainConfig(lr=1e-3, warmup_steps=2, max_steps=3, batch_size=4, log_every=1)
    gt.train_gate(gated, colour_toy(), cfg, tmp_path, log=lambda s: None)
    changed = {n for n, p in gated.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("gate_head.") for n in changed)
    assert "gate_head.head.weight" in changed
    assert gt.lr_at(0, cfg) == pytest.approx(5e-4) and gt.lr_at(1, cfg) == pytest.approx(1e-3)
    assert gt.lr_at(3, cfg) == pytest.approx(0.0, abs=1e-12)
    rows = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_loss_falls_on_planted_colour_rule(gated, tmp_path):
    ds = colour_toy()
    cfg = gt.GateTrainConfig(lr=3e-3, warmup_steps=3, max_steps=40, batch_size=8, log_every=40)
    out = gt.train_gate(gated, ds, cfg, tmp_path, log=lambda s: None)
    assert out["done"]
    red = [Image.new("RGB", (120, 90), (220, 30, 20))]
    blue = [Image.new("RGB", (120, 90), (20, 40, 220))]
    p_red = gt.gate_probs(gated, red * 2, ["What colour is it?"] * 2, 16)
    p_blue = gt.gate_probs(gated, blue * 2, ["What colour is it?"] * 2, 16)
    assert out["last_loss"] < 0.35, out                               # starts at ln 2 = 0.693 (zero-init head)
    assert max(p_red) < 0.3 < 0.7 < min(p_blue)


def test_resume_continues_exactly(tiny_models, gated, tmp_path):
    def fresh():
        return gate_only(tiny_models)

    cfg = gt.GateTrainConfig(lr=1e-3, warmup_steps=1, max_steps=4, batch_size=3, log_every=1)
    straight = fresh()
    gt.train_gate(straight, colour_toy(), cfg, tmp_path / "a", log=lambda s: None)
    split = fresh()
    half = gt.GateTrainConfig(**{**cfg.__dict__, "stop_after_steps": 2})
    r1 = gt.train_gate(split, colour_toy(), half, tmp_path / "b", log=lambda s: None)
    assert r1 == {"step": 2, "done": False, "last_loss": r1["last_loss"]}
    resumed = fresh()                                                 # a new process: weights from the state file
    logs = []
    r2 = gt.train_gate(resumed, colour_toy(), cfg, tmp_path / "b", log=logs.append)
    assert r2["step"] == 4 and r2["done"] and "resumed at step 2" in logs
    for (n, a), b in zip(straight.gate_head.state_dict().items(), resumed.gate_head.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_gate_report_rates_and_sweep():
    rep = gt.gate_report([0.9, 0.05, 0.6, 0.2], ["attr", "coarse", "coarse", "doc"], [True, False, False, True],
                         0.5, kinds=["transition", "easy", "easy", None])
    at = rep["at_thresh"]
    assert at["skip_rate_coarse"] == 0.5 and at["fire_rate_needs_hr"] == 0.5
    assert at["skip_rate_easy"] == 0.5 and at["fire_rate_transition"] == 1.0
    assert rep["auroc_needs_hr"] == 0.75
    assert [r["thresh"] for r in rep["sweep"]][0] == 0.02 and rep["sweep"][0]["fire_rate_needs_hr"] == 1.0


def test_tools_end_to_end_and_reload(tiny_models, tmp_path):
    from qzoom_agent import QZoomModel

    base = gate_only(tiny_models)
    base.gate_head, base.config.has_gate = None, False
    base.save_pretrained(tmp_path / "base")
    labels = tmp_path / "labels"
    stats = _tool("make_gate_labels").main([
        "--model", str(tmp_path / "base"), "--out_dir", str(labels), "--subsets", "coarse,attr-cue",
        "--n_per_subset", "2", "--budgets", ",".join(map(str, BUDGETS)), "--batch_size", "4",
        "--max_new_tokens", "3", "--render_workers", "1", "--device", "cpu"])
    records = gl.read_records(labels / "records.jsonl")
    assert len(records) == 4 and stats["n"] == 4 and stats["complete"]
    assert all(len(r["answers"]) == 4 and set(r["needs_hr"]) >= {"256"} for r in records)
    # a random tiny model's answers are all wrong, so plant a kept set on the real ids to drive training
    kept = [dict(r, correct=[i % 2 == 0 or j >= 2 for j in range(4)], kind="easy" if i % 2 == 0 else "transition")
            for i, r in enumerate(records)]
    (labels / "kept.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    # resumable labels: a second run answers nothing new
    stats2 = _tool("make_gate_labels").main([
        "--model", str(tmp_path / "base"), "--out_dir", str(labels), "--subsets", "coarse,attr-cue",
        "--n_per_subset", "2", "--budgets", ",".join(map(str, BUDGETS)), "--render_workers", "1", "--device", "cpu"])
    assert len(gl.read_records(labels / "records.jsonl")) == 4 and stats2["n"] == 4
    (labels / "kept.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    out = tmp_path / "gate"
    train = _tool("train_gate")
    common = ["--model", str(tmp_path / "base"), "--labels_dir", str(labels), "--out_dir", str(out),
              "--max_steps", "4", "--batch_size", "2", "--warmup_steps", "1", "--render_workers", "1",
              "--eval_subsets", "coarse,attr-cue", "--eval_n_per_subset", "1", "--eval_budget", "16",
              "--device", "cpu", "--log_every", "1"]
    r1 = train.main(common + ["--stop_after_steps", "2"])
    assert r1["train"]["step"] == 2 and not r1["train"]["done"] and "eval" not in r1
    r2 = train.main(common)
    assert r2["train"] == {"step": 4, "done": True, "last_loss": r2["train"]["last_loss"]}
    ev = json.loads((out / "eval.json").read_text())["eval"]
    assert ev["n"] == 2 and ev["n_coarse"] == 1 and len(ev["sweep"]) == 8
    loaded = QZoomModel.from_pretrained(out / "model")
    assert loaded.config.has_gate and loaded.gate_head is not None
    state = torch.load(out / "train_state.pt", weights_only=False)["gate"]
    for k, v in loaded.gate_head.state_dict().items():
        assert torch.allclose(v.float(), state[k].float()), k
