"""Evaluate a zoom-calling policy on SynthHR items with TRL's own rollout loop (greedy), and compare runs.

    python rl/evaluate.py --model_name_or_path runs/sft_policy --output_dir runs/eval_rl/before
    python rl/evaluate.py --model_name_or_path runs/rl_testbed/policy --output_dir runs/eval_rl/after
    python rl/evaluate.py --model_name_or_path runs/rl_deepeyes/policy --environment deepeyes --fuse_crops false \\
        --size_hint true --output_dir runs/eval_rl/deepeyes
    python rl/evaluate.py --compare runs/eval_rl/before,runs/eval_rl/after,runs/eval_rl/deepeyes \
        --output_dir runs/eval_rl

The rollouts are exactly the training ones (same prompt, tool schema, environment, token concatenation and fused
positions: `rl.train_grpo.build_trainer` + `GRPOTrainer.evaluate`), sampled greedily, one per item. Per subset and
overall: accuracy (the eval's scorers), tool-call rate on `needs_hr` and coarse items, share of calls on `needs_hr`
items, coarse items answered without zooming, invalid-call rate, crops, tokens after the prompt (policy text and tool
responses, crops included), and seconds per item (wall time of the batched evaluation / items; tool time apart).
Writes `records.jsonl`, `summary.json`, `summary.md`; `--compare` puts several summaries in one table.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rl.train_grpo import PolicyConfig, ScriptArguments  # noqa: E402

COLUMNS = (("accuracy", "acc"), ("call_rate_needs_hr", "zoom on needs_hr"), ("call_rate_coarse", "zoom on coarse"),
           ("calls_on_needs_hr_share", "calls on needs_hr"), ("coarse_no_zoom_rate", "coarse w/o zoom"),
           ("invalid_rate", "invalid calls"), ("crops_per_item", "crops/item"), ("completion_tokens", "tokens/item"),
           ("seconds_per_item", "s/item"))


@dataclass
class EvalArguments:
    split: str = field(default="test", metadata={"help": "SynthHR split: dev | test | tp"})
    limit_per_subset: int = field(default=50, metadata={"help": "items per subset"})
    eval_subsets: str = field(default="", metadata={"help": "comma-separated subsets (empty: all)"})
    compare: str = field(default="", metadata={"help": "comma-separated eval folders: write one table, no eval"})
    label: str = field(default="", metadata={"help": "name of this run in tables (default: the folder name)"})


def summarize(scores, seconds: float) -> dict:
    from rl.rewards import batch_stats

    n = max(1, len(scores))
    out = {"overall": {**batch_stats(scores), "items": len(scores), "seconds_per_item": seconds / n}}
    for subset in sorted({s.subset for s in scores}):
        sub = [s for s in scores if s.subset == subset]
        out[subset] = {**batch_stats(sub), "items": len(sub), "seconds_per_item": seconds / n}
    return out


def markdown(summaries: dict[str, dict], scope: str = "overall") -> str:
    def fmt(v):
        return "–" if v is None or (isinstance(v, float) and v != v) else (f"{v:.3f}" if isinstance(v, float) else v)

    head = "| run | " + " | ".join(c for _, c in COLUMNS) + " |\n" + "|---" * (len(COLUMNS) + 1) + "|\n"
    rows = [f"| {name} | " + " | ".join(str(fmt(s.get(scope, {}).get(k))) for k, _ in COLUMNS) + " |"
            for name, s in summaries.items()]
    return head + "\n".join(rows) + "\n"


def per_subset_table(summaries: dict[str, dict]) -> str:
    subsets = sorted({k for s in summaries.values() for k in s if k != "overall"})
    head = "| subset | " + " | ".join(summaries) + " |\n" + "|---" * (len(summaries) + 1) + "|\n"
    rows = []
    for sub in subsets:
        cells = []
        for s in summaries.values():
            v = s.get(sub, {}).get("accuracy")
            cells.append("–" if v is None else f"{v:.3f}")
        rows.append(f"| {sub} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def compare(folders: list[str], out: Path) -> str:
    summaries = {}
    for f in folders:
        saved = json.loads((Path(f) / "summary.json").read_text())
        label = saved.get("label") or Path(f).name
        summaries[label if label not in summaries else f"{label} ({f})"] = saved["summary"]
    text = "## Overall\n\n" + markdown(summaries) + "\n## Accuracy per subset\n\n" + per_subset_table(summaries)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(text)
    return text


def evaluate(script_args, training_args, model_args, eval_args) -> dict:
    from rl.data import synthhr_eval_dataset
    from rl.rewards import score_dict
    from rl.train_grpo import build_trainer

    subsets = [s for s in eval_args.eval_subsets.split(",") if s] or None
    ds = synthhr_eval_dataset(eval_args.split, subsets=subsets, limit=eval_args.limit_per_subset,
                              scale=script_args.synthhr_scale, n_candidates=script_args.synthhr_n_candidates,
                              budget=script_args.needs_hr_budget or script_args.budget_tokens,
                              prompt_mode=script_args.prompt_mode)
    training_args.generation_kwargs = {**(training_args.generation_kwargs or {}), "do_sample": False}
    training_args.num_generations_eval = 1
    trainer, run = build_trainer(script_args, training_args, model_args, train_dataset=ds)
    collected = []
    run.rewards.sinks.append(lambda scores, stats: collected.extend(scores))
    t0 = time.perf_counter()
    metrics = trainer.evaluate(eval_dataset=ds)
    seconds = time.perf_counter() - t0
    out = Path(training_args.output_dir)
    summary = summarize(collected, seconds)
    if trainer.accelerator.is_main_process:
        with open(out / "records.jsonl", "w") as f:
            for s in collected:
                f.write(json.dumps(score_dict(s)) + "\n")
        label = eval_args.label or out.name
        result = {"label": label, "policy": model_args.model_name_or_path, "environment": script_args.environment,
                  "split": eval_args.split, "limit_per_subset": eval_args.limit_per_subset,
                  "batch_size": training_args.per_device_eval_batch_size, "seconds": seconds,
                  "trl_metrics": metrics, "summary": summary}
        (out / "summary.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        (out / "summary.md").write_text(markdown({label: summary}) + "\n" + per_subset_table({label: summary}))
    return summary


def main(argv=None):
    import argparse

    from trl import GRPOConfig, TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--compare" in argv:  # tables only: no model, no trainer config
        p = argparse.ArgumentParser()
        p.add_argument("--compare", required=True)
        p.add_argument("--output_dir", required=True)
        a = p.parse_args(argv)
        print(compare([f for f in a.compare.split(",") if f], Path(a.output_dir)))
        return None
    parser = TrlParser((ScriptArguments, GRPOConfig, PolicyConfig, EvalArguments))
    script_args, training_args, model_args, eval_args = parser.parse_args_and_config(argv)
    summary = evaluate(script_args, training_args, model_args, eval_args)
    print(markdown({Path(training_args.output_dir).name: summary}))
    return summary


if __name__ == "__main__":
    main()
