#!/usr/bin/env python
"""Train the testbed (a from-scratch Qwen2.5-VL, ~25 M params) on glyph sheets + SynthHR-mini, in resumable stages.

    python tools/train_testbed.py --config tools/configs/testbed_stage1.yaml
    python tools/train_testbed.py --config tools/configs/testbed_stage2.yaml --resume runs/testbed/ckpt

A stage = dense ViT pretraining on glyph sheets for `dense_minutes` (skipped if 0), then QA for `qa_minutes`
(SynthHR-mini single-candidate: coarse@256, global+crop with Q-Zoom alignment, multi-budget views; a share of
sheet steps keeps the dense loss alive), then an optional Tier-1 eval. Every stage ends (and checkpoints every
`ckpt_minutes`) with an atomic bf16 checkpoint (`save_testbed`) plus the dense heads; `--resume` restarts from
those weights (the optimiser restarts with a short warm-up). Go/no-go lines are printed after each phase.
Imports only torch/transformers/numpy/PIL/yaml and our modules (the GPU image has no trl/datasets).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


@dataclass
class TrainArgs:
    out_dir: str = field(default="runs/testbed/ckpt", metadata={"help": "checkpoint folder (written atomically)"})
    resume: str | None = field(default=None, metadata={"help": "checkpoint folder to start from"})
    log_file: str | None = None
    seed: int = 0
    tiny: bool = field(default=False, metadata={"help": "tiny arch for CPU smoke tests"})
    dense_minutes: float = 3.0
    qa_minutes: float = 5.0
    max_steps: int = 0                      # >0: stop each phase after this many steps (smoke tests)
    ckpt_minutes: float = 4.0
    lr: float = 6e-4
    min_lr_frac: float = 0.1
    warmup: int = 150
    weight_decay: float = 0.05
    sheet_batch: int = 48
    sheet_share_qa: float = 0.2
    dense_weight_qa: float = 0.5
    coarse_labels: bool = field(default=True, metadata={"help": "stage 6: dense shape / size / side heads on the "
                                                               "glyph sheets (their accuracies log as acc_shape, "
                                                               "acc_size, acc_side)"})
    coarse_label_weight: float = 1.0        # weight of each of those three losses in the dense loss
    sheet_landmarks: str = ""               # "lo,hi": large landmark shapes per sheet (empty: none, stage 1-5 sheets)
    sheet_carrier_frac: float = 1.0         # < 1: fewer carriers per sheet, more room for shapes
    sheet_workers: int = 5
    qa_workers: int = 10
    detail_scale_start: float = 2.5
    curriculum_frac: float = 0.6
    progress_offset: float = 0.0            # stage 2: 1.0 (curriculum finished)
    mode_coarse: float = 0.3
    mode_crop: float = 0.45
    mode_budget: float = 0.25
    free_form: float = 0.25
    per_item: str = field(default="", metadata={"help": "stage 4: prompts per rendered item, e.g. 'free,mc,mc' "
                                                        "(share one ViT pass); empty: one prompt per item"})
    lr_vit_mult: float = 1.0                # the vision tower's LR = lr * lr_vit_mult
    lens_layer: int = 0                     # >0: logit-lens aux loss on MC prompts at this decoder layer's output
    lens_weight: float = 0.0                # (answer position -> the option text's token; the letter stays the target)
    attn_layer: int = -1                    # >=0: supervise one head of this decoder layer (0-based) on MC prompts:
    attn_head: int = 0                      #   the answer position attends to the correct option line
    attn_weight: float = 0.0
    letter_layer: int = 0                   # >0: a linear probe on this layer's output (1-based) names each option
    letter_weight: float = 0.0              #   line's letter at every token of the line (aux head, not shipped)
    text_mc_minutes: float = 0.0            # stage 4: text-only MC drill (answer stated in the prompt) before QA
    text_mc_share: float = 0.0              # ... and this share of QA steps (cheap: no image)
    text_mc_batch: int = 256
    text_mc_workers: int = 2
    tokens_per_batch: int = 14000
    subsets: str = "attr-cue,fsp-4k,doc-code,coarse"
    subset_weights: str = "0.35,0.25,0.15,0.25"
    eval_n: int = 0                         # items per subset for the final eval (0: none)
    eval_split: str = "test"
    eval_modes: str = "coarse@256,oracle-crop@256,native-crop@256,base@576,base@1024,base@2304"
    eval_json: str | None = None
    gonogo_n: int = 40                      # dev items per subset for the go/no-go check after QA
    probe_every_min: float = 0.0            # >0: first-token MC / free-form accuracy on dev oracle crops this often
    probe_n: int = 32                       # dev items per subset for that probe
    eval_free: bool = True                  # add free-form columns (option text as the answer) to the final eval
    eval_free_modes: str = "coarse@256,oracle-crop@256"
    pin_src: str | None = field(default=None, metadata={"help": "folder put first on sys.path (e.g. a pinned eval/ "
                                                                "package, so items match an earlier report)"})
    log_every: int = 25
    device: str = "auto"


def parse(argv=None) -> TrainArgs:
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(TrainArgs)
    if "--config" in argv:
        import yaml

        i = argv.index("--config")
        cfg = yaml.safe_load(Path(argv[i + 1]).read_text()) or {}
        del argv[i:i + 2]
        base = parser.parse_dict(cfg, allow_extra_keys=False)[0]
        # command-line flags override the file
        cli = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)[0] if argv else None
        if cli is not None:   # every flag given on the command line wins, even one equal to its default
            given = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
            for k, v in asdict(cli).items():
                if k in given:
                    setattr(base, k, v)
        return base
    return parser.parse_args_into_dataclasses(argv, look_for_args_file=False)[0]


class Logger:
    def __init__(self, path):
        self.f = open(path, "a") if path else None

    def __call__(self, *a):
        s = " ".join(str(x) for x in a)
        print(s, flush=True)
        if self.f:
            self.f.write(s + "\n")
            self.f.flush()


def build(args: TrainArgs, device, log=print):
    from qzoom_agent.testbed.model import TestbedArch, build_testbed, load_testbed_hf
    from qzoom_agent.training.glyph_sheets import label_classes
    from qzoom_agent.training.testbed_model import DenseHeads

    if args.resume:
        model, processor = load_testbed_hf(args.resume, dtype=torch.float32, attn="sdpa", device="cpu")
        model.train()
    else:
        arch = TestbedArch(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vit_hidden=32, vit_depth=2,
                           vit_heads=2, vit_ffn=64) if args.tiny else TestbedArch()
        model, processor = build_testbed(seed=args.seed, arch=arch)
    nc = label_classes()
    extra = dict(n_shape=nc["shape"], n_size=nc["size"], n_side=nc["side"]) if args.coarse_labels else {}
    heads = DenseHeads(model.config.text_config.hidden_size, nc["glyph"], nc["count"], nc["color"], nc["kind"],
                       **extra)
    if args.resume and (Path(args.resume) / "dense_heads.pt").exists():
        state = torch.load(Path(args.resume) / "dense_heads.pt", map_location="cpu")
        dropped = sorted({k.split(".")[1] for k in state if k.split(".")[1] not in heads.heads})
        fresh = heads.load_partial({k: v for k, v in state.items() if k.split(".")[1] not in dropped})
        log(f"dense heads from {args.resume}: loaded {sorted(set(heads.heads) - set(fresh))}; "
            f"fresh (not in the checkpoint): {fresh or 'none'}; dropped (coarse_labels off): {dropped or 'none'}")
    return model.to(device), heads.to(device), processor


def save(args, model, heads, processor, state, log):
    from qzoom_agent.testbed.model import arch_dict, save_testbed

    a = model.config.text_config
    v = model.config.vision_config
    arch = dict(hidden=a.hidden_size, layers=a.num_hidden_layers, heads=a.num_attention_heads,
                kv_heads=a.num_key_value_heads, ffn=a.intermediate_size, vit_hidden=v.hidden_size,
                vit_depth=v.depth, vit_heads=v.num_heads, vit_ffn=v.intermediate_size)
    del arch_dict
    meta = dict(arch=arch, state=state, args=asdict(args))
    p = save_testbed(model, processor, args.out_dir, meta=meta)
    torch.save({k: t.detach().to("cpu", torch.bfloat16) for k, t in heads.state_dict().items()},
               p / "dense_heads.pt")
    log(f"checkpoint -> {p} ({sum(f.stat().st_size for f in p.iterdir()) / 2**20:.1f} MiB)")


def main(argv=None):
    args = parse(argv)
    if args.pin_src:
        sys.path.insert(0, str(Path(args.pin_src).resolve()))
    pre = {}
    if args.eval_n > 0:   # render the eval items in 2 side processes while training runs (doc-code: ~0.3 s/item)
        import concurrent.futures as cf
        import multiprocessing as mp

        from qzoom_agent.training.testbed_eval import load_items

        pool = cf.ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("fork"))
        pre = {s: pool.submit(load_items, [s], args.eval_n, args.eval_split) for s in args.subsets.split(",")}
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    log = Logger(args.log_file)
    log(f"args: {json.dumps(asdict(args))}")
    torch.manual_seed(args.seed)
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    from qzoom_agent.training.testbed_model import (collate, dense_loss, lens_loss, lm_forward, qa_loss,
                                                    shared_vision, vision, LayerTap, LayerInputTap,
                                                    option_losses)
    from qzoom_agent.training.testbed_streams import (QAMix, QAStream, SheetStream, TextMCStream, loader,
                                                      make_progress)

    model, heads, processor = build(args, dev, log)
    dense_w = {k: (args.coarse_label_weight if args.coarse_labels else 0.0) for k in ("shape", "size", "side")}
    tok = processor.tokenizer
    n_par = sum(p.numel() for p in model.parameters())
    log(f"model: {n_par / 1e6:.2f} M params on {dev}")
    pad, img_id = tok.convert_tokens_to_ids("<|endoftext|>"), model.config.image_token_id
    d_model = model.config.text_config.hidden_size
    letter_head = torch.nn.Sequential(torch.nn.LayerNorm(d_model), torch.nn.Linear(d_model, 4)).to(dev)  # aux only
    params = [p for p in list(model.parameters()) + list(heads.parameters()) + list(letter_head.parameters())
              if p.requires_grad]
    vit_ids = {id(p) for p in model.model.visual.parameters()}
    groups = []
    for is_vit, mult in ((False, 1.0), (True, args.lr_vit_mult)):
        ps = [p for p in params if (id(p) in vit_ids) == is_vit]
        groups += [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": args.weight_decay, "mult": mult},
                   {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0, "mult": mult}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, betas=(0.9, 0.95),
                            fused=(dev == "cuda"))
    amp = dict(device_type="cuda", dtype=torch.bfloat16, enabled=(dev == "cuda"))
    total_s = 60 * (args.dense_minutes + args.text_mc_minutes + args.qa_minutes)
    t_start = time.time()
    step = 0
    curves = []
    state = {"steps": 0}
    prev_state = {}
    if args.resume and (Path(args.resume) / "testbed_meta.json").exists():
        prev_state = json.loads((Path(args.resume) / "testbed_meta.json").read_text()).get("state", {})
    last_ckpt = time.time()

    def lr_at(step, t):
        w = min(1.0, (step + 1) / args.warmup)
        frac = min(1.0, t / max(1.0, total_s))
        return args.lr * w * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))

    def do_step(loss):
        nonlocal step
        if not torch.isfinite(loss):
            log(f"step {step}: non-finite loss, skipped")
            opt.zero_grad(set_to_none=True)
            return False
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if not torch.isfinite(gn):
            opt.zero_grad(set_to_none=True)
            return False
        for g in opt.param_groups:
            g["lr"] = lr_at(step, time.time() - t_start) * g.get("mult", 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        return True

    def sheet_step(batch, weight=1.0):
        imgs, labs = batch
        ims = [torch.from_numpy(np.ascontiguousarray(im)).to(dev, non_blocking=True) for im in imgs]
        lab = {k: torch.from_numpy(np.concatenate([l[k].reshape(-1) for l in labs])).to(dev) for k in labs[0]}
        with torch.autocast(**amp):
            z = vision(model, ims)
            loss, st = dense_loss(heads(z), lab, weights=dense_w)
        do_step(loss * weight)
        return float(loss), st

    lm = tuple(int(x) for x in args.sheet_landmarks.split(",")) if args.sheet_landmarks else (0, 0)
    sheets = loader(SheetStream(args.seed * 1000 + int(prev_state.get("steps", 0)), args.sheet_batch,
                                landmarks=lm, carrier_frac=args.sheet_carrier_frac),
                    args.sheet_workers if dev == "cuda" else 0)
    model.train()
    # ---------------------------------------------------------------- phase A: dense glyph sheets (ViT only)
    ema = {}
    t_a = time.time()
    if args.dense_minutes > 0:
        while time.time() - t_a < 60 * args.dense_minutes and not (args.max_steps and step >= args.max_steps):
            t0 = time.time()
            loss, st = sheet_step(next(sheets))
            for k, v in st.items():
                ema[k] = 0.95 * ema.get(k, v) + 0.05 * v
            if step % args.log_every == 0:
                rec = dict(phase="dense", step=step, t=round(time.time() - t_start, 1), loss=round(loss, 4),
                           dt=round(time.time() - t0, 3), **{k: round(v, 3) for k, v in ema.items()})
                curves.append(rec)
                log(json.dumps(rec))
        g = ema.get("acc_glyph", 0.0)
        log(f"GO/NO-GO after dense phase: glyph token acc (EMA) {g:.3f} -> {'GO' if g >= 0.9 else 'NO-GO'} "
            f"(bar 0.90); colour {ema.get('acc_color', 0):.3f}, count {ema.get('acc_count', 0):.3f}"
            + (f"; shape {ema.get('acc_shape', 0):.3f}, size {ema.get('acc_size', 0):.3f}, "
               f"side {ema.get('acc_side', 0):.3f}" if args.coarse_labels else ""))
    progress = make_progress()
    mix = QAMix(subsets=tuple(args.subsets.split(",")), weights=tuple(float(x) for x in args.subset_weights.split(",")),
                mode_coarse=args.mode_coarse, mode_crop=args.mode_crop, mode_budget=args.mode_budget,
                free_form=args.free_form, per_item=args.per_item, detail_scale_start=args.detail_scale_start,
                curriculum_frac=args.curriculum_frac, tokens_per_batch=args.tokens_per_batch)
    progress.value = args.progress_offset
    qa = None
    if args.qa_minutes > 0:    # started before phase T, so its workers have batches ready when QA begins
        qa = loader(QAStream(tok, args.seed * 1000 + 17 + int(prev_state.get("steps", 0)), mix, progress),
                    args.qa_workers if dev == "cuda" else 0)
    letter_head.train()
    taps = dict(lens=None, att=None, let=None)

    def add_aux(loss, seqs, pos, mask, aux):
        """Stage-4 routing aux losses (logit lens, supervised answer->option attention, option-letter probe)."""
        if taps["lens"] is not None:
            lens = lens_loss(model, taps["lens"].out, seqs)
            if lens is not None:
                loss = loss + args.lens_weight * lens
                aux["lens"] = float(lens)
        if taps["att"] is not None:
            l_att, l_let, mass = option_losses(model, taps["att"].out, pos, mask, seqs, args.attn_layer,
                                               args.attn_head, taps["let"].out if taps["let"] else None,
                                               letter_head if taps["let"] else None)
            if l_att is not None:
                loss = loss + args.attn_weight * l_att
                aux["attn_mass"] = float(mass)
                if l_let is not None:
                    loss = loss + args.letter_weight * l_let
                    aux["letter"] = float(l_let)
        return loss

    def text_step(seqs, aux):
        ids, mask, pos, labels, _ = collate(seqs, pad, img_id, dev)
        none = torch.zeros(0, model.config.text_config.hidden_size, device=dev)
        with torch.autocast(**amp):
            h, _, _ = lm_forward(model, ids, mask, pos, None, image_embeds=none)
            loss, acc = qa_loss(model, h, labels)
            loss = add_aux(loss, seqs, pos, mask, aux)
        do_step(loss)
        return float(loss), acc

    def install_taps(probe_data):
        if args.lens_weight > 0 and args.lens_layer > 0:
            taps["lens"] = LayerTap(model, args.lens_layer)
        if args.letter_weight > 0 and args.letter_layer > 0:
            taps["let"] = LayerTap(model, args.letter_layer)
        if args.attn_weight > 0 and args.attn_layer >= 0:
            from qzoom_agent.training.testbed_eval import attn_rows_selfcheck, load_items

            taps["att"] = LayerInputTap(model, args.attn_layer)
            err = attn_rows_selfcheck(model, tok, probe_data or load_items(["attr-cue"], 2, split="dev"),
                                      args.attn_layer, device=dev)
            log(f"attn_rows self-check vs eager attentions: max abs diff {err:.2e}")
            if not err < 2e-2:
                log("attn_rows disagrees with the model's attention: attention aux OFF")
                taps["att"].remove()
                taps["att"] = None
                model.train()

    probe_data, last_probe = None, [0.0]

    def maybe_probe(force: bool = False) -> None:
        """Every probe_every_min minutes: the first-token probe on fixed dev items, logged as a curve point."""
        if probe_data is None or not (force or time.time() - last_probe[0] > 60 * args.probe_every_min):
            return
        from qzoom_agent.training.testbed_eval import probe

        pr = probe(model, tok, probe_data, device=dev)
        curves.append(dict(phase="probe", step=step, t=round(time.time() - t_start, 1), **pr))
        log(json.dumps(curves[-1]))
        model.train()
        last_probe[0] = time.time()

    if args.probe_every_min > 0 and args.qa_minutes + args.text_mc_minutes > 0:
        from qzoom_agent.training.testbed_eval import load_items

        probe_data = load_items(["attr-cue", "fsp-4k", "coarse"], args.probe_n, split="dev")
        maybe_probe(force=True)
    install_taps(probe_data)
    texts = None
    if args.text_mc_minutes > 0 or args.text_mc_share > 0:
        texts = loader(TextMCStream(tok, args.seed * 1000 + 29 + int(prev_state.get("steps", 0)),
                                    batch=args.text_mc_batch), args.text_mc_workers if dev == "cuda" else 0)
    # ---------------------------------------------------------------- phase T: text-only MC drill
    t_t = time.time()
    step_t0 = step
    t_ema = {}
    while texts is not None and time.time() - t_t < 60 * args.text_mc_minutes and not (
            args.max_steps and step - step_t0 >= args.max_steps):
        aux = {}
        loss, acc = text_step(next(texts), aux)
        for k, v in dict(acc=acc, **aux).items():
            t_ema[k] = 0.9 * t_ema.get(k, v) + 0.1 * v
        if step % args.log_every == 0:
            rec = dict(phase="text_mc", step=step, t=round(time.time() - t_start, 1), loss=round(loss, 4),
                       **{k: round(v, 3) for k, v in t_ema.items()})
            curves.append(rec)
            log(json.dumps(rec))
        maybe_probe()
    # ---------------------------------------------------------------- phase B: QA (+ sheet steps)
    t_b = time.time()
    step_b0 = step
    if args.qa_minutes > 0:
        qa_ema, aux_ema = {}, {}
        rng = np.random.default_rng(args.seed)
        while time.time() - t_b < 60 * args.qa_minutes and not (args.max_steps and step - step_b0 >= args.max_steps):
            progress.value = min(1.0, args.progress_offset + (time.time() - t_b) / (60 * args.qa_minutes))
            if texts is not None and rng.random() < args.text_mc_share:
                aux = {}
                _, acc = text_step(next(texts), aux)
                for k, v in dict(acc=acc, **aux).items():
                    t_ema[k] = 0.9 * t_ema.get(k, v) + 0.1 * v
                continue
            if rng.random() < args.sheet_share_qa:
                _, st = sheet_step(next(sheets), args.dense_weight_qa)
                for k, v in st.items():
                    ema[k] = 0.95 * ema.get(k, v) + 0.05 * v
                continue
            t0 = time.time()
            seqs = next(qa)
            aux = {}
            ids, mask, pos, labels, _ = collate(seqs, pad, img_id, dev)
            with torch.autocast(**amp):
                z = shared_vision(model, seqs, dev)
                h, _, _ = lm_forward(model, ids, mask, pos, None, image_embeds=z)
                loss, acc = qa_loss(model, h, labels)
                loss = add_aux(loss, seqs, pos, mask, aux)
            do_step(loss)
            key = f"{seqs[0].meta['mode']}"
            qa_ema[key] = 0.9 * qa_ema.get(key, acc) + 0.1 * acc
            for k, v in aux.items():
                aux_ema[k] = 0.9 * aux_ema.get(k, v) + 0.1 * v
            if step % args.log_every == 0:
                rec = dict(phase="qa", step=step, t=round(time.time() - t_start, 1), loss=round(float(loss), 4),
                           mode=key, n=len(seqs), dt=round(time.time() - t0, 3), progress=round(progress.value, 3),
                           **{f"qa_acc_{k}": round(v, 3) for k, v in qa_ema.items()},
                           **{f"aux_{k}": round(v, 3) for k, v in aux_ema.items()},
                           **{f"text_{k}": round(v, 3) for k, v in t_ema.items()},
                           **{k: round(v, 3) for k, v in ema.items()})
                curves.append(rec)
                log(json.dumps(rec))
            maybe_probe()
            if time.time() - last_ckpt > 60 * args.ckpt_minutes:
                state = dict(steps=int(prev_state.get("steps", 0)) + step, seconds=round(time.time() - t_start, 1))
                save(args, model, heads, processor, state, log)
                last_ckpt = time.time()
    for t in taps.values():
        if t is not None:
            t.remove()
    state = dict(steps=int(prev_state.get("steps", 0)) + step,
                 seconds=round(float(prev_state.get("seconds", 0)) + time.time() - t_start, 1))
    save(args, model, heads, processor, state, log)
    out = dict(args=asdict(args), state=state, curves=curves, params=n_par)
    # ---------------------------------------------------------------- go/no-go + eval
    if args.gonogo_n > 0 and args.qa_minutes > 0:
        from qzoom_agent.training.testbed_eval import evaluate, load_items

        data = load_items(args.subsets.split(","), args.gonogo_n, split="dev")
        r = evaluate(model, tok, data, ["coarse@256", "oracle-crop@256"], device=dev, log=log)
        out["gonogo_dev"] = r
        det = [v for k, v in r["oracle-crop@256"].items() if k != "coarse"]
        log(f"GO/NO-GO after QA: coarse@256 {r['coarse@256'].get('coarse')} (bar 95), oracle-crop detail mean "
            f"{np.mean(det) if det else float('nan'):.1f} (bar 85)")
    if args.eval_n > 0:
        from qzoom_agent.training.testbed_eval import evaluate, load_items, pointing

        t0 = time.time()
        data = [d for s in args.subsets.split(",") for d in pre[s].result()]   # = load_items(subsets, ...)
        log(f"eval items ready after {time.time() - t0:.0f}s wait")
        out["eval"] = evaluate(model, tok, data, args.eval_modes.split(","), device=dev, log=log)
        if args.eval_free:
            mc = [d for d in data if d[0].get("options")]
            out["eval_free"] = evaluate(model, tok, mc, args.eval_free_modes.split(","), device=dev,
                                        log=log, free_form=True)
        det = [d for d in data if d[0]["subset"] != "coarse"]
        out["pointing"] = pointing(model, tok, det, device=dev)
        log(f"pointing: {json.dumps({k: v for k, v in out['pointing'].items() if k in ('chance', 'chosen_head', 'chosen_hit', 'best_head_oracle')})}")
        log(f"eval time {time.time() - t0:.0f}s")
        pool.shutdown(wait=False)
    if args.eval_json:
        Path(args.eval_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.eval_json).write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
