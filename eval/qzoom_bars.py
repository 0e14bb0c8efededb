"""Issue #5's bars from one run_eval records.jsonl, on the subsets where the testbed meets its Tier-1 bars:
RoI recall (GT box >= 90 % covered) and proposal area per subset, gate skip / fire rates, and the accuracy / token /
FLOPs / samples-per-second comparison of the best qzoom@N against the best base@N.

    python eval/qzoom_bars.py runs/qzoom_heads/eval/records.jsonl --subsets attr-cue,fsp-4k --out bars.json
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from eval.metrics import roi_item_metrics  # noqa: E402


def load(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def bars(recs: list[dict], subsets: list[str], summary: dict | None = None) -> dict:
    """Per method@budget: accuracy on `subsets`, RoI recall@0.9 / area per subset, gate skip on `coarse` and fire
    on needs_hr@256 items; plus the best-qzoom vs best-base comparison."""
    by = defaultdict(list)
    for r in recs:
        by[f"{r['method']}@{r['budget']}"].append(r)
    out: dict = {"subsets": subsets, "methods": {}}
    for key, rs in sorted(by.items()):
        sel = [r for r in rs if r["subset"] in subsets]
        m = {"n": len(sel), "accuracy": 100 * float(np.mean([r["score"] for r in sel])) if sel else None,
             "visual_tokens": float(np.mean([r["visual_tokens"] for r in sel])) if sel else None,
             "prefill_flops": float(np.mean([r["prefill_flops"] for r in sel])) if sel else None}
        if key.startswith("qzoom"):
            per = {}
            for s in subsets:
                rows = [r for r in sel if r["subset"] == s]
                rec, area = [], []
                for r in rows:
                    boxes = r.get("boxes") or []
                    im = roi_item_metrics(r["rois_gt"], boxes, r.get("evidence_union"), tuple(r["image_size"]))
                    rec.append(float(im["min_coverage"] >= 0.9) if boxes else 0.0)
                    area.append(im.get("area_frac", 0.0) if boxes else 0.0)
                per[s] = {"recall@0.9": 100 * float(np.mean(rec)), "area_pct": 100 * float(np.mean(area)),
                          "zoom_rate": 100 * float(np.mean([bool(r.get("zoomed")) for r in rows]))}
            m["roi"] = per
            coarse = [r for r in rs if r["subset"] == "coarse"]
            hr = [r for r in rs if r.get("needs_hr") and r["subset"] != "coarse"]   # needs_hr at this budget
            m["gate_skip_coarse"] = 100 * float(np.mean([not r.get("zoomed") for r in coarse])) if coarse else None
            m["gate_fire_needs_hr"] = (100 * float(np.mean([r.get("fallback") != "gate_skip" for r in hr]))
                                       if hr else None)
        if summary and key in summary.get("runs", {}):
            m["samples_per_s"] = summary["runs"][key].get("samples_per_s")
        out["methods"][key] = m
    base = {k: v for k, v in out["methods"].items() if k.startswith("base@")}
    qz = {k: v for k, v in out["methods"].items() if k.startswith("qzoom@")}
    if base and qz:
        bb = max(base, key=lambda k: (base[k]["accuracy"], -base[k]["visual_tokens"]))
        bq = max(qz, key=lambda k: (qz[k]["accuracy"], -qz[k]["visual_tokens"]))
        b, q = base[bb], qz[bq]
        out["pareto"] = {"best_base": bb, "best_qzoom": bq, "acc_base": b["accuracy"], "acc_qzoom": q["accuracy"],
                         "token_ratio": q["visual_tokens"] / b["visual_tokens"],
                         "flops_ratio": q["prefill_flops"] / b["prefill_flops"],
                         "speedup": (q.get("samples_per_s") or float("nan")) / (b.get("samples_per_s") or float("nan"))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records")
    ap.add_argument("--subsets", default="attr-cue,fsp-4k")
    ap.add_argument("--summary", default=None, help="summary.json of the same run (samples/s)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    summ = json.loads(Path(a.summary).read_text()) if a.summary else None
    res = bars(load(a.records), a.subsets.split(","), summ)
    text = json.dumps(res, indent=1)
    if a.out:
        from qzoom_agent.checkpoint import atomic_write_text

        atomic_write_text(a.out, text)
    print(text)


if __name__ == "__main__":
    main()
