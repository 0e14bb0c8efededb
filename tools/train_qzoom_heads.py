#!/usr/bin/env python
"""Train Q-Zoom's heads on the shipped testbed, every stage end to end (issue #5; method.md §3, §4), resumable.

    python tools/train_qzoom_heads.py --config tools/configs/qzoom_heads_testbed.yaml --max_minutes 9.5

Stages, each in its own folder under --out_dir, in order:
  1. pseudo       tools/make_pseudo_labels.py   Stage-1 labels from the frozen model's attention  → pseudo/labels.jsonl
  2. rpn          tools/train_rpn.py            RoI head (SD-RPN twig)                           → rpn/model
  3. sft          tools/targeted_sft.py         Stage-2 targeted SFT of the LLM (a subprocess)    → sft/model
                  skipped, with a log line, under --skip_sft or when the tool is missing; complete but
                  untrained (logged; later stages keep the RPN model) when nothing is mined
  4. gate_labels  tools/make_gate_labels.py     answers at ascending budgets, consistency filter  → gate_labels/kept.jsonl
  5. gate         tools/train_gate.py           the dynamic gate                                  → gate/model
                  not trained, with a log line, when the filter kept no record (the stage is still complete)
  6. eval         eval/run_eval.py              SynthHR-mini test: base / qzoom / oracle-crop     → eval/report/
                  (summary.json, report.md, Pareto PNGs from eval/report.py)

A stage that finishes writes <stage>/stage_done.json (atomically, last); a later call skips it. A stage whose tool
stops on its own time limit (rpn, sft, gate_labels, gate checkpoint and resume) writes no marker: the pipeline
stops there and the next call resumes that stage. `--max_minutes` (0: none) keeps a call inside a device limit:
before each stage the pipeline compares `<stage>_minutes + overhead_minutes` (from the config; the tools with a
time limit get `<stage>_minutes` as theirs) with the minutes left and stops, logging the decision, when it would
not fit. The log is out_dir/pipeline_log.jsonl; out_dir/pipeline.json holds every stage's status.

Device command sequence (testbed config; one H100; the stage minutes are estimates, not yet measured on a GPU).
out_dir lies under runs/ (git-ignored): the device machine keeps it between calls only while it stays warm
(30 s after a call), so make the calls back to back; if the machine was given back in between, the next call
re-runs the stages whose folders are gone (the markers make that safe, not free). Each call is ≤ 10 min:

  call 1 (~8 min):  pseudo + rpn
      python tools/train_qzoom_heads.py --config tools/configs/qzoom_heads_testbed.yaml --max_minutes 9.5; \
      cp runs/qzoom_heads/pipeline.json runs/qzoom_heads/pipeline_log.jsonl $OUT/
  call 2 (~6 min):  sft (gate_labels would not fit: logged stop)
      same command
  call 3 (~8 min):  gate_labels + gate
      same command
  call 4 (~5 min):  eval; also copy the report back:
      same command; cp runs/qzoom_heads/eval/report/{summary.json,report.md,*.png} $OUT/ 2>/dev/null

≈ 27 min of device time with the machine starts; with --skip_sft calls 2 and 3 merge into one (three calls).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
for p in (str(ROOT), str(TOOLS)):
    if p not in sys.path:
        sys.path.insert(0, p)

from qzoom_agent.checkpoint import atomic_write_text  # noqa: E402
from qzoom_agent.errors import QZoomError  # noqa: E402
from qzoom_agent.training.head_trainer import JsonlLog, RunBudget  # noqa: E402

DONE = "stage_done.json"
STAGES = ("pseudo", "rpn", "sft", "gate_labels", "gate", "eval", "export")
EVAL_METHODS = "base@256,base@576,base@1024,base@2304,qzoom@256,qzoom@576,qzoom@1024,oracle-crop@256"


@dataclass
class HeadsArgs:
    out_dir: str = "runs/qzoom_heads"
    model: str = field(default="testbed", metadata={"help": "testbed | QZoomModel folder (the frozen base)"})
    device: str = "auto"
    max_minutes: float = field(default=0.0, metadata={"help": "stop before a stage that would not fit (0: no limit)"})
    overhead_minutes: float = field(default=0.5, metadata={"help": "added to each stage's estimate (model load)"})
    render_workers: int = 8
    n_candidates: int = field(default=1, metadata={"help": "SynthHR level of the SFT pool and the eval (objects of "
                                                          "the asked kind; 1: single candidate, where the testbed "
                                                          "meets its Tier-1 bars; 0: each subset's default)"})
    # 1. pseudo labels (no time limit in the tool: pseudo_minutes is an estimate only)
    pseudo_subsets: str = ""                  # empty: every SynthHR subset
    pseudo_n: int = 32                        # items per subset
    pseudo_head_n: int = 4                    # head-selection items per subset
    pseudo_budget: int = 576
    pseudo_batch: int = 8
    pseudo_minutes: float = 2.0
    # 2. RoI head
    rpn_steps: int = 300
    rpn_batch_size: int = 16
    rpn_lr: float = 1e-4
    rpn_minutes: float = 4.0
    rpn_fg_weight: float = 1.0                # BCE pos_weight of FG cells (1.0: Q-Zoom's plain mean)
    # 3. targeted SFT
    skip_sft: bool = False
    sft_tool: str = "tools/targeted_sft.py"
    sft_config: str = field(default="", metadata={"help": "YAML passed to the SFT tool as --config"})
    sft_subsets: str = "attr-cue,attr-search,doc-code,doc-table"
    sft_n_pool: int = 64
    sft_minutes: float = 5.0
    # 4. gate labels
    gate_subsets: str = "coarse,attr-cue,attr-search,rel-lr,doc-code,doc-table"
    gate_n_per_subset: int = 32
    gate_budgets: str = "256,576,1024,2304"
    gate_label_batch: int = 16
    gate_max_new_tokens: int = 16
    gate_labels_minutes: float = 4.0
    # 5. gate
    gate_steps: int = 200
    gate_batch_size: int = 16
    gate_lr: float = 1e-4
    gate_warmup_steps: int = 10
    gate_eval_n_per_subset: int = 16
    gate_eval_budget: int = 256
    gate_minutes: float = 3.0
    # 6. eval
    eval_methods: str = EVAL_METHODS
    eval_subsets: str = ""                    # empty: every SynthHR subset
    eval_n: int = 16                          # test items per subset
    eval_batch_size: int = 8
    eval_minutes: float = 4.0
    eval_nosft_methods: str = field(default="", metadata={"help": "ablation 'no targeted SFT': these methods again "
                                                                  "with the RPN-stage model (-> eval_nosft/)"})
    # 7. export
    export_dtype: str = field(default="bfloat16", metadata={"help": "dtype of the shippable copy of the final "
                                                                   "model (-> export/)"})
    export_minutes: float = 0.5


def validate(args: HeadsArgs) -> None:
    """Clear errors for values no stage could run with, before any work starts."""
    for name in STAGES:
        if getattr(args, f"{name}_minutes") <= 0:
            raise QZoomError(f"{name}_minutes must be > 0 (it is the stage's time estimate), got "
                             f"{getattr(args, f'{name}_minutes')}")
    for name in ("pseudo_n", "rpn_steps", "rpn_batch_size", "gate_n_per_subset", "gate_steps", "gate_batch_size",
                 "eval_n"):
        if getattr(args, name) < 1:
            raise QZoomError(f"{name} must be ≥ 1, got {getattr(args, name)}")
    if args.max_minutes < 0:
        raise QZoomError(f"max_minutes must be ≥ 0, got {args.max_minutes}")
    for b in args.gate_budgets.split(","):
        if not b.strip().isdigit():
            raise QZoomError(f"gate_budgets must be comma-separated integers, got {args.gate_budgets!r}")
    from eval.run_eval import parse_methods

    try:
        parse_methods(args.eval_methods)
    except SystemExit as e:
        raise QZoomError(f"eval_methods: {e}") from None


# ------------------------------------------------------------------------------------------- models
def _base_for_tools(args: HeadsArgs) -> str:
    """train_rpn / make_gate_labels / train_gate take '' for the shipped testbed."""
    return "" if args.model == "testbed" else args.model


def stage_model(out: Path, stage: str, args: HeadsArgs) -> str:
    """The model a stage starts from: the latest finished stage that wrote one."""
    chain = {"sft": ["rpn"], "gate_labels": ["sft", "rpn"], "gate": ["sft", "rpn"], "eval": ["gate", "sft", "rpn"]}
    for prev in chain.get(stage, []):
        if (out / prev / DONE).exists() and (out / prev / "model" / "qzoom_config.json").exists():
            return str(out / prev / "model")
    return _base_for_tools(args)


def _device(args: HeadsArgs) -> str:
    return "" if args.device == "auto" else args.device


# ------------------------------------------------------------------------------------------- stages
def run_pseudo(args: HeadsArgs, out: Path, log: JsonlLog) -> dict:
    import make_pseudo_labels

    rep = make_pseudo_labels.main([
        "--model", args.model, "--device", args.device, "--split", "train", "--subsets", args.pseudo_subsets,
        "--n", str(args.pseudo_n), "--head_n", str(args.pseudo_head_n), "--budget", str(args.pseudo_budget),
        "--batch", str(args.pseudo_batch), "--out", str(out / "pseudo" / "labels.jsonl")])
    if rep["rows"] == 0:
        raise QZoomError("pseudo labels: no rows written; the RoI head has nothing to train on")
    from qzoom_agent.training.rpn_train import IGNORE, read_label_rows

    usable = sum(any(v != IGNORE for v in r["labels"]) for r in read_label_rows(out / "pseudo" / "labels.jsonl"))
    if usable == 0:
        log.write({"event": "warning", "stage": "pseudo", "reason": "every pseudo-label row is wholly ignored "
                   "(§3.2 sample filter): the RoI head gets no gradient and stays at its initialisation"})
    return {"complete": True, "rows": rep["rows"], "usable_rows": usable, "heads": rep["heads"]["chosen"],
            "quality_all": rep["quality"]["labels"].get("all")}


def run_rpn(args: HeadsArgs, out: Path, log: JsonlLog) -> dict:
    import train_rpn

    os.environ.setdefault("TQDM_DISABLE", "1")
    res = train_rpn.main([
        "--labels", str(out / "pseudo" / "labels.jsonl"), "--model", _base_for_tools(args),
        "--out_dir", str(out / "rpn"), "--steps", str(args.rpn_steps), "--batch_size", str(args.rpn_batch_size),
        "--lr", str(args.rpn_lr), "--minutes", str(args.rpn_minutes), "--device", args.device,
        "--fg_weight", str(args.rpn_fg_weight)])
    return {"complete": bool(res["done"]), "step": res["step"], "last": res["last"]}


def sft_skip_reason(args: HeadsArgs) -> str | None:
    if args.skip_sft:
        return "--skip_sft"
    tool = Path(args.sft_tool) if Path(args.sft_tool).is_absolute() else ROOT / args.sft_tool
    return None if tool.exists() else f"{args.sft_tool} is missing"


def run_sft(args: HeadsArgs, out: Path, log: JsonlLog) -> dict:
    tool = Path(args.sft_tool) if Path(args.sft_tool).is_absolute() else ROOT / args.sft_tool
    cmd = [sys.executable, str(tool), "--model", stage_model(out, "sft", args), "--out_dir", str(out / "sft"),
           "--subsets", args.sft_subsets, "--n_pool", str(args.sft_n_pool), "--minutes", str(args.sft_minutes),
           "--device", args.device, "--n_candidates", str(args.n_candidates)] + (
               ["--config", args.sft_config] if args.sft_config else [])
    log.write({"event": "subprocess", "stage": "sft", "cmd": cmd})
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc != 0:
        raise QZoomError(f"targeted SFT exited with status {rc}")
    path = out / "sft" / "summary.json"
    if not path.exists():
        raise QZoomError(f"targeted SFT wrote no {path}")
    summary = json.loads(path.read_text())
    if summary.get("train") is None:            # nothing mined (base right & RoI wrong never happened)
        log.write({"event": "sft_not_trained", "reason": "nothing mined; later stages use the RPN model",
                   "mined": summary.get("mined")})
        return {"complete": True, "trained": False, "mined": summary.get("mined")}
    has_model = (out / "sft" / "model" / "qzoom_config.json").exists()
    return {"complete": bool(summary["train"].get("done") and has_model), "trained": True,
            "mined": summary.get("mined"), "step": summary["train"].get("step")}


def run_gate_labels(args: HeadsArgs, out: Path, log: JsonlLog) -> dict:
    import make_gate_labels

    stats = make_gate_labels.main([
        "--model", stage_model(out, "gate_labels", args), "--out_dir", str(out / "gate_labels"),
        "--subsets", args.gate_subsets, "--n_per_subset", str(args.gate_n_per_subset),
        "--budgets", args.gate_budgets, "--batch_size", str(args.gate_label_batch),
        "--max_new_tokens", str(args.gate_max_new_tokens), "--max_minutes", str(args.gate_labels_minutes),
        "--render_workers", str(args.render_workers), "--device", _device(args)])
    return {"complete": bool(stats["complete"]), "n": stats["n"], "kept": _n_kept(out),
            "accuracy_by_budget": stats["accuracy_by_budget"]}


def _n_kept(out: Path) -> int:
    kept = out / "gate_labels" / "kept.jsonl"
    return sum(1 for line in kept.read_text().splitlines() if line.strip()) if kept.exists() else 0


def run_gate(args: HeadsArgs, out: Path, log: JsonlLog) -> dict:
    n_kept = _n_kept(out)
    if n_kept == 0:
        log.write({"event": "gate_not_trained", "reason": "the consistency filter kept no record "
                   "(gate_labels/stats.json says why); eval runs without a trained gate"})
        return {"complete": True, "trained": False, "kept": 0}
    import train_gate

    rep = train_gate.main([
        "--model", stage_model(out, "gate", args), "--labels_dir", str(out / "gate_labels"),
        "--out_dir", str(out / "gate"), "--max_steps", str(args.gate_steps), "--batch_size", str(args.gate_batch_size),
        "--lr", str(args.gate_lr), "--warmup_steps", str(args.gate_warmup_steps),
        "--max_minutes", str(args.gate_minutes), "--render_workers", str(args.render_workers),
        "--eval_n_per_subset", str(args.gate_eval_n_per_subset), "--eval_budget", str(args.gate_eval_budget),
        "--device", _device(args)])
    ev = rep.get("eval") or {}
    return {"complete": bool(rep["train"]["done"]), "trained": True, "kept": n_kept, "train": rep["train"],
            "eval_at_thresh": ev.get("at_thresh"), "auroc_needs_hr": ev.get("auroc_needs_hr")}


def run_eval(args: HeadsArgs, out: Path, log: JsonlLog) -> dict:
    from eval.run_eval import EvalArgs, run

    model = stage_model(out, "eval", args) or "testbed"
    common = dict(suite="synthhr-mini", split="test", subsets=args.eval_subsets or None, limit=args.eval_n,
                  n_candidates=args.n_candidates or None, batch_size=args.eval_batch_size, device=args.device)
    summary = run(EvalArgs(methods=args.eval_methods, model=model, out=str(out / "eval"),
                           title=f"Q-Zoom heads on the testbed ({Path(model).name})", **common))
    runs = {k: {m: r.get(m) for m in ("accuracy", "visual_tokens_mean", "samples_per_s")}
            for k, r in summary["runs"].items()}
    res = {"complete": True, "model": model, "runs": runs, "report": str(out / "eval" / "report")}
    rpn_model = out / "rpn" / "model"
    if args.eval_nosft_methods and (out / "sft" / DONE).exists() and rpn_model.exists():
        nosft = run(EvalArgs(methods=args.eval_nosft_methods, model=str(rpn_model), out=str(out / "eval_nosft"),
                             title="Ablation: no targeted SFT (RPN-stage model)", **common))
        res["nosft_runs"] = {k: {m: r.get(m) for m in ("accuracy", "visual_tokens_mean")}
                             for k, r in nosft["runs"].items()}
    return res


def run_export(args: HeadsArgs, out: Path, log: JsonlLog) -> dict:
    """A shippable copy of the final model (heads + SFT-tuned backbone) in `export_dtype`, shards ≤ 15 MB."""
    import torch

    from qzoom_agent import QZoomModel

    src = stage_model(out, "eval", args)
    if not src:
        raise QZoomError("export: no trained stage wrote a model")
    model = QZoomModel.from_pretrained(src, dtype=getattr(torch, args.export_dtype))
    model.save_pretrained(out / "export")
    mib = sum(f.stat().st_size for f in (out / "export").iterdir()) / 2 ** 20
    return {"complete": True, "source": src, "dtype": args.export_dtype, "mib": round(mib, 1)}


RUNNERS = {"pseudo": run_pseudo, "rpn": run_rpn, "sft": run_sft, "gate_labels": run_gate_labels,
           "gate": run_gate, "eval": run_eval, "export": run_export}


# ------------------------------------------------------------------------------------------- driver
def run_pipeline(args: HeadsArgs) -> dict:
    """Run the stages not yet done, in order, within --max_minutes; returns (and writes) pipeline.json."""
    validate(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(out / "pipeline_log.jsonl", echo=lambda line: print(f"[qzoom_heads] {line}", flush=True))
    budget = RunBudget(minutes=args.max_minutes)
    log.write({"event": "start", "max_minutes": args.max_minutes, "out_dir": str(out)})
    status, ran = "done", []
    for stage in STAGES:
        marker = out / stage / DONE
        if marker.exists():
            log.write({"event": "skip", "stage": stage, "reason": "complete (marker)"})
            continue
        if stage == "sft" and (reason := sft_skip_reason(args)):
            log.write({"event": "skip", "stage": stage, "reason": reason})
            continue
        need, left = getattr(args, f"{stage}_minutes") + args.overhead_minutes, budget.minutes_left()
        if need > left:
            log.write({"event": "stop", "stage": stage, "need_minutes": round(need, 2),
                       "left_minutes": round(left, 2), "reason": "would not fit; run again to continue"})
            status = "paused"
            break
        log.write({"event": "begin", "stage": stage, "need_minutes": round(need, 2),
                   "left_minutes": None if left == float("inf") else round(left, 2)})
        t0 = time.perf_counter()
        result = RUNNERS[stage](args, out, log)
        for _ in range(3 if args.max_minutes > 0 else 0):   # stopped on its own limit with time left in this
            if result["complete"] or not budget.minutes_left() > need:     # device call: resume it now
                break
            log.write({"event": "resume", "stage": stage, "left_minutes": round(budget.minutes_left(), 2)})
            result = RUNNERS[stage](args, out, log)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        ran.append(stage)
        if not result["complete"]:
            log.write({"event": "incomplete", "stage": stage, "result": result,
                       "reason": "stopped on its own limit; the next call resumes it"})
            status = "paused"
            break
        atomic_write_text(marker, json.dumps(result, indent=1, default=str) + "\n")
        log.write({"event": "done", "stage": stage, "seconds": result["seconds"]})
    summary = {"status": status, "ran": ran, "minutes": round(budget.elapsed_s() / 60, 2), "args": asdict(args),
               "stages": {s: json.loads((out / s / DONE).read_text()) if (out / s / DONE).exists() else None
                          for s in STAGES}}
    atomic_write_text(out / "pipeline.json", json.dumps(summary, indent=1, default=str) + "\n")
    log.write({"event": "end", "status": status, "ran": ran})
    return summary


def main(argv=None) -> dict:
    from qzoom_agent.cli_args import parse_args

    return run_pipeline(parse_args(HeadsArgs, argv=argv))


if __name__ == "__main__":
    main()
