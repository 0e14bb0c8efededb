"""RL / SFT rows: SynthHR's training stream (default) or a local parquet/jsonl file, in the form TRL's GRPO reads.

One row (what `reset(**row)` and the reward functions receive):

    prompt    [system, user([{"type": "image"}, {"type": "text", "text": <benchmark prompt>}])]
    images    [PIL]  the ORIGINAL image: the trainer's processor shows the policy a coarse view at the model's
              budget, the zoom tool crops this full-resolution image
    question  the prompt text (the zoom tool's default query)
    item      the item as JSON (question, answer, options, schema, subset, needs_hr@B ...): the eval's scorer reads it
    needs_hr  whether the coarse view at the training budget hides the answer (None when unknown)
    subset    SynthHR subset (or the file's `subset` column, else "custom")

Rows are built lazily (`Dataset.with_transform`), so a run of any length renders only the images it draws.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from eval.benchmarks.base import decode_image
from eval.benchmarks.synthhr import SynthHRLoader, item_to_doc

DEFAULT_SYSTEM_PROMPT = None  # filled lazily from qzoom_agent.graph (the inference agent's prompt)


def system_prompt() -> str:
    """The inference agent's system prompt (qzoom_agent.graph.DEFAULT_SYSTEM_PROMPT): train what inference runs."""
    global DEFAULT_SYSTEM_PROMPT
    if DEFAULT_SYSTEM_PROMPT is None:
        from qzoom_agent.graph import DEFAULT_SYSTEM_PROMPT as text

        DEFAULT_SYSTEM_PROMPT = text
    return DEFAULT_SYSTEM_PROMPT


_LOADER = SynthHRLoader(items=[])


def item_prompt(item: dict, mode: str = "lmms_eval") -> str:
    """The eval's prompt text for an item (V*/HR-Bench MC prompt, or question + single-word suffix)."""
    return _LOADER.doc_to_prompt(item_to_doc(item), mode=mode)


def chat_prompt(text: str, n_images: int = 1, system: str | None = "default") -> list[dict]:
    """[system?, user(images..., text)] with image placeholders, as TRL's multimodal prompts."""
    sys_text = system_prompt() if system == "default" else system
    messages = [{"role": "system", "content": sys_text}] if sys_text else []
    messages.append({"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]})
    return messages


def needs_hr_at(item: dict, budget: int | None) -> bool | None:
    """`needs_hr@budget` of a SynthHR item (None if the item has no label at that budget)."""
    if budget is None:
        return None
    v = item.get(f"needs_hr@{int(budget)}")
    if v is None and isinstance(item.get("needs_hr"), (bool, int)) and not isinstance(item.get("needs_hr"), dict):
        v = item["needs_hr"]
    return None if v is None else bool(v)


def to_row(item: dict, images: list, *, budget: int | None, prompt_mode: str = "lmms_eval",
           system: str | None = "default") -> dict:
    """One RL row (module docstring) from an item dict and its image(s)."""
    text = item_prompt(item, prompt_mode)
    return {
        "prompt": chat_prompt(text, len(images), system),
        "images": list(images),
        "question": text,
        "item": json.dumps(item, default=_json_default, sort_keys=True),
        "needs_hr": needs_hr_at(item, budget),
        "subset": str(item.get("subset") or "custom"),
    }


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _columns(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]}


class SynthHRRows:
    """Transform: stream positions `k` → rendered SynthHR training rows (picklable, for DataLoader workers)."""

    def __init__(self, scale: str = "mini", subsets: Sequence[str] | None = None, start: int = 0,
                 budget: int | None = 256, prompt_mode: str = "lmms_eval", system: str | None = "default",
                 n_candidates: int | None = None) -> None:
        from eval.synthhr import SUBSETS

        self.scale, self.start, self.budget, self.n_candidates = scale, int(start), budget, n_candidates
        self.subsets = tuple(subsets or SUBSETS)
        self.prompt_mode, self.system = prompt_mode, system
        self._cfg = None

    @property
    def cfg(self):
        if self._cfg is None:
            from eval.synthhr import SynthHRConfig

            self._cfg = SynthHRConfig(scale=self.scale, n_candidates=self.n_candidates)
        return self._cfg

    def item(self, k: int) -> dict:
        from eval.synthhr.stream import train_item

        return train_item(self.cfg, self.subsets, self.start + int(k))

    def row(self, k: int) -> dict:
        from eval.synthhr import render_item

        item = self.item(k)
        return to_row(item, [render_item(item, self.cfg)], budget=self.budget, prompt_mode=self.prompt_mode,
                      system=self.system)

    def __call__(self, batch: dict) -> dict:
        return _columns([self.row(k) for k in batch["k"]])

    def __getstate__(self):
        return {**self.__dict__, "_cfg": None}


class LocalRows:
    """Transform: rows of a local file (image(s), question, answer[, options, subset, needs_hr]) → RL rows."""

    def __init__(self, root: str | None, budget: int | None = None, prompt_mode: str = "lmms_eval",
                 system: str | None = "default") -> None:
        self.root, self.budget, self.prompt_mode, self.system = root, budget, prompt_mode, system

    def row(self, raw: dict, index: int) -> dict:
        images = raw.get("images")
        if images is None or (hasattr(images, "__len__") and len(images) == 0):
            images = [raw.get("image")]
        pil = [decode_image(im, str(raw.get("question_id", index)), self.root) for im in images]
        options = raw.get("options")
        options = list(options) if options is not None and len(options) > 0 else None
        answer = raw["answer"]
        item = {"question": str(raw["question"]), "answer": answer if not isinstance(answer, list) else answer,
                "options": options, "schema": str(raw.get("schema") or ("vstar" if options else "doc")),
                "subset": str(raw.get("subset") or "custom"), "question_id": str(raw.get("question_id", index))}
        if raw.get("needs_hr") is not None:
            item["needs_hr"] = bool(raw["needs_hr"])
        for key, value in raw.items():  # keep per-budget labels (needs_hr@256 ...)
            if isinstance(key, str) and key.startswith(("needs_hr@", "cue_visible@")) and value is not None:
                item[key] = bool(value)
        row = to_row(item, pil, budget=self.budget, prompt_mode=self.prompt_mode, system=self.system)
        if row["needs_hr"] is None and "needs_hr" in item:
            row["needs_hr"] = item["needs_hr"]
        return row

    def __call__(self, batch: dict) -> dict:
        keys = list(batch)
        n = len(batch[keys[0]])
        return _columns([self.row({k: batch[k][i] for k in keys}, i) for i in range(n)])


def synthhr_dataset(n: int, *, scale: str = "mini", subsets: Sequence[str] | None = None, start: int = 0,
                    budget: int | None = 256, prompt_mode: str = "lmms_eval", system: str | None = "default",
                    n_candidates: int | None = None):
    """A map-style `datasets.Dataset` of `n` SynthHR training rows (positions start..start+n-1), built lazily.
    `n_candidates`: the generator's level (objects of the asked kind; 1 = single candidate, None = subset default)."""
    from datasets import Dataset

    return Dataset.from_dict({"k": list(range(int(n)))}).with_transform(
        SynthHRRows(scale, subsets, start, budget, prompt_mode, system, n_candidates))


class ItemRows:
    """Transform: item JSON → rendered rows (fixed evaluation items)."""

    def __init__(self, scale: str = "mini", budget: int | None = 256, prompt_mode: str = "lmms_eval",
                 system: str | None = "default", n_candidates: int | None = None) -> None:
        self.scale, self.budget, self.prompt_mode, self.system = scale, budget, prompt_mode, system
        self.n_candidates = n_candidates

    def __call__(self, batch: dict) -> dict:
        from eval.synthhr import SynthHRConfig, render_item

        cfg = SynthHRConfig(scale=self.scale, n_candidates=self.n_candidates)
        rows = []
        for text in batch["item_json"]:
            item = json.loads(text)
            rows.append(to_row(item, [render_item(item, cfg)], budget=self.budget, prompt_mode=self.prompt_mode,
                               system=self.system))
        return _columns(rows)


def synthhr_eval_dataset(split: str = "test", *, subsets: Sequence[str] | None = None, limit: int = 50,
                         scale: str = "mini", budget: int | None = 256, prompt_mode: str = "lmms_eval",
                         system: str | None = "default", n_candidates: int | None = None):
    """The first `limit` items of each subset of a SynthHR split (dev / test / tp), as lazily rendered rows."""
    from datasets import Dataset

    from eval.synthhr import SUBSETS, SynthHRConfig, make_items

    cfg = SynthHRConfig(scale=scale, n_candidates=n_candidates)
    items = [it for s in (subsets or SUBSETS) for it in make_items(cfg, subset=s, split=split, n=int(limit))]
    texts = [json.dumps(it, default=_json_default, sort_keys=True) for it in items]
    return Dataset.from_dict({"item_json": texts}).with_transform(
        ItemRows(scale, budget, prompt_mode, system, n_candidates))


def local_dataset(path: str, *, budget: int | None = None, prompt_mode: str = "lmms_eval",
                  system: str | None = "default", limit: int | None = None):
    """A local parquet / jsonl file (or folder of them) as lazily built RL rows. Image paths are relative to it."""
    from datasets import load_dataset

    p = Path(path)
    files = sorted(str(f) for f in p.iterdir() if f.suffix in (".parquet", ".jsonl", ".json")) if p.is_dir() \
        else [str(p)]
    if not files:
        raise FileNotFoundError(f"no parquet/jsonl files at {path}")
    kind = "parquet" if files[0].endswith(".parquet") else "json"
    ds = load_dataset(kind, data_files=files, split="train")
    for col in ("question", "answer"):
        if col not in ds.column_names:
            raise ValueError(f"{path}: the dataset needs a {col!r} column (has {ds.column_names})")
    if "image" not in ds.column_names and "images" not in ds.column_names:
        raise ValueError(f"{path}: the dataset needs an 'image' or 'images' column (has {ds.column_names})")
    if limit:
        ds = ds.select(range(min(int(limit), len(ds))))
    root = str(p if p.is_dir() else p.parent)
    return ds.with_transform(LocalRows(root, budget, prompt_mode, system))
