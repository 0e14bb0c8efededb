"""Where the time goes (issue #8): a kernel profile of the ViT at one budget, and decode ms/token for every
fast-decoder mode, with and without packed-GQA decode attention, at several context lengths and batch sizes.

Same random-weight architectures as eval/bench_latency.py (ARCHS). Output: JSON + markdown under `out_dir`.

    python eval/profile_latency.py --arch qwen2_5_vl_7b --out_dir $OUT
    python eval/profile_latency.py --config eval/configs/profile_latency_7b.yaml
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.bench_latency import (QUESTION, LatencyArgs, _ints, build_model, make_images,  # noqa: E402
                                random_vit_input)
from qzoom_agent.checkpoint import atomic_write_text  # noqa: E402


@dataclass
class ProfileArgs:
    arch: str = "qwen2_5_vl_7b"
    vit_tokens: int = 4096
    vit_top: int = 18
    contexts: str = "576,4096"           # visual tokens of the prompt before decoding
    batches: str = "1,8"
    decode_modes: str = "plain,static,graph,compile"
    packed: str = "packed_math,packed_sdpa,sdpa"   # decode attention variants (FastDecoder.decode_attention)
    new_tokens: int = 16
    repeats: int = 3
    dtype: str = "bfloat16"
    device: str = "cuda"
    out_dir: str = "eval/results"
    tag: str = "h100_7b"
    time_budget_s: float = 0.0


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def vit_profile(model, args: ProfileArgs) -> dict:
    """Fast and stock ViT at `vit_tokens`: GPU time, host time of the call, and the top kernels of the fast path."""
    from qzoom_agent.backbones.fast_vision import install_fast_vision, uninstall_fast_vision

    bb, dev = model.backbone, model.device
    pv, grid = random_vit_input(model, int(bb.cell_px * args.vit_tokens ** 0.5), min(256, args.vit_tokens),
                                args.vit_tokens)
    patches = int(grid.prod())
    out = {"tokens": patches // 4, "patches": patches}
    for fast in (False, True):
        (install_fast_vision if fast else uninstall_fast_vision)(model.base)
        for _ in range(2):
            bb._vision_forward(pv, grid)
        _sync(dev)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            bb._vision_forward(pv, grid)
            t1 = time.perf_counter()
            _sync(dev)
            times.append((t1 - t0, time.perf_counter() - t0))
        out["fast" if fast else "stock"] = {"host_call_ms": 1e3 * float(np.median([a for a, _ in times])),
                                            "wall_ms": 1e3 * float(np.median([b for _, b in times]))}
    if dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                bb._vision_forward(pv, grid)
            _sync(dev)
        ka = prof.key_averages()
        rows = sorted(((e.key, e.device_time_total / 3e3, e.count // 3) for e in ka if e.device_time_total > 0),
                      key=lambda r: -r[1])
        out["fast"]["kernels_ms"] = [{"name": n[:90], "ms": round(ms, 3), "calls": c} for n, ms, c in
                                     rows[:args.vit_top]]
        out["fast"]["gpu_ms_total"] = sum(r[1] for r in rows if not r[0].startswith(("aten::", "cuda")))
    uninstall_fast_vision(model.base)
    return out


@torch.no_grad()
def decode_matrix(model, args: ProfileArgs, deadline: float, rows: list, save=lambda: None) -> list[dict]:
    """ms per decode step (decode stage / (new_tokens - 1): the first token comes from the prefill) per
    (mode, packed, context, batch); a mode that fails is recorded with its error."""
    from qzoom_agent.fast_decode import FastDecoder

    bb = model.backbone
    decoders: dict = {}
    for N in _ints(args.contexts):
        for B in _ints(args.batches):
            imgs = make_images(B, int(bb.cell_px * N ** 0.5))
            for mode in args.decode_modes.split(","):
                for packed in args.packed.split(","):
                    if mode == "plain" and packed != "sdpa":
                        continue
                    if args.time_budget_s and time.time() > deadline:
                        rows.append({"context": N, "batch": B, "mode": mode, "packed": packed, "skipped": True})
                        continue
                    key = (mode, packed)
                    row = {"context": N, "batch": B, "mode": mode, "packed": packed}
                    try:
                        if mode != "plain" and key not in decoders:
                            decoders[key] = FastDecoder(bb, mode, decode_attention=packed)
                        model.fast_decoder = decoders.get(key)
                        t0 = time.perf_counter()
                        model.answer(imgs, [QUESTION] * B, mode="base", max_visual_tokens=N,
                                     min_visual_tokens=min(256, N), max_new_tokens=args.new_tokens)
                        row["first_call_s"] = time.perf_counter() - t0          # includes capture / compile
                        per = []
                        for _ in range(args.repeats):
                            a = model.answer(imgs, [QUESTION] * B, mode="base", max_visual_tokens=N,
                                             min_visual_tokens=min(256, N), max_new_tokens=args.new_tokens)
                            per.append(a[0].timings["decode"] / max(1, a[0].new_tokens - 1))
                        row["ms_per_step"] = 1e3 * float(np.median(per))
                        row["text"] = a[0].text[:40]
                    except Exception as e:                       # recorded: one failure must not end the call
                        row["error"] = f"{type(e).__name__}: {e}"[:400]
                    finally:
                        model.fast_decoder = None
                    rows.append(row)
                    save()                                       # partial results survive a killed call
                    print(json.dumps(row), flush=True)
    return rows


def to_markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"# Latency profile: {m['arch']} (random weights)", "",
             f"- command: `{m['command']}`", f"- device: {m['device']}; torch {m['torch']}, transformers "
             f"{m['transformers']}; {m['date']}", f"- decode floor (weights read per step / copy bandwidth): "
             f"{m.get('decode_floor_ms', float('nan')):.2f} ms", ""]
    v = res.get("vit")
    if v:
        lines += [f"## ViT at {v['tokens']} tokens ({v['patches']} patches), batch 1", "",
                  "| path | host call ms | wall ms |", "|---|---|---|"]
        lines += [f"| {k} | {v[k]['host_call_ms']:.1f} | {v[k]['wall_ms']:.1f} |" for k in ("stock", "fast")]
        if "kernels_ms" in v["fast"]:
            lines += ["", "Top GPU kernels of the fast path (per forward):", "", "| kernel | ms | calls |",
                      "|---|---|---|"]
            lines += [f"| `{r['name']}` | {r['ms']:.2f} | {r['calls']} |" for r in v["fast"]["kernels_ms"]]
    lines += ["", f"## Decode ms per step (base answers, {m['args']['new_tokens']} new tokens, median of repeats)", "",
              "| context | batch | mode | decode attention | ms/step | × floor | first call s | note |",
              "|---|---|---|---|---|---|---|---|"]
    floor = m.get("decode_floor_ms") or float("nan")
    for r in res["decode"]:
        ms = r.get("ms_per_step")
        note = "skipped (time budget)" if r.get("skipped") else r.get("error", "")
        lines.append(f"| {r['context']} | {r['batch']} | {r['mode']} | {r['packed']} | "
                     f"{'' if ms is None else f'{ms:.2f}'} | {'' if ms is None else f'{ms / floor:.2f}'} | "
                     f"{r.get('first_call_s', float('nan')):.1f} | {note} |")
    return "\n".join(lines) + "\n"


def run(args: ProfileArgs, command: str) -> dict:
    import transformers

    from eval.bench_latency import measure_bandwidth, weight_bytes

    t_start = time.time()
    dev = torch.device(args.device if args.device != "cuda" or torch.cuda.is_available() else "cpu")
    src = max(max(_ints(args.contexts)), args.vit_tokens)
    largs = LatencyArgs(dtype=args.dtype, new_tokens=args.new_tokens, source_tokens=src, min_tokens=min(256, src))
    model = build_model(args.arch, largs, dev)
    bw = measure_bandwidth(dev)
    wb = weight_bytes(model)
    meta = {"arch": args.arch, "command": command, "device": torch.cuda.get_device_name() if dev.type == "cuda"
            else "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()), "args": asdict(args), **bw, **wb,
            "decode_floor_ms": 1e3 * wb["decode_read_bytes"] / (bw["copy_GBps"] * 1e9)}
    res = {"meta": meta}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"profile_latency_{args.tag}"

    def save():
        atomic_write_text(stem.with_suffix(".json"), json.dumps(res, indent=1))
        atomic_write_text(stem.with_suffix(".md"), to_markdown(res))
    res["vit"] = vit_profile(model, args)
    res["decode"] = []
    save()
    decode_matrix(model, args, t_start + args.time_budget_s, res["decode"], save)
    print(to_markdown(res))
    return res


def main(argv: list[str] | None = None) -> int:
    from qzoom_agent.cli_args import parse_args

    args = parse_args(ProfileArgs, argv=argv)
    run(args, "python eval/profile_latency.py " + " ".join(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
