"""Where does the testbed stop reading? Answer SynthHR-mini `test` detail items rendered at several detail scales
(the generator's `detail_scale`, which shrinks tags, glyphs and dots together) in the Tier-1 modes, and record the
detail's effective size in each view. This is the measurement behind a generator geometry whose details really need
zooming (issue #4: detail@256 <= chance + 20, base at the top budget >= 75 %).

    python tools/testbed_detail_sweep.py --scales 1.0,0.5,0.35 --n 24 --out eval/results/testbed_detail_sweep.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from qzoom_agent.checkpoint import atomic_write_text
from qzoom_agent.testbed.model import load_testbed_hf
from qzoom_agent.training.testbed_data import target_box
from qzoom_agent.training.testbed_eval import evaluate, load_items

MODES = ("coarse@256", "base@576", "base@1024", "base@2304", "oracle-crop@256")


def detail_px(item: dict, canvas) -> dict:
    """Target box side and detail size (glyph ink / dot diameter, the generator's `detail_px`) in native px and in
    the 256-token view, per detail kind."""
    H, W = canvas.shape[:2]
    s256 = min(1.0, math.sqrt(256 * 784 / (W * H)))
    x0, y0, x1, y1 = target_box(item)
    kind = item.get("detail_kind", "detail")
    side = max(x1 - x0, y1 - y0)
    return {"box_native": side, "box_256": side * s256, f"{kind}_native": float(item["detail_px"]),
            f"{kind}_256": float(item["detail_px"]) * s256}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", default="1.0,0.5,0.35")
    ap.add_argument("--subsets", default="attr-cue,fsp-4k")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--weights", default=None, help="testbed folder (default: the shipped weights)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) // 2))
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from eval.synthhr import SynthHRConfig

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, proc = load_testbed_hf(args.weights, dtype=dtype, device=args.device)
    out_path = Path(args.out)
    res = json.loads(out_path.read_text()) if out_path.exists() else {}   # resume: finished scales are kept
    res.setdefault("command", " ".join(sys.argv))
    for scale in [float(s) for s in args.scales.split(",")]:
        key = f"{scale:g}"
        if key in res.get("scales", {}):
            continue
        cfg = SynthHRConfig(scale="mini", n_candidates=1, detail_scale=scale)
        t0 = time.time()
        data = load_items(args.subsets.split(","), args.n, "test", workers=args.workers, config=cfg)
        sizes: dict = {}
        for it, canvas in data:
            for k, v in detail_px(it, canvas).items():
                sizes.setdefault(it["subset"], {}).setdefault(k, []).append(v)
        size_summary = {s: {k: [round(min(v), 2), round(max(v), 2)] for k, v in d.items()} for s, d in sizes.items()}
        r = evaluate(model, proc.tokenizer, data, args.modes.split(","), batch=args.batch, device=args.device)
        res.setdefault("scales", {})[key] = dict(acc={m: r[m] for m in args.modes.split(",")},
                                                top_share=r["top_pred_share"], sizes=size_summary,
                                                seconds=round(time.time() - t0, 1))
        atomic_write_text(out_path, json.dumps(res, indent=1))
        print(key, json.dumps(res["scales"][key]["acc"]), flush=True)


if __name__ == "__main__":
    main()
