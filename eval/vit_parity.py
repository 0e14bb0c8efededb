"""Is the fast ViT exact at real shapes? ‖fast − stock‖ / ‖stock‖ of the vision tower's output in fp32 and in bf16,
beside the bf16 noise floor of the stock path itself (‖stock_bf16 − stock_fp32‖ / ‖stock_fp32‖), random weights.

    python eval/vit_parity.py --arch qwen2_5_vl_7b --tokens 1024 --out_dir $OUT
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.bench_latency import LatencyArgs, build_model, random_vit_input  # noqa: E402
from qzoom_agent.checkpoint import atomic_write_text  # noqa: E402


@dataclass
class ParityArgs:
    arch: str = "qwen2_5_vl_7b"
    tokens: int = 1024
    device: str = "cuda"
    out_dir: str = "eval/results"
    tag: str = "h100_7b"


@torch.no_grad()
def vision_outputs(arch: str, tokens: int, dtype: str, device: torch.device):
    """(stock, fast) vision-tower outputs (n_tokens, d) in fp32 for one square random image of `tokens` tokens;
    the pixels are drawn from a fixed CPU seed, so every call sees the same image."""
    from qzoom_agent.backbones.fast_vision import install_fast_vision, uninstall_fast_vision

    model = build_model(arch, LatencyArgs(dtype=dtype, min_tokens=min(256, tokens), source_tokens=tokens), device)
    model.base.model.language_model.to("meta")            # only the vision tower is needed
    bb = model.backbone
    pv, grid = random_vit_input(model, int(bb.cell_px * tokens ** 0.5), min(256, tokens), tokens, seed=0)
    stock = bb._vision_forward(pv, grid)[0].float()
    install_fast_vision(model.base)
    fast = bb._vision_forward(pv, grid)[0].float()
    uninstall_fast_vision(model.base)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return stock, fast


def main(argv: list[str] | None = None) -> int:
    import transformers

    from qzoom_agent.cli_args import parse_args

    args = parse_args(ParityArgs, argv=argv)
    dev = torch.device(args.device if args.device != "cuda" or torch.cuda.is_available() else "cpu")
    rel = lambda a, b: float((a - b).norm() / b.norm())                       # noqa: E731
    s32, f32 = vision_outputs(args.arch, args.tokens, "float32", dev)
    s16, f16 = vision_outputs(args.arch, args.tokens, "bfloat16", dev)
    res = {"arch": args.arch, "tokens": args.tokens, "device": torch.cuda.get_device_name() if dev.type == "cuda"
           else "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()), "args": asdict(args),
           "fp32_fast_vs_stock": rel(f32, s32), "bf16_fast_vs_stock": rel(f16, s16),
           "bf16_stock_vs_fp32_stock": rel(s16, s32), "bf16_fast_vs_fp32_stock": rel(f16, s32)}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"vit_parity_{args.tag}.json", json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
