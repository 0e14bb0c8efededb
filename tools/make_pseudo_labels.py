#!/usr/bin/env python
"""Q-Zoom Stage-1 data (issue #5 step 1): SD-RPN pseudo labels from the frozen model's own attention, on SynthHR-mini.

    python tools/make_pseudo_labels.py --model testbed --split train --n 64 --out runs/pseudo_labels/labels.jsonl
    python tools/make_pseudo_labels.py --config tools/configs/pseudo_labels.yaml

Steps:
  1. load the model (the shipped testbed, `tiny-random`, or a QZoomModel folder);
  2. choose teacher heads WITHOUT ground truth: all layers' last-prompt-token attention on `head_split` items
     (question + image only), ranked by peakiness + cross-layer agreement; keep the top `n_heads`;
  3. for each `split` item: coarse view (square-padded, `budget` tokens), teacher map = mean of the chosen heads,
     family sink map, denoise (§3.2) → one jsonl row (resumable: ids already written are skipped);
  4. report, using SynthHR's GT boxes only now: per subset FG precision / recall / box IoU / ignored share, and the
     pointing hit rate of each chosen head (and of every ranked head on the head-selection items, post hoc), as
     `<out>.quality.json` + `<out>.quality.md`.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from qzoom_agent import roi as roi_lib  # noqa: E402
from qzoom_agent.checkpoint import atomic_write_text  # noqa: E402
from qzoom_agent.training import pseudo_labels as pl  # noqa: E402
from qzoom_agent.training.teacher_attention import coarse_view, teacher_maps, visual_attention  # noqa: E402


@dataclass
class PseudoLabelArgs:
    model: str = field(default="testbed", metadata={"help": "testbed | tiny-random | QZoomModel folder"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    split: str = field(default="train", metadata={"help": "SynthHR-mini split to label"})
    subsets: str = field(default="", metadata={"help": "comma-separated SynthHR subsets (empty: all)"})
    n: int = field(default=64, metadata={"help": "items per subset to label"})
    budget: int = field(default=576, metadata={"help": "coarse visual tokens (min = max), 576 = 24x24 as Q-Zoom"})
    square_pad: bool = field(default=True, metadata={"help": "grey square padding before encoding (§3.1)"})
    query: str = field(default="last_prompt", metadata={"help": "last_prompt | response (greedy answer, forced)"})
    prompt: str = field(default="benchmark", metadata={"help": "benchmark: the benchmark's prompt (MC options and "
                                                               "answer instruction), the text the RoI head meets at "
                                                               "inference | question: the bare question"})
    n_heads: int = field(default=4, metadata={"help": "teacher heads kept from the GT-free ranking"})
    head_split: str = field(default="dev", metadata={"help": "split of the unlabelled head-selection items"})
    head_n: int = field(default=8, metadata={"help": "head-selection items per subset"})
    head_layers: str = field(default="", metadata={"help": "comma-separated candidate layers (empty: all)"})
    batch: int = 8
    out: str = "runs/pseudo_labels/labels.jsonl"
    cpu_threads: int | None = None


# ------------------------------------------------------------------------------------------------ helpers

def _prompt(item: dict, args) -> str:
    """The text the teacher reads: Q-Zoom labels with the dataset's own prompt, and ours is the benchmark's. The RoI
    head reads layer-K features of the whole sequence, so a head trained on bare questions lost 12-33 points of
    recall under the MC prompt (eval/results/qzoom_heads_testbed.md)."""
    if args.prompt == "question":
        return item["question"]
    from qzoom_agent.training.gate_labels import synthhr_target

    return synthhr_target(item)[0]


def _subsets(args) -> list[str]:
    from eval.synthhr import SUBSETS

    return [s.strip() for s in args.subsets.split(",") if s.strip()] or list(SUBSETS)


def _load_items(subsets, n: int, split: str):
    from qzoom_agent.training.testbed_eval import load_items

    return [(it, Image.fromarray(canvas)) for it, canvas in load_items(subsets, n, split)]


def _batches(seq, size):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def gt_box_cells(item: dict, grid_hw, cell_px: int, square_pad: bool):
    """The item's GT box (testbed_data.target_box) on the label grid of its coarse view; None without a box."""
    from qzoom_agent.training.testbed_data import target_box

    box = target_box(item)
    if box is None:
        return None
    W, H = item["width"], item["height"]
    side_w, side_h = (max(W, H),) * 2 if square_pad else (W, H)
    x0, y0 = (side_w - W) // 2, (side_h - H) // 2
    view_box = (box[0] + x0, box[1] + y0, box[2] + x0, box[3] + y0)
    gh, gw = grid_hw
    return roi_lib.pixels_to_cells(view_box, cell_px, (gh * cell_px, gw * cell_px), (side_h, side_w), grid_hw)


def select_heads(qzoom, args) -> tuple[list[dict], list[tuple]]:
    """GT-free head ranking on `head_split` items: only (image, question) reach the model and the scorer."""
    bb = qzoom.backbone
    layers = [int(x) for x in args.head_layers.split(",") if x.strip()] or list(range(bb.num_layers))
    data = _load_items(_subsets(args), args.head_n, args.head_split)
    attn, kept = [], []
    for chunk in tqdm(list(_batches(data, args.batch)), desc="head selection", leave=False):
        views = [coarse_view(img, args.square_pad) for _, img in chunk]
        vas = visual_attention(qzoom, views, [it["question"] for it, _ in chunk], layers, budget=args.budget,
                               query="last_prompt")
        attn.extend(va.attn for va in vas)
        kept.extend((it, va.block.grid_hw) for (it, _), va in zip(chunk, vas))
    ranked = pl.rank_heads(attn, layers)
    # post hoc, for the report only: how often each ranked head points inside the GT box on these items
    hits = np.zeros((len(layers), attn[0].shape[1]))
    n = 0
    for a, (it, grid) in zip(attn, kept):
        gt = gt_box_cells(it, grid, bb.cell_px, args.square_pad)
        if gt is None:
            continue
        n += 1
        flat = a.reshape(-1, *a.shape[2:])
        hits += np.array(pl.pointing_hits(flat, gt), float).reshape(hits.shape)
    for r in ranked:
        r["post_hoc_hit"] = round(float(hits[layers.index(r["layer"]), r["head"]] / max(1, n)), 4)
    return ranked, pl.choose_heads(ranked, args.n_heads)


def label_items(qzoom, args, heads, params: pl.DenoiseParams, writer: pl.LabelWriter) -> dict:
    """Label every item not yet in `writer`; returns (rows written now, per-id pointing hits of the chosen heads)."""
    data = [d for d in _load_items(_subsets(args), args.n, args.split) if d[0]["question_id"] not in writer.done]
    hits = {}
    for chunk in tqdm(list(_batches(data, args.batch)), desc="pseudo labels", leave=False):
        views = [coarse_view(img, args.square_pad) for _, img in chunk]
        prompts = [_prompt(it, args) for it, _ in chunk]
        maps = teacher_maps(qzoom, views, prompts, heads, budget=args.budget, query=args.query)
        rows = []
        for (it, _), m, prompt in zip(chunk, maps, prompts):
            labels = pl.denoise(m.attn_hw, m.sink_hw, m.pad_hw, params)
            peak = float(pl.clean_map(m.attn_hw, m.sink_hw, m.pad_hw, params).max())
            rows.append(pl.label_row(it["question_id"], {"synthhr": it["question_id"], "subset": it["subset"]},
                                     prompt, args.budget, labels, heads, args.query, peak,
                                     view={"square_pad": bool(args.square_pad), "fill": 127}))
            gt = gt_box_cells(it, m.block.grid_hw, qzoom.backbone.cell_px, args.square_pad)
            if gt is not None:
                hits[it["question_id"]] = pl.pointing_hits(m.head_hw, gt)
        writer.write(rows)
    return len(data), hits


def quality_report(qzoom, args, rows: list[dict], hits: dict, heads) -> dict:
    """Per subset label quality of every stored row against SynthHR GT, and the chosen heads' hit rates."""
    from eval.synthhr import SynthHRConfig, make_item

    cfg = SynthHRConfig(scale="mini", n_candidates=1)
    per, point = {}, {}
    for r in rows:
        sub = r["source"]["subset"]
        index = int(r["id"].rsplit("-", 1)[1])
        it = make_item(cfg, sub, args.split, index)
        gt = gt_box_cells(it, r["grid"], qzoom.backbone.cell_px, args.square_pad)
        if gt is None:
            continue
        q = pl.label_quality(pl.row_labels(r), gt)
        q["gt_cells"] = (gt[2] - gt[0]) * (gt[3] - gt[1])
        per.setdefault(sub, []).append(q)
        if r["id"] in hits:
            point.setdefault(sub, []).append(hits[r["id"]])
    out = {sub: pl.summarize_quality(qs) for sub, qs in per.items()}
    out["all"] = pl.summarize_quality([q for qs in per.values() for q in qs])
    names = [f"{l}:{h}" for l, h in heads]
    pointing = {sub: dict(zip(names, np.round(np.mean(v, 0), 4).tolist())) for sub, v in point.items()}
    if point:
        pointing["all"] = dict(zip(names, np.round(np.mean([x for v in point.values() for x in v], 0), 4).tolist()))
    return {"labels": out, "pointing": pointing,
            "gt_cells_mean": {sub: round(float(np.mean([q["gt_cells"] for q in qs])), 2) for sub, qs in per.items()}}


def markdown(report: dict) -> str:
    lines = ["# SD-RPN pseudo labels: quality vs SynthHR GT (measured after the GT-free head choice)", "",
             f"model `{report['args']['model']}`, split `{report['args']['split']}`, budget {report['args']['budget']}"
             f", square pad {report['args']['square_pad']}, query `{report['args']['query']}`", "",
             "Chosen heads (layer:head, GT-free): " + ", ".join(f"{l}:{h}" for l, h in report["heads"]["chosen"]),
             *(["", f"**Warning:** {report['heads']['warning']}"] if report["heads"].get("warning") else []),
             "", "| subset | n | ignored | FG precision | FG recall | FG-box IoU | mean FG cells |",
             "|---|---|---|---|---|---|---|"]
    for sub, q in report["quality"]["labels"].items():
        lines.append(f"| {sub} | {q['n']} | {q['ignored_share']} | {q['fg_precision']} | {q['fg_recall']} | "
                     f"{q['box_iou']} | {q['mean_fg_cells']} |")
    point = report["quality"]["pointing"]
    if point:
        names = list(next(iter(point.values())))
        lines += ["", "Pointing hit rate (argmax cell inside the GT box) of each chosen head, this run's rows:", "",
                  "| subset | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {sub} | " + " | ".join(str(v[n]) for n in names) + " |" for sub, v in point.items()]
    lines += ["", "Top of the GT-free ranking (post-hoc hit rate on the head-selection items):", "",
              "| layer | head | score | peakiness | agreement | post-hoc hit |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['head']} | {r['score']} | {r['peakiness']} | {r['agreement']} | "
              f"{r['post_hoc_hit']} |" for r in report["heads"]["ranked"][:10]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from eval.run_eval import load_model
    from qzoom_agent.cli_args import parse_args

    args, params = parse_args(PseudoLabelArgs, pl.DenoiseParams, argv=argv)
    if args.prompt not in ("benchmark", "question"):
        from qzoom_agent.errors import QZoomError

        raise QZoomError(f"--prompt must be 'benchmark' or 'question', got {args.prompt!r}")
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    t0 = time.perf_counter()
    qzoom = load_model(args.model, args.device)
    qzoom.eval()
    ranked, heads = select_heads(qzoom, args)
    print(json.dumps({"chosen_heads": heads, "top": ranked[:args.n_heads]}))
    weak = pl.head_choice_warning(ranked, args.n_heads)
    if weak:
        print(f"WARNING: {weak}", file=sys.stderr)
    writer = pl.LabelWriter(args.out)
    n_new, hits = label_items(qzoom, args, heads, params, writer)
    path = writer.close()
    rows = pl.read_labels(path)
    report = {"args": asdict(args), "denoise": asdict(params), "device": str(qzoom.device),
              "heads": {"chosen": heads, "ranked": ranked, "warning": weak}, "rows": len(rows), "new_rows": n_new,
              "quality": quality_report(qzoom, args, rows, hits, heads),
              "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(str(path) + ".quality.json", json.dumps(report, indent=1))
    atomic_write_text(str(path) + ".quality.md", markdown(report))
    print(json.dumps({"rows": len(rows), "quality_all": report["quality"]["labels"].get("all"),
                      "seconds": report["seconds"]}))
    return report


if __name__ == "__main__":
    main()
