"""Q-Zoom Stage 2, targeted fine-tuning (method.md §4 "Stage 2", §1.4, §1.5).

Mining (`mine`): every pool item is answered twice by the same QZoomModel,
  A. mode="base": the source image only, at the config's budget;
  B. the RoI path with the gate forced open (`gate_forced_open`): global image + the trained twig's RoI;
and both answers are judged by the benchmark's own scorer (`eval.benchmarks.synthhr` through
`gate_labels.synthhr_target`; Q-Zoom uses an LLM judge instead, method.md §4). Kept: A right AND B wrong AND B
really zoomed. Every judged item goes to OUT/judged.jsonl (rewritten atomically after each batch, so a run resumes
where it stopped); the kept ones to OUT/mined.jsonl.

Training (`train_targeted_sft`), one step:
  1. per record: the engine's chat template + the record's base answer tokens + <|im_end|> as the target
  2. the global image encoded at the record's budget; its RoI crop(s) re-encoded and fused on the global grid by
     the engine's own `build_sequence` (continuous M-RoPE alignment, §1.4); boxes from the record (the frozen twig's
     prediction at mining time) or re-proposed online by the frozen twig (`boxes="online"`)
  3. the fused sequence fully re-prefilled through all L layers (§1.5: no gate-era KV reuse in Stage 2)
  4. cross-entropy on the target tokens only; every prompt, image and RoI token is −100; records without a RoI
     contribute nothing (a batch with none makes no update)
  5. AdamW on all decoder layers + lm_head (ViT, merger, embeddings, final norm, RoI head, gate frozen and asserted),
     warm-up + cosine, grad-norm clip, bf16 autocast on CUDA; atomic checkpoints (weights, optimiser, scheduler)

Why not the HF-forward seam (`aligned_positions`): it reads crop boxes from marker text after the crop, which the
engine's fused sequence does not contain; building the sequence with the engine's functions keeps training tokens and
positions identical to inference (tests/test_targeted_sft.py checks both against a live `answer` call).
"""
from __future__ import annotations

import json
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..checkpoint import atomic_write_text
from ..errors import QZoomError
from ..fusion import Batch, build_sequence, pad_batch
from ..roi import RoI
from .head_trainer import (JsonlLog, RunBudget, StepChores, has_state_dir, load_state_dir, save_state_dir,
                           warmup_cosine, warmup_steps_of)
from .rpn_train import batch_indices

IGNORE = -100
CKPT_DIR = "checkpoint"


# ================================================================================================ mining
@contextmanager
def gate_forced_open(model):
    """Within the block the RoI path runs for every sample: the engine skips gating when there is no gate head."""
    gate = model.gate_head
    model.gate_head = None
    try:
        yield model
    finally:
        model.gate_head = gate


def keep_regression(base_right: bool, roi_right: bool, zoomed: bool) -> bool:
    """Q-Zoom's mining rule: the base model is right and the RoI model is wrong (on a real RoI)."""
    return bool(base_right) and not roi_right and bool(zoomed)


def synthhr_pool(subsets: list[str], n: int, split: str = "train", start: int = 0,
                 n_candidates: int | None = 1) -> list[dict]:
    """Pool items {"id", "subset", "question", "image", "judge"}: SynthHR-mini rows at the `n_candidates` level
    (1: single candidate; None: each subset's default), the benchmark's prompt, and `judge(response) -> bool` from
    the benchmark's scorer (score ≥ 0.999)."""
    from eval.synthhr import SynthHRConfig, make_items, render_item

    from .gate_labels import synthhr_target

    cfg = SynthHRConfig(scale="mini", n_candidates=n_candidates)
    out = []
    for s in subsets:
        for item in make_items(cfg, s, split, n, start):
            prompt, _, judge = synthhr_target(item)
            out.append({"id": item["question_id"], "subset": s, "question": prompt,
                        "image": render_item(item, cfg).convert("RGB"), "judge": judge})
    return out


@dataclass
class MineConfig:
    batch_size: int = 8
    min_visual_tokens: int | None = None      # None: the model config's budget (A and B alike)
    max_visual_tokens: int | None = None
    max_new_tokens: int = 32


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def mine(model, items: list[dict], out_dir, cfg: MineConfig = MineConfig(), *, progress: bool = True) -> dict:
    """Judge base vs RoI answers on `items` (see `synthhr_pool`); write OUT/judged.jsonl and OUT/mined.jsonl.

    Resumes: ids already in judged.jsonl are not asked again. Returns {"counts": {subset: {"n", "base_right",
    "roi_right", "no_roi", "kept"}}, "n_kept"}.
    """
    if model.roi_head is None:
        raise QZoomError("mining needs a model with a trained RoI head (tools/train_rpn.py output)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    judged_path = out_dir / "judged.jsonl"
    judged = _read_jsonl(judged_path)
    seen = {r["id"] for r in judged}
    todo = [it for it in items if it["id"] not in seen]
    c = model.config
    budget = [cfg.min_visual_tokens or c.min_visual_tokens, cfg.max_visual_tokens or c.max_visual_tokens]
    kw = dict(min_visual_tokens=budget[0], max_visual_tokens=budget[1], max_new_tokens=cfg.max_new_tokens)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="mine", leave=False)
    for i in range(0, len(todo), cfg.batch_size):
        chunk = todo[i:i + cfg.batch_size]
        images, questions = [it["image"] for it in chunk], [it["question"] for it in chunk]
        base = model.answer(images, questions, mode="base", **kw)
        with gate_forced_open(model):
            roi = model.answer(images, questions, mode="qzoom", **kw)
        for it, a, b in zip(chunk, base, roi):
            a_ok, b_ok = bool(it["judge"](a.text)), bool(it["judge"](b.text))
            judged.append({"id": it["id"], "subset": it["subset"], "question": it["question"],
                           "base_answer": a.text, "roi_answer": b.text, "base_right": a_ok, "roi_right": b_ok,
                           "zoomed": bool(b.zoomed), "boxes": [list(r.box) for r in b.boxes],
                           "box_cells": [list(r.box_cells) for r in b.boxes], "budget": budget,
                           "kept": keep_regression(a_ok, b_ok, b.zoomed)})
        _write_jsonl(judged_path, judged)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    wanted = {it["id"] for it in items}
    rows = [r for r in judged if r["id"] in wanted]
    mined = [r for r in rows if r["kept"]]
    _write_jsonl(out_dir / "mined.jsonl", mined)
    counts: dict[str, dict] = {}
    for r in rows:
        cell = counts.setdefault(r["subset"], dict.fromkeys(("n", "base_right", "roi_right", "no_roi", "kept"), 0))
        cell["n"] += 1
        cell["base_right"] += r["base_right"]
        cell["roi_right"] += r["roi_right"]
        cell["no_roi"] += not r["zoomed"]
        cell["kept"] += r["kept"]
    return {"counts": counts, "n_kept": len(mined)}


# ====================================================================================== fused examples
def record_image(record: dict):
    """The source image of a mined record: `image` (a path) or its SynthHR id re-rendered."""
    from ..images import load_image

    if record.get("image"):
        return load_image(record["image"])
    from .rpn_train import synthhr_item

    return synthhr_item(record["id"])[1]


def target_ids(model, text: str) -> list[int]:
    """Token ids of an assistant response: the text, then <|im_end|> (the end-of-turn the engine stops at)."""
    tok = model.processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok(text, add_special_tokens=False)["input_ids"] + [end]
    if model.backbone.image_token_id in ids:
        raise QZoomError(f"response {text!r} tokenizes to an image placeholder")
    return ids


@dataclass
class FusedBatch:
    """Left-padded fused sequences with their response labels. labels (B, L): target ids, −100 elsewhere."""

    batch: Batch
    labels: torch.Tensor
    has_roi: list[bool]


@torch.no_grad()
def fused_batch(model, records: list[dict], images: list, *, online_boxes: bool = False) -> FusedBatch:
    """The engine's fused sequences (global + RoI crops on the global grid) followed by each record's base answer.

    Records without a box (or, online, without a proposal) keep only their coarse sequence and get all −100 labels.
    """
    from ..engine import Answer

    c, bb = model.config, model.backbone
    samples, _ = model._samples(images, [r["question"] for r in records])
    budgets = [tuple(r.get("budget") or (c.min_visual_tokens, c.max_visual_tokens)) for r in records]
    for budget in sorted(set(budgets)):                               # one ViT call per budget
        rows = [i for i, b in enumerate(budgets) if b == budget]
        for i, block in zip(rows, bb.encode_images([samples[i].images[0] for i in rows], *budget)):
            samples[i].blocks = [block]
    for s in samples:
        s.answer = Answer(text="")
    if online_boxes:
        coarse = pad_batch([build_sequence(s.template_ids, model._token_ids(), s.blocks) for s in samples],
                           bb.image_token_id, bb.pad_id)
        h0 = model._embed(coarse)
        pe, mask = model._rope_and_mask(h0, coarse.position_ids, coarse.valid, h0.shape[1])
        h_K = bb.run_layers(h0, 0, c.twig_K, pe, mask, None, model._deepstack(coarse))
        model._propose_for_rows(samples, coarse, h_K, pe, mask, list(range(len(samples))))
    else:
        for s, r in zip(samples, records):
            rois = [RoI(box=tuple(b), score=1.0, box_cells=tuple(cells))
                    for b, cells in zip(r.get("boxes") or [], r.get("box_cells") or [])]
            if rois:
                s.crops = {0: rois}
    for budget in sorted(set(budgets)):
        model._encode_crops([s for s, b in zip(samples, budgets) if b == budget and s.crops], *budget)
    seqs, targets, has_roi = [], [], []
    for s, r in zip(samples, records):
        tgt = target_ids(model, r["base_answer"])
        seqs.append(build_sequence(s.template_ids + tgt, model._token_ids(), s.blocks, s.crops,
                                   aligned=c.alignment == "continuous"))
        targets.append(tgt)
        has_roi.append(bool(s.crops))
    batch = pad_batch(seqs, bb.image_token_id, bb.pad_id)
    labels = torch.full_like(batch.input_ids, IGNORE)
    for b, (tgt, roi) in enumerate(zip(targets, has_roi)):
        if roi:                                     # left padding: the response ends every row
            labels[b, -len(tgt):] = torch.tensor(tgt)
    return FusedBatch(batch, labels, has_roi)


def fused_hidden(model, batch: Batch) -> torch.Tensor:
    """Final-norm hidden states (B, L, d) of a full re-prefill (all L layers) over a fused batch, with grad."""
    bb = model.backbone
    h = model._embed(batch)
    pe, mask = model._rope_and_mask(h, batch.position_ids, batch.valid, h.shape[1])
    h = bb.run_layers(h, 0, bb.num_layers, pe, mask, None, model._deepstack(batch))
    return bb.final_norm(h)


def response_loss(hidden: torch.Tensor, labels: torch.Tensor, logits_fn: Callable) -> tuple[torch.Tensor, int]:
    """Mean next-token CE over the label positions ≠ −100; hidden (B, L, d), labels (B, L).

    Only the hidden states that predict a target token (column i predicts label i+1) go through `logits_fn` (the LM
    head), so nothing else can reach the loss. Returns (loss, number of target tokens); (0, 0) without targets.
    """
    keep = labels[:, 1:] != IGNORE
    n = int(keep.sum())
    if n == 0:
        return hidden.new_zeros((), dtype=torch.float32), 0
    logits = logits_fn(hidden[:, :-1][keep.to(hidden.device)]).float()
    return F.cross_entropy(logits, labels[:, 1:][keep].to(logits.device)), n


# ================================================================================== what is trained
def untie_lm_head(model) -> bool:
    """If lm_head shares the embedding matrix, give lm_head its own copy and mark the config untied, so training
    lm_head leaves the (frozen) input embeddings alone and save/load keeps both. Returns True if it untied."""
    hf, emb = model.base, model.backbone.lm.embed_tokens.weight
    if hf.lm_head.weight.data_ptr() != emb.data_ptr():
        return False
    hf.lm_head.weight = torch.nn.Parameter(emb.detach().clone())
    for cfg in (hf.config, getattr(hf.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    return True


def sft_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze everything, then train every decoder layer and lm_head (untied first); returns (name, param) pairs."""
    untie_lm_head(model)
    model.requires_grad_(False)
    model.backbone.layers.requires_grad_(True)
    model.base.lm_head.requires_grad_(True)
    assert_sft_trainable(model)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def assert_sft_trainable(model, check_grads: bool = False) -> None:
    """Trainable = decoder layers + lm_head, exactly; ViT, merger, embeddings, norm, RoI head, gate frozen."""
    bb = model.backbone
    allowed = {id(p) for p in bb.layers.parameters()} | {id(p) for p in model.base.lm_head.parameters()}
    if model.base.lm_head.weight.data_ptr() == bb.lm.embed_tokens.weight.data_ptr():
        raise AssertionError("lm_head is tied to the input embeddings (call untie_lm_head)")
    for name, p in model.named_parameters():
        if id(p) in allowed:
            continue
        if p.requires_grad:
            raise AssertionError(f"{name} is trainable but is neither a decoder layer nor lm_head")
        if check_grads and p.grad is not None:
            raise AssertionError(f"{name} received a gradient but is frozen")


# ============================================================================================= training
@dataclass
class SFTTrainConfig:
    """Stage-2 optimisation (method.md §4: lr 1e-6 at 7B, batch 64, 1 epoch) and run control."""

    steps: int = 100                  # length of the whole schedule (over all resumed runs)
    batch_size: int = 16
    lr: float = 1e-6
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    minutes: float = 0.0              # stop this run after so many minutes (0: no limit); resume continues
    stop_after_steps: int = 0         # stop this run after so many steps (0: no limit); resume continues
    ckpt_every: int = 50
    log_every: int = 1
    seed: int = 0
    boxes: str = "mined"              # "mined": the record's twig boxes | "online": the frozen twig re-proposes
    resume: bool = True


TRAINABLE_FILE = "trainable.safetensors"


def save_checkpoint(params, optimizer, scheduler, step: int, path) -> None:
    """Atomic folder (head_trainer layout): trainable.safetensors (decoder layers + lm_head), optimizer.pt,
    trainer_state.json."""
    save_state_dir(path, {n: p.contiguous() for n, p in params}, TRAINABLE_FILE, optimizer, scheduler,
                   {"step": step})


def load_checkpoint(model, params, optimizer, scheduler, path) -> int:
    """Restore trainable weights, optimiser and scheduler; returns the step to continue at."""
    state, trainer = load_state_dir(path, TRAINABLE_FILE, optimizer, scheduler, model.device)
    names = {n for n, _ in params}
    if set(state) != names:
        raise QZoomError(f"{path}: checkpoint tensors do not match the trainable parameters "
                         f"(missing {sorted(names - set(state))[:3]}, unexpected {sorted(set(state) - names)[:3]})")
    with torch.no_grad():
        for n, p in params:
            p.copy_(state[n])
    return int(trainer["step"])


def train_targeted_sft(model, records: list[dict], cfg: SFTTrainConfig, out_dir, *,
                       image_fn: Callable[[dict], object] = record_image, progress: bool = True) -> dict:
    """Train decoder layers + lm_head on mined records for cfg.steps (or cfg.minutes / cfg.stop_after_steps),
    resuming from out_dir/checkpoint. Logs out_dir/train_log.jsonl. Returns {"step", "done", "losses", "last"}."""
    if cfg.boxes not in ("mined", "online"):
        raise QZoomError(f"boxes must be 'mined' or 'online', got {cfg.boxes!r}")
    if not records:
        raise QZoomError("no mined records to train on")
    if cfg.boxes == "online" and model.roi_head is None:
        raise QZoomError("boxes='online' needs the model's RoI head")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(out_dir / "train_log.jsonl")
    params = sft_parameters(model)
    optimizer = torch.optim.AdamW([p for _, p in params], lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, cfg.steps, warmup_steps_of(cfg.warmup_ratio, cfg.steps)))
    step, ckpt = 0, out_dir / CKPT_DIR
    if cfg.resume and has_state_dir(ckpt):
        step = load_checkpoint(model, params, optimizer, scheduler, ckpt)
        log.write({"event": "resume", "step": step})
    images: dict[int, object] = {}                       # rendered once per record
    cuda = model.device.type == "cuda"
    model.eval()                                         # no dropout; gradients still flow
    budget = RunBudget(cfg.minutes, cfg.stop_after_steps)
    start, losses, last, checked = step, [], None, False
    chores = StepChores(total_steps=cfg.steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, log=log,
                        budget=budget, save=lambda st: save_checkpoint(params, optimizer, scheduler, st, ckpt),
                        start_step=step, desc="targeted-sft", progress=progress)
    while step < cfg.steps:
        if budget.spent(step - start):
            break
        t0 = time.perf_counter()
        idx = batch_indices(len(records), cfg.batch_size, cfg.seed, step)
        for i in idx:
            if i not in images:
                images[i] = image_fn(records[i])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            fb = fused_batch(model, [records[i] for i in idx], [images[i] for i in idx],
                             online_boxes=cfg.boxes == "online")
            hidden = fused_hidden(model, fb.batch)
            loss, n_tok = response_loss(hidden, fb.labels, model.backbone.logits)
        optimizer.zero_grad(set_to_none=True)
        grad_norm = 0.0
        lr = scheduler.get_last_lr()[0]
        if n_tok:
            loss.backward()
            if not checked:
                assert_sft_trainable(model, check_grads=True)
                checked = True
            grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.max_grad_norm))
            optimizer.step()
        with warnings.catch_warnings():          # a step without targets makes no update but keeps the schedule
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
        step += 1
        last = {"step": step, "loss": float(loss.detach()), "lr": lr, "grad_norm": grad_norm, "n_target": n_tok,
                "n_roi": sum(fb.has_roi), "step_s": round(time.perf_counter() - t0, 4)}
        losses.append(last["loss"])
        chores.record(step, last)
        if chores.checkpoint(step):
            break
    chores.close(step)
    return {"step": step, "done": step >= cfg.steps, "losses": losses, "last": last, "config": asdict(cfg)}


# ================================================================================================= eval
@torch.no_grad()
def mined_accuracy(model, records: list[dict], images: list, judges: list | None = None, *,
                   batch_size: int = 8, max_new_tokens: int = 32) -> dict:
    """Measurement on mined records: RoI path (gate forced open, twig online) and base path — share judged right
    (when `judges` are given) and share equal to the record's base answer (the training target)."""
    out = {"n": len(records)}
    for mode in ("qzoom", "base"):
        texts = []
        for i in range(0, len(records), batch_size):
            chunk = records[i:i + batch_size]
            with gate_forced_open(model), torch.autocast("cuda", dtype=torch.bfloat16,
                                                         enabled=model.device.type == "cuda"):
                ans = model.answer(images[i:i + batch_size], [r["question"] for r in chunk], mode=mode,
                                   min_visual_tokens=(chunk[0].get("budget") or [None])[0],
                                   max_visual_tokens=(chunk[0].get("budget") or [None, None])[1],
                                   max_new_tokens=max_new_tokens)
            texts += [a.text for a in ans]
        key = "roi" if mode == "qzoom" else "base"
        n = max(1, len(records))
        out[f"{key}_matches_target"] = sum(t == r["base_answer"] for t, r in zip(texts, records)) / n
        if judges is not None:
            out[f"{key}_acc"] = sum(bool(j(t)) for j, t in zip(judges, texts)) / n
    return out
