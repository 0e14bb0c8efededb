"""Q-Zoom Stage-3 gate labels: multi-budget answers → consistency filter → per-fetch label draw (method.md §2).

1. `answer_at_budgets` answers items with the plain model (QZoomModel, mode "base") at ascending budgets, each
   image encoded at exactly that budget (min = max tokens), and `write_records` appends them to a jsonl
   (atomic rewrite, resumable: ids already in the file are skipped). Record:
   {"id", "subset", "prompt", "budgets", "answers", "gt", "correct", "needs_hr"}.
2. `filter_records` keeps the records Q-Zoom trains on:
   - consensus: the answers at the two highest budgets must match each other, else "unstable";
   - GT consistency: that consensus must be correct, else "inconsistent";
   - transition: ≥1 wrong and ≥1 right, the wrong ones a contiguous prefix of the lowest budgets, else
     "non_monotone";
   - easy (all correct): subsampled 1:1 against the transitions (seeded), the rest "easy_surplus".
   Matching is on normalised strings (lower case, punctuation stripped, spaces collapsed), substring containment
   either way; an empty string matches nothing. `correct` at record time is the benchmark scorer's verdict OR a
   containment match with the GT strings.
3. `draw_label(record, rng)` per fetch: easy → a random budget outside the top two, label 0; transition →
   p 0.9 one of the two highest WRONG budgets, label 1; p 0.1 a correct budget outside the top two, label 0,
   or label −100 (ignored by the loss) when there is none.
"""
from __future__ import annotations

import json
import random
import re
import string
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..checkpoint import atomic_write_text

IGNORE = -100
P_POSITIVE = 0.9
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


# ------------------------------------------------------------------------------------------- matching
def normalize(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: "  The Code: K7Q-42X." → "the code k7q42x"."""
    return " ".join(_PUNCT.sub("", str(text).lower()).split())


def answers_match(a: str, b: str) -> bool:
    """Normalised substring containment in either direction; an empty side never matches."""
    na, nb = normalize(a), normalize(b)
    return bool(na) and bool(nb) and (na in nb or nb in na)


def is_correct(answer: str, gts: Sequence[str], verdict: bool | None = None) -> bool:
    """The scorer's verdict (when given and True) or a containment match with any GT string."""
    return bool(verdict) or any(answers_match(answer, g) for g in gts)


# ------------------------------------------------------------------------------------------- records
def make_record(item_id: str, budgets: Sequence[int], answers: Sequence[str], gts: Sequence[str],
                verdicts: Sequence[bool | None] | None = None, **extra) -> dict:
    """A label record; `correct[i]` = is_correct(answers[i], gts, verdicts[i])."""
    budgets = [int(b) for b in budgets]
    if budgets != sorted(budgets) or len(set(budgets)) != len(budgets):
        raise ValueError(f"budgets must be strictly ascending, got {budgets}")
    if len(answers) != len(budgets):
        raise ValueError(f"{len(answers)} answers for {len(budgets)} budgets")
    verdicts = list(verdicts) if verdicts is not None else [None] * len(budgets)
    correct = [is_correct(a, gts, v) for a, v in zip(answers, verdicts)]
    return {"id": str(item_id), "budgets": budgets, "answers": list(answers), "gt": list(gts),
            "correct": correct, **extra}


def read_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_records(path: str | Path, records: Iterable[dict]) -> None:
    """Append `records` to the jsonl at `path` by an atomic rewrite (old lines + new ones)."""
    old = read_records(path)
    lines = [json.dumps(r, sort_keys=True) for r in [*old, *records]]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


# ------------------------------------------------------------------------------------------- answering
def synthhr_target(item: dict) -> tuple[str, list[str], Callable[[str], bool]]:
    """(prompt, GT strings for containment, scorer verdict fn) of a SynthHR item via the benchmark's loader.

    MC items: the GT strings hold the option text only when it is longer than one character (a one-letter
    option text would match any answer containing that letter); the letter is judged by the V*/HR-Bench scorer.
    """
    from eval.benchmarks.synthhr import SynthHRLoader, item_to_doc

    loader = SynthHRLoader(items=[item])
    doc = item_to_doc(item)
    prompt = loader.doc_to_prompt_lmms(doc)
    if doc["options"]:
        text = item.get("answer_text") or doc["options"]["ABCD".index(doc["label"])]
        gts = [text] if len(normalize(text)) > 1 else []
    else:
        gts = list(doc["answers"])
    return prompt, gts, lambda response: float(loader.score(doc, response)["score"]) >= 0.999


def needs_hr_flags(item: dict) -> dict[str, bool]:
    """{"256": True, ...} from the generator's `needs_hr@B` keys (measurement only)."""
    return {k.split("@")[1]: bool(v) for k, v in item.items() if isinstance(k, str) and k.startswith("needs_hr@")}


def answer_at_budgets(model, items: Sequence[tuple[dict, object]], budgets: Sequence[int], *,
                      batch_size: int = 16, max_new_tokens: int = 16) -> list[dict]:
    """Records for (item, image) pairs: plain-model answers at each budget (min = max tokens), batched."""
    targets = [synthhr_target(it) for it, _ in items]
    answers = [[None] * len(budgets) for _ in items]
    for j, B in enumerate(budgets):
        for i in range(0, len(items), batch_size):
            chunk = list(range(i, min(i + batch_size, len(items))))
            outs = model.answer([_pil(items[k][1]) for k in chunk], [targets[k][0] for k in chunk], mode="base",
                                max_visual_tokens=int(B), min_visual_tokens=int(B), max_new_tokens=max_new_tokens)
            for k, a in zip(chunk, outs):
                answers[k][j] = a.text
    records = []
    for (it, _), (prompt, gts, verdict), ans in zip(items, targets, answers):
        records.append(make_record(it["question_id"], budgets, ans, gts, [verdict(a) for a in ans],
                                   subset=it.get("subset"), prompt=prompt, needs_hr=needs_hr_flags(it)))
    return records


def _pil(image):
    from PIL import Image

    return image if isinstance(image, Image.Image) else Image.fromarray(image)


# ------------------------------------------------------------------------------------------- filter
def classify(record: dict) -> str:
    """"easy" | "transition" | a drop reason: "unstable" | "inconsistent" | "non_monotone" | "too_few_budgets"."""
    answers, correct = record["answers"], record["correct"]
    if len(answers) < 3:
        return "too_few_budgets"                  # the draw needs budgets outside the top two
    if not answers_match(answers[-1], answers[-2]):
        return "unstable"
    if not (correct[-1] and correct[-2]):
        return "inconsistent"                     # consensus ≠ GT (one top answer matched GT only by the scorer)
    if all(correct):
        return "easy"
    n_wrong = correct.index(True)                 # length of the leading run of wrong budgets
    if n_wrong >= 1 and all(correct[n_wrong:]):
        return "transition"
    return "non_monotone"


def filter_records(records: Sequence[dict], seed: int = 0) -> tuple[list[dict], dict]:
    """(kept records, each with "kind" = "easy" | "transition"; statistics). Easy:transition = 1:1 at most."""
    kinds = [classify(r) for r in records]
    transitions = [dict(r, kind="transition") for r, k in zip(records, kinds) if k == "transition"]
    easy_all = [r for r, k in zip(records, kinds) if k == "easy"]
    rng = random.Random(seed)
    easy_idx = sorted(rng.sample(range(len(easy_all)), min(len(easy_all), len(transitions))))
    easy = [dict(easy_all[i], kind="easy") for i in easy_idx]
    kept = transitions + easy
    kept_ids = {r["id"] for r in easy}
    reasons = [k if k != "easy" or r["id"] in kept_ids else "easy_surplus" for r, k in zip(records, kinds)]
    return kept, label_stats(records, reasons)


def label_stats(records: Sequence[dict], reasons: Sequence[str]) -> dict:
    """Counts by outcome, overall and per subset, and the transition share of the kept set."""
    def summary(rs):
        c = Counter(rs)
        kept = c["transition"] + c["easy"]
        return {"n": len(rs), "kept": kept, "transition": c["transition"], "easy": c["easy"],
                "dropped": {k: v for k, v in sorted(c.items()) if k not in ("transition", "easy")},
                "transition_share": round(c["transition"] / kept, 4) if kept else None}

    out = summary(list(reasons))
    per: dict[str, list[str]] = {}
    for r, why in zip(records, reasons):
        per.setdefault(str(r.get("subset")), []).append(why)
    out["per_subset"] = {s: summary(v) for s, v in sorted(per.items())}
    return out


# ------------------------------------------------------------------------------------------- draw
def draw_label(record: dict, rng: random.Random) -> tuple[int, int]:
    """(budget, label) for one fetch of a kept record (see the module docstring); label −100 = ignore."""
    budgets, correct = record["budgets"], record["correct"]
    low = range(len(budgets) - 2)                                   # indices outside the top two
    if record["kind"] == "easy":
        return budgets[rng.choice(low)], 0
    if record["kind"] != "transition":
        raise ValueError(f"record {record.get('id')} has kind {record.get('kind')!r}")
    wrong = [i for i, ok in enumerate(correct) if not ok]
    if rng.random() < P_POSITIVE:
        return budgets[rng.choice(wrong[-2:])], 1
    right_low = [i for i in low if correct[i]]
    if not right_low:
        return budgets[wrong[-1]], IGNORE
    return budgets[rng.choice(right_low)], 0


def label_outcomes(record: dict) -> list[tuple[int, int]]:
    """Every (budget, label) the draw can give for a kept record, label −100 excluded."""
    budgets, correct = record["budgets"], record["correct"]
    low = range(len(budgets) - 2)
    if record["kind"] == "easy":
        return [(budgets[i], 0) for i in low]
    wrong = [i for i, ok in enumerate(correct) if not ok]
    return [(budgets[i], 1) for i in wrong[-2:]] + [(budgets[i], 0) for i in low if correct[i]]


def needs_hr_agreement(kept: Sequence[dict]) -> dict:
    """Agreement of the drawable labels with the generator's needs_hr@B (pairs whose B has a flag)."""
    pairs = []
    for r in kept:
        flags = r.get("needs_hr") or {}
        for b, y in label_outcomes(r):
            if str(b) in flags:
                pairs.append((y, int(flags[str(b)]), r.get("subset")))
    if not pairs:
        return {"n": 0}
    agree = sum(y == f for y, f, _ in pairs)
    tp = sum(y == 1 and f == 1 for y, f, _ in pairs)
    return {"n": len(pairs), "agreement": round(agree / len(pairs), 4),
            "label1_given_needs_hr": round(tp / max(1, sum(f for _, f, _ in pairs)), 4),
            "needs_hr_given_label1": round(tp / max(1, sum(y for y, _, _ in pairs)), 4)}
