"""The shipped testbed with its trained Q-Zoom heads (qzoom_agent/testbed/qzoom): size budget, loading, and one
real Q-Zoom answer on a SynthHR-mini item whose detail needs zooming."""
from pathlib import Path

import pytest
import torch

from qzoom_agent.testbed import QZOOM_DIR, load_testbed_qzoom


def test_shipped_heads_fit_the_testbed_budget():
    files = [f for f in Path(QZOOM_DIR).iterdir() if f.is_file()]
    assert max(f.stat().st_size for f in files) <= 15 * 2 ** 20
    assert sum(f.stat().st_size for f in files) <= 60 * 2 ** 20


def test_load_and_zoom_on_a_needs_hr_item():
    from eval.synthhr import SynthHRConfig, make_items, render_item

    model = load_testbed_qzoom()
    assert model.roi_head is not None and model.gate_head is not None
    assert model.config.min_box_px == 168 and model.config.twig_K == 3
    assert {p.dtype for p in model.base.parameters()} == {torch.float32}
    cfg = SynthHRConfig(scale="mini", n_candidates=1)
    item = make_items(cfg, "attr-cue", "test", 1)[0]
    assert item["needs_hr@256"]
    img = render_item(item, cfg).convert("RGB")
    a = model.answer(img, item["question"], mode="qzoom", max_visual_tokens=576, max_new_tokens=4,
                     boxes=[item["evidence_union"]])
    assert a.zoomed and a.visual_tokens > 256 and a.text.strip()
    b = model.answer(img, item["question"], mode="qzoom", max_visual_tokens=576, max_new_tokens=4)
    assert b.gate_prob is not None and 0.0 <= b.gate_prob <= 1.0


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_qzoom_heads"):
        load_testbed_qzoom(tmp_path)
