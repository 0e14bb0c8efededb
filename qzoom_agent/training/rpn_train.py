"""Q-Zoom Stage 1: train the SD-RPN (RoI head) on pseudo-labels (method.md §3.3, §3.4, §4).

One step reads as the method:
  1. encode each row's image at its coarse budget and build the engine's own coarse sequence (`coarse_batch`)
  2. run the frozen trunk to layer K without grad                                   → h_K
  3. RoI head on h_K (the engine's `_score_maps`: twig layers, last prompt token's q · visual k / √d, head mean)
  4. BCE-with-logits against the row's labels over non-ignored cells (`rpn_loss`; logits bilinearly resized
     when the grids differ), backward into the RoI head only
  5. AdamW (lr 1e-4, wd 0), cosine with 3 % warm-up, grad-norm clip 1; bf16 autocast on CUDA

Label rows (jsonl, from tools/make_pseudo_labels.py): {"id", "source": {"synthhr": question_id} | {"image": path},
"question", "budget", "grid": [H, W], "labels": H·W ints (1 FG, 0 BG, -100 ignore), "teacher", "peak"}.
Checkpoints (`out_dir/checkpoint`, atomic): roi_head.safetensors + optimizer.pt + trainer_state.json; a run
resumes from them with the same step counter, optimiser moments and LR schedule.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import QZoomError
from ..fusion import build_sequence, pad_batch
from ..images import load_image
from .head_trainer import (JsonlLog, RunBudget, StepChores, has_state_dir, load_state_dir, save_state_dir,
                           warmup_cosine, warmup_steps_of)

IGNORE = -100
CKPT_DIR = "checkpoint"


# ------------------------------------------------------------------------------------------------ data
def read_label_rows(path) -> list[dict]:
    """Rows of a pseudo-label jsonl, each checked: labels has grid H·W entries in {1, 0, -100}."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        H, W = row["grid"]
        if len(row["labels"]) != H * W:
            raise QZoomError(f"{path}:{n}: {len(row['labels'])} labels for a {H}x{W} grid")
        if not set(row["labels"]) <= {1, 0, IGNORE}:
            raise QZoomError(f"{path}:{n}: labels must be 1, 0 or -100")
        rows.append(row)
    return rows


def parse_synthhr_id(question_id: str) -> dict:
    """'synthhr-mini-test-attr-cue-00012' → {"scale": "mini", "split": "test", "subset": "attr-cue", "index": 12}."""
    parts = question_id.split("-")
    if len(parts) < 5 or parts[0] != "synthhr":
        raise QZoomError(f"not a SynthHR question id: {question_id!r}")
    return {"scale": parts[1], "split": parts[2], "subset": "-".join(parts[3:-1]), "index": int(parts[-1])}


def synthhr_item(question_id: str, n_candidates: int = 1):
    """(item dict, PIL image) re-rendered from its id (the config `testbed_eval.load_items` uses)."""
    from eval.synthhr import SynthHRConfig, make_item, render_item

    key = parse_synthhr_id(question_id)
    cfg = SynthHRConfig(scale=key["scale"], n_candidates=n_candidates)
    item = make_item(cfg, key["subset"], key["split"], key["index"])
    if item["question_id"] != question_id:
        raise QZoomError(f"SynthHR id {question_id!r} re-renders as {item['question_id']!r}")
    return item, render_item(item, cfg).convert("RGB")


def load_source(source: dict):
    """(PIL image, GT box px or None) of a label row's source."""
    if "image" in source:
        return load_image(source["image"]), source.get("gt_box")
    if "synthhr" in source:
        from .testbed_data import target_box

        item, img = synthhr_item(source["synthhr"], source.get("n_candidates", 1))
        return img, target_box(item)
    raise QZoomError(f"label source must hold 'image' or 'synthhr', got {sorted(source)}")


def apply_view(image, gt_box, view: dict | None):
    """The image the labels were made on: grey square padding when the row's `view` says so (pseudo labels at a
    fixed square grid, method.md §3.1), the GT box shifted into the padded frame."""
    if not view or not view.get("square_pad"):
        return image, gt_box
    from .teacher_attention import coarse_view

    cv = coarse_view(image, True, int(view.get("fill", 127)))
    if gt_box is not None:
        x0, y0 = cv.box_px[:2]
        gt_box = (gt_box[0] + x0, gt_box[1] + y0, gt_box[2] + x0, gt_box[3] + y0)
    return cv.image, gt_box


class RPNDataset(torch.utils.data.Dataset):
    """Label rows → {"id", "image" (PIL), "question", "budget", "labels" (H, W) long, "gt_box"}."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        image, gt_box = load_source(row["source"])
        image, gt_box = apply_view(image, gt_box, row.get("view"))
        H, W = row["grid"]
        labels = torch.tensor(row["labels"], dtype=torch.long).view(H, W)
        return {"id": row["id"], "image": image, "question": row["question"], "budget": int(row["budget"]),
                "labels": labels, "gt_box": gt_box}


def collate_rows(samples: list[dict]) -> list[dict]:
    """Keep rows as a list: encoding needs the model's ViT, so it happens in `coarse_batch`."""
    return samples


# -------------------------------------------------------------------------------------- forward, loss
@dataclass
class CoarseBatch:
    batch: object            # fusion.Batch of the coarse sequences
    blocks: list             # per row: [VisualBlock] (one image)


@torch.no_grad()
def coarse_batch(model, samples: list[dict]) -> CoarseBatch:
    """The engine's coarse pass input per row: image encoded at min(config min, budget)..budget tokens, the chat
    template, `build_sequence` + `pad_batch` (so positions are exactly the engine's)."""
    bb, c = model.backbone, model.config
    engine_samples, _ = model._samples([s["image"] for s in samples], [s["question"] for s in samples])
    blocks: list = [None] * len(samples)
    for budget in sorted({s["budget"] for s in samples}):      # one ViT call per budget
        rows = [i for i, s in enumerate(samples) if s["budget"] == budget]
        enc = bb.encode_images([engine_samples[i].images[0] for i in rows], min(c.min_visual_tokens, budget), budget)
        for i, b in zip(rows, enc):
            blocks[i] = [b]
    seqs = [build_sequence(s.template_ids, model._token_ids(), blk) for s, blk in zip(engine_samples, blocks)]
    return CoarseBatch(pad_batch(seqs, bb.image_token_id, bb.pad_id), blocks)


def rpn_logits(model, cb: CoarseBatch) -> list[torch.Tensor]:
    """RoI-head logits (H, W) per row; the trunk (layers 0..K-1) runs without grad, the head with grad."""
    batch = cb.batch
    with torch.no_grad():
        h0 = model._embed(batch)
        pe, mask = model._rope_and_mask(h0, batch.position_ids, batch.valid, h0.shape[1])
        h_K = model.backbone.run_layers(h0, 0, model.config.twig_K, pe, mask, None, model._deepstack(batch))
    maps = model._score_maps(batch, h_K, pe, mask, list(range(len(cb.blocks))), cb.blocks)
    return [per_image[0][0] for per_image in maps]


def resize_logits(logits_hw: torch.Tensor, grid_hw) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of a (h, w) map to grid_hw; unchanged when the grids agree."""
    H, W = grid_hw
    if tuple(logits_hw.shape) == (H, W):
        return logits_hw
    return F.interpolate(logits_hw[None, None].float(), size=(H, W), mode="bilinear", align_corners=False)[0, 0]


def rpn_loss(logits: list[torch.Tensor], labels: list[torch.Tensor],
             fg_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Mean BCE-with-logits over every non-ignored cell of the batch (zero, still differentiable, when none).
    `fg_weight` > 1 weighs FG cells up (BCE `pos_weight`; 1.0 is Q-Zoom's plain mean): for targets of one or two
    cells among thousands of BG cells, where the plain mean learns to say "background" everywhere.

    logits[b] (h, w) raw scores, labels[b] (H, W) in {1, 0, -100}. Stats: FG / BG accuracy at p = 0.5 (None if
    no such cell), counts.
    Worked example: logits [[0, 2]], labels [[1, -100]] → loss = -log σ(0) = log 2; the ignored cell never counts.
    """
    xs, ys = [], []
    for lg, lb in zip(logits, labels):
        lb = lb.to(lg.device)
        lg = resize_logits(lg.float(), lb.shape)
        keep = lb != IGNORE
        xs.append(lg[keep])
        ys.append(lb[keep].float())
    x, y = torch.cat(xs), torch.cat(ys)
    if x.numel() == 0:
        loss = sum(lg.float().sum() for lg in logits) * 0.0
    else:
        pw = None if fg_weight == 1.0 else torch.tensor(float(fg_weight), device=x.device)
        loss = F.binary_cross_entropy_with_logits(x, y, reduction="mean", pos_weight=pw)
    with torch.no_grad():
        pred = x > 0
        fg, bg = y == 1, y == 0
        stats = {"n_fg": int(fg.sum()), "n_bg": int(bg.sum()),
                 "fg_acc": float(pred[fg].float().mean()) if fg.any() else None,
                 "bg_acc": float((~pred[bg]).float().mean()) if bg.any() else None}
    return loss, stats


# ------------------------------------------------------------------------------------ what is trained
def freeze_all_but_roi_head(model) -> list[torch.nn.Parameter]:
    """requires_grad only on the RoI head's parameters (trunk, ViT, merger, embeddings, lm_head, gate frozen)."""
    if model.roi_head is None:
        raise QZoomError("the model has no RoI head to train (set config.has_roi_head and call init_heads)")
    model.requires_grad_(False)
    model.roi_head.requires_grad_(True)
    params = list(model.roi_head.parameters())
    assert_only_roi_head_trainable(model)
    return params


def assert_only_roi_head_trainable(model, check_grads: bool = False) -> None:
    """Every parameter outside the RoI head is frozen (and, with check_grads, holds no gradient)."""
    roi = {id(p) for p in model.roi_head.parameters()}
    for name, p in model.named_parameters():
        if id(p) in roi:
            continue
        if p.requires_grad:
            raise AssertionError(f"{name} is trainable but is not part of the RoI head")
        if check_grads and p.grad is not None:
            raise AssertionError(f"{name} received a gradient but is not part of the RoI head")


# -------------------------------------------------------------------------------------------- schedule
def cosine_with_warmup(step: int, total_steps: int, warmup_ratio: float) -> float:
    """LR multiplier: linear warm-up over ceil(warmup_ratio · total) steps, then cosine to 0 (HF's schedule)."""
    return warmup_cosine(step, total_steps, warmup_steps_of(warmup_ratio, total_steps))


@dataclass
class RPNTrainConfig:
    """Stage-1 optimisation (method.md §3.4 defaults) and run control."""

    steps: int = 1000                 # length of the whole schedule (over all resumed runs)
    batch_size: int = 16
    lr: float = 1e-4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    beta2: float = 0.999              # the Q-Zoom script leaves HF's default (method.md §3.4)
    max_grad_norm: float = 1.0
    fg_weight: float = 1.0            # BCE pos_weight of FG cells (1.0: Q-Zoom's plain mean; see rpn_loss)
    minutes: float = 0.0              # stop this run after so many minutes (0: no limit); resume continues
    ckpt_every: int = 200             # steps between checkpoints (plus one at the end of every run)
    log_every: int = 10
    eval_every: int = 0               # steps between RoI-recall evals (0: only at the end, if eval items given)
    seed: int = 0
    num_workers: int = 0              # DataLoader workers (image loading / SynthHR rendering)
    resume: bool = True               # continue from out_dir/checkpoint when it exists

    def __post_init__(self) -> None:
        if not self.fg_weight > 0:
            raise QZoomError(f"fg_weight must be > 0 (1.0: Q-Zoom's plain mean BCE), got {self.fg_weight}")


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Row indices of global step `step`: epoch-wise seeded permutations, so a resumed run sees the same rows."""
    out = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, pos = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.extend(perm[pos:pos + batch_size - len(out)].tolist())
    return out


class _StepSampler(torch.utils.data.Sampler):
    def __init__(self, n: int, cfg: RPNTrainConfig, start: int) -> None:
        self.n, self.cfg, self.start = n, cfg, start

    def __iter__(self):
        for step in range(self.start, self.cfg.steps):
            yield batch_indices(self.n, self.cfg.batch_size, self.cfg.seed, step)

    def __len__(self) -> int:
        return max(0, self.cfg.steps - self.start)


# ------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(model, optimizer, scheduler, step: int, path) -> None:
    """Atomic folder: roi_head.safetensors (the `roi.*` head tensors), optimizer.pt, trainer_state.json."""
    roi = {k: v for k, v in model.heads_state_dict().items() if k.startswith("roi.")}
    save_state_dir(path, roi, "roi_head.safetensors", optimizer, scheduler, {"step": step})


def load_checkpoint(model, optimizer, scheduler, path) -> int:
    """Restore head weights, optimiser and scheduler from `save_checkpoint`; returns the step to continue at."""
    state, trainer = load_state_dir(path, "roi_head.safetensors", optimizer, scheduler, model.device)
    model.roi_head.load_state_dict({k[len("roi."):]: v for k, v in state.items()}, strict=True)
    return int(trainer["step"])


# ------------------------------------------------------------------------------------------------- eval
def box_coverage(gt_box, box) -> float:
    """Share of the GT box's area inside `box` (both x0, y0, x1, y1 px)."""
    ix = max(0, min(gt_box[2], box[2]) - max(gt_box[0], box[0]))
    iy = max(0, min(gt_box[3], box[3]) - max(gt_box[1], box[1]))
    area = max(1, (gt_box[2] - gt_box[0]) * (gt_box[3] - gt_box[1]))
    return ix * iy / area


@torch.no_grad()
def roi_recall(model, items: list[dict], *, budget: int | None = None, cover: float = 0.9) -> dict:
    """Measurement only: share of items whose GT box is ≥ `cover` inside the proposed box (QZoomModel.propose),
    mean proposal area as a share of the image, and how many items got no box. items: {image, question, gt_box}."""
    hits, areas, empty = 0, [], 0
    was_training = model.training
    model.eval()
    use_bf16 = model.device.type == "cuda"
    for it in items:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            rois = model.propose(it["image"], it["question"], max_visual_tokens=budget or it.get("budget"))
        if not rois:
            empty += 1
            continue
        box = rois[0].box
        W, H = it["image"].size
        areas.append((box[2] - box[0]) * (box[3] - box[1]) / (W * H))
        hits += box_coverage(it["gt_box"], box) >= cover
    model.train(was_training)
    n = len(items)
    return {"n": n, "recall": hits / n if n else None, "mean_area": sum(areas) / len(areas) if areas else None,
            "n_empty": empty}


# ---------------------------------------------------------------------------------------------- train
def train_rpn(model, dataset, cfg: RPNTrainConfig, out_dir, *, eval_items: list[dict] | None = None,
              eval_budget: int | None = None, progress: bool = True) -> dict:
    """Train the RoI head for cfg.steps (or until cfg.minutes), resuming from out_dir/checkpoint.

    Writes out_dir/train_log.jsonl (loss, FG/BG accuracy, lr, step time; eval records) and checkpoints every
    cfg.ckpt_every steps and at the end. Returns {"step", "done", "last": last log record, "eval": last eval}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(out_dir / "train_log.jsonl")
    params = freeze_all_but_roi_head(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, cfg.steps, cfg.warmup_ratio))
    step = 0
    ckpt = out_dir / CKPT_DIR
    if cfg.resume and has_state_dir(ckpt):
        step = load_checkpoint(model, optimizer, scheduler, ckpt)
        log.write({"event": "resume", "step": step})
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=_StepSampler(len(dataset), cfg, step),
                                         collate_fn=collate_rows, num_workers=cfg.num_workers)
    use_bf16 = model.device.type == "cuda"
    model.train()
    budget = RunBudget(minutes=cfg.minutes)
    last, last_eval, checked = None, None, False
    chores = StepChores(total_steps=cfg.steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, log=log,
                        budget=budget, save=lambda st: save_checkpoint(model, optimizer, scheduler, st, ckpt),
                        start_step=step, desc="rpn", progress=progress)
    for samples in loader:
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            logits = rpn_logits(model, coarse_batch(model, samples))
        loss, stats = rpn_loss(logits, [s["labels"] for s in samples], cfg.fg_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not checked:
            assert_only_roi_head_trainable(model, check_grads=True)
            checked = True
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        step += 1
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        last = {"step": step, "loss": float(loss.detach()), "lr": lr, "grad_norm": float(grad_norm),
                "step_s": round(time.perf_counter() - t0, 4), **stats}
        chores.record(step, last)
        if eval_items and cfg.eval_every and step % cfg.eval_every == 0:
            last_eval = {"step": step, "eval": roi_recall(model, eval_items, budget=eval_budget)}
            log.write(last_eval)
        if chores.checkpoint(step):
            break
    chores.close(step)
    if eval_items and (last_eval is None or last_eval["step"] != step):
        last_eval = {"step": step, "eval": roi_recall(model, eval_items, budget=eval_budget)}
        log.write(last_eval)
    return {"step": step, "done": step >= cfg.steps, "last": last, "eval": last_eval,
            "config": asdict(cfg)}
