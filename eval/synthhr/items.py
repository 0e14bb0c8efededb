"""Items: JSON-serialisable question metadata (no pixels), made deterministically from
`SeedSequence(cfg.entropy, spawn_key=(subset_id, split_id, base_index))`; `render_item` rebuilds the scene from it."""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

import numpy as np

from .config import SynthHRConfig
from .labels import cue_visible, difficulty, needs_hr, union_box
from .objects import tight_box
from .render import render_scene
from .scenes import Scene
from . import subsets_clutter as sc
from . import subsets_doc as sd

SUBSETS = ("attr-cue", "attr-search", "rel-lr", "fsp-4k", "fsp-8k", "fcp-4k", "fcp-8k", "doc-code", "doc-table",
           "coarse", "chain")
SPLITS = {"train": 0, "dev": 1, "test": 2, "tp": 2}       # tp is a fixed prefix of test (same ids and seeds)
SUBSET_IDS = {name: i for i, name in enumerate(SUBSETS)}
COARSE_HOSTS = ("attr-cue", "attr-search", "rel-lr", "chain", "fsp-4k", "fcp-4k")   # coarse asks about their scenes
LETTERS = "ABCD"

BUILD = {
    "attr-cue": sc.build_attr_cue, "attr-search": sc.build_attr_search, "rel-lr": sc.build_rel_lr,
    "fsp-4k": partial(sc.build_carrier_scene, family="4k", n_default=4),
    "fsp-8k": partial(sc.build_carrier_scene, family="8k", n_default=4),
    "fcp-4k": partial(sc.build_fcp, family="4k"), "fcp-8k": partial(sc.build_fcp, family="8k"),
    "doc-code": sd.build_doc_code, "doc-table": sd.build_doc_table, "chain": sc.build_chain,
}
ASK = {
    "attr-cue": sc.ask_attr_cue, "attr-search": sc.ask_attr_search, "rel-lr": sc.ask_rel_lr,
    "fsp-4k": sc.ask_fsp, "fsp-8k": sc.ask_fsp, "fcp-4k": sc.ask_fcp, "fcp-8k": sc.ask_fcp,
    "doc-code": sd.ask_doc_code, "doc-table": sd.ask_doc_table, "coarse": sc.ask_coarse, "chain": sc.ask_chain,
}
ROTATED = ("fsp-4k", "fsp-8k", "fcp-4k", "fcp-8k")   # HR-Bench schema: each base question in `cfg.rotations` rows


def _check_names(subset: str, split: str) -> None:
    if subset not in SUBSET_IDS:
        raise ValueError(f"unknown subset {subset!r}; known: {SUBSETS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {tuple(SPLITS)}")


def item_seed(cfg: SynthHRConfig, subset: str, split: str, base_index: int) -> int:
    """63-bit seed of one base question; no global RNG involved."""
    ss = np.random.SeedSequence(cfg.entropy, spawn_key=(SUBSET_IDS[subset], SPLITS[split], int(base_index)))
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))


def answer_slot(cfg: SynthHRConfig, subset: str, split: str, base_index: int, stream: int | None = None) -> int:
    """Answer position in 0..3: every block of 4 consecutive base questions (of one `stream`) uses each position
    once; with 2 options the position is slot % 2, so 2-option questions are balanced too."""
    key = (SUBSET_IDS[subset], SPLITS[split], base_index // 4, 7) + (() if stream is None else (int(stream),))
    return int(np.random.default_rng(np.random.SeedSequence(cfg.entropy, spawn_key=key)).permutation(4)[base_index % 4])


def coarse_kind(base_index: int) -> tuple[str, int]:
    """(question kind, index among the coarse questions of that kind). Kinds rotate per round of host scenes, so
    every host gets every kind, and letters are balanced per kind, hence per option count (2 for `half`, else 4)."""
    n = len(COARSE_HOSTS)
    rnd, j = divmod(int(base_index), n)
    kind_round, k = divmod(rnd, len(sc.COARSE_KINDS))
    return sc.COARSE_KINDS[k], kind_round * n + j


_SCENES: OrderedDict = OrderedDict()   # (config_id, scene_subset, scene_seed) -> Scene; per process, a few entries
_SCENE_CACHE_SIZE = 8


def clear_scene_cache() -> None:
    """Forget the per-process scene cache (tests use it to check that fresh builds are byte-identical)."""
    _SCENES.clear()


def build_scene(cfg: SynthHRConfig, scene_subset: str, scene_seed: int, config_id: str | None = None) -> Scene:
    """The scene of a base question, from its seed alone. A layout that cannot be placed (rare; small canvases) is
    redrawn from the next rng stream, so the result stays a function of the seed.

    The last few scenes are kept per process (scenes are never mutated after they are built), so the loader path
    `make_item` -> `render_item`, and `coarse` rows that share their host's scene, build each scene once."""
    key = (config_id or cfg.config_id(), scene_subset, int(scene_seed))
    if key in _SCENES:
        _SCENES.move_to_end(key)
        return _SCENES[key]
    for attempt in range(16):
        try:
            scene = BUILD[scene_subset](_rng(scene_seed, 0 if attempt == 0 else 100 + attempt), cfg)
            break
        except RuntimeError as err:
            last = err
    else:
        raise ValueError(f"{scene_subset}: no layout fits after 16 attempts ({last}); enlarge the canvas or shrink "
                         f"sizes")
    _SCENES[key] = scene
    while len(_SCENES) > _SCENE_CACHE_SIZE:
        _SCENES.popitem(last=False)
    return scene


def _scene_source(cfg: SynthHRConfig, subset: str, split: str, base: int) -> tuple[str, int]:
    if subset != "coarse":
        return subset, item_seed(cfg, subset, split, base)
    host = COARSE_HOSTS[base % len(COARSE_HOSTS)]
    return host, item_seed(cfg, host, split, base // len(COARSE_HOSTS))


def _size(obj_box: list[int], kind: str) -> int:
    """Detail / cue size in px: ink height for text, smallest side otherwise."""
    w, h = obj_box[2] - obj_box[0], obj_box[3] - obj_box[1]
    return h if kind in ("glyph", "text") else min(w, h)


def _answer_box(rois: list[dict], detail_box: list[int]) -> list[int]:
    """The RoI that holds the answer detail (difficulty is binned on its area); the first RoI if none does."""
    for r in rois:
        b = r["box"]
        if b[0] <= detail_box[0] and b[1] <= detail_box[1] and detail_box[2] <= b[2] and detail_box[3] <= b[3]:
            return b
    return rois[0]["box"]


def make_item(cfg: SynthHRConfig, subset: str, split: str, index: int) -> dict:
    """Metadata of row `index` of (subset, split). Rotated subsets: row = base * rotations + rotation."""
    _check_names(subset, split)
    split_key = "test" if split == "tp" else split
    rot = cfg.rotations if subset in ROTATED else 1
    base, r = divmod(int(index), rot)
    seed = item_seed(cfg, subset, split_key, base)
    scene_subset, scene_seed = _scene_source(cfg, subset, split_key, base)
    config_id = cfg.config_id()
    scene = build_scene(cfg, scene_subset, scene_seed, config_id)
    if subset == "coarse":
        kind, j = coarse_kind(base)
        slot = answer_slot(cfg, subset, split_key, j, stream=sc.COARSE_KINDS.index(kind))
        qa = sc.ask_coarse(scene, _rng(seed, 1), cfg, slot, kind=kind)
    else:
        qa = ASK[subset](scene, _rng(seed, 1), cfg, answer_slot(cfg, subset, split_key, base))
    W, H = scene.width, scene.height
    rois = [dict(box=tight_box(scene.objects[i], cfg.font_dir), role=role, needed=needed, object_id=i + 1)
            for i, role, needed in qa["rois"]]
    evidence = union_box([x["box"] for x in rois if x["needed"]])
    d_kind, d_idx, d_px = qa["detail"]
    c_kind, c_idx = qa["cue"]
    detail_box = tight_box(scene.objects[d_idx], cfg.font_dir)
    detail_px = d_px or _size(detail_box, d_kind)
    cue_px = _size(tight_box(scene.objects[c_idx], cfg.font_dir), c_kind)
    options, k = qa["options"], qa["answer_index"]
    if options is not None and rot > 1:
        n = len(options)
        options = options[n - r:] + options[:n - r]      # cyclic rotation: the answer moves r places
        k = (k + r) % n
    item = dict(
        question_id=f"synthhr-{cfg.scale}-{split_key}-{subset}-{index:05d}", subset=subset, split=split,
        index=int(index), base_index=base, seed=seed, scene_subset=scene_subset, scene_seed=scene_seed,
        scale=cfg.scale, width=W, height=H, question=qa["question"], options=options,
        answer=LETTERS[k] if options is not None else qa["answer_text"], answer_text=qa["answer_text"],
        schema=qa["schema"], category=qa["category"], cycle_category=f"c{r}", rois=rois, evidence_union=evidence,
        detail_kind=d_kind, detail_px=int(detail_px), detail_object_id=d_idx + 1, cue_kind=c_kind, cue_px=int(cue_px),
        cue_object_id=c_idx + 1, difficulty=difficulty(_answer_box(rois, detail_box), W, H), n_candidates=int(qa["n_candidates"]),
        n_distractors=int(scene.facts.get("n_distractors", 0)),
        font=cfg.fonts.text if scene.family == "doc" else cfg.fonts.glyph, palette_id=cfg.palette_id,
        bg_family=scene.bg, generator_version=cfg.generator_version, config_id=config_id,
    )
    for b in cfg.budgets:
        item[f"needs_hr@{b}"] = needs_hr(detail_px, cfg.tau_detail(d_kind), W, H, b)
        item[f"cue_visible@{b}"] = cue_visible(cue_px, cfg.tau_cue_px[c_kind], W, H, b)
    return item


def make_items(cfg: SynthHRConfig, subset: str, split: str, n: int, start: int = 0) -> list[dict]:
    """Rows start..start+n-1 of (subset, split); `tp` rows are the first rows of `test`."""
    _check_names(subset, split)
    if split == "train" and n < 0:
        raise ValueError("n must be >= 0")
    return [make_item(cfg, subset, split, i) for i in range(start, start + n)]


def render_item(item: dict, cfg: SynthHRConfig, with_labels: bool = False):
    """The item's image (PIL RGB, W x H px), deterministic from its scene seed; see `render_scene` for labels."""
    if item["scale"] != cfg.scale:
        raise ValueError(f"item is scale {item['scale']!r} but the config is {cfg.scale!r}")
    config_id = cfg.config_id()
    if item.get("config_id", config_id) != config_id:
        raise ValueError(f"item was made with config {item['config_id']}, got {config_id}: pass the same knobs")
    return render_scene(build_scene(cfg, item["scene_subset"], item["scene_seed"], config_id), cfg, with_labels)
