#!/usr/bin/env python
"""Q-Zoom Stage 2: targeted fine-tuning of the LLM on "regression" items (base right, RoI path wrong).

    python tools/targeted_sft.py --model runs/rpn/model --out_dir runs/sft --subsets attr-cue,doc-code \
        --n_pool 200 --steps 100 --minutes 9
    python tools/targeted_sft.py --model runs/rpn/model --out_dir runs/sft2 --mined runs/sft/mined.jsonl
    python tools/targeted_sft.py --config tools/configs/x.yaml

--model is a folder written by tools/train_rpn.py (QZoomModel with a trained RoI head). Mining judges answers with
the SynthHR benchmark scorer (not an LLM judge) and resumes from OUT/judged.jsonl; training resumes from
OUT/checkpoint. Writes OUT/mined.jsonl, OUT/model (save_pretrained, heads intact), OUT/train_log.jsonl and
OUT/summary.json (mined counts per subset, loss summary, RoI/base path accuracy on the mined items before/after).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from qzoom_agent.training.targeted_sft import (MineConfig, SFTTrainConfig, mine, mined_accuracy,  # noqa: E402
                                               record_image, synthhr_pool, train_targeted_sft)


@dataclass
class ScriptArgs:
    model: str = field(default="", metadata={"help": "folder from tools/train_rpn.py (must have an RoI head)"})
    out_dir: str = "runs/targeted_sft"
    subsets: str = field(default="attr-cue,attr-search,doc-code,doc-table",
                         metadata={"help": "comma-separated SynthHR subsets of the mining pool"})
    n_pool: int = field(default=100, metadata={"help": "pool items per subset"})
    n_candidates: int = field(default=1, metadata={"help": "SynthHR level of the pool (objects of the asked kind); "
                                                          "0: each subset's default"})
    split: str = "train"
    mined: str = field(default="", metadata={"help": "reuse this mined jsonl instead of mining"})
    mine_batch_size: int = 8
    max_new_tokens: int = 32
    eval_n: int = field(default=64, metadata={"help": "mined items measured before/after (0: skip)"})
    device: str = "auto"
    dtype: str = "float32"                  # weights; on CUDA the forward runs under bf16 autocast


def load_rpn_model(path: str, device: str, dtype: torch.dtype):
    from qzoom_agent import QZoomModel
    from qzoom_agent.errors import QZoomError

    if not path or not (Path(path) / "qzoom_config.json").exists():
        raise QZoomError(f"--model must be a folder written by tools/train_rpn.py (qzoom_config.json), got {path!r}")
    model = QZoomModel.from_pretrained(path, device=device, dtype=dtype)
    if model.roi_head is None:
        raise QZoomError(f"{path} has no RoI head: Stage 2 mines and trains on the RoI path, so train one first "
                         "(tools/train_rpn.py)")
    return model


def _judges(records: list[dict]) -> list | None:
    """Benchmark-scorer verdicts for SynthHR records (None when some record is not a SynthHR item)."""
    from qzoom_agent.training.gate_labels import synthhr_target
    from qzoom_agent.training.rpn_train import synthhr_item

    if not all(r["id"].startswith("synthhr-") for r in records):
        return None
    return [synthhr_target(synthhr_item(r["id"])[0])[2] for r in records]


def _measure(model, records, images, judges, args) -> dict:
    return mined_accuracy(model, records, images, judges, batch_size=args.mine_batch_size,
                          max_new_tokens=args.max_new_tokens)


def main(argv: list[str] | None = None) -> dict:
    from qzoom_agent.cli_args import parse_args

    args, cfg = parse_args(ScriptArgs, SFTTrainConfig, argv=argv)
    torch.manual_seed(cfg.seed)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = load_rpn_model(args.model, device, getattr(torch, args.dtype))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = os.environ.get("TQDM_DISABLE") != "1"
    summary: dict = {"args": vars(args)}
    if args.mined:
        records = [json.loads(line) for line in Path(args.mined).read_text().splitlines() if line.strip()]
        (out / "mined.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        summary["mined"] = {"source": args.mined, "n_kept": len(records)}
    else:
        pool = synthhr_pool(args.subsets.split(","), args.n_pool, args.split,
                            n_candidates=args.n_candidates or None)
        summary["mined"] = mine(model, pool, out, MineConfig(batch_size=args.mine_batch_size,
                                                             max_new_tokens=args.max_new_tokens), progress=progress)
        records = [json.loads(line) for line in (out / "mined.jsonl").read_text().splitlines() if line.strip()]
    print(f"targeted_sft: {len(records)} mined records, device {device}", flush=True)
    if not records:
        summary["train"] = None
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print("targeted_sft: nothing mined, nothing to train", flush=True)
        return summary
    ev = records[:args.eval_n]
    ev_images = [record_image(r) for r in ev]
    judges = _judges(ev)
    if ev:
        summary["before"] = _measure(model, ev, ev_images, judges, args)
    result = train_targeted_sft(model, records, cfg, out, progress=progress)
    if ev:
        summary["after"] = _measure(model, ev, ev_images, judges, args)
    losses = result.pop("losses")
    k = max(1, len(losses) // 10)
    result["loss_summary"] = {"n": len(losses), "first": losses[:k], "last": losses[-k:]} if losses else None
    summary["train"] = result
    model.save_pretrained(out / "model")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary.get(k) for k in ("mined", "before", "after")}), flush=True)
    return summary


if __name__ == "__main__":
    main()
