"""SD-RPN pseudo labels (method.md §3.1–§3.2): the denoising rules on hand-made maps, GT-free head choice, the
teacher attention against the model's own eager attention, jsonl storage + resume, and the tool end to end."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_qzoom
from qzoom_agent.training import pseudo_labels as pl
from qzoom_agent.training.teacher_attention import coarse_view, teacher_maps, visual_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import make_pseudo_labels as mpl  # noqa: E402
from test_rl_train_grpo import one_thread  # noqa: E402,F401  (autouse: one torch thread)

FG, BG, IGN = pl.FG, pl.BG, pl.IGNORE


def base_map(h=8, w=8, floor=0.001):
    return torch.full((h, w), floor)


# ------------------------------------------------------------------------------------------------ §3.2 rules

def test_worked_example_from_the_docstring():
    m = torch.full((6, 6), 0.01)
    m[1, 1] = 1.0
    labels = pl.denoise(m)
    assert labels.dtype == torch.int8
    assert labels[1, 1] == FG and int((labels == FG).sum()) == 1
    assert (labels[:3, :3] != BG).all() and int((labels[:3, :3] == IGN).sum()) == 8
    assert int((labels == BG).sum()) == 27


def test_sink_cells_are_zeroed_before_the_max():
    m = base_map()
    m[0, 0] = 5.0          # a sink, far above the real peak
    m[5, 5] = 0.5
    m[5, 6] = 0.2          # 0.4 of the real peak: FG only if the sink is removed first
    sink = torch.zeros(8, 8, dtype=torch.bool)
    sink[0, 0] = True
    labels = pl.denoise(m, sink)
    assert labels[0, 0] == BG and labels[5, 5] == FG and labels[5, 6] == FG
    no_sink = pl.denoise(m)
    assert no_sink[0, 0] == FG and no_sink[5, 6] != FG
    # a float sink-attention map marks sinks at >= sink_thresh (0.01)
    sink_attn = torch.zeros(8, 8)
    sink_attn[0, 0] = 0.02
    assert torch.equal(pl.denoise(m, sink_attn), labels)
    assert pl.clean_map(m, sink)[0, 0] == 0


def test_fg_is_strictly_above_a_quarter_of_the_max():
    m = base_map()
    m[4, 4] = 1.0
    m[4, 5] = 0.26
    m[3, 4] = 0.24
    labels = pl.denoise(m)
    assert labels[4, 4] == FG and labels[4, 5] == FG
    assert labels[3, 4] == IGN                                   # inside the box, not FG, not BG
    assert int((labels == FG).sum()) == 2


def test_bg_only_outside_the_box_and_below_five_percent():
    m = base_map()
    m[4, 4] = 1.0
    m[0, 7] = 0.04         # outside the box, below 0.05·max → BG
    m[7, 0] = 0.06         # outside the box, above 0.05·max → ignore
    m[3, 3] = 0.001        # inside the (dilated) box → ignore however low
    labels = pl.denoise(m)
    assert labels[0, 7] == BG and labels[7, 0] == IGN and labels[3, 3] == IGN
    box = pl.fg_box_cells(pl.clean_map(m))[1]
    assert box == (3, 3, 6, 6)                                   # FG cell dilated by one by the 3×3 blur
    x0, y0, x1, y1 = box
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    assert not (labels[inside] == BG).any()


def test_padding_is_always_background():
    m = base_map()
    m[4, 4] = 1.0
    m[0, :] = 0.9          # strong attention on padding rows: never FG
    m[4, 5] = 0.8          # a padding cell inside the FG box
    pad = torch.zeros(8, 8, dtype=torch.bool)
    pad[0, :] = True
    pad[4, 5] = True
    labels = pl.denoise(m, None, pad)
    assert (labels[pad] == BG).all()
    assert labels[4, 4] == FG


def test_whole_sample_ignore_when_the_box_covers_half_the_grid():
    m = base_map()
    m[1, 1] = 1.0
    m[6, 6] = 1.0          # box rows/cols 0..7 after dilation: the whole grid
    assert pl.is_ignored(pl.denoise(m))
    small = base_map()
    small[1, 1] = 1.0
    small[1, 3] = 1.0      # box 3 rows × 5 cols = 15 of 64 cells: kept
    assert not pl.is_ignored(pl.denoise(small))
    edge = base_map(4, 8)  # box exactly 50 %: 4 rows × 4 cols of 32 → ignored (>=)
    edge[1, 1] = edge[2, 2] = 1.0
    assert pl.fg_box_cells(pl.clean_map(edge))[1] == (0, 0, 4, 4)
    assert pl.is_ignored(pl.denoise(edge))


def test_whole_sample_ignore_when_the_peak_is_weak():
    m = torch.zeros(8, 8)
    m[4, 4] = 0.004        # a clean single peak, but below 5e-3
    assert pl.is_ignored(pl.denoise(m))
    m[4, 4] = 0.006
    assert not pl.is_ignored(pl.denoise(m))
    sinky = torch.zeros(8, 8)
    sinky[0, 0], sinky[4, 4] = 1.0, 0.004   # the peak counts after sink removal
    sink = torch.zeros(8, 8, dtype=torch.bool)
    sink[0, 0] = True
    assert pl.is_ignored(pl.denoise(sinky, sink))


def test_label_quality_example():
    labels = torch.full((4, 4), BG, dtype=torch.int8)
    labels[1, 1] = labels[1, 2] = FG
    q = pl.label_quality(labels, (1, 1, 2, 2))
    assert q["fg_precision"] == 0.5 and q["fg_recall"] == 1.0 and q["box_iou"] == 0.5 and not q["ignored"]
    ign = pl.label_quality(torch.full((4, 4), IGN, dtype=torch.int8), (1, 1, 2, 2))
    assert ign["ignored"] and ign["fg_recall"] is None
    s = pl.summarize_quality([q, ign])
    assert s["ignored_share"] == 0.5 and s["fg_recall"] == 1.0


# ------------------------------------------------------------------------------------------------ heads

def test_rank_heads_prefers_a_planted_peaky_head():
    rng = np.random.RandomState(0)
    attn = []
    for n in range(6):
        a = torch.tensor(rng.rand(3, 4, 8, 8) * 0.1 + 1.0, dtype=torch.float32)
        r, c = rng.randint(8), rng.randint(8)
        a[:, :, r, c] += 0.3                   # every head leans a little to the target
        a[1, 2, r, c] += 40.0                  # planted: layer 11, head 2 points sharply
        attn.append(a / a.sum((-1, -2), keepdim=True))
    ranked = pl.rank_heads(attn, layers=[10, 11, 12])
    assert (ranked[0]["layer"], ranked[0]["head"]) == (11, 2)
    assert pl.choose_heads(ranked, 2)[0] == (11, 2) and len(ranked) == 12


def test_head_selection_never_reads_ground_truth(tiny_models, rng_image, monkeypatch):
    qzoom = make_qzoom(tiny_models, "qwen2_5_vl")
    data = mpl._load_items(["attr-cue"], 2, "dev")
    stripped = [({k: v for k, v in it.items() if k not in ("rois", "evidence_union", "answer", "options")}, img)
                for it, img in data]
    args = mpl.PseudoLabelArgs(model="tiny-random", subsets="attr-cue", head_n=2, budget=16, n_heads=2)
    monkeypatch.setattr(mpl, "_load_items", lambda *a, **k: data)
    ranked_gt, heads_gt = mpl.select_heads(qzoom, args)
    monkeypatch.setattr(mpl, "_load_items", lambda *a, **k: stripped)
    ranked, heads = mpl.select_heads(qzoom, args)
    assert heads == heads_gt
    assert [(r["layer"], r["head"], r["score"]) for r in ranked] == \
        [(r["layer"], r["head"], r["score"]) for r in ranked_gt]
    assert all(r["post_hoc_hit"] == 0 for r in ranked)       # no box: nothing to report, nothing was used


# ------------------------------------------------------------------------------------------------ teacher

@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_teacher_attention_matches_eager_attention(tiny_models, rng_image, family):
    qzoom = make_qzoom(tiny_models, family)
    bb = qzoom.backbone
    views = [coarse_view(rng_image(300, 200, seed=1)), coarse_view(rng_image(200, 200, seed=2))]
    qs = ["What is the code on the red tag?", "What color?"]
    layer = 2
    vas = visual_attention(qzoom, views, qs, [layer], budget=16)
    # reference: the layer's own eager attention module on the same inputs
    from qzoom_agent.fusion import build_sequence, pad_batch

    seqs = [build_sequence(qzoom._template_ids(1, q), qzoom._token_ids(), [va.block]) for q, va in zip(qs, vas)]
    batch = pad_batch(seqs, bb.image_token_id, bb.pad_id)
    with torch.no_grad():
        h = qzoom._embed(batch)
        pe, mask = qzoom._rope_and_mask(h, batch.position_ids, batch.valid, h.shape[1])
        h = bb.run_layers(h, 0, layer, pe, mask, None, qzoom._deepstack(batch))
        _, w = bb.layers[layer].self_attn(bb.layers[layer].input_layernorm(h), attention_mask=mask,
                                          position_embeddings=pe)
    for b, va in enumerate(vas):
        cols = batch.visual[b].nonzero().squeeze(-1)
        ref = w[b, :, -1, cols].float()
        assert torch.allclose(va.attn[0].reshape(ref.shape), ref, atol=1e-5)
    # square padding: a 300×200 source centred in 300×300 → grid rows 0 and last are pure padding
    maps = teacher_maps(qzoom, views, qs, [(2, 0), (3, 1)], budget=64)
    pad = maps[0].pad_hw
    assert max(maps[0].block.grid_hw) >= 7               # cells ≤ 43 source px: the 50 px bands are whole cells
    assert pad.shape == maps[0].attn_hw.shape == maps[0].sink_hw.shape
    assert pad[0].all() and pad[-1].all() and not pad[1:-1].any()
    assert not maps[1].pad_hw.any()
    assert torch.allclose(maps[0].attn_hw, maps[0].head_hw.mean(0))


def test_response_queries_average_more_rows(tiny_models, rng_image):
    qzoom = make_qzoom(tiny_models, "qwen2_5_vl")
    views = [coarse_view(rng_image(seed=3))]
    last = visual_attention(qzoom, views, ["What color?"], [1], budget=16)[0].attn
    resp = visual_attention(qzoom, views, ["What color?"], [1], budget=16, query="response",
                            responses=["red tag"])[0].attn
    assert last.shape == resp.shape and not torch.allclose(last, resp)
    empty = visual_attention(qzoom, views, ["What color?"], [1], budget=16, query="response", responses=[""])[0].attn
    assert torch.allclose(empty, last, atol=1e-6)       # no response: only the last prompt token's query


# ------------------------------------------------------------------------------------------------ storage

def _row(i, H=3, W=4):
    labels = torch.tensor(np.random.RandomState(i).choice([FG, BG, IGN], size=(H, W)), dtype=torch.int8)
    return pl.label_row(f"s{i}", {"synthhr": f"s{i}"}, "q?", 576, labels, [(2, 1), (3, 0)], "last_prompt", 0.1 * i)


def test_jsonl_round_trip_and_resume(tmp_path):
    path = tmp_path / "labels.jsonl"
    w = pl.LabelWriter(path)
    w.write([_row(0), _row(1)])
    assert not path.exists()                                    # nothing final until close
    with open(w.partial, "a") as f:                             # a crash mid-write: a torn last line
        f.write('{"id": "s2", "lab')
    w2 = pl.LabelWriter(path)                                   # resume
    assert w2.done == {"s0", "s1"}
    w2.write([_row(1), _row(2)])                                # s1 is skipped
    w2.close()
    rows = pl.read_labels(path)
    assert [r["id"] for r in rows] == ["s0", "s1", "s2"]
    assert rows[2] == json.loads(json.dumps(_row(2)))
    assert set(rows[0]) == {"id", "source", "question", "budget", "grid", "labels", "teacher", "peak"}
    assert torch.equal(pl.row_labels(rows[1]), pl.row_labels(_row(1)))
    assert rows[0]["teacher"] == {"heads": [[2, 1], [3, 0]], "query": "last_prompt"}
    w3 = pl.LabelWriter(path)                                   # resume from a finished file
    assert w3.done == {"s0", "s1", "s2"}
    w3.write([_row(3)])
    w3.close()
    assert [r["id"] for r in pl.read_labels(path)] == ["s0", "s1", "s2", "s3"]


# ------------------------------------------------------------------------------------------------ tool

def test_tool_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "pl" / "labels.jsonl"
    argv = ["--model", "tiny-random", "--device", "cpu", "--subsets", "attr-cue,doc-code", "--n", "1",
            "--head_n", "1", "--budget", "16", "--n_heads", "2", "--out", str(out), "--fg_coeff", "0.3"]
    report = mpl.main(argv)
    rows = pl.read_labels(out)
    assert len(rows) == 2 and report["rows"] == 2 and report["new_rows"] == 2
    assert {r["source"]["subset"] for r in rows} == {"attr-cue", "doc-code"}
    for r in rows:
        assert r["budget"] == 16 and len(r["labels"]) == r["grid"][0] * r["grid"][1]
        assert set(r["labels"]) <= {FG, BG, IGN}
        assert r["teacher"]["heads"] == [list(h) for h in report["heads"]["chosen"]]
    assert report["denoise"]["fg_coeff"] == 0.3
    q = json.loads(Path(str(out) + ".quality.json").read_text())
    assert set(q["quality"]["labels"]) == {"attr-cue", "doc-code", "all"}
    assert set(q["quality"]["pointing"]["all"]) == {f"{l}:{h}" for l, h in report["heads"]["chosen"]}
    assert "FG recall" in Path(str(out) + ".quality.md").read_text()
    again = mpl.main(argv)                                      # resume: nothing new to label
    assert again["new_rows"] == 0 and again["rows"] == 2
    # rows carry the benchmark's prompt (what the RoI head reads at inference), not the bare question
    from eval.synthhr import SynthHRConfig, make_items
    from qzoom_agent.training.gate_labels import synthhr_target

    item = make_items(SynthHRConfig(scale="mini", n_candidates=1), "attr-cue", "train", 1)[0]
    row = next(r for r in rows if r["source"]["subset"] == "attr-cue")
    assert row["question"] == synthhr_target(item)[0] != item["question"]
    bare = mpl.main(argv[:-4] + ["--out", str(tmp_path / "bare.jsonl"), "--prompt", "question", "--subsets", "attr-cue"])
    assert bare["rows"] == 1 and pl.read_labels(tmp_path / "bare.jsonl")[0]["question"] == item["question"]


def test_head_choice_warning_flags_heads_that_do_not_agree():
    def ranked(agreements):
        return [dict(layer=i, head=0, score=1.0, peakiness=0.5, agreement=a) for i, a in enumerate(agreements)]

    # the top-4 agreements of two real runs (sixth session): fsp-4k alone (labels' FG precision 0.07), and
    # attr-cue + fsp-4k (0.95-0.99); the fifth head never counts with n=4
    bad = pl.head_choice_warning(ranked([0.0, 0.4, 0.4, 0.0, 0.9]), n=4)
    assert bad is not None and "0.20" in bad and "--head_n" in bad
    assert pl.head_choice_warning(ranked([0.4875, 0.4875, 0.5375, 0.4875, 0.0]), n=4) is None
    assert pl.head_choice_warning([], n=4) is None
