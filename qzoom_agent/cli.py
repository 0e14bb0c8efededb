"""`qzoom` command: demo, ask."""
from __future__ import annotations

import argparse
import os
import sys
import time


def _demo_model():
    """The shipped testbed with its trained Q-Zoom heads when present, else the plain testbed (no heads: qzoom
    answers at the coarse view), else a tiny random model (pipeline smoke run)."""
    try:
        from .testbed import load_testbed_qzoom

        return load_testbed_qzoom(), "shipped testbed with its trained Q-Zoom heads"
    except Exception:  # noqa: BLE001 - no trained heads shipped: the plain testbed
        pass
    try:
        from .testbed import load_testbed

        return load_testbed(), "shipped testbed (no trained heads: qzoom does not zoom)"
    except Exception as e:  # noqa: BLE001 - any failure means: no usable testbed shipped
        from .config import QZoomConfig
        from .engine import QZoomModel
        from .testing import build_tiny_model

        hf, proc = build_tiny_model("qwen2_5_vl", qk_gain=4.0)
        cfg = QZoomConfig(family="qwen2_5_vl", twig_K=2, twig_T=2, gate_T=1, roi_conf_thresh=0.5,
                          gate_thresh=0.5, min_visual_tokens=16, max_visual_tokens=256, max_new_tokens=8)
        return QZoomModel.from_backbone(hf, proc, cfg), f"tiny RANDOM model (no testbed: {e})"


def _demo_items(n: int):
    """SynthHR-mini items when the generator is importable (repo checkout), else a drawn tag scene."""
    try:
        sys.path.insert(0, os.getcwd())
        from eval.synthhr import SynthHRConfig, make_items, render_item

        cfg = SynthHRConfig(scale="mini", n_candidates=1)     # the level where the testbed meets its Tier-1 bars
        out = []
        for subset in ("coarse", "attr-cue", "fsp-4k"):
            for item in make_items(cfg, subset=subset, split="dev", n=n):
                q = item["question"]
                if item.get("options"):
                    q += "\n" + "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(item["options"]))
                out.append((subset, render_item(item, cfg), q, item["answer"]))
        return out
    except ImportError:
        from PIL import Image, ImageDraw

        img = Image.new("RGB", (1344, 1008), (200, 200, 200))
        d = ImageDraw.Draw(img)
        d.rectangle((900, 600, 930, 630), fill=(220, 30, 30))
        d.text((908, 608), "K", fill=(255, 255, 255))
        return [("drawn", img, "What letter is on the red tag?", "K")]


def demo(args) -> int:
    t0 = time.time()
    model, what = _demo_model()
    print(f"model: {what}; loaded in {time.time() - t0:.1f} s")
    for subset, img, q, gold in _demo_items(args.n):
        for mode, budget in (("base", args.low), ("qzoom", args.low), ("base", args.high)):
            a = model.answer(img, q, mode=mode, max_visual_tokens=budget, max_new_tokens=args.max_new_tokens)
            box = f" box={a.boxes[0].box}" if a.boxes else ""
            gate = f" gate={a.gate_prob:.2f}" if a.gate_prob is not None else ""
            print(f"[{subset}] {mode}@{budget}: {a.text!r} (gold {gold!r}) tokens={a.visual_tokens}{gate}{box} "
                  f"{sum(a.timings.values()):.2f}s")
    print(f"demo done in {time.time() - t0:.1f} s")
    return 0


def ask(args) -> int:
    from .engine import QZoomModel

    model = QZoomModel.from_pretrained(args.model)
    a = model.answer(args.image, args.question, mode=args.mode, max_visual_tokens=args.max_visual_tokens)
    print(a.text)
    print(f"visual_tokens={a.visual_tokens} gate_prob={a.gate_prob} boxes={[r.box for r in a.boxes]} "
          f"timings={ {k: round(v, 4) for k, v in a.timings.items()} }")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="qzoom", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="answer SynthHR questions with the shipped testbed at a low and a high budget")
    d.add_argument("--n", type=int, default=2, help="items per subset")
    d.add_argument("--low", type=int, default=576, help="coarse budget (576: Q-Zoom's HR operating point, where the "
                   "testbed's RoI head was trained)")
    d.add_argument("--high", type=int, default=2304)
    d.add_argument("--max-new-tokens", type=int, default=12)
    d.set_defaults(fn=demo)
    a = sub.add_parser("ask", help="answer one question about one image with a saved QZoomModel")
    a.add_argument("--model", required=True)
    a.add_argument("--image", required=True)
    a.add_argument("--question", required=True)
    a.add_argument("--mode", default="qzoom", choices=["qzoom", "base"])
    a.add_argument("--max-visual-tokens", type=int, default=None)
    a.set_defaults(fn=ask)
    args = p.parse_args(argv)
    from .errors import QZoomError

    try:
        return args.fn(args)
    except QZoomError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
