#!/usr/bin/env python
"""Oracle RPN labels from SynthHR ground-truth boxes, in the pseudo-label jsonl format (sanity runs only).

    python tools/make_gt_box_labels.py --subsets attr-cue,doc-code --n 200 --split train --out runs/gt_labels.jsonl

Not Q-Zoom's recipe (that is self-distilled attention, tools/make_pseudo_labels.py): FG = cells that overlap
the target box, ignore = a one-cell ring around them, BG = the rest. Useful to check tools/train_rpn.py learns
and to give an upper bound for RoI recall at the testbed's scale. The grid is the smart-resize grid at
min(256, budget)..budget tokens, as the engine encodes the coarse view.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class Args:
    subsets: str = "attr-cue,fsp-4k,doc-code,coarse"
    n: int = 100                     # items per subset
    split: str = "train"
    start: int = 0
    budget: int = 256
    out: str = "runs/gt_labels.jsonl"


def gt_box_labels(box_px, W: int, H: int, grid_hw) -> list[int]:
    """Row-major labels over grid_hw: 1 inside the box's cells, -100 on a one-cell ring, 0 elsewhere."""
    from qzoom_agent.training.testbed_data import box_cells

    gh, gw = grid_hw
    c0, r0, c1, r1 = box_cells(box_px, W, H, gh, gw)
    out = []
    for r in range(gh):
        for c in range(gw):
            if r0 <= r < r1 and c0 <= c < c1:
                out.append(1)
            elif r0 - 1 <= r < r1 + 1 and c0 - 1 <= c < c1 + 1:
                out.append(-100)
            else:
                out.append(0)
    return out


def main(argv=None) -> int:
    from eval.synthhr import SynthHRConfig, make_items
    from qzoom_agent.cli_args import parse_args
    from qzoom_agent.training.testbed_data import CELL, smart_hw, target_box

    a = parse_args(Args, argv=argv)
    cfg = SynthHRConfig(scale="mini", n_candidates=1)
    n = 0
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w") as f:
        for subset in a.subsets.split(","):
            for it in make_items(cfg, subset, a.split, a.n, a.start):
                box = target_box(it)
                if box is None:
                    continue
                W, H = it["width"], it["height"]
                h, w = smart_hw(H, W, min(256, a.budget), a.budget)
                grid = (h // CELL, w // CELL)
                row = {"id": it["question_id"], "source": {"synthhr": it["question_id"]}, "question": it["question"],
                       "budget": a.budget, "grid": list(grid), "labels": gt_box_labels(box, W, H, grid),
                       "teacher": {"kind": "gt_box"}, "peak": 1.0}
                f.write(json.dumps(row) + "\n")
                n += 1
    print(f"wrote {n} rows to {a.out}")
    return n


if __name__ == "__main__":
    main()
