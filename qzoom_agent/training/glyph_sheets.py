"""Dense glyph sheets: many labelled glyphs, colours and kinds per image, for ViT-only pretraining.

A sheet is one view (its size a multiple of 28 px) carrying dozens of SynthHR-style carriers (tags, flags,
signs) with a letter or dots, plus coloured and grey clutter shapes, drawn with the SynthHR generator's own
object painters (`eval.synthhr.objects`), so the pixels look like the benchmark's. Each merged 28 px cell gets
per-token labels (`-100` = ignore):

- `glyph`: index into `GLYPHS` + 1 for cells that overlap a letter's ink box by ≥ 25 % of min(cell, glyph)
  area; 0 for cells with no carrier; ignored on the rest of a carrier;
- `count`: the dot count (1..6) likewise for dots; 0 = none;
- `color`: palette index + 1 of the object covering the cell centre; 0 = background/grey;
- `kind`: 0 background, 1 grey shape, 2 coloured shape, 3 tag, 4 flag, 5 sign;
- `shape`: index into the generator's shape list (`SynthHRConfig.shapes`, i.e. `PRIMITIVES`) + 1 of the shape
  covering the cell centre; 0 = background; ignored on carriers and their details (they have no shape class);
- `size`: 1 small / 2 large for the object covering the cell centre (carriers included), by the shorter side of
  its box as a fraction of the view's shorter side: large ≥ `LARGE_FRAC`, small ≤ `SMALL_FRAC`, ignored in
  between; 0 = bg. The thresholds are the `coarse` subset's "large": its landmarks are 0.162–0.278 of the short
  side in every view of every canvas family (`landmark_px` · unit, unit = short side / 1728), clutter shapes
  ≤ 0.058, carriers and referents ≤ 0.07 (`tests/test_glyph_sheets.py` checks this against the config);
- `side`: 1 left / 2 right half of the view for the centre of the object covering the cell centre, ignored within
  `HALF_DEADBAND` of the vertical centre line (`coarse` half questions only ask ≥ 0.1 W off it); 0 = bg. (Named
  `side`, not `half`: a dense head named `half` would clash with `nn.Module.half`.)

`shape`, `size` and `side` serve the `coarse` templates ("What color is the large {shape}?", "Is the large
{shape} in the left or right half of the image?", "How many large shapes are there in the image?"). Sheets drawn
with the defaults are those of stages 1–5 (same pixels and same old labels for a seed); `landmarks=(lo, hi)`
first places lo..hi large coloured shapes of distinct shapes and colours, as the generator's `add_landmarks`
does, so that `size` = large is common enough to learn.

Sizes are drawn per sheet so glyph fonts span what the testbed sees: 5–12 px in coarse views, 9–24 px at
native resolution and up to 48 px in zoomed crops.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

CELL = 28
GLYPHS = "ACDEFHJKLMNPRTUVWXY345679BGQSZ"   # SynthHR glyph + code alphabets first, then extra letters
KINDS = ("bg", "grey", "shape", "tag", "flag", "sign")
LARGE_FRAC = 0.15        # size = large: shorter side of the box >= this fraction of the view's shorter side
SMALL_FRAC = 0.08        # size = small: <= this fraction; in between: ignored
HALF_DEADBAND = 0.05     # side: ignored when the object's centre is within this fraction of W of the centre line
LANDMARK_FRAC = (0.16, 0.28)   # landmark sides on sheets (the generator's range, as a fraction of the short side)


def label_classes() -> dict[str, int]:
    """Number of classes of each dense label (the dense heads' output sizes)."""
    from eval.synthhr.config import PRIMITIVES

    return dict(glyph=len(GLYPHS) + 1, count=7, color=11, kind=6, shape=len(PRIMITIVES) + 1, size=3, side=3)


def _synthhr():
    from eval.synthhr import objects, scenes
    from eval.synthhr.backgrounds import BACKGROUNDS
    from eval.synthhr.config import PUBLIC_PALETTE, SynthHRConfig

    return objects, scenes, BACKGROUNDS, PUBLIC_PALETTE, SynthHRConfig


def paint(width: int, height: int, bg: Image.Image | None, objs, font_dir=None):
    """Composite `objs` (SynthHR `Obj`s) in order; returns (RGB uint8 array, object-id map int32 with 0 = bg)."""
    objects = _synthhr()[0]
    img = bg.copy() if bg is not None else Image.new("RGB", (width, height), (200, 200, 200))
    ids = np.zeros((height, width), dtype=np.int32)
    for k, o in enumerate(objs, start=1):
        x0, y0, x1, y1 = o.box_px
        for m, rgb in objects.layers(o, font_dir):
            img.paste(tuple(int(v) for v in rgb), (x0, y0), m)
            a = np.asarray(m) > 0
            h, w = a.shape
            sub = ids[y0:y0 + h, x0:x0 + w]
            sub[a[:sub.shape[0], :sub.shape[1]]] = k
    return np.asarray(img, dtype=np.uint8).copy(), ids


def _overlap_cells(box, gh, gw, frac=0.25):
    """bool[gh, gw]: cells overlapping `box` by ≥ frac · min(cell area, box area)."""
    x0, y0, x1, y1 = box
    cx = np.arange(gw) * CELL
    cy = np.arange(gh) * CELL
    ox = np.clip(np.minimum(cx + CELL, x1) - np.maximum(cx, x0), 0, None)
    oy = np.clip(np.minimum(cy + CELL, y1) - np.maximum(cy, y0), 0, None)
    inter = oy[:, None] * ox[None, :]
    ref = min(CELL * CELL, max(1, (x1 - x0) * (y1 - y0)))
    return inter >= frac * ref, inter > 0


def dense_labels(objs, ids: np.ndarray, palette_names: list[str], gh: int, gw: int) -> dict[str, np.ndarray]:
    """Per-cell labels (see module doc) from the painted objects and their id map."""
    glyph = np.zeros((gh, gw), np.int64)
    count = np.zeros((gh, gw), np.int64)
    color = np.zeros((gh, gw), np.int64)
    kind = np.zeros((gh, gw), np.int64)
    # centre-of-cell object
    cyx = (np.arange(gh) * CELL + CELL // 2)[:, None], (np.arange(gw) * CELL + CELL // 2)[None, :]
    cen = ids[np.minimum(cyx[0], ids.shape[0] - 1), np.minimum(cyx[1], ids.shape[1] - 1)]
    for k, o in enumerate(objs, start=1):
        host = objs[o.parent] if o.parent is not None else o
        at = cen == k
        if o.parent is not None:                     # a detail: its cells belong to the carrier
            at = at
        cidx = palette_names.index(host.color) + 1 if host.color in palette_names else 0
        kd = {"tag": 3, "flag": 4, "sign": 5}.get(host.kind, 2 if host.color else 1)
        color[at] = cidx
        kind[at] = kd
    for o in objs:
        if o.kind in ("tag", "flag", "sign"):
            _, touch = _overlap_cells(o.box_px, gh, gw)
            glyph[touch & (glyph == 0)] = -100
            count[touch & (count == 0)] = -100
    for o in objs:
        if o.kind == "glyph" and o.text in GLYPHS:
            strong, _ = _overlap_cells(o.box_px, gh, gw)
            glyph[strong] = GLYPHS.index(o.text) + 1
        elif o.kind == "dots":
            strong, _ = _overlap_cells(o.box_px, gh, gw)
            count[strong] = int(o.count)
    return dict(glyph=glyph, count=count, color=color, kind=kind)


def coarse_labels(objs, ids: np.ndarray, shapes, gh: int, gw: int, width: int, height: int) -> dict[str, np.ndarray]:
    """Per-cell `shape`, `size`, `side` (see module doc) of the object covering each cell centre (a detail's host
    for glyphs and dots). `shapes` is the generator's shape list; `width`, `height` the view's size in px."""
    shape = np.zeros((gh, gw), np.int64)
    size = np.zeros((gh, gw), np.int64)
    side = np.zeros((gh, gw), np.int64)
    cyx = (np.arange(gh) * CELL + CELL // 2)[:, None], (np.arange(gw) * CELL + CELL // 2)[None, :]
    cen = ids[np.minimum(cyx[0], ids.shape[0] - 1), np.minimum(cyx[1], ids.shape[1] - 1)]
    short = min(width, height)
    for k, o in enumerate(objs, start=1):
        at = cen == k
        if not at.any():
            continue
        host = objs[o.parent] if o.parent is not None else o
        shape[at] = shapes.index(host.shape) + 1 if host.kind == "shape" and host.shape in shapes else -100
        w, h = host.size
        frac = min(w, h) / short
        size[at] = 2 if frac >= LARGE_FRAC else 1 if frac <= SMALL_FRAC else -100
        cx = host.center[0]
        side[at] = -100 if abs(cx - width / 2) < HALF_DEADBAND * width else (1 if cx < width / 2 else 2)
    return dict(shape=shape, size=size, side=side)


def render_sheet(rng: np.random.Generator, width: int = 448, height: int = 448, *, font_px=(6, 40),
                 density: float = 1.0, glyph_share: float = 0.75, cfg=None, landmarks=(0, 0),
                 carrier_frac: float = 1.0):
    """One sheet: (uint8 HxWx3, labels dict of (H/28, W/28) int64 arrays, object list). `landmarks` = (lo, hi):
    place lo..hi large landmark shapes first; `carrier_frac` < 1 draws that share of the carriers (the clutter count
    is unchanged), leaving room for shapes. The defaults give the sheets (and rng stream) of stages 1-5."""
    objects, scenes, BACKGROUNDS, PALETTE, SynthHRConfig = _synthhr()
    cfg = cfg or SynthHRConfig(scale="mini")
    Obj = objects.Obj
    palette = dict(cfg.palette)
    names = list(palette)
    bgname = ("noise", "gradient", "tiles", "paper")[int(rng.integers(4))]
    bg = BACKGROUNDS[bgname](rng, width, height)
    placer = scenes.Placer(rng, width, height, edge_px=2)
    objs: list = []
    if landmarks[1] > 0:   # large coloured shapes, distinct shapes and colours (scenes.add_landmarks on a sheet)
        n_lm = int(rng.integers(landmarks[0], landmarks[1] + 1))
        shp = [cfg.shapes[int(i)] for i in rng.permutation(len(cfg.shapes))[:n_lm]]
        col = [names[int(i)] for i in rng.permutation(len(names))[:n_lm]]
        for shape, c in zip(shp, col):
            s = int(round(min(width, height) * rng.uniform(*LANDMARK_FRAC)))
            box = placer.place(s, s, margin=max(4, s // 10), tries=50)
            if box is not None:
                objs.append(Obj("shape", "landmark", box, c, palette[c], shape=shape))
    # one glyph-size range per sheet (log-uniform), carriers sized from it (glyph = 0.36–0.46 of the face)
    lo, hi = font_px
    f0 = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    n_target = int(density * width * height / (2.6 * (f0 / 0.41) ** 2 + 1500))
    n_target = max(3, min(n_target, 120))
    for _ in range(n_target if carrier_frac >= 1.0 else int(round(n_target * carrier_frac))):
        fpx = max(4, int(round(f0 * rng.uniform(0.85, 1.15))))
        side = max(8, int(round(fpx / rng.uniform(0.36, 0.46))))
        kind = scenes.CARRIERS[int(rng.integers(3))]
        w, h = scenes.carrier_extent(kind, side)
        box = placer.place(w, h, margin=max(2, side // 5), tries=20)
        if box is None:
            continue
        color = names[int(rng.integers(len(names)))]
        ci = len(objs)
        objs.append(Obj(kind, "carrier", box, color, palette[color]))
        fx0, fy0, fx1, fy1 = objects.carrier_face(objs[ci])
        ink = (250, 250, 250) if (0.2126 * palette[color][0] + 0.7152 * palette[color][1]
                                  + 0.0722 * palette[color][2]) / 255 < 0.55 else (15, 15, 15)
        if rng.random() < glyph_share:
            g = GLYPHS[int(rng.integers(len(GLYPHS)))] if rng.random() < 0.3 else \
                cfg.glyph_alphabet[int(rng.integers(len(cfg.glyph_alphabet)))]
            gw, gh = objects.text_extent(g, cfg.font_dir, cfg.fonts.glyph, fpx)
            x0, y0 = int((fx0 + fx1 - gw) // 2), int((fy0 + fy1 - gh) // 2)
            objs.append(Obj("glyph", "detail", (x0, y0, x0 + gw, y0 + gh), None, ink, text=g,
                            font=cfg.fonts.glyph, font_px=fpx, parent=ci))
        else:
            n = int(rng.integers(1, 7))
            dpx = max(2, int(round(side * cfg.sizes.dot_frac)))
            dw, dh = objects.dots_extent(n, dpx)
            x0, y0 = int((fx0 + fx1 - dw) // 2), int((fy0 + fy1 - dh) // 2)
            objs.append(Obj("dots", "detail", (x0, y0, x0 + dw, y0 + dh), None, ink, count=n, parent=ci))
    # clutter: grey and coloured shapes, sizes around the carriers', a few large landmarks
    n_clutter = int(rng.integers(n_target // 3, n_target + 2))
    for _ in range(n_clutter):
        shape = cfg.shapes[int(rng.integers(len(cfg.shapes)))]
        s = int(np.clip(f0 / 0.41 * rng.uniform(0.5, 1.6), 6, min(width, height) // 3))
        if rng.random() < 0.08:
            s = int(min(width, height) * rng.uniform(0.15, 0.3))
        box = placer.place(s, s, margin=2, tries=10)
        if box is None:
            continue
        if rng.random() < 0.5:
            g = int(rng.integers(60, 225))
            objs.append(Obj("shape", "distractor", box, None, (g, g, g), shape=shape))
        else:
            c = names[int(rng.integers(len(names)))]
            objs.append(Obj("shape", "distractor", box, c, palette[c], shape=shape))
    img, ids = paint(width, height, bg, objs, cfg.font_dir)
    labels = dense_labels(objs, ids, names, height // CELL, width // CELL)
    labels.update(coarse_labels(objs, ids, list(cfg.shapes), height // CELL, width // CELL, width, height))
    return img, labels, objs


def sheet_size(rng: np.random.Generator, sizes=((448, 448), (336, 336), (560, 448), (448, 560))):
    return sizes[int(rng.integers(len(sizes)))]
