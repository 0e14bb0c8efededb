#!/usr/bin/env python
"""Pack a tools/train_qzoom_heads.py out_dir small enough to carry between device calls (≤ 64 MiB): every marker,
label file, log and report, the resume checkpoints of a stage that has not finished, and only the latest finished
stage's model, re-saved in bf16 (the fp32 copies are ~100 MiB each). A later call that finds the folder resumes
from it as if the machine had stayed warm.

    python tools/pack_heads_state.py runs/qzoom_heads runs/qzoom_heads_carry
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "tools")):
    if p not in sys.path:
        sys.path.insert(0, p)

MODEL_STAGES = ("rpn", "sft", "gate")


def pack(src: Path, dst: Path) -> list[str]:
    """Copy `src` to `dst` without the models of superseded stages; returns the stages whose model was kept."""
    import torch

    from qzoom_agent import QZoomModel
    from train_qzoom_heads import DONE, HeadsArgs, stage_model

    found = Path(stage_model(src, "eval", HeadsArgs(model="")) or ".")   # the model the next stage would start from
    latest = found.parent.name if found.parent.parent == src else None
    if dst.exists():
        shutil.rmtree(dst)

    def skip(folder: str, names: list[str]) -> set[str]:
        here = Path(folder)
        drop = set()
        for n in names:
            stage = here.name
            if n == "model" and stage in MODEL_STAGES and here.parent == src:
                drop.add(n)                                   # models: only the latest, re-saved below
            if n in ("checkpoint", "train_state.pt") and (here / DONE).exists():
                drop.add(n)                                   # a finished stage's resume state is not needed
        return drop

    shutil.copytree(src, dst, ignore=skip)
    if latest:
        QZoomModel.from_pretrained(src / latest / "model", dtype=torch.bfloat16).save_pretrained(dst / latest / "model")
    return [latest] if latest else []


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    kept = pack(Path(sys.argv[1]), Path(sys.argv[2]))
    size = sum(f.stat().st_size for f in Path(sys.argv[2]).rglob("*") if f.is_file()) / 2 ** 20
    print(f"packed {sys.argv[1]} -> {sys.argv[2]}: model of {kept or 'no stage'}, {size:.1f} MiB")
