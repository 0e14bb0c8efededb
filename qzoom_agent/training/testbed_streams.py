"""DataLoader streams for testbed training: glyph sheets (dense ViT labels) and SynthHR QA batches.

Each worker yields whole batches (lists of `Seq`) filled up to a visual-token budget. A shared
`progress` value (0→1, written by the trainer) drives the curriculum: SynthHR `detail_scale` goes from
`detail_scale_start` down to 1 (targets first large, then at evaluation size) over `curriculum_frac`.
"""
from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass

import numpy as np
import torch

from .glyph_sheets import render_sheet
from .testbed_data import SeqBuilder, item_prompt, make_views, target_box

CELL = 28


@dataclass
class QAMix:
    subsets: tuple = ("attr-cue", "fsp-4k", "doc-code", "coarse")
    weights: tuple = (0.35, 0.25, 0.15, 0.25)
    mode_coarse: float = 0.3      # one view at 256 tokens
    mode_crop: float = 0.45       # global@256 + oracle-ish crop
    mode_budget: float = 0.25     # one view at 576 … native (≤ 2304 tokens)
    free_form: float = 0.25       # answer text instead of the option letter ("single word or phrase")
    system_p: float = 0.5
    detail_scale_start: float = 2.5
    curriculum_frac: float = 0.6
    n_candidates: int = 1
    tokens_per_batch: int = 14000
    # stage 4: several prompts per rendered item (they share its images and ViT pass): a comma list of
    # "free" (question + "single word or phrase" -> the option text) and "mc" (options in a fresh random
    # order -> the letter). Items without options get one free-form prompt. Empty: one prompt per item
    # (MC, or free-form with probability `free_form`), as in stages 1-3.
    per_item: str = ""


class SheetStream(torch.utils.data.IterableDataset):
    """Batches of glyph sheets. `landmarks` / `carrier_frac` go to `render_sheet` (stage 6: large landmark shapes
    and fewer carriers, for the `shape` / `size` / `side` labels); the defaults give the sheets of stages 1-5."""

    def __init__(self, seed: int, batch: int = 48, font_px=(5, 44), landmarks=(0, 0), carrier_frac: float = 1.0):
        self.seed, self.batch, self.font_px = seed, batch, font_px
        self.landmarks, self.carrier_frac = tuple(landmarks), carrier_frac

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        torch.set_num_threads(1)
        rng = np.random.default_rng([self.seed, wid, 7])
        sizes = ((448, 448), (448, 448), (336, 336), (560, 448), (448, 560), (672, 672))
        while True:
            w, h = sizes[int(rng.integers(len(sizes)))]
            n = max(4, int(self.batch * 448 * 448 / (w * h)))
            imgs, labs = [], []
            for _ in range(n):
                img, lab, _ = render_sheet(rng, w, h, font_px=self.font_px, landmarks=self.landmarks,
                                          carrier_frac=self.carrier_frac)
                imgs.append(img)
                labs.append(lab)
            yield imgs, labs


class QAStream(torch.utils.data.IterableDataset):
    def __init__(self, tok, seed: int, mix: QAMix, progress=None, max_budget: int = 2304):
        self.b = SeqBuilder(tok)
        self.tok = tok
        self.seed, self.mix, self.progress, self.max_budget = seed, mix, progress, max_budget

    def _cfg(self, cache: dict):
        from eval.synthhr import SynthHRConfig

        p = float(self.progress.value) if self.progress is not None else 1.0
        m = self.mix
        f = min(1.0, p / max(1e-6, m.curriculum_frac))
        ds = round((m.detail_scale_start + (1.0 - m.detail_scale_start) * f) * 4) / 4
        if ds not in cache:
            cache[ds] = SynthHRConfig(scale="mini", n_candidates=m.n_candidates, detail_scale=ds)
        return cache[ds]

    def _prompts(self, rng, item):
        """[(prompt, answer, fmt, lens token id or None)] for one item (see `QAMix.per_item`)."""
        from eval.benchmarks.doc import SINGLE_WORD_OR_PHRASE

        m = self.mix
        opts = item.get("options")
        if not m.per_item:
            prompt, ans = item_prompt(item)
            if opts and rng.random() < m.free_form:
                return [(item["question"] + SINGLE_WORD_OR_PHRASE, opts["ABCD".index(ans)], "free", None)]
            return [(prompt, ans, "mc" if opts else "free", None)]
        if not opts:
            prompt, ans = item_prompt(item)
            return [(prompt, ans, "free", None)]
        text = opts["ABCD".index(item_prompt(item)[1])]
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        lens = ids[0] if len(ids) == 1 else None     # one-token answers (glyph, count, colour): the lens target
        out = []
        for fmt in m.per_item.split(","):
            if fmt == "free":
                out.append((item["question"] + SINGLE_WORD_OR_PHRASE, text, "free", None))
            elif fmt == "mc":
                out.append(mc_permuted(rng, item, text) + ("mc", lens))
            else:
                raise ValueError(f"per_item entry {fmt!r}: expected 'free' or 'mc'")
        return out

    def __iter__(self):
        from eval.synthhr import make_item, render_item

        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        torch.set_num_threads(1)
        rng = np.random.default_rng([self.seed, wid, 11])
        m = self.mix
        cache: dict = {}
        w = np.asarray(m.weights, float) / sum(m.weights)
        k = int(rng.integers(1 << 40))
        while True:
            cfg = self._cfg(cache)
            u = rng.random()
            mode = "coarse" if u < m.mode_coarse else ("crop" if u < m.mode_coarse + m.mode_crop else "budget")
            seqs, tokens = [], 0
            while tokens < m.tokens_per_batch:
                subset = m.subsets[int(rng.choice(len(w), p=w))]
                k += 1
                try:
                    item = make_item(cfg, subset, "train", k)
                    canvas = np.asarray(render_item(item, cfg).convert("RGB"), dtype=np.uint8)
                except Exception:
                    continue
                box = target_box(item)
                if box is None:
                    continue
                budget = 256
                if mode == "budget":
                    budget = int(rng.choice([576, 1024, self.max_budget]))
                images, slots, crop = make_views(rng, canvas, box, "crop" if mode == "crop" else "coarse",
                                                 budget=budget)
                group = len(seqs)
                for prompt, ans, fmt, lens in self._prompts(rng, item):
                    s = self.b.build(images, slots, prompt, ans, system=rng.random() < m.system_p)
                    s.meta = dict(subset=subset, mode=mode, budget=budget, group=group, fmt=fmt)
                    if lens is not None:
                        s.meta["lens"] = lens
                    if fmt == "mc" and m.per_item:        # option lines + the correct one (routing aux losses)
                        spans = self.b.option_spans(s, len(item["options"]))
                        if spans is not None:
                            s.meta["spans"], s.meta["gold"] = spans, "ABCD".index(ans)
                    seqs.append(s)
                    tokens += len(s.ids) // 4
                tokens += sum(a * b for a, b in (sl.grid_hw for sl in slots))
            yield seqs


class TextMCStream(torch.utils.data.IterableDataset):
    """Text-only MC batches (stage 4): a real SynthHR question and options (fresh random order) with the answer
    stated in the prompt ("It is D.\n" + the benchmark's MC prompt) -> the letter. No image and no
    rendering (`make_item` is ~1 ms), so thousands per second: it drills the option matching and letter copy
    that image MC needs, on the same prompts. Meta as image MC ('lens', 'spans', 'gold')."""

    def __init__(self, tok, seed: int, subsets=("attr-cue", "fsp-4k", "coarse"), batch: int = 256,
                 system_p: float = 0.5, pool: int = 4000):
        self.b, self.tok, self.pool = SeqBuilder(tok), tok, pool
        self.seed, self.subsets, self.batch, self.system_p = seed, tuple(subsets), batch, system_p

    def __iter__(self):
        from eval.synthhr import SynthHRConfig, make_item

        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        torch.set_num_threads(1)
        rng = np.random.default_rng([self.seed, wid, 23])
        cfg = SynthHRConfig(scale="mini", n_candidates=1)
        k = int(rng.integers(1 << 40))
        pool: list = []
        while True:
            seqs = []
            while len(seqs) < self.batch:
                if len(pool) < self.pool and (len(pool) < 64 or rng.random() < 0.15):
                    k += 1
                    subset = self.subsets[int(rng.integers(len(self.subsets)))]
                    try:
                        item = make_item(cfg, subset, "train", k)
                    except Exception:
                        continue
                    if not item.get("options"):
                        continue
                    pool.append(item)
                else:                   # reuse an item: its options get a fresh order below
                    item = pool[int(rng.integers(len(pool)))]
                subset = item["subset"]
                text = item["options"]["ABCD".index(item_prompt(item)[1])]
                prompt, letter = mc_permuted(rng, item, text)
                s = self.b.build([], [], f"It is {text}.\n" + prompt, letter,
                                 system=rng.random() < self.system_p)
                ids = self.tok(text, add_special_tokens=False)["input_ids"]
                s.meta = dict(subset=subset, mode="text", fmt="mc", group=len(seqs))
                if len(ids) == 1:
                    s.meta["lens"] = ids[0]
                spans = self.b.option_spans(s, len(item["options"]))
                if spans is not None:
                    # the evidence line adds one newline before the question: skip it
                    spans = self.b.option_spans(s, len(item["options"]) + 1)
                    s.meta["spans"], s.meta["gold"] = spans[1:], "ABCD".index(letter)
                seqs.append(s)
            yield seqs


def mc_permuted(rng, item: dict, text: str) -> tuple[str, str]:
    """(MC prompt, letter) of `item` with its options in a fresh random order (same prompt template)."""
    opts = list(item["options"])
    order = [int(i) for i in rng.permutation(len(opts))]
    new = [opts[i] for i in order]
    it = dict(item, options=new, answer="ABCD"[new.index(text)])
    return item_prompt(it)


def make_progress():
    return mp.get_context("fork").Value("d", 0.0)


def loader(ds, workers: int):
    return iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
                                            persistent_workers=bool(workers),
                                            multiprocessing_context="fork" if workers else None))
