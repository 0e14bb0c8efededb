"""SynthHRConfig: every knob of the SynthHR generator in one dataclass.

Lengths in `sizes` are given at the *full* scale (real pixel sizes, `*_px`) for a 1728-px short side. Each canvas
family has a length unit (its short side / 1728) and a detail unit (for tags, glyphs, referents, codes, cells):

* `full`: canvases `canvas_px` (V*-like 2304x1728, HR-4K 3840x2160, HR-8K 7680x4320, page 1728x2304); detail unit =
  unit, so every detail keeps its effective coarse size across families.
* `mini` (evaluation.md §5.3, the tiny testbed): canvases `mini_canvas_px` (1344x1344 V*-like = exactly 2304 merged
  tokens, 2688x1512 4K-like, 3840x2160 8K-like, 1024x1344 page). Scene objects keep their size relative to the
  canvas (unit = short side / 1728); details use `mini_detail_unit`, chosen so that every detail is legible at native
  resolution and illegible in the 448x448 coarse view of B=256, while its cue stays visible there. Legible and
  illegible are the testbed's (`mini_tau_detail_px`, measured), not a 7B model's: synthhr-1.2 shrank 1.1's details
  0.4x because the testbed read them at B=256.

Budgets `B` are coarse-view token budgets with 28 px per merged token at both scales: the coarse downscale of a W x H
image is `s = min(1, sqrt(B * 784 / (W * H)))`. B=256 is a 448x448-pixel view and B=576 a 672x672 view; at `mini`
those are the testbed's coarse views, at `full` they are the usual Qwen2.5-VL budgets.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

SCALES = ("full", "mini")
FAMILIES = ("clutter", "4k", "8k", "doc")
BUDGETS = (256, 576, 1024, 2048, 4096)
OPTION_LETTERS = "ABCDE"   # letters the MC extractors read as option answers (V*, HR-Bench: A-D; MME-RW: A-E)
PRIMITIVES = ("circle", "square", "triangle", "diamond", "star", "hexagon", "cross", "ring", "arrow")

# 10-colour public palette (sRGB). Names are what questions say.
PUBLIC_PALETTE = {
    "red": (220, 30, 30), "orange": (250, 130, 20), "yellow": (240, 210, 20), "green": (30, 150, 50),
    "cyan": (20, 200, 220), "blue": (30, 70, 230), "purple": (140, 50, 190), "pink": (255, 110, 190),
    "brown": (125, 75, 30), "black": (20, 20, 20),
}


@dataclass
class FontSet:
    """Font file names (looked up in `SynthHRConfig.font_dir`) per role."""
    glyph: str = "DejaVuSans-Bold.ttf"      # single letters on tags and flags
    text: str = "DejaVuSans.ttf"            # document body text
    bold: str = "DejaVuSans-Bold.ttf"       # headers, titles, field labels
    code: str = "DejaVuSansMono.ttf"        # reference codes


@dataclass
class SizeSpec:
    """Object sizes in px at the full scale on a 1728-px-short-side canvas ('unit' 1); other canvases multiply by
    `unit = short side / 1728` (4K 1.25, 8K 2.5, pages 1.0). Ranges are (lo, hi) inclusive."""
    tag_px: tuple[int, int] = (72, 120)            # side of a tag / flag cloth carrying the detail
    glyph_frac: tuple[float, float] = (0.36, 0.46)  # glyph font size as a fraction of the tag side
    dot_frac: float = 0.13                          # dot diameter as a fraction of the tag side
    referent_px: tuple[int, int] = (40, 72)         # small shapes for relations and counting
    search_px: tuple[int, int] = (28, 52)           # the searched shape (its category is the cue: too small at B=256)
    distractor_px: tuple[int, int] = (28, 100)      # clutter shapes
    landmark_px: tuple[int, int] = (280, 480)       # large coarse-visible shapes
    body_font_px: tuple[int, int] = (18, 24)        # document filler text
    code_font_px: tuple[int, int] = (20, 28)        # document codes (the detail)
    cell_font_px: tuple[int, int] = (20, 26)        # table cells (the detail)
    header_font_px: tuple[int, int] = (60, 80)      # table headers (the cue)
    title_font_px: tuple[int, int] = (72, 100)      # document titles (coarse questions)
    label_font_px: tuple[int, int] = (36, 48)       # field labels inside coloured boxes (the cue)


def _canvases() -> dict[str, tuple[int, int]]:
    return {"clutter": (2304, 1728), "4k": (3840, 2160), "8k": (7680, 4320), "doc": (1728, 2304)}


def _mini_canvases() -> dict[str, tuple[int, int]]:
    # evaluation.md §5.3: 1344^2 = 2304 merged tokens (the largest testbed view), 4K-like, page; 8K-like keeps 8K's
    # place (s at B=256 below 4K's) at 2x the 4K-like area, not 4x: a 16 Mpx mini canvas would cost more to render
    # than the testbed can use (it never looks at more than 2304 tokens)
    return {"clutter": (1344, 1344), "4k": (2688, 1512), "8k": (3840, 2160), "doc": (1024, 1344)}


def _mini_detail_units() -> dict[str, float]:
    # multiplier of the full-scale detail sizes (tag_px, referent_px, search_px, code/cell fonts) per mini family.
    # synthhr-1.2: 0.4x of 1.1's (0.7 / 0.85 / 1.2) on the scene canvases, so that the testbed needs to zoom: it read
    # 1.1's 4.6-8.7 px glyphs and 2-2.6 px dots at B=256 (92-100 %), and at 0.4x it is at chance there but still reads
    # them at the top budget (tools/testbed_detail_sweep.py, eval/results/testbed.md "synthhr-1.2"). Glyph ink 5.6-13
    # px (clutter), 7-13 (4K-like), 10-16 (8K-like), dots 3.6-5.2 px; e@256 1.6-4.4 px glyphs, 0.8-1.2 px dots. The
    # page keeps 1.1's 0.9: its codes / cells (13-18 px ink) are unread by the testbed at any size so far
    return {"clutter": 0.28, "4k": 0.34, "8k": 0.48, "doc": 0.9}


def _tau_detail() -> dict[str, float]:
    # effective coarse size (px in the coarse view) below which a detail of this kind is illegible (full scale: the
    # real-model range of evaluation.md §5.3)
    return {"glyph": 14.0, "text": 14.0, "dots": 14.0, "shape": 14.0, "color": 3.0, "position": 3.0}


def _mini_tau_detail() -> dict[str, float]:
    # the same at `mini`, measured on the shipped testbed (synthhr-1.2, tools/testbed_detail_sweep.py): glyphs are
    # read from ~5 px ink (chance at 3 px, 67 % at 4.8, 96 % at 6.4), dots from ~3 px (33 % at 1.6, 67 % at 2.1,
    # 83 % at 3.2); text / codes never read, shapes not measured: the full-scale values
    return {"glyph": 5.0, "text": 14.0, "dots": 3.0, "shape": 14.0, "color": 3.0, "position": 3.0}


def _tau_cue() -> dict[str, float]:
    # effective coarse size at which a cue of this kind can be found; a word is recognisable smaller than a glyph
    return {"color": 4.0, "landmark": 14.0, "shape": 14.0, "text": 8.0, "layout": 4.0}


@dataclass
class SynthHRConfig:
    """Knobs of the SynthHR generator. Validated on construction (`ValueError` with the offending field)."""
    scale: str = "mini"
    palette: dict[str, tuple[int, int, int]] = field(default_factory=lambda: dict(PUBLIC_PALETTE))
    palette_id: str = "public10"
    fonts: FontSet = field(default_factory=FontSet)
    font_dir: str | None = None                   # None: matplotlib's mpl-data/fonts/ttf
    glyph_alphabet: str = "FHJKLMNPRTUVWXY"  # no O/0, I/1/l confusables; no A-E: those are MC option letters
    code_alphabet: str = "ACDEFHJKLMNPRTUVWXY345679"
    shapes: tuple[str, ...] = PRIMITIVES
    templates: dict[str, tuple[str, ...]] | None = None   # None: templates.DEFAULT_TEMPLATES
    backgrounds: tuple[str, ...] = ("noise", "gradient", "tiles")
    doc_backgrounds: tuple[str, ...] = ("paper",)
    canvas_px: dict[str, tuple[int, int]] = field(default_factory=_canvases)   # full-scale (W, H) per family
    mini_canvas_px: dict[str, tuple[int, int]] = field(default_factory=_mini_canvases)   # mini (W, H) per family
    mini_detail_unit: dict[str, float] = field(default_factory=_mini_detail_units)     # mini detail sizes per family
    canvas_override_px: tuple[int, int] | None = None   # (W, H) at this scale for every family (curricula, testbeds)
    sizes: SizeSpec = field(default_factory=SizeSpec)
    detail_scale: float = 1.0        # multiplies tag/glyph/referent/code sizes (curriculum: large -> eval size)
    n_candidates: int | None = None  # objects of the asked kind; None: the subset's default; 1: single-candidate level
    n_distractors: tuple[int, int] = (20, 60)   # clutter objects per clutter scene (full canvas; 4K/8K scale by area)
    hard_negative_rate: float = 0.5  # chance per candidate of a same-colour object of another kind nearby
    text_density: float = 0.8        # fraction of free page area filled with filler paragraphs
    filler_vocab: int = 4096         # pseudo-words that document filler draws from (rasterised once per process)
    budgets: tuple[int, ...] = BUDGETS
    tau_detail_px: dict[str, float] = field(default_factory=_tau_detail)          # at scale "full"
    mini_tau_detail_px: dict[str, float] = field(default_factory=_mini_tau_detail)  # at scale "mini"
    tau_cue_px: dict[str, float] = field(default_factory=_tau_cue)
    rotations: int = 4               # cyclic option rotations per base question for HR-Bench-schema subsets
    jpeg_quality: int | None = None  # None: lossless render; else JPEG round trip at this quality
    entropy: int = 20250917          # SeedSequence entropy of this generator (hidden splits use others)
    bg_block_px: int = 4             # backgrounds are smooth: drawn at 1/bg_block_px of the canvas, blown up NEAREST
    generator_version: str = "synthhr-1.2"

    def __post_init__(self) -> None:
        _validate(self)

    def geometry(self, family: str) -> tuple[int, int, float, float]:
        """(W, H, unit, detail_unit) of a canvas family at this scale, before `canvas_override_px`: sizes of
        `self.sizes` are multiplied by unit (scene objects, page text) or detail_unit (details and their carriers)."""
        w, h = (self.canvas_px if self.scale == "full" else self.mini_canvas_px)[family]
        unit = min(w, h) / 1728.0
        return int(w), int(h), unit, (unit if self.scale == "full" else float(self.mini_detail_unit[family]))

    def tau_detail(self, kind: str) -> float:
        """Effective coarse size (px) below which a detail of `kind` is illegible at this scale (`needs_hr@B`)."""
        return float((self.tau_detail_px if self.scale == "full" else self.mini_tau_detail_px)[kind])

    def config_id(self) -> str:
        """Short fingerprint of every knob; items remember it so a render with other knobs is refused. (Serialised
        without `dataclasses.asdict`, whose deep copies cost ~1 ms per call on the loader path; same JSON.)"""
        blob = json.dumps(self, sort_keys=True, default=_plain)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _plain(o):
    return o.__dict__ if dataclasses.is_dataclass(o) else str(o)


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(f"SynthHRConfig: {msg}")


def _check_range(name: str, r, lo: float = 0.0) -> None:
    _check(isinstance(r, (tuple, list)) and len(r) == 2, f"{name} must be a (lo, hi) pair, got {r!r}")
    _check(lo <= r[0] <= r[1], f"{name} must satisfy {lo} <= lo <= hi, got {r!r}")


def _validate(c: SynthHRConfig) -> None:
    _check(c.scale in SCALES, f"scale must be one of {sorted(SCALES)}, got {c.scale!r}")
    bad = sorted(set(c.glyph_alphabet.upper()) & set(OPTION_LETTERS))
    _check(not bad, f"glyph_alphabet must not contain the option letters {OPTION_LETTERS} (any case): a glyph "
                    f"answer {bad[:1]} would be scored as an option letter")
    _check(len(c.palette) >= 6, f"palette needs >= 6 colours, got {len(c.palette)}")
    for name, rgb in c.palette.items():
        _check(len(rgb) == 3 and all(0 <= int(v) <= 255 for v in rgb), f"palette[{name!r}] is not an RGB triple")
    _check(len(set(c.glyph_alphabet)) >= 8, "glyph_alphabet needs >= 8 distinct characters")
    _check(len(set(c.code_alphabet)) >= 8, "code_alphabet needs >= 8 distinct characters")
    unknown = set(c.shapes) - set(PRIMITIVES)
    _check(not unknown, f"unknown shapes {sorted(unknown)}; known: {PRIMITIVES}")
    _check(len(c.shapes) >= 4, "shapes needs >= 4 primitives")
    from .backgrounds import BACKGROUNDS
    for name in (*c.backgrounds, *c.doc_backgrounds):
        _check(name in BACKGROUNDS, f"unknown background {name!r}; known: {sorted(BACKGROUNDS)}")
    _check(len(c.backgrounds) >= 1 and len(c.doc_backgrounds) >= 1, "backgrounds must not be empty")
    for fam in FAMILIES:
        for name in ("canvas_px", "mini_canvas_px"):
            _check(fam in getattr(c, name), f"{name} lacks family {fam!r}")
            w, h = getattr(c, name)[fam]
            _check(w >= 256 and h >= 256, f"{name}[{fam!r}] must be >= 256 px a side, got {(w, h)}")
        _check(fam in c.mini_detail_unit and 0.1 <= c.mini_detail_unit[fam] <= 4.0,
               f"mini_detail_unit[{fam!r}] must be in [0.1, 4], got {c.mini_detail_unit.get(fam)}")
    for name in ("tau_detail_px", "mini_tau_detail_px"):
        missing = sorted(set(_tau_detail()) - set(getattr(c, name)))
        _check(not missing, f"{name} lacks detail kinds {missing}")
        _check(all(float(v) > 0 for v in getattr(c, name).values()), f"{name} values must be > 0")
    if c.canvas_override_px is not None:
        w, h = c.canvas_override_px
        _check(w >= 128 and h >= 128, f"canvas_override_px must be >= 128 px a side, got {(w, h)}")
    _check(0.25 <= c.detail_scale <= 8.0, f"detail_scale must be in [0.25, 8], got {c.detail_scale}")
    _check(c.n_candidates is None or 1 <= c.n_candidates <= 8, f"n_candidates must be None or 1..8, got {c.n_candidates}")
    _check_range("n_distractors", c.n_distractors)
    _check(c.n_distractors[1] <= 80, f"n_distractors hi must be <= 80, got {c.n_distractors[1]}")
    _check(0.0 <= c.hard_negative_rate <= 1.0, f"hard_negative_rate must be in [0, 1], got {c.hard_negative_rate}")
    _check(0.0 <= c.text_density <= 1.0, f"text_density must be in [0, 1], got {c.text_density}")
    _check(64 <= c.filler_vocab <= 65536, f"filler_vocab must be in [64, 65536], got {c.filler_vocab}")
    _check(len(c.budgets) >= 1 and all(int(b) > 0 for b in c.budgets), f"budgets must be positive, got {c.budgets}")
    _check(256 in c.budgets, "budgets must include 256 (the coarse budget every label refers to)")
    _check(c.rotations in (1, 2, 4), f"rotations must be 1, 2 or 4, got {c.rotations}")
    _check(c.jpeg_quality is None or 30 <= c.jpeg_quality <= 100,
           f"jpeg_quality must be None or 30..100, got {c.jpeg_quality}")
    _check(c.bg_block_px in (1, 2, 4, 8), f"bg_block_px must be 1, 2, 4 or 8, got {c.bg_block_px}")
    s = c.sizes
    for name in ("tag_px", "referent_px", "search_px", "distractor_px", "landmark_px", "body_font_px", "code_font_px",
                 "cell_font_px", "header_font_px", "title_font_px", "label_font_px"):
        _check_range(f"sizes.{name}", getattr(s, name), lo=1)
    _check_range("sizes.glyph_frac", s.glyph_frac)
    _check(s.glyph_frac[1] <= 0.8, "sizes.glyph_frac hi must be <= 0.8 (the glyph must fit on its tag)")
