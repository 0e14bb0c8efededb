#!/usr/bin/env python
"""Q-Zoom Stage 3: train the dynamic gate on the labels of tools/make_gate_labels.py, then evaluate it.

    python tools/train_gate.py --labels_dir runs/gate/labels --out_dir runs/gate/train --max_minutes 6
    python tools/train_gate.py --config my.yaml

Only the gate trains (asserted). out_dir gets train_state.pt (gate + optimiser + step; resumed automatically),
train_log.jsonl, model/ (QZoomModel.save_pretrained: loads with the gate via QZoomModel.from_pretrained) and
eval.json (held-out skip / fire rates at the config's gate_thresh, a threshold sweep, AUROC vs needs_hr).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclass
class GateArgs:
    labels_dir: str = "runs/gate/labels"
    out_dir: str = "runs/gate/train"
    model: str = field(default="", metadata={"help": "QZoomModel folder; empty: the shipped testbed"})
    device: str = ""
    render_workers: int = 8
    eval_subsets: str = "coarse,attr-cue,attr-search,rel-lr,doc-code,doc-table"
    eval_split: str = "test"
    eval_n_per_subset: int = 32
    eval_budget: int = 256
    gate_thresh: float = 0.0                  # > 0: override the config's gate_thresh


def _train_config_type():
    """GateTrainConfig with this tool's defaults; its max_minutes covers the whole run, rendering included."""
    from qzoom_agent.training.gate_train import GateTrainConfig

    @dataclass
    class ToolGateTrainConfig(GateTrainConfig):
        max_steps: int = 300
        max_minutes: float = field(default=6.0, metadata={"help": "whole run, rendering included (<= 0: no limit)"})

    return ToolGateTrainConfig


def main(argv=None) -> dict:
    import torch
    from PIL import Image

    from make_gate_labels import load_model
    from qzoom_agent.checkpoint import atomic_write_text
    from qzoom_agent.cli_args import parse_args
    from qzoom_agent.training import gate_labels as gl
    from qzoom_agent.training.testbed_eval import load_items
    from qzoom_agent.training import gate_train as gt

    args, train_cfg = parse_args(GateArgs, _train_config_type(), argv=argv)
    t0 = time.time()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = Path(args.labels_dir)
    meta = json.loads((labels / "meta.json").read_text())
    kept = gl.read_records(labels / "kept.jsonl")
    if not kept:
        raise SystemExit(f"no kept records in {labels / 'kept.jsonl'}")
    model = load_model(args.model, device)
    gt.enable_gate(model)
    if args.gate_thresh > 0:
        model.config.gate_thresh = args.gate_thresh
    ids = {r["id"] for r in kept}
    images = {it["question_id"]: Image.fromarray(c) for it, c in load_items(
        meta["subsets"], meta["n_per_subset"], meta["split"], workers=args.render_workers, ids=ids)}
    print(f"{len(kept)} kept records, images rendered ({time.time() - t0:.0f}s)", flush=True)
    left = 0.0 if train_cfg.max_minutes <= 0 else max(1e-6, train_cfg.max_minutes - (time.time() - t0) / 60)
    cfg = gt.GateTrainConfig(**{**asdict(train_cfg), "max_minutes": left})
    result = gt.train_gate(model, gt.GateDataset(kept, images.__getitem__), cfg, out)
    model.save_pretrained(out / "model")
    report = {"train": result, "args": {**asdict(args), **asdict(train_cfg)}}
    if result["done"] and args.eval_n_per_subset > 0:
        held = load_items([s for s in args.eval_subsets.split(",") if s], args.eval_n_per_subset,
                                args.eval_split, workers=args.render_workers)
        prompts = [gl.synthhr_target(it)[0] for it, _ in held]
        probs = gt.gate_probs(model, [Image.fromarray(c) for _, c in held], prompts, args.eval_budget,
                              batch_size=train_cfg.batch_size)
        report["eval"] = gt.gate_report(probs, [it["subset"] for it, _ in held],
                                        [it.get(f"needs_hr@{args.eval_budget}") for it, _ in held],
                                        model.config.gate_thresh)
        report["eval"]["budget"] = args.eval_budget
        atomic_write_text(out / "eval.json", json.dumps(report, indent=1) + "\n")
        print(json.dumps(report["eval"]["at_thresh"]), f"auroc {report['eval']['auroc_needs_hr']}", flush=True)
    print(f"{'done' if result['done'] else 'stopped (run again to resume)'} at step {result['step']} "
          f"({time.time() - t0:.0f}s)", flush=True)
    return report


if __name__ == "__main__":
    main()
