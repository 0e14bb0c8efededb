#!/usr/bin/env python
"""Per-stage latency of QZoomModel at the real Qwen2.5-VL-7B / -3B and Qwen3-VL-4B shapes (issue #8,
evaluation.md §4.3), random weights, bf16, transformers' SDPA; fast paths off vs on.

    python eval/bench_latency.py --config eval/configs/bench_latency_7b.yaml --out_dir $OUT     # GPU
    python eval/bench_latency.py --dry_run true                                               # CPU, < 60 s

Latency depends on shapes, not weights. Every number comes from `QZoomModel.answer` itself, with three probes:
- routing is forced: a forward hook replaces the gate's logits (±20 per row, after it ran), and the RoI score
  maps (computed for real) are replaced by a map whose thresholded union box is a centred box sized so that the
  crop, at native resolution, holds `roi_token_frac` × the coarse budget (the crop is then re-encoded within
  [min, max] tokens as Q-Zoom does); `fire_rate` × batch rows zoom, the rest take the direct path;
- `backbone.run_layers` is timed (CUDA events) to split coarse prefill (layers < K; base: all L) from the
  direct rows' layers ≥ K, and the fused prefill into its < K suffix part and its ≥ K part;
- the image processor is timed: global-view preprocessing is excluded from `e2e` (Q-Zoom convention, §7),
  crop preprocessing stays in `crop_vit`.
Decoding never stops early (no EOS), so every method emits `new_tokens` tokens. Batch 1 times the zoom and the
skip route separately and mixes them by `fire_rate` ("mix" rows); larger batches route per sample in one call.

Defaults follow the paper (method.md §6): HR operating point = coarse 576, Doc = coarse 1024, against base@4096;
73.2 % / 53.0 % fewer visual tokens than base@4096 are what fire_rate 0.9 with RoI crops at the coarse budget
(roi_token_frac 1.0) give: 576 + 0.9·576 = 1094 ≈ 0.268·4096 and 1024 + 0.9·1024 = 1946 ≈ 0.475·4096.
The source image holds 4096 tokens at native resolution (so base@4096 does not resize it).
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

STAGES = ("vit", "prefill_coarse", "prefill_rest", "gate", "rpn", "crop_vit", "fused_prefill", "decode", "other")
SPECIAL = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>", "<|im_end|>")
QUESTION = "What is the code on the red tag?"


@dataclass
class ArchSpec:
    """Public config numbers (Hugging Face config.json of each release); K = Q-Zoom's twig_K (method.md §0)."""

    family: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie: bool
    rope_theta: float
    mrope: list
    v_depth: int
    v_hidden: int
    v_inter: int
    v_heads: int
    K: int
    T: int = 3
    head_dim: int | None = None
    fullatt: list | None = None           # Qwen2.5-VL: full-attention ViT blocks (others windowed, 112 px)
    deepstack: list | None = None         # Qwen3-VL
    cell_px: int = 28


ARCHS = {
    "qwen2_5_vl_7b": ArchSpec("qwen2_5_vl", 3584, 28, 28, 4, 18944, 152064, False, 1e6, [16, 24, 24],
                              32, 1280, 3420, 16, K=18, fullatt=[7, 15, 23, 31]),
    "qwen2_5_vl_3b": ArchSpec("qwen2_5_vl", 2048, 36, 16, 2, 11008, 151936, True, 1e6, [16, 24, 24],
                              32, 1280, 3420, 16, K=24, fullatt=[7, 15, 23, 31]),
    "qwen3_vl_4b": ArchSpec("qwen3_vl", 2560, 36, 32, 8, 9728, 151936, True, 5e6, [24, 20, 20],
                            24, 1024, 4096, 16, K=24, head_dim=128, deepstack=[5, 11, 17], cell_px=32),
    # CPU smoke shapes (dry run): same code paths, tiny widths
    "tiny_qwen2_5_vl": ArchSpec("qwen2_5_vl", 128, 6, 4, 2, 256, 2048, False, 1e6, [4, 6, 6],
                                4, 64, 128, 2, K=3, fullatt=[3]),
    "tiny_qwen3_vl": ArchSpec("qwen3_vl", 128, 6, 4, 2, 256, 2048, True, 5e6, [8, 4, 4],
                              4, 64, 128, 2, K=3, head_dim=32, deepstack=[1], cell_px=32),
}


@dataclass
class LatencyArgs:
    archs: str = field(default="qwen2_5_vl_7b,qwen2_5_vl_3b,qwen3_vl_4b", metadata={"help": ",".join(ARCHS)})
    base_budgets: str = "576,1024,2048,4096"
    operating_points: str = field(default="hr:576,doc:1024", metadata={"help": "name:coarse budget, comma-separated"})
    fire_rate: float = 0.9
    roi_token_frac: float = 1.0
    min_tokens: int = 256
    source_tokens: int = 4096             # source image side = cell_px·√source_tokens
    batch_sizes: str = "1,8"
    fast: str = "off,on"
    reuse_off: bool = True                # also time the fused prefill without prefix-KV reuse (fast on)
    new_tokens: int = 16
    repeats: int = 5
    warmup: int = 2
    decode_mode: str = "auto"             # fast decode: auto (graph on CUDA, static on CPU) | static | graph | compile
    dtype: str = "bfloat16"
    device: str = "auto"
    threads: int = 0
    vit_check: bool = True
    decode_check: bool = True
    dry_run: bool = False                 # tiny archs on CPU, small grid: the whole script in well under a minute
    out_dir: str = "eval/results"
    tag: str = ""                         # file stem suffix: bench_latency_<tag>.{json,md,png}
    time_budget_s: float = 0.0            # > 0: start no setting after this many seconds (a device call ends at 600)


def dry_run_args(args: LatencyArgs) -> LatencyArgs:
    return LatencyArgs(**{**asdict(args), **dict(
        archs="tiny_qwen2_5_vl,tiny_qwen3_vl", base_budgets="64,256", operating_points="hr:64",
        min_tokens=16, source_tokens=256, batch_sizes="1,3", new_tokens=4, repeats=2, warmup=1,
        dtype="float32", device="cpu", tag=args.tag or "dry_run")})


def _ints(s) -> list[int]:
    return [int(x) for x in str(s).split(",") if x.strip()]


# ------------------------------------------------------------------------------------------- building
def hf_config(spec: ArchSpec, ids: dict):
    text = dict(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=spec.tie,
                pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], bos_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta, "mrope_section": spec.mrope})
    vis = dict(depth=spec.v_depth, hidden_size=spec.v_hidden, intermediate_size=spec.v_inter, num_heads=spec.v_heads,
               out_hidden_size=spec.hidden, spatial_merge_size=2, temporal_patch_size=2)
    tok_ids = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if spec.family == "qwen3_vl":
        from transformers import Qwen3VLConfig

        text["head_dim"] = spec.head_dim
        text["rope_parameters"]["mrope_interleaved"] = True
        vis.update(patch_size=16, num_position_embeddings=2304, deepstack_visual_indexes=spec.deepstack,
                   hidden_act="gelu_pytorch_tanh")
        return Qwen3VLConfig(text_config=text, vision_config=vis, tie_word_embeddings=spec.tie, **tok_ids)
    from transformers import Qwen2_5_VLConfig

    vis.update(patch_size=14, window_size=112, fullatt_block_indexes=spec.fullatt, hidden_act="silu")
    return Qwen2_5_VLConfig(text_config=text, vision_config=vis, tie_word_embeddings=spec.tie, **tok_ids)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights in place, on the model's device: N(0, 0.02), norms 1 (their biases 0). Never zeros."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name or "ln_q" in name:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)


def build_model(name: str, args: LatencyArgs, device: torch.device):
    """A QZoomModel at `name`'s shapes with random weights, built on `device` without init cost."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    from qzoom_agent import QZoomConfig, QZoomModel
    from qzoom_agent.processing import build_processor
    from qzoom_agent.testbed.tokenizer import build_testbed_tokenizer
    try:
        from transformers.initialization import no_init_weights
    except ImportError:                                     # older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:                                 # init then runs once, on the device
            from contextlib import nullcontext as no_init_weights

    spec = ARCHS[name]
    tok = build_testbed_tokenizer()
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIAL}
    cls = Qwen3VLForConditionalGeneration if spec.family == "qwen3_vl" else Qwen2_5_VLForConditionalGeneration
    with torch.device(device), no_init_weights():
        hf = cls._from_config(hf_config(spec, ids), dtype=getattr(torch, args.dtype), attn_implementation="sdpa")
    if spec.tie:
        hf.lm_head.weight = hf.model.language_model.embed_tokens.weight
    randomize_(hf)
    hf.eval()
    hf.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    cfg = QZoomConfig(family=spec.family, twig_K=spec.K, twig_T=spec.T, gate_T=spec.T, roi_conf_thresh=0.4,
                      gate_thresh=0.5, min_visual_tokens=args.min_tokens, max_visual_tokens=args.source_tokens,
                      max_new_tokens=args.new_tokens,
                      answer_suffix="\nAnswer the question using a single word or phrase.")
    model = QZoomModel.from_backbone(hf, build_processor(tok, spec.family), cfg)
    model.backbone.eos_ids = [-1]                           # no EOS: every answer has new_tokens tokens
    return model


# -------------------------------------------------------------------------------------------- probes
class Clock:
    """Marks on the device timeline: CUDA events on GPU, host time on CPU (synchronous there)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


class Probes:
    """Forced routing and sub-stage timing around one QZoomModel (see the module docstring)."""

    def __init__(self, model, args: LatencyArgs) -> None:
        self.model, self.args, self.clock = model, args, Clock(model.device)
        self.zoom: list[bool] = []
        self.calls: list = []
        self.pre: list[float] = []
        bb = model.backbone
        self._run_layers, self._score_maps = bb.run_layers, model._score_maps
        bb.run_layers, model._score_maps = self.run_layers, self.score_maps
        model.gate_head.register_forward_hook(self.gate_hook)
        ip = bb.processor.image_processor
        probe = self
        self.n_global, self.cache, self.images = 0, {}, None

        class TimedImageProcessor:
            """Times every call; global views (the first n_global calls of a run) are excluded from e2e anyway,
            so they are preprocessed once per image list and replayed (saves device-machine time): `pre` keeps
            the time actually spent (subtracted from the wall clock), `pre_nominal` the first, uncached time."""

            def __call__(self, *a, **k):
                t0 = time.perf_counter()
                key = (id(k.get("images", a[0] if a else None)[0]), json.dumps(k.get("size"), sort_keys=True))
                glob = len(probe.pre) < probe.n_global
                if glob and key in probe.cache:
                    out, nominal = probe.cache[key]
                else:
                    out = ip(*a, **k)
                    nominal = time.perf_counter() - t0
                    if glob:
                        probe.cache[key] = (out, nominal)
                probe.pre.append(time.perf_counter() - t0)
                probe.pre_nominal.append(nominal)
                return out

            def __getattr__(self, item):
                return getattr(ip, item)

        bb.processor.image_processor = TimedImageProcessor()

    def gate_hook(self, module, inputs, out):
        return torch.tensor([20.0 if z else -20.0 for z in self.zoom], dtype=out.dtype, device=out.device)

    def run_layers(self, hidden, start, end, pe, mask, cache=None, deepstack=None, layers=None):
        if layers is not None or hidden.shape[1] == 1:        # heads, decode steps: not split further
            return self._run_layers(hidden, start, end, pe, mask, cache, deepstack, layers)
        a = self.clock.mark()
        out = self._run_layers(hidden, start, end, pe, mask, cache, deepstack, layers)
        self.calls.append((start, end, a, self.clock.mark()))
        return out

    def score_maps(self, batch, h_K, pe, mask, rows, blocks):
        real = self._score_maps(batch, h_K, pe, mask, rows, blocks)          # the real head, then a forced map
        return [[(self.box_map(tuple(logits.shape), logits), None) for logits, _ in per] for per in real]

    def box_map(self, grid_hw, like):
        """+20 on a centred b×b cell box, -20 elsewhere; b makes the crop hold ≈ roi_token_frac × coarse tokens."""
        H, W = grid_hw
        side = self.args.source_tokens ** 0.5
        b = int(np.ceil(max(H, W) * (self.args.roi_token_frac * H * W) ** 0.5 / side))
        bh, bw = max(2, min(H, b)), max(2, min(W, b))
        out = torch.full((H, W), -20.0, dtype=like.dtype, device=like.device)
        y0, x0 = (H - bh) // 2, (W - bw) // 2
        out[y0:y0 + bh, x0:x0 + bw] = 20.0
        return out

    def run(self, images, mode: str, budget: int, zoom: list[bool]) -> dict:
        """One answer(); returns wall seconds, stage seconds (STAGES + preprocess, splits) and the answers."""
        K, L = self.model.config.twig_K, self.model.backbone.num_layers
        self.zoom, self.calls, self.pre, self.pre_nominal, self.n_global = zoom, [], [], [], len(images)
        if images is not self.images:
            self.images, self.cache = images, {}
        dev = self.model.device
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        answers = self.model.answer(images, [QUESTION] * len(images), mode=mode, max_visual_tokens=budget,
                                    min_visual_tokens=min(self.args.min_tokens, budget),
                                    max_new_tokens=self.args.new_tokens)
        wall = time.perf_counter() - t0
        t = answers[0].timings
        calls = [(s, e, self.clock.seconds(a, b)) for s, e, a, b in self.calls]
        second = next((i for i, c in enumerate(calls) if i > 0 and c[0] == 0), len(calls))
        rest = sum(dt for s, e, dt in calls[1:second] if s == K)
        fused = calls[second:]
        pre_global = sum(self.pre[:len(images)])
        st = {"vit": t["vit"] - pre_global, "prefill_coarse": t["prefill"] - rest, "prefill_rest": rest,
              "gate": t["gate"], "rpn": t["rpn"], "crop_vit": t["crop_vit"], "fused_prefill": t["fused_prefill"],
              "decode": t["decode"]}
        st["other"] = wall - pre_global - sum(st.values())
        st.update(preprocess=sum(self.pre_nominal[:len(images)]), preprocess_crop=sum(self.pre[len(images):]),
                  fused_lt_K=sum(dt for s, e, dt in fused if (s, e) == (0, K)),
                  fused_ge_K=sum(dt for s, e, dt in fused if (s, e) == (K, L)),
                  fused_all=sum(dt for s, e, dt in fused if (s, e) == (0, L)))
        return {"wall": wall, "e2e": wall - pre_global, "stages": st, "answers": answers}


# ------------------------------------------------------------------------------------------- timing
def make_images(n: int, side_px: int):
    from PIL import Image

    rng = np.random.RandomState(0)
    return [Image.fromarray((rng.rand(side_px, side_px, 3) * 255).astype(np.uint8)) for _ in range(n)]


def time_setting(probes: Probes, images, mode: str, budget: int, zoom: list[bool], args: LatencyArgs) -> dict:
    """Median (p90 of e2e) over `repeats` runs after `warmup` runs, plus token counts and analytic FLOPs."""
    from eval.costs import _dec, answer_cost_means, model_dims

    runs = [probes.run(images, mode, budget, zoom) for _ in range(args.warmup + args.repeats)][args.warmup:]
    ans = runs[-1]["answers"]
    keys = list(runs[0]["stages"])
    e2e = [r["e2e"] for r in runs]
    dims, K, L = model_dims(probes.model), probes.model.config.twig_K, probes.model.backbone.num_layers
    reuse = probes.model.config.prefix_kv_reuse
    fused = [_dec(dims, K, a.fused_tokens) - _dec(dims, K, a.reused_tokens) + _dec(dims, L - K, a.fused_tokens, True)
             if reuse else _dec(dims, L, a.fused_tokens, True) for a in ans if a.zoomed]
    heads = [_dec(dims, probes.model.config.gate_T + probes.model.config.twig_T - 1, a.prompt_tokens) /
             _dec(dims, K, a.prompt_tokens) for a in ans if a.zoomed]
    return {"e2e_s": float(np.median(e2e)), "e2e_p90_s": float(np.percentile(e2e, 90)),
            "wall_s": float(np.median([r["wall"] for r in runs])), "samples_per_s": len(images) / float(np.median(e2e)),
            "stages_s": {k: float(np.median([r["stages"][k] for r in runs])) for k in keys},
            **answer_cost_means(probes.model, ans, mode),
            "flops_fused": float(np.mean(fused)) if fused else 0.0,          # fused prefill per zoomed sample
            "heads_flops_share": float(np.mean(heads)) if heads else 0.0}   # (gate + twig) / coarse < K, analytic


def mix_rows(zoom: dict, skip: dict, f: float) -> dict:
    """Expected batch-1 row when a fraction f of samples zooms: every time and count mixed linearly."""
    def mix(a, b):
        return {k: mix(a[k], b[k]) for k in a} if isinstance(a, dict) else f * a + (1 - f) * b
    out = {k: mix(zoom[k], skip[k]) for k in zoom if k not in ("samples_per_s",)}
    out["samples_per_s"] = 1.0 / out["e2e_s"]
    return out


def set_fast(model, on: bool, decode_mode: str) -> None:
    from qzoom_agent.fast_decode import disable_fast_paths, enable_fast_paths

    disable_fast_paths(model)
    if on:
        enable_fast_paths(model, decode=decode_mode)


def bench_arch(name: str, args: LatencyArgs, device: torch.device, out: dict, save, deadline: float, tick) -> None:
    """Fill `out` with one architecture's checks and rows; `save()` after every (fast, batch) group; settings
    not started before `deadline` (time.time()) are listed under out["skipped"]."""
    spec = ARCHS[name]
    t0 = time.perf_counter()
    model = build_model(name, args, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    out.update(spec=asdict(spec), build_s=time.perf_counter() - t0, **weight_bytes(model), rows=[], skipped=[])
    side = int(spec.cell_px * round(args.source_tokens ** 0.5))
    if args.vit_check:
        out["vit_check"] = vit_check(model, args, side)
    if args.decode_check:
        out["decode_check"] = decode_check(model, args, side)
    save()
    probes = Probes(model, args)
    ops = [(op.split(":")[0], int(op.split(":")[1])) for op in args.operating_points.split(",") if op.strip()]

    # a fast decoder whose capture failed in decode_check is replaced by the eager static one (recorded)
    out["decode_mode_used"] = "static" if out.get("decode_check", {}).get("errors") else args.decode_mode

    def timed(label: dict, *a):
        if time.time() > deadline:
            out["skipped"].append(label)
            return None
        try:
            return time_setting(probes, *a, args)
        except Exception as e:                       # one failing setting (OOM, capture) must not end the call
            out.setdefault("errors", []).append({**label, "error": repr(e)[:500]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    for fast in args.fast.split(","):
        set_fast(model, fast == "on", out["decode_mode_used"])
        for B in _ints(args.batch_sizes):
            images = make_images(B, side)
            row = dict(arch=name, fast=fast, batch=B)
            for N in _ints(args.base_budgets):
                r = timed({**row, "method": f"base@{N}"}, images, "base", N, [False] * B)
                if r:
                    out["rows"].append({**row, "method": f"base@{N}", "route": "all", "reuse": None, **r})
                tick()
            for op, C in ops:
                for reuse in [True] + ([False] if args.reuse_off and fast == "on" else []):
                    model.config.prefix_kv_reuse = reuse
                    meth = dict(row, method=f"qzoom-{op}@{C}", reuse=reuse)
                    if B == 1:
                        z = timed({**meth, "route": "zoom"}, images, "qzoom", C, [True])
                        if reuse:
                            skip = timed({**meth, "route": "skip"}, images, "qzoom", C, [False])
                        mixed = [(r, route) for r, route in ((z, "zoom"), (skip, "skip")) if r]
                        if z and skip:
                            mixed.append((mix_rows(z, skip, args.fire_rate), "mix"))
                        out["rows"] += [{**meth, "route": route, **r} for r, route in mixed if route != "skip" or reuse]
                    else:
                        n = int(args.fire_rate * B)
                        r = timed({**meth, "route": f"{n}/{B} zoom"}, images, "qzoom", C, [i < n for i in range(B)])
                        if r:
                            out["rows"].append({**meth, "route": f"{n}/{B} zoom", **r})
                    tick()
                model.config.prefix_kv_reuse = True
            save()
    set_fast(model, False, "auto")


# ------------------------------------------------------------------------------------- checks, floors
def weight_bytes(model) -> dict:
    """Bytes of all weights and of what one decode step must read (decoder layers, final norm, LM head)."""
    lm, hf = model.backbone.lm, model.base
    size = lambda ps: sum(p.numel() * p.element_size() for p in {id(p): p for p in ps}.values())  # noqa: E731
    step = size([p for n, p in lm.named_parameters() if not n.startswith("embed_tokens")] + [hf.lm_head.weight])
    return {"params": sum(p.numel() for p in hf.parameters()), "weights_bytes": size(list(hf.parameters())),
            "decode_read_bytes": step}


def measure_bandwidth(device: torch.device) -> dict:
    """Device-to-device copy (bytes read + written) and a square bf16 matmul: the two ceilings (METHOD.md)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    m = 8192 if device.type == "cuda" else 512
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    clock = Clock(device)

    def best(fn, reps=10):
        fn()
        times = []
        for _ in range(reps):
            s = clock.mark()
            fn()
            e = clock.mark()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(clock.seconds(s, e))
        return float(np.median(times))
    t_copy, t_mm = best(lambda: dst.copy_(src)), best(lambda: a @ a)
    return {"copy_GBps": 2 * src.numel() * 4 / t_copy / 1e9, "matmul_TFLOPs": 2 * m ** 3 / t_mm / 1e12,
            "matmul_dtype": str(a.dtype)}


def random_vit_input(model, side: int, min_tokens: int, max_tokens: int, seed: int | None = None):
    """(pixel rows (n_patches, 3·2·ps²) on the model's device and dtype, grid (1, 3)) of one random square image of
    `side` px resized to [min_tokens, max_tokens]; `seed` draws the pixels on the CPU, so they repeat across
    models and dtypes."""
    bb = model.backbone
    gh, gw = (2 * x // bb.cell_px for x in bb.resized_hw((side, side), min_tokens, max_tokens))
    ps = model.base.config.vision_config.patch_size
    shape = (gh * gw, 3 * 2 * ps * ps)
    if seed is None:
        pv = torch.randn(shape, device=model.device, dtype=bb.dtype)
    else:
        pv = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(model.device, bb.dtype)
    return pv, torch.tensor([[1, gh, gw]])


@torch.no_grad()
def vit_check(model, args: LatencyArgs, side: int) -> list[dict]:
    """ViT alone per budget, one image: transformers' per-chunk loop vs grouped SDPA, and
    ‖fast − stock‖ / ‖stock‖."""
    from qzoom_agent.backbones.fast_vision import install_fast_vision, uninstall_fast_vision

    bb, clock, out = model.backbone, Clock(model.device), []
    for N in _ints(args.base_budgets):
        pv, grid = random_vit_input(model, side, min(args.min_tokens, N), N)
        gh, gw = grid[0, 1:].tolist()
        res = {}
        for fast in (False, True):
            (install_fast_vision if fast else uninstall_fast_vision)(model.base)
            times = []
            for i in range(args.warmup + args.repeats):
                a = clock.mark()
                emb, _ = bb._vision_forward(pv, grid)
                b = clock.mark()
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(clock.seconds(a, b))
            res[fast] = (float(np.median(times[args.warmup:])), emb.float())
        uninstall_fast_vision(model.base)
        err = float((res[True][1] - res[False][1]).norm() / res[False][1].norm())
        out.append({"tokens": gh * gw // 4, "stock_s": res[False][0], "fast_s": res[True][0],
                    "speedup": res[False][0] / res[True][0], "rel_err": err})
    return out


@torch.no_grad()
def decode_check(model, args: LatencyArgs, side: int) -> dict:
    """One base answer at the smallest budget, plain loop vs fast decoders: greedy text equality for every mode,
    and the per-step logits' max ‖static − plain‖ / ‖plain‖ (a graph replays without Python, so only eager
    steps are logged)."""
    from qzoom_agent.fast_decode import FastDecoder, default_decode_mode

    bb, img, N = model.backbone, make_images(1, side), min(_ints(args.base_budgets))
    mode = default_decode_mode(model.device) if args.decode_mode == "auto" else args.decode_mode
    texts, logs = {}, {}
    for name in dict.fromkeys(("plain", "static", mode)):
        rows, head = [], bb.logits
        bb.logits = lambda h, head=head, rows=rows: (lambda o: rows.append(o[:, -1].float()) or o)(head(h))
        try:
            model.fast_decoder = None if name == "plain" else FastDecoder(bb, name)
            texts[name] = model.answer(img, QUESTION, mode="base", max_visual_tokens=N,
                                       min_visual_tokens=min(args.min_tokens, N), max_new_tokens=args.new_tokens).text
        except Exception as e:                      # recorded, so that one failure does not end a GPU call
            texts[name] = f"error: {e!r}"[:300]
        finally:
            del bb.logits
            model.fast_decoder = None
        logs[name] = rows
    out = {"same_text": {k: v == texts["plain"] for k, v in texts.items() if k != "plain"},
           "errors": {k: v for k, v in texts.items() if v.startswith("error:")}}
    if len(logs["static"]) == len(logs["plain"]) > 0:
        errs = [float((s - p).norm() / p.norm()) for s, p in zip(logs["static"], logs["plain"])]
        out["static_logits_rel_err_max"] = max(errs)
        out["static_logits_rel_err_steps"] = [round(e, 5) for e in errs]
        out["argmax_agree_steps"] = [bool((s.argmax(-1) == p.argmax(-1)).all())
                                     for s, p in zip(logs["static"], logs["plain"])]
    return out


def write_outputs(result: dict, args: LatencyArgs) -> dict:
    """bench_latency[_<tag>].{json,md,png} under out_dir."""
    from eval.bench_latency_report import plot, to_markdown
    from qzoom_agent.checkpoint import atomic_write_text

    stem = Path(args.out_dir) / ("bench_latency" + (f"_{args.tag}" if args.tag else ""))
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = {k: f"{stem}.{k}" for k in ("json", "md", "png")}
    atomic_write_text(paths["json"], json.dumps(result, indent=1) + "\n")
    atomic_write_text(paths["md"], to_markdown(result))
    plot(result, paths["png"])
    return paths


def run(args: LatencyArgs, command: str = "run()", progress: bool = True) -> dict:
    import datetime as dt

    import transformers
    from tqdm import tqdm

    if args.dry_run:
        args = dry_run_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(0)
    result = {"meta": {"command": command, "args": asdict(args), "torch": torch.__version__,
                       "transformers": transformers.__version__,
                       "device_name": (torch.cuda.get_device_name() if device.type == "cuda"
                                       else f"cpu ({os.cpu_count()} cores)"),
                       "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ"),
                       "ceilings": measure_bandwidth(device)}, "archs": {}}
    archs = [a for a in args.archs.split(",") if a.strip()]
    per_arch = len(args.fast.split(",")) * len(_ints(args.batch_sizes)) * (
        len(_ints(args.base_budgets)) + 2 * len([o for o in args.operating_points.split(",") if o.strip()]))
    bar = tqdm(total=len(archs) * per_arch, desc="bench_latency", disable=not progress)
    deadline = time.time() + (args.time_budget_s or float("inf"))

    def save():                                                    # partial results survive a killed call
        result["paths"] = write_outputs(result, args)

    for name in archs:
        bar.set_postfix_str(name)
        result["archs"][name] = {}
        bench_arch(name, args, device, result["archs"][name], save, deadline, tick=lambda: bar.update(1))
        gc.collect()                                               # the model and its hooks form cycles
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    save()
    return result


def main(argv: list[str] | None = None) -> int:
    from qzoom_agent.cli_args import parse_args

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(LatencyArgs, argv=argv)
    from eval.bench_latency_report import headline, to_markdown

    result = run(args, command=" ".join(["python", "eval/bench_latency.py", *argv]))
    print(to_markdown(result))
    print(headline(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.exit(main())
