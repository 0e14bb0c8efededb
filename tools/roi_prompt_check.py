#!/usr/bin/env python
"""RoI recall of trained testbed heads on SynthHR-mini dev (gate forced open, 576 tokens) with the bare question vs
the benchmark's MC prompt (question + options + answer instruction), as run_eval sends it.

    python tools/roi_prompt_check.py --n 24 --subsets fsp-4k,attr-cue --out runs/promptcheck.json
    python tools/roi_prompt_check.py --model runs/cpu_rpn/rpn/model --out runs/promptcheck_cpu_rpn.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="", help="QZoomModel folder (default: the shipped testbed-qzoom)")
    ap.add_argument("--n", type=int, default=24, help="dev items per subset")
    ap.add_argument("--subsets", default="fsp-4k,attr-cue")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from eval.benchmarks.synthhr import SynthHRLoader, item_to_doc
    from eval.metrics import roi_item_metrics
    from eval.synthhr import SynthHRConfig, make_items, render_item
    from qzoom_agent import QZoomModel
    from qzoom_agent.checkpoint import atomic_write_text
    from qzoom_agent.testbed import load_testbed_qzoom

    torch.set_num_threads(2)
    m = QZoomModel.from_pretrained(a.model) if a.model else load_testbed_qzoom()
    m.config.gate_thresh = 0.0
    cfg = SynthHRConfig(scale="mini", n_candidates=1)
    out = {}
    for subset in a.subsets.split(","):
        items = make_items(cfg, subset, "dev", a.n)
        loader = SynthHRLoader(items=items, cfg=cfg)
        res = {"bare": [], "benchmark": []}
        for it in items:
            img = render_item(it, cfg).convert("RGB")
            for name, q in (("bare", it["question"]),
                            ("benchmark", loader.doc_to_prompt(item_to_doc(it), mode="lmms_eval"))):
                ans = m.answer(img, q, mode="qzoom", max_visual_tokens=576, max_new_tokens=2)
                boxes = [list(r.box) for r in ans.boxes]
                cov = roi_item_metrics(it["rois"], boxes, None, img.size)["min_coverage"] if boxes else 0.0
                res[name].append((cov >= 0.9, bool(boxes)))
        out[subset] = {k: {"recall@0.9": round(sum(c for c, _ in v) / len(v), 3),
                           "roi_rate": round(sum(b for _, b in v) / len(v), 3), "n": len(v)} for k, v in res.items()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, json.dumps(out))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
