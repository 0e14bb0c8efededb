"""Teacher attention for SD-RPN pseudo labels (method.md §3.1, evaluation.md §5.4): the frozen base model's
attention from the answer side to the image tokens, per (layer, head), at a fixed coarse budget.

    view            = coarse_view(image, square_pad)        # grey (127) square padding, centred (§3.1)
    attn            = visual_attention(qzoom, views, questions, layers, budget=576)
                      # per sample (layers, heads, H, W): softmax(q·k/√d) rows of the query positions, restricted
                      # to the image tokens (not renormalised), averaged over the query positions
    maps            = teacher_maps(qzoom, views, questions, heads, budget=576)  # mean over the chosen heads

Queries: "last_prompt" (the token before the first response token; what the twig is trained to mimic, §3.3 and
the cheap route of §5.4) or "response" (each decode step's query: the last prompt token and every response token
but the last, averaged, as Q-Zoom's hooks record during generation; the response is teacher-forced, given or
generated greedily first). q and k are recomputed from each layer's input (`Backbone.qk_for_scores`, the same call
the RoI head uses), so no eager attention or `output_attentions` is needed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image

from .. import roi as roi_lib
from ..fusion import build_sequence, pad_batch
from ..heads import RoIHead

QUERIES = ("last_prompt", "response")


@dataclass
class CoarseView:
    """The image the teacher sees. image: padded (or not) PIL RGB; box_px: the source image inside it (x0, y0, x1,
    y1) px; source_wh: the source image's (width, height)."""

    image: Image.Image
    box_px: tuple[int, int, int, int]
    source_wh: tuple[int, int]

    def to_view_px(self, box_px) -> tuple[int, int, int, int]:
        """A box in source px → px in the (padded) view."""
        x0, y0 = self.box_px[:2]
        return (int(box_px[0]) + x0, int(box_px[1]) + y0, int(box_px[2]) + x0, int(box_px[3]) + y0)


def coarse_view(image: Image.Image, square_pad: bool = True, fill: int = 127) -> CoarseView:
    """Pad to a square with grey `fill`, the source centred (as LLaVA's expand2square); unpadded when not asked."""
    image = image.convert("RGB")
    w, h = image.size
    if not square_pad or w == h:
        return CoarseView(image, (0, 0, w, h), (w, h))
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), (fill, fill, fill))
    x0, y0 = (side - w) // 2, (side - h) // 2
    canvas.paste(image, (x0, y0))
    return CoarseView(canvas, (x0, y0, x0 + w, y0 + h), (w, h))


def padding_mask(view: CoarseView, block) -> torch.Tensor:
    """bool (H, W) on the block's grid: True for cells with no source pixel (pure padding)."""
    gh, gw = block.grid_hw
    inside = roi_lib.pixels_to_cells(view.box_px, block.resized_hw[0] // gh, block.resized_hw, block.original_hw,
                                     block.grid_hw)
    pad = torch.ones(gh, gw, dtype=torch.bool)
    x0, y0, x1, y1 = inside
    pad[y0:y1, x0:x1] = False
    return pad


@dataclass
class VisualAttention:
    """One sample. attn: (layers, heads, H, W) attention to the image tokens (rows averaged over the queries);
    layers: the layer index of each row of `attn`; block: the encoded view (grid, resized/original px);
    sink_logits_hw: Qwen3's first-token head-0 logits at the last layer asked (None for other families)."""

    attn: torch.Tensor
    layers: list[int]
    block: object
    sink_logits_hw: torch.Tensor | None = None


def _query_columns(batch, n_resp: list[int], query: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns (B, R) long, row mask (B, R) bool) of the query positions in the left-padded batch."""
    L = batch.input_ids.shape[1]
    rows = []
    for n in n_resp:
        last_prompt = L - 1 - n
        rows.append([last_prompt] if query == "last_prompt" else list(range(last_prompt, L - 1)) or [last_prompt])
    R = max(len(r) for r in rows)
    cols = torch.tensor([r + [r[-1]] * (R - len(r)) for r in rows], dtype=torch.long)
    ok = torch.tensor([[i < len(r) for i in range(R)] for r in rows], dtype=torch.bool)
    return cols, ok


def _attention_rows(q, k, valid, cols):
    """softmax(q·k/√d) of the query columns: (B, heads, R, L) float32, causal and padding keys masked."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    idx = cols[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1])
    q_rows = q.gather(2, idx)                                                    # (B, heads, R, hd)
    logits = (q_rows.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    keys = torch.arange(k.shape[2], device=q.device)
    allowed = valid[:, None, :] & (keys[None, None, :] <= cols[:, :, None])     # (B, R, L)
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return logits.softmax(-1)


@torch.no_grad()
def visual_attention(qzoom, views: list[CoarseView], questions: list[str], layers: list[int], *,
                     budget: int = 576, query: str = "last_prompt",
                     responses: list[str] | None = None) -> list[VisualAttention]:
    """Per sample the attention of the query positions to the image tokens at `layers` (all heads)."""
    if query not in QUERIES:
        raise ValueError(f"query must be one of {QUERIES}, got {query!r}")
    bb = qzoom.backbone
    layers = sorted(set(int(x) for x in layers))
    if not layers or layers[0] < 0 or layers[-1] >= bb.num_layers:
        raise ValueError(f"layers must lie in 0..{bb.num_layers - 1}, got {layers}")
    blocks = bb.encode_images([v.image for v in views], budget, budget)
    tok = qzoom.processor.tokenizer
    resp_ids = [[] for _ in views]
    if query == "response":
        if responses is None:
            answers = qzoom.answer([v.image for v in views], list(questions), mode="base",
                                   min_visual_tokens=budget, max_visual_tokens=budget)
            responses = [a.text for a in answers]
        resp_ids = [tok(r, add_special_tokens=False)["input_ids"] for r in responses]
    seqs = [build_sequence(qzoom._template_ids(1, q) + r, qzoom._token_ids(), [b])
            for q, r, b in zip(questions, resp_ids, blocks)]
    batch = pad_batch(seqs, bb.image_token_id, bb.pad_id)
    cols, row_ok = _query_columns(batch, [len(r) for r in resp_ids], query)
    cols, row_ok = cols.to(qzoom.device), row_ok.to(qzoom.device)
    valid = batch.valid.to(qzoom.device)
    h = qzoom._embed(batch)
    pe, mask = qzoom._rope_and_mask(h, batch.position_ids, batch.valid, h.shape[1])
    deep = qzoom._deepstack(batch)
    vis_cols = [batch.visual[b].nonzero().squeeze(-1).to(qzoom.device) for b in range(len(views))]
    per_layer, sink_logits = [], None
    for i in range(layers[-1] + 1):
        if i in layers:
            attn_mod = bb.layers[i].self_attn
            q, k = bb.qk_for_scores(attn_mod, bb.layers[i].input_layernorm(h), pe)
            a = _attention_rows(q, k, valid, cols)                               # (B, heads, R, L)
            w = row_ok[:, None, :, None].float()
            per_layer.append((a * w).sum(2) / w.sum(2))                          # (B, heads, L)
            if i == layers[-1] and bb.sink_rule() == "qwen3_token":
                first = torch.tensor([batch.input_ids.shape[1] - n for n in batch.lengths], device=qzoom.device)
                sink_logits = RoIHead.first_token_scores(q, k.repeat_interleave(q.shape[1] // k.shape[1], 1), first)
        h = bb.run_layers(h, i, i + 1, pe, mask, None, deep)
    out = []
    for b, block in enumerate(blocks):
        H, W = block.grid_hw
        a = torch.stack([pl[b, :, vis_cols[b]] for pl in per_layer])               # (layers, heads, N)
        s = None if sink_logits is None else sink_logits[b, vis_cols[b]].view(H, W).float().cpu()
        out.append(VisualAttention(a.view(len(layers), a.shape[1], H, W).float().cpu(), layers, block, s))
    return out


def sink_mask(qzoom, va: VisualAttention) -> torch.Tensor:
    """bool (H, W), True = attention sink, by the model's inference-time rule (config.sink_rule / family)."""
    c = qzoom.config
    rule = qzoom.backbone.sink_rule() if c.sink_rule == "auto" else c.sink_rule
    grid = va.block.grid_hw
    if rule == "qwen25_corner":
        return roi_lib.qwen25_sink_mask(grid, min_cells=c.sink_min_cells)
    if rule == "qwen3_token" and va.sink_logits_hw is not None:
        return roi_lib.qwen3_sink_mask(va.sink_logits_hw, c.qwen3_sink_thresh)
    return torch.zeros(grid, dtype=torch.bool)


@dataclass
class TeacherMap:
    """One sample's teacher signal on the coarse grid. attn_hw: (H, W) mean over the chosen heads; head_hw:
    (n_heads, H, W) each chosen head; sink_hw / pad_hw: bool (H, W); block: the encoded view."""

    attn_hw: torch.Tensor
    head_hw: torch.Tensor
    sink_hw: torch.Tensor
    pad_hw: torch.Tensor
    block: object


@torch.no_grad()
def teacher_maps(qzoom, views: list[CoarseView], questions: list[str], heads: list[tuple[int, int]], *,
                 budget: int = 576, query: str = "last_prompt",
                 responses: list[str] | None = None) -> list[TeacherMap]:
    """Teacher maps averaged over the chosen (layer, head) pairs, with the family's sink map and the padding."""
    heads = [(int(l), int(h)) for l, h in heads]
    if not heads:
        raise ValueError("teacher_maps needs at least one (layer, head)")
    vas = visual_attention(qzoom, views, questions, [l for l, _ in heads], budget=budget, query=query,
                           responses=responses)
    out = []
    for view, va in zip(views, vas):
        head_hw = torch.stack([va.attn[va.layers.index(l), h] for l, h in heads])
        out.append(TeacherMap(head_hw.mean(0), head_hw, sink_mask(qzoom, va), padding_mask(view, va.block), va.block))
    return out
