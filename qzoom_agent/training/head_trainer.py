"""What the head trainers (Stage 1 `rpn_train`, Stage 3 `gate_train`) share: the LR schedule, a JSON-lines log, a
time / step budget and atomic, resumable checkpoints (method.md §3.4, §4).

The two trainers keep the on-disk checkpoint layouts they shipped with, so runs started before this module
existed resume unchanged:
  * folder (`save_state_dir`, the RPN's `checkpoint/`): <head_file>.safetensors (head tensors),
    optimizer.pt {"optimizer", "scheduler"}, trainer_state.json {"step", ...}; replaced as a whole.
  * file (`save_state_file`, the gate's `train_state.pt`): one torch pickle of a dict; replaced as a whole.
"""
from __future__ import annotations

import io
import json
import math
import random
import time
from pathlib import Path

import torch

from ..checkpoint import atomic_directory, atomic_write_bytes


# ------------------------------------------------------------------------------------------- schedule
def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier at 0-based `step`: linear warm-up (step + 1) / warmup_steps, then cosine from 1 to 0 at
    total_steps (HF's cosine schedule).

    Worked example: total 10, warm-up 2 → 0.5, 1.0, 1.0, 0.962, …, 0.038, then 0.0 from step 10 on.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps_of(ratio: float, total_steps: int) -> int:
    """Warm-up length from a ratio, as HF rounds it: ceil(ratio · total)."""
    return math.ceil(ratio * total_steps)


# ------------------------------------------------------------------------------------------------ log
class JsonlLog:
    """Appends one JSON object a line to `path` (created with its folder); `echo` also gets each line."""

    def __init__(self, path, echo=None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.echo = echo

    def write(self, record: dict) -> None:
        line = json.dumps(record)
        with open(self.path, "a") as f:
            f.write(line + "\n")
        if self.echo is not None:
            self.echo(line)


# ------------------------------------------------------------------------------------------- budget
class RunBudget:
    """Limits of one call of a trainer (a resumed run gets a fresh budget): `minutes` of wall time and
    `steps` optimiser steps; 0 means no limit. The clock starts at construction."""

    def __init__(self, minutes: float = 0.0, steps: int = 0) -> None:
        self.minutes, self.steps = minutes, steps
        self.t0 = time.perf_counter()

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t0

    def out_of_time(self) -> bool:
        return self.minutes > 0 and self.elapsed_s() > 60 * self.minutes

    def spent(self, steps_done: int) -> bool:
        """Out of time, or `steps_done` (in this call) reached the step limit."""
        return self.out_of_time() or (self.steps > 0 and steps_done >= self.steps)

    def minutes_left(self) -> float:
        """Minutes before the time limit (inf without one)."""
        return math.inf if self.minutes <= 0 else self.minutes - self.elapsed_s() / 60


class StepChores:
    """The per-step chores the RPN and SFT loops share, in their order: `record` (progress bar, log every
    `log_every` steps and at the last), then `checkpoint` (every `ckpt_every` steps, at the last step or when the
    budget's time is up; True means stop). `close` ends the bar and saves the final step unless already saved.
    `save(step)` writes the trainer's own checkpoint."""

    def __init__(self, *, total_steps: int, log_every: int, ckpt_every: int, log: JsonlLog, budget: RunBudget,
                 save, start_step: int, desc: str, progress: bool = True) -> None:
        self.total, self.log_every, self.ckpt_every = total_steps, log_every, ckpt_every
        self.log, self.budget, self.save, self.saved = log, budget, save, start_step
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, leave=False)

    def record(self, step: int, last: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{last['loss']:.4f}")
        if step % self.log_every == 0 or step == self.total:
            self.log.write(last)

    def checkpoint(self, step: int) -> bool:
        out_of_time = self.budget.out_of_time()
        if step % self.ckpt_every == 0 or step == self.total or out_of_time:
            self.save(step)
            self.saved = step
        return out_of_time

    def close(self, step: int) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.saved != step:
            self.save(step)


# ---------------------------------------------------------------------------------------- checkpoints
def rng_state(rng: random.Random) -> dict:
    """The data-order RNG and torch's CPU RNG, to resume the same label draws and shuffles."""
    return {"rng": rng.getstate(), "torch_rng": torch.get_rng_state()}


def restore_rng(state: dict) -> random.Random:
    """Inverse of `rng_state`: sets torch's CPU RNG and returns the data-order RNG."""
    rng = random.Random()
    rng.setstate(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    return rng


def head_tensors(module: torch.nn.Module) -> dict:
    """A head's state dict, detached on the CPU (what a checkpoint stores)."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def save_state_file(path, state: dict) -> None:
    """torch.save(state) to `path`, all or nothing."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state_file(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def save_state_dir(path, tensors: dict, head_file: str, optimizer, scheduler, trainer_state: dict) -> None:
    """Atomic folder: `head_file` (safetensors of `tensors`), optimizer.pt, trainer_state.json."""
    from safetensors.torch import save_file

    with atomic_directory(path) as tmp:
        save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(tmp / head_file))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state) + "\n")


def load_state_dir(path, head_file: str, optimizer, scheduler, map_location) -> tuple[dict, dict]:
    """Restore optimiser and scheduler from a `save_state_dir` folder; returns (head tensors, trainer_state)."""
    from safetensors.torch import load_file

    path = Path(path)
    opt = torch.load(path / "optimizer.pt", map_location=map_location, weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    return load_file(str(path / head_file)), json.loads((path / "trainer_state.json").read_text())


def has_state_dir(path) -> bool:
    """A complete `save_state_dir` folder exists (the atomic rename makes trainer_state.json its last word)."""
    return (Path(path) / "trainer_state.json").exists()
