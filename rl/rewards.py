"""Rewards for zoom-calling policies: answer accuracy (the eval's scorers), format, zoom cost, conditional tool bonus.

    r = w_acc · acc + w_fmt · fmt + w_cost · cost + w_bonus · g · 1[zoomed ∧ correct ∧ needs_hr]

acc    ∈ [0, 1]   the benchmark scorer of the item (V*/HR-Bench letter, relaxed accuracy, ANLS) on the final answer
                  (`<answer>X</answer>` if present); no final answer scores 0.
fmt    ∈ [-1, 0]  −0.5 per invalid call (malformed `<tool_call>` text, unknown tool, refused arguments), −0.5
                  for an answer outside `<answer></answer>` (unless `answer_tag` is off: policies cold-started on
                  bare answers), −1 for no final answer; clipped at −1.
cost   ≤ 0        −1 per zoom call on an item whose coarse view already suffices (`needs_hr` False), and −1 per
                  call beyond `free_calls` on items that need it (or whose need is unknown).
bonus  ∈ {0, 1}   DeepEyes' conditional tool reward (anchors.md §2–§3: `1.2·[tool used ∧ acc]`), further
                  conditioned on `needs_hr` when the item carries it; g ≥ 1 is the collapse guard's scale.

Why this reward, and not accuracy alone:
- Tool-use collapse (anchors.md §5: DeepEyes #55/#78/#100, Pixel-Reasoner #39, CoF #12) happens when zooming never
  pays more than guessing from the coarse view: the policy drops the tool and the call rate decays to 0. DeepEyes'
  ablation (no tool reward 53.4 vs conditional 75.1 on HR-4K) shows the conditional bonus is what keeps tool use.
  Our bonus pays only a zoom that ended in a correct answer, so zooming without reading the crop earns nothing
  (an unconditional bonus is farmed: DeepEyes' unconditional variant trails on V*).
- Over-zoom (always-tool agents, e.g. DeepEyesV2's 99.7% tool rate, anchors.md §4) wastes tokens. SynthHR labels
  `needs_hr` analytically, so the bonus is paid only where the coarse view hides the answer, and calls on items
  that did not need them cost: the optimum is the gate's behaviour, zoom exactly when it helps.
- Invalid calls cost format reward, so a policy cannot trade malformed calls for exploration.
- Collapse guard: `CollapseGuard` tracks the call rate on `needs_hr` items (EMA over generation batches, counted over
  all processes so every rank pays the same bonus); below `floor` the bonus scale g grows ×`growth` per batch (up to
  `max_scale`), above it g decays back to 1. With GRPO's group-relative advantages this keeps a positive advantage
  for the zoomed-and-correct rollouts of a group even when they are rare. The callback (rl/callbacks.py) warns
  whenever a batch's call rate hits 0.

Each term is its own TRL reward function (`rewards/<name>/mean` in the logs); weights come from
`GRPOConfig.reward_weights` in the order of `ZoomRewards.funcs()`: accuracy, format, zoom_cost, tool_bonus.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Callable

from eval.benchmarks.synthhr import SynthHRLoader, item_to_doc

REWARD_NAMES = ("accuracy", "format", "zoom_cost", "tool_bonus")
DEFAULT_WEIGHTS = (1.0, 0.2, 0.2, 0.5)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
# A tool call TRL could not parse, left as text. The testbed policy often wrote the call's JSON without its opening
# `<tool_call>` (second GPU run); looking for the tag alone scored those as wrong answers, so the JSON is a sign too
_CALL_TEXT = re.compile(r"</?tool_call>|\"(?:name|arguments)\"\s*:|^\s*\{")
_LOADER = SynthHRLoader(items=[])


# ------------------------------------------------------------------------------------------------ parsing

def message_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return "" if content is None else str(content)


def looks_like_tool_call(text: str) -> bool:
    """Text that tried to be a tool call (tags, or the call's JSON without them), not an answer."""
    return bool(_CALL_TEXT.search(text or ""))


def final_answer(completion) -> str | None:
    """The last assistant message's text when it ends the rollout without a tool call, else None."""
    if isinstance(completion, str):
        return completion
    if not completion:
        return None
    last = completion[-1]
    if last.get("role") != "assistant" or last.get("tool_calls"):
        return None
    text = message_text(last)
    return None if looks_like_tool_call(text) else text  # an unparsed call is not an answer


def rollout_text(completion, limit: int = 400) -> str:
    """A rollout in one line for the logs: each message's role and text, tool calls as JSON, images as [image]."""
    if isinstance(completion, str):
        return completion[:limit]
    parts = []
    for m in completion or []:
        text = message_text(m)
        if isinstance(m.get("content"), list):
            text += "[image]" * sum(isinstance(b, dict) and b.get("type") == "image" for b in m["content"])
        calls = [json.dumps(c.get("function", c), default=str) for c in m.get("tool_calls") or []]
        parts.append(f"{m.get('role')}: {text}{' '.join(calls)}")
    return " | ".join(parts)[:limit]


def is_tool_error(message: dict) -> bool:
    """A tool message holding TRL's `{"error": ...}` (a raised tool, an unknown tool name, bad arguments)."""
    content = message.get("content")
    if isinstance(content, dict):
        return "error" in content
    return isinstance(content, str) and content.lstrip().startswith(("{'error'", '{"error"'))


@dataclass
class RolloutScore:
    """Everything the reward terms and the stats need about one rollout."""

    accuracy: float = 0.0
    answered: bool = False
    tagged: bool = False
    calls: int = 0                 # tool calls attempted (executed, refused, or malformed text)
    invalid: int = 0               # refused + malformed
    crops: int = 0
    crop_tokens: int = 0
    needs_hr: bool | None = None
    subset: str = ""
    item_id: str = ""
    completion_tokens: int = 0     # tokens after the prompt: the policy's text plus tool responses (crops included)
    tool_seconds: float = 0.0
    text: str = ""                 # the rollout in one line (`rollout_text`): eval records show what was written

    @property
    def zoomed(self) -> bool:
        return self.crops > 0

    @property
    def correct(self) -> bool:
        return self.accuracy >= 0.5


@lru_cache(maxsize=4096)
def _doc(item_json: str) -> dict:
    return item_to_doc(json.loads(item_json))


def score_answer(item: dict | str, response: str | None) -> float:
    """The eval's score of `response` on the item (0 for no response)."""
    if response is None:
        return 0.0
    doc = _doc(item if isinstance(item, str) else json.dumps(item, sort_keys=True, default=str))
    return float(_LOADER.score(doc, response)["score"])


def score_rollout(completion, item, *, env=None, needs_hr=None, subset: str = "",
                  completion_ids=None) -> RolloutScore:
    """Read one rollout (TRL's list of messages, roles assistant/tool/...) and its environment log."""
    s = RolloutScore(needs_hr=None if needs_hr is None else bool(needs_hr), subset=subset or "")
    messages = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
    malformed = 0
    for m in messages:
        if m.get("role") == "assistant" and not m.get("tool_calls") and looks_like_tool_call(message_text(m)):
            malformed += 1  # TRL could not parse it: plain text, no tool ran
    tool_msgs = [m for m in messages if m.get("role") == "tool"]
    failed = sum(is_tool_error(m) for m in tool_msgs)
    s.calls = len(tool_msgs) + malformed
    s.invalid = failed + malformed
    log = getattr(env, "log", None)
    if log is not None:
        s.crops, s.crop_tokens, s.tool_seconds = log.crops, log.crop_tokens, log.seconds
    else:
        s.crops = sum(1 for m in tool_msgs for b in (m.get("content") if isinstance(m.get("content"), list) else [])
                      if isinstance(b, dict) and b.get("type") == "image")
    text = final_answer(completion)
    if item is not None:
        s.item_id = str(_doc(item if isinstance(item, str) else json.dumps(item, sort_keys=True, default=str))
                        .get("question_id", ""))
    s.answered = text is not None and text.strip() != ""
    s.tagged = s.answered and bool(_ANSWER_TAG.search(text))
    s.accuracy = score_answer(item, text) if s.answered and item is not None else 0.0
    if completion_ids is not None:
        s.completion_tokens = len(completion_ids)
    s.text = rollout_text(completion)
    return s


# ------------------------------------------------------------------------------------------------ terms

def format_term(s: RolloutScore, answer_tag: bool = True) -> float:
    penalty = 0.5 * s.invalid + (0.0 if s.tagged or s.answered and not answer_tag else 0.5 if s.answered else 1.0)
    return -min(1.0, penalty)


def zoom_cost_term(s: RolloutScore, free_calls: int = 2) -> float:
    valid = s.calls - s.invalid
    if s.needs_hr is False:
        return -float(valid)
    return -float(max(0, valid - free_calls))


def bonus_term(s: RolloutScore, needs_hr_only: bool = True) -> float:
    if not (s.zoomed and s.correct):
        return 0.0
    if needs_hr_only and s.needs_hr is False:
        return 0.0
    return 1.0


@dataclass
class CollapseGuard:
    """Scales the tool bonus up while the call rate on `needs_hr` items sits below `floor` (EMA over batches)."""

    floor: float = 0.1
    growth: float = 1.5
    max_scale: float = 8.0
    momentum: float = 0.7
    scale: float = 1.0
    ema: float | None = None

    def update(self, rate: float | None) -> float:
        if rate is None or (isinstance(rate, float) and math.isnan(rate)):
            return self.scale
        self.ema = rate if self.ema is None else self.momentum * self.ema + (1 - self.momentum) * rate
        if self.ema < self.floor:
            self.scale = min(self.max_scale, self.scale * self.growth)
        else:
            self.scale = max(1.0, self.scale / self.growth)
        return self.scale


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sums over the processes of a distributed run (every rank scores its batch in step), else `values`."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def batch_stats(scores: list[RolloutScore]) -> dict[str, float]:
    """Tool-use statistics of one generation batch (NaN where a group is empty)."""
    hr = [s for s in scores if s.needs_hr is True]
    coarse = [s for s in scores if s.needs_hr is False]
    calls = sum(s.calls for s in scores)
    valid_on_hr = sum(s.calls - s.invalid for s in hr)
    valid = sum(s.calls - s.invalid for s in scores)
    return {
        "call_rate": _mean(s.calls > 0 for s in scores),
        "call_rate_needs_hr": _mean(s.calls > 0 for s in hr),
        "call_rate_coarse": _mean(s.calls > 0 for s in coarse),
        "calls_per_item": _mean(s.calls for s in scores),
        "calls_on_needs_hr_share": valid_on_hr / valid if valid and (hr or coarse) else float("nan"),
        "coarse_no_zoom_rate": _mean(s.calls == 0 for s in coarse),
        "invalid_rate": sum(s.invalid for s in scores) / calls if calls else 0.0,
        "crops_per_item": _mean(s.crops for s in scores),
        "crop_tokens_per_item": _mean(s.crop_tokens for s in scores),
        "completion_tokens": _mean(s.completion_tokens for s in scores),
        "accuracy": _mean(s.accuracy for s in scores),
        "accuracy_needs_hr": _mean(s.accuracy for s in hr),
        "accuracy_coarse": _mean(s.accuracy for s in coarse),
        "answered_rate": _mean(s.answered for s in scores),
        "tool_seconds_per_item": _mean(s.tool_seconds for s in scores),
    }


@dataclass
class ZoomRewards:
    """The four reward functions over one shared per-batch scoring (each rollout is scored once per batch).

    `funcs()` returns them for `GRPOTrainer(reward_funcs=...)`. The first call of a batch also updates the
    collapse guard, logs `zoom/*` metrics through TRL's `log_metric`, and hands the batch to `sinks`
    (e.g. `ZoomStatsCallback.record`).
    """

    free_calls: int = 2
    bonus_needs_hr_only: bool = True
    answer_tag: bool = True
    guard: CollapseGuard = field(default_factory=CollapseGuard)
    sinks: list[Callable[[list[RolloutScore], dict], None]] = field(default_factory=list)
    _cache_key: Any = None
    _cache: list = field(default_factory=list)

    def scores(self, completions, kwargs) -> list[RolloutScore]:
        """Scores of this batch; computed (and published) on the first call for a `completions` list."""
        if completions is self._cache_key and len(self._cache) == len(completions):
            return self._cache
        n = len(completions)
        items = kwargs.get("item") or [None] * n
        envs = kwargs.get("environments") or [None] * n
        needs = kwargs.get("needs_hr") or [None] * n
        subsets = kwargs.get("subset") or [""] * n
        ids = kwargs.get("completion_ids") or [None] * n
        scores = [score_rollout(c, it, env=e, needs_hr=nh, subset=sb, completion_ids=ci)
                  for c, it, e, nh, sb, ci in zip(completions, items, envs, needs, subsets, ids)]
        self._cache_key, self._cache = completions, scores  # holding the list: its identity is the batch's
        self._publish(scores, kwargs)
        return scores

    def _publish(self, scores: list[RolloutScore], kwargs) -> None:
        stats = batch_stats(scores)
        hr = [s for s in scores if s.needs_hr is True]
        hits, n = all_reduce_sum([float(sum(s.calls > 0 for s in hr)), float(len(hr))])
        stats["bonus_scale"] = self.guard.update(hits / n if n else None)  # one scale on every rank
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            for k, v in stats.items():
                if not (isinstance(v, float) and math.isnan(v)):
                    log_metric(f"zoom/{k}", float(v))
        state = kwargs.get("trainer_state")
        stats["step"] = getattr(state, "global_step", None)
        # one rollout of a needs_hr item and one of a coarse item: what the policy actually writes
        firsts = (next((s for s in scores if s.needs_hr is want), None) for want in (True, False))
        stats["samples"] = [s.text for s in firsts if s is not None]
        for sink in self.sinks:
            sink(scores, stats)

    def _make(self, name: str, term: Callable[[RolloutScore], float]):
        def reward(prompts=None, completions=None, completion_ids=None, **kwargs):
            kwargs["completion_ids"] = completion_ids
            return [term(s) for s in self.scores(completions, kwargs)]

        reward.__name__ = name
        reward.__qualname__ = name
        return reward

    def funcs(self) -> list:
        return [
            self._make("accuracy", lambda s: s.accuracy),
            self._make("format", lambda s: format_term(s, self.answer_tag)),
            self._make("zoom_cost", lambda s: zoom_cost_term(s, self.free_calls)),
            self._make("tool_bonus", lambda s: bonus_term(s, self.bonus_needs_hr_only) * self.guard.scale),
        ]


def score_dict(s: RolloutScore) -> dict:
    return {**asdict(s), "zoomed": s.zoomed, "correct": s.correct}
