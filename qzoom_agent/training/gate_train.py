"""Q-Zoom Stage 3: train the dynamic gate (GateHead) on consistency labels (method.md §2, §4).

Per step: every sample redraws its (budget, label) with `gate_labels.draw_label`; its image is encoded at exactly
that budget (min = max tokens); the frozen trunk runs layers 0..K-1 (the engine's own code paths, no grad); the
GateHead logit at the last prompt token gets BCEWithLogits, labels −100 ignored. Only gate parameters train.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import QZoomError
from ..fusion import build_sequence, pad_batch
from ..heads import GateHead
from .gate_labels import IGNORE, draw_label
from .head_trainer import (JsonlLog, RunBudget, head_tensors, load_state_file, restore_rng, rng_state,
                           save_state_file, warmup_cosine)


# ------------------------------------------------------------------------------------------- model
def enable_gate(model) -> GateHead:
    """Give `model` a fresh gate (copies of layers K..K+gate_T-1, zero-init linear) if it has none; other heads
    are left as they are. Sets config.has_gate so save_pretrained / from_pretrained carry it."""
    c = model.config
    c.has_gate = True
    c.validate(num_layers=model.backbone.num_layers)
    if model.gate_head is None:
        model.gate_head = GateHead(model.backbone, c.twig_K, c.gate_T)
    return model.gate_head


def freeze_all_but_gate(model) -> list[nn.Parameter]:
    """requires_grad only on the gate's parameters; returns them (asserting nothing else trains)."""
    if model.gate_head is None:
        raise QZoomError("the model has no gate head (call enable_gate first)")
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.gate_head.parameters())
    for p in params:
        p.requires_grad_(True)
    gate_ids = {id(p) for p in params}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in gate_ids]
    assert not trainable, f"non-gate parameters would train: {trainable[:5]}"
    return params


def gate_logits(model, images: Sequence, prompts: Sequence[str], budgets: Sequence[int]) -> torch.Tensor:
    """(B,) gate logits, each image encoded at exactly its budget; trunk 0..K-1 without grad, gate with grad."""
    bb, K = model.backbone, model.config.twig_K
    samples, _ = model._samples(list(images), list(prompts))
    for s in samples:
        if len(s.images) != 1:
            raise QZoomError("gate training takes one image per sample")
    for B in sorted(set(int(b) for b in budgets)):                  # one ViT call per distinct budget
        idx = [i for i, b in enumerate(budgets) if int(b) == B]
        for i, block in zip(idx, bb.encode_images([samples[i].images[0] for i in idx], B, B)):
            samples[i].blocks = [block]
    batch = pad_batch([build_sequence(s.template_ids, model._token_ids(), s.blocks) for s in samples],
                      bb.image_token_id, bb.pad_id)
    with torch.no_grad():
        h0 = model._embed(batch)
        pe, mask = model._rope_and_mask(h0, batch.position_ids, batch.valid, h0.shape[1])
        h_K = bb.run_layers(h0, 0, K, pe, mask, None, model._deepstack(batch))
    return model.gate_head(h_K.detach(), pe, mask)


def gate_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean BCEWithLogits over labels ≠ −100 (0 with a graph when all are ignored)."""
    keep = labels != IGNORE
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return nn.functional.binary_cross_entropy_with_logits(logits[keep].float(), labels[keep].float())


# ------------------------------------------------------------------------------------------- data
class GateDataset:
    """Kept label records + images; `fetch(i, rng)` redraws (budget, label) every time it is called."""

    def __init__(self, records: Sequence[dict], image_fn: Callable[[str], object]) -> None:
        self.records = list(records)
        self.image_fn = image_fn

    def __len__(self) -> int:
        return len(self.records)

    def fetch(self, i: int, rng: random.Random) -> dict:
        r = self.records[i]
        budget, label = draw_label(r, rng)
        return {"id": r["id"], "image": self.image_fn(r["id"]), "prompt": r["prompt"], "budget": budget,
                "label": label}


# ------------------------------------------------------------------------------------------- training
@dataclass
class GateTrainConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    max_steps: int = 200
    batch_size: int = 16
    clip_norm: float = 1.0
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 50
    max_minutes: float = 0.0                   # > 0: stop (and checkpoint) after this many minutes
    stop_after_steps: int = 0                  # > 0: stop (and checkpoint) after this many steps in this call


def lr_at(step: int, cfg: GateTrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine to 0 at max_steps."""
    return cfg.lr * warmup_cosine(step, cfg.max_steps, cfg.warmup_steps)


def save_train_state(path: Path, model, opt, step: int, rng: random.Random, order: list[int]) -> None:
    """Gate weights, optimiser, step, the label/shuffle RNG and the pending epoch order, written atomically."""
    save_state_file(path, {"gate": head_tensors(model.gate_head), "optimizer": opt.state_dict(), "step": step,
                           "order": list(order), **rng_state(rng)})


def load_train_state(path: Path, model, opt) -> tuple[int, random.Random, list[int]]:
    state = load_state_file(path)
    model.gate_head.load_state_dict(state["gate"])
    opt.load_state_dict(state["optimizer"])
    return int(state["step"]), restore_rng(state), list(state["order"])


def train_gate(model, dataset: GateDataset, cfg: GateTrainConfig, out_dir: str | Path, *,
               log: Callable[[str], None] = print) -> dict:
    """Train the gate; resumes from out_dir/train_state.pt; logs JSON lines to out_dir/train_log.jsonl.

    Returns {"step", "done", "last_loss"}; `done` is False when stopped by max_minutes (run again to resume).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_file, train_log = out_dir / "train_state.pt", JsonlLog(out_dir / "train_log.jsonl", echo=log)
    params = freeze_all_but_gate(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, rng, order = 0, random.Random(cfg.seed), []
    if state_file.exists():
        step, rng, order = load_train_state(state_file, model, opt)
        log(f"resumed at step {step}")
    cuda = model.device.type == "cuda"
    model.eval()                                  # no dropout in the frozen trunk
    model.gate_head.train()
    budget, last_loss, start = RunBudget(cfg.max_minutes, cfg.stop_after_steps), None, step
    while step < cfg.max_steps:
        if budget.spent(step - start):
            break
        while len(order) < cfg.batch_size:
            order += rng.sample(range(len(dataset)), len(dataset))
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        items = [dataset.fetch(i, rng) for i in idx]
        labels = torch.tensor([it["label"] for it in items], device=model.device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = gate_logits(model, [it["image"] for it in items], [it["prompt"] for it in items],
                                 [it["budget"] for it in items])
        loss = gate_loss(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm))
        opt.step()
        step += 1
        last_loss = float(loss.detach())
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            row = {"step": step, "loss": round(last_loss, 5), "lr": opt.param_groups[0]["lr"],
                   "grad_norm": round(grad_norm, 4), "pos_share": round(float((labels == 1).float().mean()), 3),
                   "seconds": round(budget.elapsed_s(), 1)}
            train_log.write(row)
        if step % cfg.ckpt_every == 0:
            save_train_state(state_file, model, opt, step, rng, order)
    save_train_state(state_file, model, opt, step, rng, order)
    return {"step": step, "done": step >= cfg.max_steps, "last_loss": last_loss}


# ------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def gate_probs(model, images: Sequence, prompts: Sequence[str], budget: int, batch_size: int = 16) -> list[float]:
    """p(needs high-res) per sample with each image at exactly `budget` tokens."""
    out = []
    cuda = model.device.type == "cuda"
    for i in range(0, len(images), batch_size):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = gate_logits(model, images[i:i + batch_size], prompts[i:i + batch_size],
                                 [budget] * len(images[i:i + batch_size]))
        out += torch.sigmoid(logits.float()).tolist()
    return out


def _auroc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return round(wins / (len(pos) * len(neg)), 4)


def gate_report(probs: Sequence[float], subsets: Sequence[str], needs_hr: Sequence[bool | None],
                thresh: float, kinds: Sequence[str | None] | None = None,
                sweep: Sequence[float] = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)) -> dict:
    """Skip rate on `coarse` items (and on label-"easy" items), fire rate on needs_hr items, at `thresh` and a
    sweep; AUROC of the score against needs_hr. Fire = p ≥ thresh (the engine's rule)."""
    def rates(t):
        fire = [p >= t for p in probs]
        coarse = [not f for f, s in zip(fire, subsets) if s == "coarse"]
        hr = [f for f, n in zip(fire, needs_hr) if n]
        row = {"thresh": t, "skip_rate_all": round(1 - sum(fire) / max(1, len(fire)), 4),
               "skip_rate_coarse": round(sum(coarse) / len(coarse), 4) if coarse else None,
               "fire_rate_needs_hr": round(sum(hr) / len(hr), 4) if hr else None}
        if kinds is not None:
            easy = [not f for f, k in zip(fire, kinds) if k == "easy"]
            trans = [f for f, k in zip(fire, kinds) if k == "transition"]
            row["skip_rate_easy"] = round(sum(easy) / len(easy), 4) if easy else None
            row["fire_rate_transition"] = round(sum(trans) / len(trans), 4) if trans else None
        return row

    known = [(p, bool(n)) for p, n in zip(probs, needs_hr) if n is not None]
    return {"n": len(probs), "n_coarse": sum(s == "coarse" for s in subsets),
            "n_needs_hr": sum(bool(n) for n in needs_hr), "at_thresh": rates(thresh),
            "auroc_needs_hr": _auroc([p for p, _ in known], [n for _, n in known]),
            "sweep": [rates(t) for t in sweep],
            "mean_prob": round(sum(probs) / max(1, len(probs)), 4)}
