#!/usr/bin/env python
"""Q-Zoom Stage 1: train the RoI head (SD-RPN twig) on pseudo-labels; everything else stays frozen.

    python tools/train_rpn.py --labels runs/pseudo/labels.jsonl --out_dir runs/rpn --steps 600 --minutes 9
    python tools/train_rpn.py --config tools/configs/rpn_stage1.yaml        # same flags from a YAML file

The default model is the shipped testbed (its config has no RoI head: one is enabled and initialised from
decoder layers K.. via `init_heads`). A run stops after `--steps` (the schedule's length) or `--minutes`,
checkpoints to OUT/checkpoint and resumes from there when started again. Each run ends by writing OUT/model
(`QZoomModel.from_pretrained` loads it with the trained head), OUT/summary.json and OUT/train_log.jsonl.
Eval (measurement only): RoI recall (GT box ≥ 90 % inside the proposed box) and mean proposal area.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from qzoom_agent.training.rpn_train import (RPNDataset, RPNTrainConfig, load_source, read_label_rows,  # noqa: E402
                                            train_rpn)


@dataclass
class ScriptArgs:
    labels: str = field(default="", metadata={"help": "pseudo-label jsonl (tools/make_pseudo_labels.py)"})
    model: str = field(default="", metadata={"help": "model folder (default: the shipped testbed)"})
    out_dir: str = "runs/rpn"
    reinit_roi_head: bool = field(default=False, metadata={"help": "re-initialise an existing RoI head from layers K.."})
    device: str = "auto"
    dtype: str = "float32"                  # weights; on CUDA the forward runs under bf16 autocast
    eval_labels: str = field(default="", metadata={"help": "jsonl rows whose sources carry GT boxes (SynthHR ids "
                                                           "or 'gt_box'), used as eval items"})
    eval_subsets: str = field(default="", metadata={"help": "comma-separated SynthHR subsets: test items to eval"})
    eval_n: int = 0                         # SynthHR test items per subset
    eval_budget: int = 576                  # coarse budget (visual tokens) of the eval proposals


def load_model(path: str, device: str, dtype: torch.dtype, reinit: bool = False):
    """A QZoomModel from a saved folder (qzoom_config.json) or a testbed folder, with an RoI head."""
    from qzoom_agent import QZoomModel
    from qzoom_agent.testbed import WEIGHTS_DIR, load_testbed

    path = Path(path or WEIGHTS_DIR)
    if (path / "qzoom_config.json").exists():
        model = QZoomModel.from_pretrained(path, device=device, dtype=dtype)
    else:
        model = load_testbed(path, device=device, dtype=dtype)
    if model.roi_head is None or reinit:
        model.config.has_roi_head = True
        gate = model.gate_head
        model.init_heads()                   # RoI head from layers K..K+T-1; keep a trained gate as it was
        model.gate_head = gate
    return model


def eval_items(args: ScriptArgs) -> list[dict]:
    """{image, question, gt_box, budget} from --eval_labels rows and --eval_subsets × --eval_n SynthHR test items."""
    items = []
    if args.eval_labels:
        for row in read_label_rows(args.eval_labels):
            image, gt_box = load_source(row["source"])
            if gt_box is not None:
                items.append({"image": image, "question": row["question"], "gt_box": gt_box,
                              "budget": args.eval_budget or row["budget"]})
    if args.eval_subsets and args.eval_n:
        from PIL import Image

        from qzoom_agent.training.testbed_data import target_box
        from qzoom_agent.training.testbed_eval import load_items

        for item, canvas in load_items(args.eval_subsets.split(","), args.eval_n):
            box = target_box(item)
            if box is not None:
                items.append({"image": Image.fromarray(canvas), "question": item["question"], "gt_box": box,
                              "budget": args.eval_budget})
    return items


def main(argv: list[str] | None = None) -> dict:
    from qzoom_agent.cli_args import parse_args

    args, cfg = parse_args(ScriptArgs, RPNTrainConfig, argv=argv)
    if not args.labels:
        raise SystemExit("--labels is required")
    torch.manual_seed(cfg.seed)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = load_model(args.model, device, getattr(torch, args.dtype), args.reinit_roi_head)
    dataset = RPNDataset(read_label_rows(args.labels))
    items = eval_items(args)
    out = Path(args.out_dir)
    print(f"train_rpn: {len(dataset)} label rows, {len(items)} eval items, K={model.config.twig_K} "
          f"T={model.config.twig_T}, {sum(p.numel() for p in model.roi_head.parameters()) / 1e6:.2f} M head "
          f"params, device {device}", flush=True)
    result = train_rpn(model, dataset, cfg, out, eval_items=items, eval_budget=args.eval_budget or None,
                       progress=os.environ.get("TQDM_DISABLE") != "1")
    model.save_pretrained(out / "model")
    result["args"] = vars(args)
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("step", "done", "last", "eval")}), flush=True)
    return result


if __name__ == "__main__":
    main()
