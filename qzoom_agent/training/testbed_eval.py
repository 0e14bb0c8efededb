"""Tier-1 evaluation of the testbed on SynthHR-mini `test` (single-candidate level).

Modes: `coarse@256`; `oracle-crop@256` (global@256 + a crop of side 4× the GT box, ≥ 84 px, centred, encoded
like the engine encodes zoom crops: smart resize to ≥ 256 tokens, continuous M-RoPE alignment);
`native-crop@256` (a 448 px native crop around the box); `base@B` for B in the sweep (smart resize ≤ B tokens,
never above native, as the engine does). Scoring uses the benchmark's own prompts and scorers
(`eval.benchmarks.synthhr`). Pointing: answer→image attention (last prompt token → global image tokens, eager
attention) per layer and head on `coarse@256`; heads are chosen WITHOUT ground truth by peakiness (mean max
attention share) and cross-layer agreement (argmax within one cell of the other layers' head-mean argmax).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from .testbed_data import CELL, SeqBuilder, box_cells, item_prompt, resize, smart_hw, target_box
from .testbed_model import collate, greedy_answer, lm_forward


def _views(canvas, box, mode: str):
    from ..fusion import ImageSlot

    H, W = canvas.shape[:2]
    if mode.startswith("base@") or mode == "coarse@256":
        B = 256 if mode == "coarse@256" else int(mode.split("@")[1])
        h, w = smart_hw(H, W, 256, B)
        return [resize(canvas, (h, w))], [ImageSlot((h // CELL, w // CELL))]
    h, w = smart_hw(H, W, 256, 256)
    g = resize(canvas, (h, w))
    x0, y0, x1, y1 = box
    side = max(84, 4 * max(x1 - x0, y1 - y0)) if mode == "oracle-crop@256" else 448
    side = min(side, W, H)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    a = int(np.clip(cx - side / 2, 0, W - side))
    b = int(np.clip(cy - side / 2, 0, H - side))
    crop = canvas[b:b + side, a:a + side]
    ch, cw = smart_hw(crop.shape[0], crop.shape[1], 256, 256)
    bc = box_cells((a, b, a + side, b + side), W, H, h // CELL, w // CELL)
    return [g, resize(crop, (ch, cw))], [ImageSlot((h // CELL, w // CELL)),
                                         ImageSlot((ch // CELL, cw // CELL), source=0, box_cells=bc)]


def _render_canvas(args) -> np.ndarray:
    from eval.synthhr import render_item

    item, cfg = args
    return np.asarray(render_item(item, cfg).convert("RGB"), dtype=np.uint8)


def load_items(subsets, n: int, split: str = "test", n_candidates: int = 1, *, workers: int = 1,
               ids: set[str] | None = None, config=None) -> list[tuple[dict, np.ndarray]]:
    """(item, RGB canvas uint8 (H, W, 3)) for the first `n` SynthHR-mini items of each subset, rendered in
    `workers` processes; `ids`: only these question ids (the others are not rendered); `config`: a
    `SynthHRConfig` to render with instead of the default mini one (its `n_candidates` is then used)."""
    from eval.synthhr import SynthHRConfig, make_items

    cfg = config if config is not None else SynthHRConfig(scale="mini", n_candidates=n_candidates)
    items = [it for s in subsets for it in make_items(cfg, s, split, n) if ids is None or it["question_id"] in ids]
    if workers > 1 and len(items) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            canvases = pool.map(_render_canvas, [(it, cfg) for it in items], chunksize=4)
    else:
        canvases = [_render_canvas((it, cfg)) for it in items]
    return list(zip(items, canvases))


def free_prompt(item: dict) -> tuple[str, str]:
    """(free-form prompt, answer text) of an MC item: its question + "single word or phrase" -> the option text."""
    from eval.benchmarks.doc import SINGLE_WORD_OR_PHRASE

    _, letter = item_prompt(item)
    return item["question"] + SINGLE_WORD_OR_PHRASE, item["options"]["ABCD".index(letter)]


def _norm(t: str) -> str:
    return " ".join(t.strip().lower().rstrip(".").split())


@torch.no_grad()
def probe(model, tok, data, *, mode: str = "oracle-crop@256", batch: int = 48, device="cuda") -> dict:
    """First-token accuracy (one forward, no decoding) of MC letters and free-form answers, per subset (%),
    plus the share of the most frequent MC letter (1.0 = a constant letter)."""
    sb = SeqBuilder(tok)
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    img_id = model.config.image_token_id
    model.eval()
    hits: dict = {}
    letters = []
    for fmt in ("mc", "free"):
        for i in range(0, len(data), batch):
            chunk = [d for d in data[i:i + batch] if d[0].get("options")]
            if not chunk:
                continue
            seqs, gold = [], []
            for it, canvas in chunk:
                imgs, slots = _views(canvas, target_box(it), mode)
                prompt, ans = item_prompt(it) if fmt == "mc" else free_prompt(it)
                seqs.append(sb.build(imgs, slots, prompt, None, system=False))
                gold.append(tok(ans, add_special_tokens=False)["input_ids"][0])
            ids, mask, pos, _, images = collate(seqs, pad, img_id, device)
            images = [torch.from_numpy(im).to(device) for im in images]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda")):
                h, _, _ = lm_forward(model, ids, mask, pos, images)
                last = torch.tensor([s.n_prompt - 1 for s in seqs], device=h.device)
                pred = model.lm_head(h[torch.arange(len(seqs), device=h.device), last]).argmax(-1).tolist()
            for (it, _), p_, g in zip(chunk, pred, gold):
                hits.setdefault(f"{fmt}_{it['subset']}", []).append(p_ == g)
                if fmt == "mc":
                    letters.append(p_)
    out = {k: round(100 * float(np.mean(v)), 1) for k, v in hits.items()}
    if letters:
        out["mc_top_share"] = round(max(letters.count(x) for x in set(letters)) / len(letters), 2)
    return out


@torch.no_grad()
def evaluate(model, tok, data, modes, *, batch: int = 32, device="cuda", system: bool = False, log=print,
             free_form: bool = False):
    """Greedy answers scored by the benchmark's scorers; `free_form`: MC items asked free-form instead (their
    question + "single word or phrase"), scored by normalised exact match against the option text."""
    from eval.benchmarks.synthhr import SynthHRLoader, item_to_doc

    loader = SynthHRLoader(items=[d[0] for d in data])
    sb = SeqBuilder(tok)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    img_id = model.config.image_token_id
    res = {}
    model.eval()
    for mode in modes:
        t0 = time.time()
        recs = []
        for i in range(0, len(data), batch):
            chunk = data[i:i + batch]
            seqs = []
            for it, canvas in chunk:
                imgs, slots = _views(canvas, target_box(it), mode)
                prompt, _ = free_prompt(it) if free_form else item_prompt(it)
                seqs.append(sb.build(imgs, slots, prompt, None, system=system))
            ids, mask, pos, _, images = collate(seqs, pad, img_id, device)
            images = [torch.from_numpy(im).to(device) for im in images]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=(str(device).startswith("cuda"))):
                outs = greedy_answer(model, ids, mask, pos, images, [s.n_prompt for s in seqs],
                                     max_new=16 if free_form else 12, eos_id=eos)
            for (it, _), o in zip(chunk, outs):
                text = tok.decode(o, skip_special_tokens=True)
                if free_form:
                    score = float(_norm(text) == _norm(free_prompt(it)[1]))
                else:
                    score = float(loader.score(item_to_doc(it), text)["score"])
                recs.append(dict(subset=it["subset"], score=score, pred=text))
        by = {}
        for r in recs:
            by.setdefault(r["subset"], []).append(r["score"])
        res[mode] = {s: round(100 * float(np.mean(v)), 1) for s, v in by.items()}
        top = {}
        for sub in by:
            preds = [r["pred"] for r in recs if r["subset"] == sub]
            top[sub] = round(max(preds.count(x) for x in set(preds)) / len(preds), 2)
        res.setdefault("top_pred_share", {})[mode] = top     # 1.0 = one constant answer for the whole subset
        log(f"eval {mode}{' (free-form)' if free_form else ''}: {res[mode]}, top answer share {top} "
            f"({time.time() - t0:.0f}s)")
    return res


def head_choice_scores(peaks: np.ndarray, argmaxes: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GT-free head scores: (peakiness, agreement, z), each (layers, heads).

    peaks: (N, layers, heads) max share of each head's visual-attention distribution (renormalised over the image
    tokens). argmaxes: per sample (argmax (layers, heads), head-mean argmax per layer (layers,), grid (gh, gw)).
    Agreement: share of the other layers whose head-mean argmax lies within one cell (Chebyshev) of this head's
    argmax (with a single layer: that layer's own head-mean argmax). z = z-score(peakiness) + z-score(agreement).
    """
    n_l, n_h = peaks.shape[1:]
    agree = np.zeros((len(argmaxes), n_l, n_h))
    for n, (am, lm, (gh, gw)) in enumerate(argmaxes):
        r, c = am // gw, am % gw
        lr, lc = lm // gw, lm % gw
        for l in range(n_l):
            others = [k for k in range(n_l) if k != l] or [l]
            close = (np.abs(r[l][:, None] - lr[others][None]) <= 1) & (np.abs(c[l][:, None] - lc[others][None]) <= 1)
            agree[n, l] = close.mean(-1)
    pk, ag = peaks.mean(0), agree.mean(0)
    z = (pk - pk.mean()) / (pk.std() + 1e-9) + (ag - ag.mean()) / (ag.std() + 1e-9)
    return pk, ag, z


@torch.no_grad()
def pointing(model, tok, data, *, batch: int = 32, device="cuda", system: bool = False):
    """Per layer/head hit rates of the answer→image attention argmax on coarse@256, and the GT-free head choice."""
    sb = SeqBuilder(tok)
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    img_id = model.config.image_token_id
    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    hits, peaks, argmaxes, inside_chance, head_maps_all = [], [], [], [], []
    try:
        for i in range(0, len(data), batch):
            chunk = data[i:i + batch]
            seqs, boxes = [], []
            for it, canvas in chunk:
                imgs, slots = _views(canvas, target_box(it), "coarse@256")
                prompt, _ = item_prompt(it)
                seqs.append(sb.build(imgs, slots, prompt, None, system=system))
                H, W = canvas.shape[:2]
                gh, gw = slots[0].grid_hw
                x0, y0, x1, y1 = target_box(it)
                cells = np.zeros((gh, gw), bool)
                c0, r0 = int(x0 / W * gw), int(y0 / H * gh)
                c1, r1 = max(c0 + 1, math.ceil(x1 / W * gw)), max(r0 + 1, math.ceil(y1 / H * gh))
                cells[r0:r1, c0:c1] = True
                boxes.append(cells.reshape(-1))
            ids, mask, pos, _, images = collate(seqs, pad, img_id, device)
            images = [torch.from_numpy(im).to(device) for im in images]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda")):
                _, _, att = lm_forward(model, ids, mask, pos, images, output_attentions=True)
            for b, s in enumerate(seqs):
                q = s.n_prompt - 1
                img_pos = (ids[b] == img_id).nonzero().squeeze(-1)
                a = torch.stack([layer[b, :, q, img_pos].float() for layer in att])  # (layers, heads, N)
                a = a / a.sum(-1, keepdim=True).clamp_min(1e-9)
                am = a.argmax(-1).cpu().numpy()                                   # (layers, heads)
                cells = boxes[b]
                hits.append(cells[am])
                peaks.append(a.max(-1).values.cpu().numpy())
                lm = a.mean(1).argmax(-1).cpu().numpy()                           # layer head-mean argmax
                argmaxes.append((am, lm, s.slots[0].grid_hw))
                inside_chance.append(cells.mean())
                head_maps_all.append(hits[-1])
    finally:
        model.set_attn_implementation(prev)
    hits = np.stack(hits).astype(float)          # (N, layers, heads)
    pk, ag, z = head_choice_scores(np.stack(peaks), argmaxes)
    li, hi = np.unravel_index(np.argmax(z), z.shape)
    per_head = hits.mean(0)
    return dict(chance=round(100 * float(np.mean(inside_chance)), 2),
                per_layer_head=[[round(100 * float(v), 1) for v in row] for row in per_head],
                chosen_head=[int(li), int(hi)], chosen_hit=round(100 * float(per_head[li, hi]), 1),
                chosen_score=[round(float(pk[li, hi]), 4), round(float(ag[li, hi]), 4)],
                best_head_oracle=round(100 * float(per_head.max()), 1),
                peakiness=[[round(float(v), 3) for v in row] for row in pk],
                agreement=[[round(float(v), 3) for v in row] for row in ag], n=int(hits.shape[0]))


@torch.no_grad()
def attn_rows_selfcheck(model, tok, data, layer: int, *, device="cuda", n: int = 2) -> float:
    """Max |attn_rows - eager attention| at the last prompt token of `layer` on `n` items (fp32, no autocast):
    guards the attention aux against a transformers version whose attention differs from our recomputation."""
    from .testbed_model import LayerInputTap, attn_rows

    sb = SeqBuilder(tok)
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    seqs = []
    for it, canvas in data[:n]:
        imgs, slots = _views(canvas, target_box(it), "oracle-crop@256")
        seqs.append(sb.build(imgs, slots, item_prompt(it)[0], None, system=False))
    ids, mask, pos, _, images = collate(seqs, pad, model.config.image_token_id, device)
    images = [torch.from_numpy(im).to(device) for im in images]
    was_training = model.training
    model.eval()
    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    tap = LayerInputTap(model, layer)
    try:
        _, _, att = lm_forward(model, ids, mask, pos, images, output_attentions=True)
        q_idx = torch.tensor([s.n_prompt - 1 for s in seqs], device=ids.device)
        ours = attn_rows(model, layer, tap.out, pos, mask, q_idx)
        ref = att[layer][torch.arange(len(seqs), device=ids.device), :, q_idx].float()
        err = float((ours - ref).abs().max())
    finally:
        tap.remove()
        model.set_attn_implementation(prev)
        model.train(was_training)
    return err
