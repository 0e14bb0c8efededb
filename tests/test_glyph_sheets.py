"""Glyph-sheet dense labels: the stage-6 `shape` / `size` / `side` labels, the stage 1-5 labels unchanged, the dense
heads (loading the shipped stage-4 heads, which lack the new ones) and a CPU smoke of tools/train_testbed.py."""
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from eval.synthhr import SynthHRConfig  # noqa: E402
from eval.synthhr.config import PRIMITIVES  # noqa: E402
from eval.synthhr.objects import Obj  # noqa: E402
from qzoom_agent.training import glyph_sheets as gs  # noqa: E402

SHIPPED = ROOT / "qzoom_agent" / "testbed" / "weights"

# sha256[:16] of the glyph / count / color / kind labels and of the pixels, computed with the code before the
# stage-6 change (commit cf893e3) in this venv: the old labels and pixels must stay identical for a seed
OLD = [((0, 448, 448, {}), "4a3477ec0625c46c", "e0e39c758215b45a"),
       ((1, 336, 336, {}), "a84bd88d184f6d67", "960bd9adfeefdc41"),
       ((2, 560, 448, {"font_px": (5, 44)}), "51cb078ca15003e7", "4fefeb2d65f4bbda"),
       ((3, 448, 560, {"font_px": (5, 44)}), "403391bf259f413c", "7137170441af6f18")]


@pytest.mark.parametrize("case", OLD, ids=lambda c: str(c[0][:3]))
def test_old_labels_unchanged_for_a_seed(case):
    (seed, w, h, kw), lab_hash, img_hash = case
    img, lab, _ = gs.render_sheet(np.random.default_rng(seed), w, h, **kw)
    m = hashlib.sha256()
    for k in ("glyph", "count", "color", "kind"):
        m.update(k.encode())
        m.update(np.ascontiguousarray(lab[k], dtype=np.int64).tobytes())
    assert m.hexdigest()[:16] == lab_hash
    assert hashlib.sha256(img.tobytes()).hexdigest()[:16] == img_hash
    assert set(lab) == {"glyph", "count", "color", "kind", "shape", "size", "side"}


def _hand_sheet():
    """448² grey sheet: a large red circle at the left, a small red tag with a glyph at the right, a medium grey
    square straddling the centre line."""
    cfg = SynthHRConfig(scale="mini")
    pal = cfg.palette
    objs = [Obj("shape", "landmark", (28, 112, 140, 224), "red", pal["red"], shape="circle"),     # 112 px = 0.25
            Obj("tag", "carrier", (336, 56, 364, 84), "blue", pal["blue"]),                         # 28 px = 0.0625
            Obj("glyph", "detail", (343, 63, 357, 77), None, (250, 250, 250), text="K",
                font=cfg.fonts.glyph, font_px=12, parent=1),
            Obj("shape", "distractor", (196, 336, 252, 392), None, (120, 120, 120), shape="square")]  # 56 = 0.125
    img, ids = gs.paint(448, 448, None, objs, cfg.font_dir)
    lab = gs.dense_labels(objs, ids, list(cfg.palette), 16, 16)
    lab.update(gs.coarse_labels(objs, ids, list(cfg.shapes), 16, 16, 448, 448))
    return lab


def test_labels_on_a_hand_built_sheet():
    lab = _hand_sheet()
    circle = PRIMITIVES.index("circle") + 1
    # circle cells: rows 4..7, cols 1..4 (cell centres 14 + 28k inside the disc)
    for r, c in ((5, 2), (6, 3), (5, 3), (6, 2)):
        assert lab["shape"][r, c] == circle and lab["size"][r, c] == 2 and lab["side"][r, c] == 1
        assert lab["kind"][r, c] == 2 and lab["color"][r, c] == list(SynthHRConfig().palette).index("red") + 1
    # the tag (cell row 2, col 12): no shape class, small, right half
    assert lab["kind"][2, 12] == 3
    assert lab["shape"][2, 12] == -100 and lab["size"][2, 12] == 1 and lab["side"][2, 12] == 2
    # the grey square: its shape class, size in the gap (ignored), centre on the centre line (ignored)
    assert lab["shape"][12, 7] == PRIMITIVES.index("square") + 1 and lab["kind"][12, 7] == 1
    assert lab["size"][12, 7] == -100 and lab["side"][12, 7] == -100
    # background
    for r, c in ((0, 0), (15, 15), (0, 8), (10, 14)):
        assert lab["shape"][r, c] == 0 and lab["size"][r, c] == 0 and lab["side"][r, c] == 0
        assert lab["kind"][r, c] == 0


def test_size_thresholds_match_the_coarse_subset():
    """`large` = the generator's landmarks, `small` = its clutter, carriers and referents, in every mini family."""
    cfg = SynthHRConfig(scale="mini")
    sz = cfg.sizes
    for fam in ("clutter", "4k", "8k"):
        w, h, unit, dunit = cfg.geometry(fam)
        short = min(w, h)      # a coarse view is a uniform downscale: fractions of the short side are kept
        assert sz.landmark_px[0] * unit / short >= gs.LARGE_FRAC
        assert sz.distractor_px[1] * unit / short <= gs.SMALL_FRAC
        for r in (sz.tag_px, sz.referent_px, sz.search_px):
            assert r[1] * dunit / short <= gs.SMALL_FRAC, (fam, r)
    assert gs.LANDMARK_FRAC[0] >= gs.LARGE_FRAC


def test_landmark_sheets_are_balanced_enough():
    rng = np.random.default_rng(4)
    counts = {k: {} for k in ("shape", "size", "side")}
    for _ in range(6):
        _, lab, objs = gs.render_sheet(rng, 448, 448, font_px=(5, 44), landmarks=(2, 4), carrier_frac=0.5)
        assert sum(o.role == "landmark" for o in objs) >= 2
        for k in counts:
            v, c = np.unique(lab[k], return_counts=True)
            for a, b in zip(v.tolist(), c.tolist()):
                counts[k][a] = counts[k].get(a, 0) + b
    assert counts["size"].get(2, 0) >= 50 and counts["size"].get(1, 0) >= 20
    assert counts["side"].get(1, 0) >= 50 and counts["side"].get(2, 0) >= 50
    assert sum(1 for k in range(1, len(PRIMITIVES) + 1) if counts["shape"].get(k, 0) > 0) >= 6


def test_dense_loss_weights_and_missing_labels():
    from qzoom_agent.training.testbed_model import DenseHeads, dense_loss

    torch.manual_seed(0)
    nc = gs.label_classes()
    heads = DenseHeads(16, nc["glyph"], n_shape=nc["shape"], n_size=nc["size"], n_side=nc["side"])
    z = torch.randn(20, 16)
    lab = {k: torch.randint(0, n, (20,)) for k, n in nc.items()}
    with torch.no_grad():
        full, st = dense_loss(heads(z), lab)
        off, st0 = dense_loss(heads(z), lab, weights=dict(shape=0, size=0, side=0))
        old = {k: v for k, v in lab.items() if k in ("glyph", "count", "color", "kind")}
        ref, _ = dense_loss(heads(z), old)                  # old-format labels: the new heads are skipped
    assert {"acc_shape", "acc_size", "acc_side", "acc_glyph", "acc_kind"} <= set(st)
    assert torch.allclose(off, ref) and float(full) > float(off)
    assert "acc_shape" not in st0


def test_load_old_format_dense_heads_starts_new_heads_fresh():
    """A stage-1..5 dense_heads.pt (no shape / size / side heads): those start fresh, the others load exactly."""
    from qzoom_agent.training.testbed_model import DenseHeads

    shipped = torch.load(SHIPPED / "dense_heads.pt", map_location="cpu")
    state = {k: v for k, v in shipped.items() if not k.startswith(("heads.shape", "heads.size", "heads.side"))}
    assert len(state) < len(shipped)            # the shipped stage-6 heads carry the new heads
    nc = gs.label_classes()
    dim = state["heads.glyph.weight"].shape[1]
    heads = DenseHeads(dim, nc["glyph"], nc["count"], nc["color"], nc["kind"], n_shape=nc["shape"],
                       n_size=nc["size"], n_side=nc["side"])
    fresh = heads.load_partial(state)
    assert fresh == ["shape", "side", "size"]
    for k, v in state.items():
        assert torch.equal(heads.state_dict()[k], v.float())


def test_train_testbed_build_loads_shipped_heads():
    from tools.train_testbed import TrainArgs, build

    lines = []
    _, heads, _ = build(TrainArgs(resume=str(SHIPPED)), "cpu", log=lines.append)
    assert set(heads.heads) == {"glyph", "count", "color", "kind", "shape", "size", "side"}
    assert any("loaded ['color', 'count', 'glyph', 'kind', 'shape', 'side', 'size']; fresh (not in the checkpoint): none"
               in s for s in lines), lines


def test_train_testbed_cpu_smoke_logs_new_accuracies(tmp_path):
    from tools.train_testbed import TrainArgs, build, main

    log = tmp_path / "train.log"
    out = main(["--tiny", "True", "--max_steps", "2", "--resume", "", "--dense_minutes", "1.0", "--qa_minutes", "0",
                "--sheet_batch", "4", "--sheet_landmarks", "2,3", "--sheet_carrier_frac", "0.5", "--log_every", "1",
                "--eval_n", "0", "--gonogo_n", "0", "--out_dir", str(tmp_path / "ck"), "--log_file", str(log),
                "--device", "cpu"])
    dense = [c for c in out["curves"] if c["phase"] == "dense"]
    assert len(dense) == 2
    assert all(k in dense[-1] for k in ("acc_shape", "acc_size", "acc_side", "acc_glyph", "acc_kind"))
    text = log.read_text()
    assert '"acc_shape"' in text and '"acc_size"' in text and "shape " in text.split("GO/NO-GO")[-1]
    # the new checkpoint carries the new heads; with the switch off they are dropped on load
    state = torch.load(tmp_path / "ck" / "dense_heads.pt", map_location="cpu")
    assert "heads.shape.weight" in state
    lines = []
    _, heads, _ = build(TrainArgs(resume=str(tmp_path / "ck"), coarse_labels=False), "cpu", log=lines.append)
    assert "shape" not in heads.heads and any("dropped (coarse_labels off): ['shape', 'side', 'size']" in s
                                                for s in lines)
    json.dumps(out, default=str)


def test_stage6_config_parses_and_fits_one_call():
    from tools.train_testbed import parse

    a = parse(["--config", str(ROOT / "tools" / "configs" / "testbed_stage6.yaml")])
    assert a.coarse_labels and a.coarse_label_weight > 0 and a.sheet_landmarks == "2,4"
    assert a.dense_minutes + a.text_mc_minutes + a.qa_minutes <= 4.5
    assert a.eval_n == 100 and a.pin_src is None and Path(ROOT / a.resume / "dense_heads.pt").exists()
    assert a.sheet_share_qa > 0.05                         # stage 5: 0.05
