"""Q-Zoom Stage 1 (method.md §3.3–§3.4): RoI-head training on pseudo-label rows, on tiny random models."""
import json
import math

import pytest
import torch

from qzoom_agent.training.rpn_train import (IGNORE, RPNDataset, RPNTrainConfig, batch_indices, coarse_batch,
                                            cosine_with_warmup, read_label_rows, rpn_logits, rpn_loss, train_rpn)
from tests.conftest import make_qzoom

FAMILY = "qwen2_5_vl"
BUDGET = 16                       # 112 x 112 px at 28 px cells → a 4 x 4 merged grid


def _write_rows(tmp_path, rng_image, n=2, grid=(4, 4), fg_cell=5, name="labels.jsonl"):
    """n label rows over tiny PNGs: one FG cell, BG elsewhere except two ignored cells."""
    rows = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        rng_image(112, 112, seed=i).save(path)
        H, W = grid
        labels = [0] * (H * W)
        labels[fg_cell] = 1
        labels[-1] = labels[-2] = IGNORE
        rows.append({"id": f"s{i}", "source": {"image": str(path), "gt_box": [28, 28, 56, 56]},
                     "question": "What is the code on the red tag?", "budget": BUDGET, "grid": [H, W],
                     "labels": labels, "teacher": {"layers": [1]}, "peak": 0.1})
    f = tmp_path / name
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


@pytest.fixture
def new_model(tiny_models):
    """make_qzoom at the test budget; the session-wide tiny trunk gets its requires_grad back afterwards."""
    yield lambda: make_qzoom(tiny_models, FAMILY, min_visual_tokens=BUDGET, max_visual_tokens=64)
    for hf, _ in tiny_models.values():
        hf.requires_grad_(True)


def _cfg(**kw):
    base = dict(steps=4, batch_size=2, lr=1e-3, ckpt_every=2, log_every=1, num_workers=0)
    base.update(kw)
    return RPNTrainConfig(**base)


# -------------------------------------------------------------------------------------------------- loss
def test_loss_equals_hand_bce_and_ignores_minus_100():
    logits = [torch.tensor([[0.0, 2.0], [-1.0, 3.0]], requires_grad=True)]
    labels = torch.tensor([[1, IGNORE], [0, 1]])
    loss, stats = rpn_loss(logits, [labels])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    hand = -(math.log(sig(0.0)) + math.log(1 - sig(-1.0)) + math.log(sig(3.0))) / 3
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    assert stats["n_fg"] == 2 and stats["n_bg"] == 1 and stats["bg_acc"] == 1.0 and stats["fg_acc"] == 0.5
    loss.backward()
    assert logits[0].grad[0, 1] == 0                              # no gradient through the ignored cell
    logits2 = [torch.tensor([[0.0, -50.0], [-1.0, 3.0]])]      # its logit does not matter
    assert rpn_loss(logits2, [labels])[0].item() == pytest.approx(hand, rel=1e-6)


def test_loss_ignored_label_value_does_not_matter_and_empty_is_zero():
    logits = [torch.randn(3, 3)]
    a = torch.full((3, 3), IGNORE)
    a[0, 0], a[1, 1] = 1, 0
    worked = rpn_loss([torch.tensor([[0.0, 2.0]])], [torch.tensor([[1, IGNORE]])])[0]
    assert worked.item() == pytest.approx(math.log(2))          # the docstring's worked example
    x = torch.randn(3, 3, requires_grad=True)
    empty, stats = rpn_loss([x], [torch.full((3, 3), IGNORE)])
    assert empty.item() == 0.0 and stats["fg_acc"] is None
    empty.backward()                                             # still differentiable
    assert torch.equal(x.grad, torch.zeros(3, 3))
    assert rpn_loss(logits, [a])[0].item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(logits[0][[0, 1], [0, 1]],
                                                             torch.tensor([1.0, 0.0])).item())


def test_loss_resizes_logits_bilinearly_when_grids_differ():
    lg = torch.randn(2, 2)
    labels = torch.randint(0, 2, (4, 4))
    loss, _ = rpn_loss([lg], [labels])
    up = torch.nn.functional.interpolate(lg[None, None], size=(4, 4), mode="bilinear", align_corners=False)[0, 0]
    ref = torch.nn.functional.binary_cross_entropy_with_logits(up, labels.float())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_cosine_schedule_warms_up_then_decays():
    lrs = [cosine_with_warmup(s, 100, 0.03) for s in range(100)]
    assert lrs[0] == pytest.approx(1 / 3) and lrs[2] == 1.0 and lrs[3] == 1.0
    assert lrs[51] < 0.55 and lrs[99] < 1e-3
    assert batch_indices(5, 2, 0, 2) == batch_indices(5, 2, 0, 2)   # resumable data order


# ------------------------------------------------------------------------------------------ training
def test_forward_matches_engine_score_map(new_model, tmp_path, rng_image):
    model = new_model()
    ds = RPNDataset(read_label_rows(_write_rows(tmp_path, rng_image, n=1)))
    with torch.no_grad():
        logits = rpn_logits(model, coarse_batch(model, [ds[0]]))[0]
    ref, _, block, _ = model.score_map(ds[0]["image"], ds[0]["question"], max_visual_tokens=BUDGET)
    assert block.grid_hw == (4, 4)
    torch.testing.assert_close(logits.float(), ref, rtol=1e-5, atol=1e-5)


def test_only_roi_head_changes(new_model, tmp_path, rng_image):
    model = new_model()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ds = RPNDataset(read_label_rows(_write_rows(tmp_path, rng_image)))
    train_rpn(model, ds, _cfg(steps=3), tmp_path / "out", progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("roi_head.") for k in changed), sorted(changed)[:5]
    assert not any(k.startswith(("base.", "gate_head.")) for k in changed)


def test_loss_falls_on_planted_cell(new_model, tmp_path, rng_image):
    model = new_model()
    ds = RPNDataset(read_label_rows(_write_rows(tmp_path, rng_image, n=1)))
    out = tmp_path / "out"
    train_rpn(model, ds, _cfg(steps=20, batch_size=1, lr=3e-3, ckpt_every=100), out, progress=False)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 20
    assert losses[-1] < 0.5 * losses[0], losses
    assert log[-1]["fg_acc"] == 1.0 and log[-1]["bg_acc"] == 1.0


def test_checkpoint_resume_continues_schedule(new_model, tmp_path, rng_image, monkeypatch):
    rows = read_label_rows(_write_rows(tmp_path, rng_image, n=3))
    ds = RPNDataset(rows)
    # straight run: 4 steps
    a = new_model()
    train_rpn(a, ds, _cfg(steps=4), tmp_path / "straight", progress=False)
    straight = {k: v.clone() for k, v in a.roi_head.state_dict().items()}
    # split run: stop after 2 steps (a crash after the step-2 checkpoint), then resume
    b = new_model()
    import qzoom_agent.training.rpn_train as rt

    real_save = rt.save_checkpoint

    def save_then_crash(model, opt, sched, step, path):
        real_save(model, opt, sched, step, path)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(rt, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_rpn(b, ds, _cfg(steps=4), tmp_path / "split", progress=False)
    monkeypatch.setattr(rt, "save_checkpoint", real_save)
    ckpt = tmp_path / "split" / "checkpoint"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    opt = torch.load(ckpt / "optimizer.pt", weights_only=False)
    assert opt["scheduler"]["last_epoch"] == 2 and opt["optimizer"]["state"]
    c = new_model()   # a fresh process
    res = train_rpn(c, ds, _cfg(steps=4), tmp_path / "split", progress=False)
    assert res["step"] == 4 and res["done"]
    log = [json.loads(x) for x in (tmp_path / "split" / "train_log.jsonl").read_text().splitlines()]
    assert {"event": "resume", "step": 2} in log
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    for k, v in c.roi_head.state_dict().items():
        torch.testing.assert_close(v, straight[k], rtol=1e-5, atol=1e-6)
    # atomic: no temporary or stale folders left beside the checkpoint
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["checkpoint", "train_log.jsonl"]


def test_atomic_checkpoint_leaves_previous_on_failure(new_model, tmp_path, monkeypatch):
    import qzoom_agent.training.rpn_train as rt

    model = new_model()
    params = rt.freeze_all_but_roi_head(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    rt.save_checkpoint(model, opt, sched, 7, tmp_path / "ck")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        rt.save_checkpoint(model, opt, sched, 9, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "trainer_state.json").read_text())["step"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_tool_end_to_end_and_reload(tmp_path, rng_image, monkeypatch):
    from qzoom_agent import QZoomConfig, QZoomModel
    from qzoom_agent.testing import save_tiny_model

    src = tmp_path / "tiny"
    save_tiny_model(src, FAMILY)
    QZoomConfig(family=FAMILY, twig_K=2, twig_T=2, has_roi_head=False, has_gate=False, sink_min_cells=16,
                min_visual_tokens=BUDGET, max_visual_tokens=64).save(src / "qzoom_config.json")
    labels = _write_rows(tmp_path, rng_image)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"labels: {labels}\nmodel: {src}\nsteps: 3\nbatch_size: 2\nlr: 0.001\n")
    out = tmp_path / "run"
    monkeypatch.setenv("TQDM_DISABLE", "1")
    from tools.train_rpn import main

    res = main(["--config", str(yaml_file), "--out_dir", str(out), "--eval_labels", str(labels),
                "--eval_budget", str(BUDGET), "--device", "cpu"])
    assert res["step"] == 3 and res["done"]
    assert res["eval"]["eval"]["n"] == 2
    assert json.loads((out / "summary.json").read_text())["step"] == 3
    m = QZoomModel.from_pretrained(out / "model")
    assert m.config.has_roi_head and m.roi_head is not None
    from safetensors.torch import load_file

    trained = load_file(str(out / "checkpoint" / "roi_head.safetensors"))
    for k, v in m.heads_state_dict().items():
        if k.startswith("roi."):
            torch.testing.assert_close(v, trained[k])
    init = QZoomModel.from_pretrained(src)
    init.config.has_roi_head = True
    init.init_heads()
    assert any(not torch.equal(v, init.heads_state_dict()[k]) for k, v in m.heads_state_dict().items()
               if k.startswith("roi."))


def test_synthhr_source_rerenders_from_its_id():
    from qzoom_agent.training.rpn_train import parse_synthhr_id
    from tools.make_gt_box_labels import gt_box_labels

    assert parse_synthhr_id("synthhr-mini-test-attr-cue-00012") == {"scale": "mini", "split": "test",
                                                                     "subset": "attr-cue", "index": 12}
    # a 2-cell box on a 4 x 4 grid over a 112 px canvas: FG cells, a one-cell ignore ring, BG elsewhere
    assert gt_box_labels([28, 28, 84, 56], 112, 112, (4, 4)) == [-100, -100, -100, -100,
                                                                 -100, 1, 1, -100,
                                                                 -100, -100, -100, -100,
                                                                 0, 0, 0, 0]


def test_gt_box_label_rows_load_as_training_samples(tmp_path):
    from tools.make_gt_box_labels import main as make_labels

    out = tmp_path / "gt.jsonl"
    assert make_labels(["--subsets", "attr-cue", "--n", "1", "--budget", "64", "--out", str(out)]) == 1
    sample = RPNDataset(read_label_rows(out))[0]
    H, W = json.loads(out.read_text())["grid"]
    assert sample["labels"].shape == (H, W) and (sample["labels"] == 1).any()
    assert sample["image"].size == (1344, 1344) and len(sample["gt_box"]) == 4


def test_rows_made_on_square_padded_views_train_on_the_same_view(tmp_path):
    """A pseudo-label row made on a grey square-padded view (make_pseudo_labels' default) is trained on that same
    view: the dataset pads the source the same way and shifts the GT box, so label cells line up with tokens."""
    from PIL import Image

    from qzoom_agent.training.pseudo_labels import label_row
    from qzoom_agent.training.rpn_train import RPNDataset

    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 200), (10, 200, 30)).save(path)
    labels = torch.zeros(4, 4, dtype=torch.int8)
    row = label_row("a", {"image": str(path), "gt_box": [10, 20, 50, 60]}, "q?", 16, labels, [(0, 0)], "last_prompt",
                    1.0, view={"square_pad": True, "fill": 127})
    sample = RPNDataset([row])[0]
    assert sample["image"].size == (300, 300)
    assert tuple(sample["gt_box"]) == (10, 70, 50, 110)
    assert sample["image"].getpixel((5, 5)) == (127, 127, 127) and sample["image"].getpixel((150, 150)) == (10, 200, 30)
    plain = RPNDataset([{k: v for k, v in row.items() if k != "view"}])[0]
    assert plain["image"].size == (300, 200) and tuple(plain["gt_box"]) == (10, 20, 50, 60)


def test_fg_weight_scales_only_the_fg_terms():
    """fg_weight w: loss = mean over cells of (w * BCE for FG cells, BCE for BG cells); 1.0 is the plain mean."""
    import math

    x = torch.tensor([[0.0, 1.0, -1.0]])
    y = torch.tensor([[1, 0, IGNORE]])
    fg, bg = -math.log(1 / (1 + math.exp(-0.0))), -math.log(1 - 1 / (1 + math.exp(-1.0)))
    assert rpn_loss([x], [y])[0].item() == pytest.approx((fg + bg) / 2, rel=1e-6)
    assert rpn_loss([x], [y], fg_weight=5.0)[0].item() == pytest.approx((5 * fg + bg) / 2, rel=1e-6)


def test_non_positive_fg_weight_is_a_clear_error():
    from qzoom_agent.errors import QZoomError
    from qzoom_agent.training.rpn_train import RPNTrainConfig

    with pytest.raises(QZoomError, match="fg_weight"):
        RPNTrainConfig(fg_weight=0.0)
