#!/usr/bin/env python
"""Q-Zoom Stage-3 labels: answer SynthHR-mini items at ascending budgets, filter (method.md §2), report.

    python tools/make_gate_labels.py --out_dir runs/gate/labels --n_per_subset 100
    python tools/make_gate_labels.py --config my.yaml          # same flags in YAML

Writes to out_dir: records.jsonl (every answered item; resumable: answered ids are skipped), kept.jsonl (the
filtered training set, each with "kind"), stats.json (kept / dropped by reason, per subset, agreement with the
generator's needs_hr@B), meta.json (what to re-render). Stops after `max_minutes`; run again to continue.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class LabelArgs:
    out_dir: str = "runs/gate/labels"
    model: str = field(default="", metadata={"help": "QZoomModel folder; empty: the shipped testbed"})
    subsets: str = "coarse,attr-cue,attr-search,rel-lr,doc-code,doc-table"
    split: str = "train"
    n_per_subset: int = 64
    budgets: str = "256,576,1024,2304"
    batch_size: int = 16
    max_new_tokens: int = 16
    max_minutes: float = 8.0
    render_workers: int = 8
    device: str = field(default="", metadata={"help": "default: cuda if available"})
    seed: int = 0


def load_model(path: str, device: str):
    import torch

    from qzoom_agent import QZoomModel
    from qzoom_agent.testbed import load_testbed

    if not path:
        return load_testbed(device=device, dtype=torch.float32)
    return QZoomModel.from_pretrained(path, device=device)


def main(argv=None) -> dict:
    import torch

    from qzoom_agent.cli_args import parse_args
    from qzoom_agent.checkpoint import atomic_write_text
    from qzoom_agent.training import gate_labels as gl
    from qzoom_agent.training.testbed_eval import load_items

    args = parse_args(LabelArgs, argv=argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    subsets = [s for s in args.subsets.split(",") if s]
    budgets = [int(b) for b in args.budgets.split(",")]
    meta = {"subsets": subsets, "split": args.split, "n_per_subset": args.n_per_subset, "budgets": budgets,
            "model": args.model or "testbed"}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=1) + "\n")
    t0 = time.time()
    model = load_model(args.model, device)
    done = {r["id"] for r in gl.read_records(out / "records.jsonl")}
    items = load_items(subsets, args.n_per_subset, args.split, workers=args.render_workers)
    todo = [x for x in items if x[0]["question_id"] not in done]
    print(f"{len(items)} items ({len(done)} already answered), rendered in {time.time() - t0:.0f}s", flush=True)
    chunk = max(args.batch_size, 4 * args.batch_size)
    for i in range(0, len(todo), chunk):
        if time.time() - t0 > 60 * args.max_minutes:
            print("time limit: stopping (run again to continue)", flush=True)
            break
        gl.write_records(out / "records.jsonl", gl.answer_at_budgets(
            model, todo[i:i + chunk], budgets, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens))
        print(f"answered {min(i + chunk, len(todo))}/{len(todo)} ({time.time() - t0:.0f}s)", flush=True)
    records = gl.read_records(out / "records.jsonl")
    kept, stats = gl.filter_records(records, seed=args.seed)
    stats["needs_hr_agreement"] = gl.needs_hr_agreement(kept)
    stats["complete"] = len(records) >= len(items)
    stats["accuracy_by_budget"] = {str(b): round(sum(r["correct"][j] for r in records) / max(1, len(records)), 4)
                                   for j, b in enumerate(budgets)}
    atomic_write_text(out / "kept.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=1) + "\n")
    print(json.dumps({k: v for k, v in stats.items() if k != "per_subset"}), flush=True)
    return stats


if __name__ == "__main__":
    main()
