"""SD-RPN / Q-Zoom Stage-1 pseudo labels (method.md §3.1–§3.2): teacher map → FG/BG/ignore cells, stored as jsonl.

    maps    = teacher_maps(qzoom, views, questions, heads)           # teacher_attention.py
    ranked  = rank_heads(visual_attention(qzoom, views, qs, all_layers))   # GT-free: peakiness + agreement
    labels  = denoise(map.attn_hw, map.sink_hw, map.pad_hw)           # int8 (H, W): 1 FG, 0 BG, -100 ignore
    quality = label_quality(labels, gt_box_cells)                     # a measurement only (GT never steers)
    LabelWriter(path).write([label_row(...), ...])                    # atomic, resumable jsonl

Denoising (§3.2), on the (H, W) map of the chosen heads' mean attention:
  1. sink cells (bool mask, or a sink-attention map ≥ sink_thresh) and padding cells are zeroed;
  2. FG = cells > fg_coeff · max (0.25);
  3. the FG box is the tight box of the 3×3, σ = 1 Gaussian blur of the thresholded map (> box_blur_thresh, 0:
     the FG cells' box dilated by one cell where the grid allows);
  4. BG = cells outside that box whose (sink-removed) attention < bg_coeff · max (0.05); padding is always BG;
  5. everything else is ignore (-100);
  6. the whole sample is ignore when the FG box covers ≥ max_box_ratio (0.5) of the grid or the peak < min_peak
     (5e-3).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..roi import gaussian_blur3, union_box_cells

FG, BG, IGNORE = 1, 0, -100


@dataclass
class DenoiseParams:
    """§3.2 thresholds (Q-Zoom's Stage-1 values)."""

    fg_coeff: float = 0.25          # FG: attention > fg_coeff · max (roi_binary_coeff)
    bg_coeff: float = 0.05          # BG: outside the FG box and attention < bg_coeff · max (bg_coff)
    sink_thresh: float = 0.01       # a float sink map marks sinks at >= this (roi_sink_threshold)
    max_box_ratio: float = 0.5      # whole-sample ignore when the FG box covers >= this share of the grid
    min_peak: float = 5e-3          # whole-sample ignore when the sink-removed peak is below this
    blur_sigma: float = 1.0
    box_blur_thresh: float = 0.0    # FG box: blurred thresholded map > this


def _as_sink_mask(sink_hw, shape, params: DenoiseParams) -> torch.Tensor:
    if sink_hw is None:
        return torch.zeros(shape, dtype=torch.bool)
    sink_hw = torch.as_tensor(sink_hw)
    if sink_hw.shape != shape:
        raise ValueError(f"sink map shape {tuple(sink_hw.shape)} != attention map shape {tuple(shape)}")
    return sink_hw if sink_hw.dtype == torch.bool else sink_hw.float() >= params.sink_thresh


def clean_map(attn_hw, sink_hw=None, pad_hw=None, params: DenoiseParams = DenoiseParams()) -> torch.Tensor:
    """(H, W) float32 attention with sink and padding cells zeroed (§3.2 steps 1–2)."""
    attn_hw = torch.as_tensor(attn_hw).float()
    if attn_hw.ndim != 2:
        raise ValueError(f"attention map must be (H, W), got shape {tuple(attn_hw.shape)}")
    drop = _as_sink_mask(sink_hw, attn_hw.shape, params)
    if pad_hw is not None:
        drop = drop | torch.as_tensor(pad_hw, dtype=torch.bool)
    return attn_hw.masked_fill(drop, 0.0)


def fg_box_cells(clean_hw: torch.Tensor, params: DenoiseParams = DenoiseParams()):
    """(FG mask (H, W) bool, FG box (x0, y0, x1, y1) end-exclusive or None) of a sink-removed map (§3.2 3–4)."""
    peak = float(clean_hw.max())
    fg = clean_hw > params.fg_coeff * peak if peak > 0 else torch.zeros_like(clean_hw, dtype=torch.bool)
    blurred = gaussian_blur3(fg.float(), params.blur_sigma)
    return fg, union_box_cells(blurred > params.box_blur_thresh + 1e-6)


def denoise(attn_hw, sink_hw=None, pad_hw=None, params: DenoiseParams = DenoiseParams()) -> torch.Tensor:
    """Teacher map → labels int8 (H, W) in {1 FG, 0 BG, -100 ignore} (§3.2; see the module docstring).

    attn_hw: (H, W) attention; sink_hw: bool (H, W) sink mask or float sink attention (≥ params.sink_thresh), or
    None; pad_hw: bool (H, W), True = padding (always BG unless the whole sample is ignored).
    Example (6×6, no sinks): a single 1.0 at (row 1, col 1), 0.01 elsewhere → FG = {(1, 1)}, FG box = rows/cols
    0..2 (dilated by the blur, 9 of 36 cells), BG = the 27 cells outside it, the 8 other cells in the box ignore.
    """
    clean = clean_map(attn_hw, sink_hw, pad_hw, params)
    H, W = clean.shape
    labels = torch.full((H, W), IGNORE, dtype=torch.int8)
    peak = float(clean.max())
    if peak < params.min_peak:
        return labels
    fg, box = fg_box_cells(clean, params)
    if box is None:
        return labels
    x0, y0, x1, y1 = box
    if (x1 - x0) * (y1 - y0) >= params.max_box_ratio * H * W:
        return labels
    outside = torch.ones(H, W, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    labels[outside & (clean < params.bg_coeff * peak)] = BG
    labels[fg] = FG
    if pad_hw is not None:
        labels[torch.as_tensor(pad_hw, dtype=torch.bool)] = BG
    return labels


def is_ignored(labels: torch.Tensor) -> bool:
    """Whole-sample ignore: no cell carries a label."""
    return bool((torch.as_tensor(labels) == IGNORE).all())


# ------------------------------------------------------------------------------------------------ quality (GT)

def _box_iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def label_quality(labels, gt_box_cells) -> dict:
    """Measurement only: FG precision (FG cells inside the GT box), FG recall (GT cells labelled FG), IoU of the
    FG cells' tight box with the GT box; None where undefined (an ignored sample, no FG cell).

    Example: labels FG at (row 1, cols 1..2), GT box (1, 1, 2, 2) → precision 0.5, recall 1.0, IoU 0.5.
    """
    labels = torch.as_tensor(labels)
    gt = torch.zeros(labels.shape, dtype=torch.bool)
    x0, y0, x1, y1 = (int(v) for v in gt_box_cells)
    gt[y0:y1, x0:x1] = True
    if is_ignored(labels):
        return dict(ignored=True, fg_precision=None, fg_recall=None, box_iou=None, n_fg=0)
    fg = labels == FG
    n_fg = int(fg.sum())
    if n_fg == 0:
        return dict(ignored=False, fg_precision=None, fg_recall=0.0, box_iou=0.0, n_fg=0)
    return dict(ignored=False, fg_precision=float((fg & gt).sum()) / n_fg,
                fg_recall=float((fg & gt).sum()) / max(1, int(gt.sum())),
                box_iou=_box_iou(union_box_cells(fg), (x0, y0, x1, y1)), n_fg=n_fg)


def summarize_quality(rows: list[dict]) -> dict:
    """Means over samples (ignored ones excluded from the FG metrics) and the ignored share."""
    def mean(key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return round(float(np.mean(vals)), 4) if vals else None

    return dict(n=len(rows), ignored_share=round(float(np.mean([r["ignored"] for r in rows])), 4) if rows else None,
                fg_precision=mean("fg_precision"), fg_recall=mean("fg_recall"), box_iou=mean("box_iou"),
                mean_fg_cells=mean("n_fg"))


# ------------------------------------------------------------------------------------------------ head choice

def rank_heads(attn: list[torch.Tensor], layers: list[int]) -> list[dict]:
    """GT-free ranking of (layer, head) pairs, best first, from unlabelled samples' attention.

    attn: per sample (layers, heads, H, W) attention to the image tokens (`VisualAttention.attn`); layers: the
    layer index of each row. Scores as the testbed's `pointing` choice (testbed_eval.head_choice_scores):
    peakiness (mean max share of the head's attention renormalised over the image) + agreement of its argmax with
    the other layers' head-mean argmax, each z-scored. Nothing here can see a box.
    """
    from .testbed_eval import head_choice_scores

    peaks, argmaxes = [], []
    for a in attn:
        n_l, n_h, H, W = a.shape
        p = a.reshape(n_l, n_h, H * W).double()
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
        peaks.append(p.max(-1).values.numpy())
        argmaxes.append((p.argmax(-1).numpy(), p.mean(1).argmax(-1).numpy(), (H, W)))
    pk, ag, z = head_choice_scores(np.stack(peaks), argmaxes)
    order = np.argsort(-z, axis=None, kind="stable")
    out = []
    for flat in order:
        li, hi = np.unravel_index(flat, z.shape)
        out.append(dict(layer=int(layers[li]), head=int(hi), score=round(float(z[li, hi]), 4),
                        peakiness=round(float(pk[li, hi]), 4), agreement=round(float(ag[li, hi]), 4)))
    return out


def choose_heads(ranked: list[dict], n: int = 4) -> list[tuple[int, int]]:
    """The top `n` (layer, head) pairs of a `rank_heads` list."""
    return [(r["layer"], r["head"]) for r in ranked[:n]]


def head_choice_warning(ranked: list[dict], n: int = 4, min_agreement: float = 0.3) -> str | None:
    """A message when the top `n` heads of a `rank_heads` list agree too little with the other layers to trust.

    GT-free, like the ranking. On the testbed (eval/results/qzoom_heads_testbed.md, sixth session) the chosen heads'
    mean agreement was 0.8 on attr-cue and 0.5 on attr-cue + fsp-4k, whose labels had an FG precision of 0.95-0.99.
    On 4 fsp-4k items alone it was 0.2, and the labels' FG precision fell to 0.07.
    """
    top = ranked[:n]
    if not top:
        return None
    mean = sum(r["agreement"] for r in top) / len(top)
    if mean >= min_agreement:
        return None
    return (f"the chosen teacher heads agree with the other layers on {mean:.2f} of the head-selection items "
            f"(< {min_agreement}): the choice is likely noise. Use more head-selection items (--head_n) or more "
            f"subsets (--subsets), and check the labels' quality before training on them")


def pointing_hits(head_hw: torch.Tensor, gt_box_cells) -> list[bool]:
    """Per head (n, H, W): is its argmax cell inside the GT box? (reporting only)"""
    n, H, W = head_hw.shape
    am = head_hw.reshape(n, -1).argmax(-1)
    r, c = am // W, am % W
    x0, y0, x1, y1 = gt_box_cells
    return [bool(x0 <= int(cc) < x1 and y0 <= int(rr) < y1) for rr, cc in zip(r, c)]


# ------------------------------------------------------------------------------------------------ storage

def label_row(sample_id: str, source: dict, question: str, budget: int, labels: torch.Tensor,
              heads: list[tuple[int, int]], query: str, peak: float, view: dict | None = None) -> dict:
    """One jsonl row. labels: int8 (H, W) stored row-major as a list of ints. `view` says how the source was
    turned into the encoded image (e.g. {"square_pad": True, "fill": 127}), so a trainer can rebuild the same grid."""
    labels = torch.as_tensor(labels)
    H, W = labels.shape
    row = {"id": str(sample_id), "source": dict(source), "question": question, "budget": int(budget),
           "grid": [int(H), int(W)], "labels": [int(v) for v in labels.reshape(-1).tolist()],
           "teacher": {"heads": [[int(l), int(h)] for l, h in heads], "query": query}, "peak": float(peak)}
    if view is not None:
        row["view"] = dict(view)
    return row


def row_labels(row: dict) -> torch.Tensor:
    """int8 (H, W) labels of a stored row."""
    H, W = row["grid"]
    return torch.tensor(row["labels"], dtype=torch.int8).view(H, W)


def _read_complete_lines(path: Path) -> tuple[list[dict], int]:
    """Rows of the complete (newline-terminated, parseable) lines and the byte length they span."""
    rows, good = [], 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good += len(line)
    return rows, good


def read_labels(path) -> list[dict]:
    """All rows of a finished pseudo-label file."""
    return _read_complete_lines(Path(path))[0]


class LabelWriter:
    """Atomic, resumable jsonl writer. Rows are appended in chunks (flushed, fsynced) to `<path>.partial`; `close()`
    renames it onto `path`. A run that dies leaves `path` as it was and the partial file, whose complete lines are
    kept on resume (a torn last line is cut). `done` holds the ids already written (from either file)."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.partial.exists():
            rows, good = _read_complete_lines(self.partial)
            with open(self.partial, "r+b") as f:
                f.truncate(good)
        elif self.path.exists():
            rows, _ = _read_complete_lines(self.path)
            with open(self.partial, "wb") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
        else:
            rows = []
            self.partial.touch()
        self.done = {r["id"] for r in rows}

    def write(self, rows: list[dict]) -> None:
        rows = [r for r in rows if r["id"] not in self.done]
        if not rows:
            return
        with open(self.partial, "ab") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
            f.flush()
            os.fsync(f.fileno())
        self.done.update(r["id"] for r in rows)

    def close(self) -> Path:
        os.replace(self.partial, self.path)
        return self.path
