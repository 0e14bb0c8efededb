#!/usr/bin/env python
"""RoI recall of the shipped testbed heads on SynthHR-mini dev (gate forced open, 576 tokens) with the bare
question vs the benchmark's MC prompt (question + options + answer instruction), as run_eval sends it.

    python tools/roi_prompt_check.py 24 fsp-4k,attr-cue      # -> runs/promptcheck.json
"""
import sys, json, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
Path("runs").mkdir(exist_ok=True)
torch.set_num_threads(2)
from eval.synthhr import SynthHRConfig, make_items, render_item
from eval.benchmarks.synthhr import SynthHRLoader, item_to_doc
from eval.metrics import roi_item_metrics
from qzoom_agent.testbed import load_testbed_qzoom
m = load_testbed_qzoom(); m.config.gate_thresh = 0.0
cfg = SynthHRConfig(scale="mini", n_candidates=1)
out = {}
for subset in sys.argv[2].split(","):
    items = make_items(cfg, subset, "dev", int(sys.argv[1]))
    loader = SynthHRLoader(items=items, cfg=cfg)
    res = {"bare": [], "benchmark": []}
    for it in items:
        img = render_item(it, cfg).convert("RGB")
        for name, q in (("bare", it["question"]), ("benchmark", loader.doc_to_prompt(item_to_doc(it), mode="lmms_eval"))):
            a = m.answer(img, q, mode="qzoom", max_visual_tokens=576, max_new_tokens=2)
            boxes = [list(r.box) for r in a.boxes]
            cov = roi_item_metrics(it["rois"], boxes, None, img.size)["min_coverage"] if boxes else 0.0
            res[name].append((cov >= 0.9, bool(boxes)))
    out[subset] = {k: {"recall@0.9": round(sum(c for c, _ in v) / len(v), 3), "roi_rate": round(sum(b for _, b in v) / len(v), 3), "n": len(v)} for k, v in res.items()}
print(json.dumps(out)); json.dump(out, open("runs/promptcheck.json", "w"))
