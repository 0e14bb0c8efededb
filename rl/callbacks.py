"""`ZoomStatsCallback`: tool-use statistics per generation batch, a collapse alarm, and curves at the end.

The reward suite (rl/rewards.py) scores every rollout once per batch and hands the batch here (`record`). Per batch:
tool-call rate (all, `needs_hr` items, coarse items), share of calls spent on `needs_hr` items, coarse items answered
without zooming, invalid-call rate, crops and crop tokens per item, tokens per item, accuracy. The same numbers are
logged as `zoom/*` metrics through TRL (so they reach wandb/tensorboard); this callback also

- warns when a batch's call rate is 0, and loudly when it stayed 0 for `patience` batches in a row (tool-use
  collapse, anchors.md §5), with the collapse guard's bonus scale;
- writes `<output_dir>/zoom_stats.jsonl` (one line per batch) as training goes, and at the end
  `zoom_summary.json` and `curves.png` (reward, accuracy, call rates, invalid rate, crops, tokens over steps).
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger("rl.zoom_stats")

CURVES = (
    ("reward", ("reward",)),
    ("accuracy", ("rewards/accuracy/mean", "zoom/accuracy_needs_hr", "zoom/accuracy_coarse")),
    ("tool-call rate", ("zoom/call_rate", "zoom/call_rate_needs_hr", "zoom/call_rate_coarse")),
    ("where calls go", ("zoom/calls_on_needs_hr_share", "zoom/coarse_no_zoom_rate")),
    ("invalid-call rate", ("zoom/invalid_rate", "tools/failure_frequency")),
    ("crops per item", ("zoom/crops_per_item",)),
    ("tokens per item", ("zoom/completion_tokens", "completions/mean_length")),
    ("bonus scale (guard)", ("zoom/bonus_scale",)),
)


class ZoomStatsCallback(TrainerCallback):
    def __init__(self, output_dir: str | None = None, patience: int = 3, plot: bool = True) -> None:
        self.output_dir = Path(output_dir) if output_dir else None
        self.patience = int(patience)
        self.plot = plot
        self.batches: list[dict] = []
        self.zero_streak = 0
        self.zero_batches = 0
        self.is_main = True

    # -- fed by the reward suite --------------------------------------------------------------------------
    def record(self, scores, stats: dict) -> None:
        entry = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in stats.items()}
        entry["n"] = len(scores)
        self.batches.append(entry)
        if stats.get("call_rate", 1.0) == 0:
            self.zero_batches += 1
            self.zero_streak += 1
            log = logger.error if self.zero_streak >= self.patience else logger.warning
            log("tool-call rate is 0 at step %s (%d batch(es) in a row; needs_hr call rate %s, bonus scale %.2f)%s",
                stats.get("step"), self.zero_streak, entry.get("call_rate_needs_hr"), stats.get("bonus_scale", 1.0),
                ": tool use has collapsed" if self.zero_streak >= self.patience else "")
        else:
            self.zero_streak = 0
        if self.output_dir is not None and self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "zoom_stats.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")

    # -- trainer events -----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.is_main = state.is_world_process_zero
        if self.output_dir is None:
            self.output_dir = Path(args.output_dir)
        stats_file = self.output_dir / "zoom_stats.jsonl"
        if self.is_main and stats_file.exists() and not state.global_step:
            stats_file.unlink()

    def on_train_end(self, args, state, control, **kwargs):
        if not self.is_main or self.output_dir is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        summary = self.summary()
        (self.output_dir / "zoom_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        if self.plot:
            try:
                plot_curves(state.log_history, self.output_dir / "curves.png")
            except Exception as e:  # a plot must never fail a run
                logger.warning("could not plot curves: %s", e)

    def summary(self) -> dict:
        def series(key):
            return [b[key] for b in self.batches if b.get(key) is not None]

        out = {"batches": len(self.batches), "zero_call_rate_batches": self.zero_batches,
               "min_call_rate": min(series("call_rate"), default=None)}
        for key in ("call_rate", "call_rate_needs_hr", "call_rate_coarse", "calls_on_needs_hr_share",
                    "coarse_no_zoom_rate", "invalid_rate", "crops_per_item", "completion_tokens", "accuracy"):
            vals = series(key)
            out[key] = {"first": vals[0] if vals else None, "last": vals[-1] if vals else None,
                        "mean": sum(vals) / len(vals) if vals else None}
        return out


def plot_curves(log_history: list[dict], path) -> Path | None:
    """One panel per CURVES entry (the keys present in the trainer's log history) → PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, [k for k in keys if any(k in r for r in log_history)]) for title, keys in CURVES]
    panels = [(t, ks) for t, ks in panels if ks]
    if not panels:
        return None
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in log_history if k in r and r[k] is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=k.split("/")[-1] if len(keys) > 1 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class TimeLimitCallback(TrainerCallback):
    """Stop training (and save a checkpoint) once `minutes` of wall time have passed since `on_train_begin`.

    Device sessions are time-boxed; a run that ends on its clock leaves a checkpoint that
    `--resume_from_checkpoint last` continues from, instead of being killed mid-step with nothing saved.
    """

    def __init__(self, minutes: float) -> None:
        if minutes <= 0:
            raise ValueError(f"TimeLimitCallback needs minutes > 0, got {minutes}")
        self.seconds = 60.0 * float(minutes)
        self.t0: float | None = None
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.t0 is not None and time.monotonic() - self.t0 >= self.seconds and not control.should_training_stop:
            logger.warning("time limit of %.1f min reached at step %d: saving and stopping", self.seconds / 60,
                           state.global_step)
            self.stopped_at = state.global_step
            control.should_training_stop = True
            control.should_save = True
        return control


def log_history_from_text(text: str) -> list[dict]:
    """The trainer's printed per-step metric dicts (`{'loss': '0.1', ...}` lines of a log) as a log history with
    `step` 1, 2, ...: curves of a run that was stopped before `save_state` wrote trainer_state.json."""
    import ast
    import re

    history = []
    for match in re.finditer(r"\{'loss': [^{}]*\}", text):
        try:
            raw = ast.literal_eval(match.group(0))
        except (SyntaxError, ValueError):
            continue
        row = {}
        for k, v in raw.items():
            try:
                row[k] = float(v)
            except (TypeError, ValueError):
                row[k] = v
        row["step"] = len(history) + 1
        history.append(row)
    return history
