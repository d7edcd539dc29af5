"""The shapes world: a deterministic generator of captioned synthetic scenes (DESIGN.md §5).

Each scene is 1-3 objects on a background. An object has a shape (``SHAPES``), a colour (``COLOURS``), a
size (``SIZES``) and a position; backgrounds are ``BACKGROUNDS``. Every image comes with five different
captions, each naming every object's colour and shape (size and background optional), so semantic accuracy
is well defined, and with the ground truth (boxes, shape, colour, size, background) for the detector and the
evaluator.

Choices (documented here, referenced by the report):

* Colours (RGB before per-object jitter/shading): red (220,35,35), orange (250,135,20), yellow (245,225,35),
  green (40,190,60), blue (35,75,225), purple (145,55,205), pink (250,135,205), white (248,248,248).
  Backgrounds are muted so every colour stays separable from them, and every object gets a dark outline
  (its own colour at 35 % brightness) so that shape edges are visible even on a similar background.
* Backgrounds: ``grass`` (dark green, vertical blade streaks + noise), ``sky`` (vertical gradient from a
  deeper to a paler blue), ``sand`` (beige with speckle), ``grey`` (plain grey, faint noise).
* Sizes: object radius (fraction of the image side) small 0.08-0.10, medium 0.12-0.14, large 0.16-0.19.
* Objects never overlap (their enclosing disks are disjoint), so relations are well defined. Relation of A
  to B from the box centres: ``left of``/``right of`` when |dx| >= 1.5|dy|, ``above``/``below`` when
  |dy| >= 1.5|dx|, otherwise ``next to`` (diagonal neighbours).
* Novel pairs (held out of train and test, ``NOVEL_PAIRS``): shape k gets colour (3k+2) mod 8, i.e.
  yellow circle, purple square, red triangle, green star, pink heart, orange diamond, blue cross, white
  hexagon. Every ``test_novel`` image holds exactly one novel object (at a random slot); its other objects
  are drawn from all 64 pairs (distinct within a scene).
* Synonyms (``SHAPE_WORDS``, ``SIZE_WORDS``, ``COLOUR_WORDS``, ``BACKGROUND_WORDS``): circle|ball|disc,
  square|box|block, diamond|rhombus, cross|plus, purple|violet, large|big, small|little|tiny,
  medium|medium sized|mid sized; background phrases "on the grass"/"on a lawn", "in the sky"/"against the
  sky", "on sand"/"on the beach", "on a grey background"/"on a plain gray background", ...  All words are
  ``\\w+`` tokens (no hyphens). Captions have at most ``MAX_CAPTION_TOKENS`` = 20 tokens.

Determinism: every image is drawn from its own generator
``np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, split_id, index])))`` (and the background
texture from a second one, ``[seed, split_id, index, 1]``, so that the scene is the same at every
resolution; its captions too, except in rare borderline relations, which come from the pixel boxes), so it
does not depend on the number of images or on the process. Only bit-exact operations are used: uniform
draws and integers from the generator, IEEE basic arithmetic (+ - * / sqrt, correctly rounded everywhere)
for the geometry, no trigonometric or exponential functions (rotations use the rational parametrisation
cos = (1-t²)/(1+t²), sin = 2t/(1+t²); the star's vertices come from square roots), no floating-point
reductions, and integer arithmetic for coverage, textures and compositing. Rendering is analytic coverage
on a 4x4 supersampling grid per pixel (anti-aliasing), composited in integers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..utils.atomic import atomic_write_json, sha256_file

from cpgan.data.text import tokenize

__all__ = [
    "SHAPES",
    "COLOURS",
    "SIZES",
    "BACKGROUNDS",
    "COLOUR_RGB",
    "COLOUR_OF",
    "SHAPE_OF",
    "SIZE_OF",
    "NOVEL_PAIRS",
    "SPLITS",
    "MAX_CAPTION_TOKENS",
    "FORMAT_VERSION",
    "SHAPE_WORDS",
    "COLOUR_WORDS",
    "SIZE_WORDS",
    "BACKGROUND_WORDS",
    "render_scene",
    "generate_split",
    "write_dataset",
    "load_split",
    "parse_caption",
    "parse_background",
]

# ----------------------------------------------------------------------------------------------------------
# Vocabulary of the world
# ----------------------------------------------------------------------------------------------------------
SHAPES: list[str] = ["circle", "square", "triangle", "star", "heart", "diamond", "cross", "hexagon"]
COLOURS: list[str] = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "white"]
SIZES: list[str] = ["small", "medium", "large"]
BACKGROUNDS: list[str] = ["grass", "sky", "sand", "grey"]
SPLITS: dict[str, int] = {"train": 0, "test": 1, "test_novel": 2}
MAX_CAPTION_TOKENS = 20
CAPTIONS_PER_IMAGE = 5
FORMAT_VERSION = 1
SUPPORTED_SIZES = (64, 128, 256)

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (250, 135, 20),
    "yellow": (245, 225, 35),
    "green": (40, 190, 60),
    "blue": (35, 75, 225),
    "purple": (145, 55, 205),
    "pink": (250, 135, 205),
    "white": (248, 248, 248),
}

# Shape k is held out with colour (3k + 2) mod 8 (3 is coprime with 8, so the 8 colours are distinct).
NOVEL_PAIRS: frozenset[tuple[str, str]] = frozenset(
    (COLOURS[(3 * k + 2) % 8], SHAPES[k]) for k in range(len(SHAPES))
)

# Caption words: canonical name -> surface forms (the first one is the canonical name itself).
SHAPE_WORDS: dict[str, list[str]] = {
    "circle": ["circle", "ball", "disc"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle"],
    "star": ["star"],
    "heart": ["heart"],
    "diamond": ["diamond", "rhombus"],
    "cross": ["cross", "plus"],
    "hexagon": ["hexagon"],
}
COLOUR_WORDS: dict[str, list[str]] = {c: [c] for c in COLOURS}
COLOUR_WORDS["purple"] = ["purple", "violet"]
SIZE_WORDS: dict[str, list[str]] = {
    "small": ["small", "little", "tiny"],
    "medium": ["medium", "medium sized", "mid sized"],
    "large": ["large", "big"],
}
BACKGROUND_WORDS: dict[str, list[str]] = {
    "grass": ["grass", "lawn"],
    "sky": ["sky"],
    "sand": ["sand", "beach"],
    "grey": ["grey", "gray"],
}
# Phrases appended to ("suffix") or put in front of ("prefix") a caption.
_BG_SUFFIX: dict[str, list[str]] = {
    "grass": ["on the grass", "on grass", "on a lawn", "on the lawn"],
    "sky": ["in the sky", "against the sky", "in a clear sky"],
    "sand": ["on sand", "on the sand", "on a beach", "on the beach"],
    "grey": ["on a grey background", "on a plain grey background", "on grey", "on a gray background"],
}
_BG_PREFIX: dict[str, list[str]] = {
    "grass": ["on the grass", "on a lawn"],
    "sky": ["in the sky", "high in the sky"],
    "sand": ["on the sand", "on a beach"],
    "grey": ["on a grey background", "on a gray background"],
}
_REL_WORDS: dict[str, list[str]] = {
    "above": ["above", "over"],
    "below": ["below", "under", "beneath"],
    "left": ["to the left of", "left of", "on the left of"],
    "right": ["to the right of", "right of", "on the right of"],
    "next": ["next to", "beside", "near"],
}
_REL_INVERSE = {"above": "below", "below": "above", "left": "right", "right": "left", "next": "next"}

# Reverse maps for parsing, word -> canonical name (single tokens; "medium sized" / "mid sized" parse via
# "medium" / "mid"). Public: the memory report uses them to find the object a word names.
SHAPE_OF = {w: s for s, ws in SHAPE_WORDS.items() for w in ws}
COLOUR_OF = {w: c for c, ws in COLOUR_WORDS.items() for w in ws}
SIZE_OF = {"small": "small", "little": "small", "tiny": "small", "medium": "medium", "mid": "medium",
            "large": "large", "big": "large", "huge": "large"}
_BACKGROUND_OF = {w: b for b, ws in BACKGROUND_WORDS.items() for w in ws}

# ----------------------------------------------------------------------------------------------------------
# Geometry (unit shape coordinates: u to the right, v downwards, every shape inside the unit disk, ~)
# ----------------------------------------------------------------------------------------------------------
_SS = 4  # supersampling factor per axis -> coverage counts 0..16
_SIZE_RADIUS = {"small": (0.08, 0.10), "medium": (0.12, 0.14), "large": (0.16, 0.19)}
_MAX_ASPECT = 0.06  # u/v axis scale jitter (1 +- e)
_MAX_TAN_HALF = 0.13  # rotation: tan(theta/2) in [-0.13, 0.13]  ->  |theta| <= 14.8 degrees
_SHAPE_EXTENT = 1.02  # every unit shape lies within this radius (tested)
_OUTLINE_PX_AT_64 = 0.75  # outline width in pixels at 64 px (scales with resolution)


def _star_vertices(r_in: float = 0.45) -> list[tuple[float, float]]:
    """5-pointed star, tip up (v = -1), from exact square-root expressions of cos/sin of 18/54 degrees."""
    s5 = math.sqrt(5.0)
    c18, s18 = math.sqrt(10.0 + 2.0 * s5) / 4.0, (s5 - 1.0) / 4.0
    c54, s54 = math.sqrt(10.0 - 2.0 * s5) / 4.0, (s5 + 1.0) / 4.0
    outer = [(0.0, -1.0), (c18, -s18), (c54, s54), (-c54, s54), (-c18, -s18)]  # -90,-18,54,126,198 deg
    inner = [(c54, -s54), (c18, s18), (0.0, 1.0), (-c18, s18), (-c54, -s54)]  # -54,18,90,162,234 deg
    verts: list[tuple[float, float]] = []
    for o, i in zip(outer, inner):
        verts.append(o)
        verts.append((i[0] * r_in, i[1] * r_in))
    return verts


_STAR = _star_vertices()
_SQRT3_2 = math.sqrt(3.0) / 2.0


def _in_polygon(u: np.ndarray, v: np.ndarray, verts: Sequence[tuple[float, float]]) -> np.ndarray:
    """Even-odd crossing test of points (u, v) against a closed polygon (vectorised over points)."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(verts)
    for k in range(n):
        x1, y1 = verts[k]
        x2, y2 = verts[(k + 1) % n]
        if y1 == y2:
            continue
        slope = (x2 - x1) / (y2 - y1)
        crosses = (y1 > v) != (y2 > v)
        inside ^= crosses & (u < x1 + (v - y1) * slope)
    return inside


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of unit-shape membership for sample points (u, v)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (au <= 0.72) & (av <= 0.72)
    if shape == "diamond":  # rhombus, taller than wide (distinct from a square even when rotated)
        return au * (1.0 / 0.68) + av <= 1.0
    if shape == "triangle":  # tip up at v = -1, base at v = 0.6, half-width 0.8
        return (v <= 0.6) & (au <= (v + 1.0) * (0.8 / 1.6))
    if shape == "hexagon":  # regular, vertices at (+-1, 0), (+-0.5, +-sqrt(3)/2)
        return (av <= _SQRT3_2) & (au * _SQRT3_2 + av * 0.5 <= _SQRT3_2)
    if shape == "cross":  # plus sign with arms of half-thickness 0.34
        return ((au <= 0.34) & (av <= 0.95)) | ((av <= 0.34) & (au <= 0.95))
    if shape == "heart":  # two lobes (circles) on top of a downward-pointing triangle
        du = au - 0.42
        dv = v + 0.33
        lobes = du * du + dv * dv <= 0.48 * 0.48
        body = (v >= -0.2) & (au <= (0.95 - v) * (0.88 / 1.15))
        return lobes | body
    if shape == "star":
        return _in_polygon(u, v, _STAR)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary dilation by ``steps`` alternating 4- and 8-neighbourhood steps (an octagonal disk)."""
    m = mask
    for k in range(steps):
        o = m.copy()
        o[1:, :] |= m[:-1, :]
        o[:-1, :] |= m[1:, :]
        o[:, 1:] |= m[:, :-1]
        o[:, :-1] |= m[:, 1:]
        if k % 2 == 1:
            o[1:, 1:] |= m[:-1, :-1]
            o[1:, :-1] |= m[:-1, 1:]
            o[:-1, 1:] |= m[1:, :-1]
            o[:-1, :-1] |= m[1:, 1:]
        m = o
    return m


# ----------------------------------------------------------------------------------------------------------
# Backgrounds (integer arithmetic only)
# ----------------------------------------------------------------------------------------------------------
def _jitter(rng: np.random.Generator, rgb: Sequence[int], amount: int) -> np.ndarray:
    return np.asarray(rgb, dtype=np.int32) + rng.integers(-amount, amount + 1, size=3).astype(np.int32)


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) int32 background in [0, 255]."""
    H = W = size
    if kind == "grey":
        g = int(rng.integers(112, 145))
        img = np.full((H, W, 3), g, dtype=np.int32)
        img += rng.integers(-3, 4, size=(H, W, 1)).astype(np.int32)
    elif kind == "sky":
        top = _jitter(rng, (70, 130, 210), 10)
        bottom = _jitter(rng, (165, 200, 240), 8)
        y = np.arange(H, dtype=np.int32)[:, None]
        col = top[None, :] + ((bottom - top)[None, :] * y) // (H - 1)  # (H, 3)
        img = np.broadcast_to(col[:, None, :], (H, W, 3)).copy()
        img += rng.integers(-2, 3, size=(H, W, 1)).astype(np.int32)
    elif kind == "sand":
        base = _jitter(rng, (212, 188, 135), 8)
        img = np.broadcast_to(base, (H, W, 3)).copy()
        img += rng.integers(-10, 11, size=(H, W, 1)).astype(np.int32)
        speck = rng.integers(0, 100, size=(H, W, 1)) < 6
        img += np.where(speck, rng.integers(-50, 26, size=(H, W, 1)), 0).astype(np.int32)
    elif kind == "grass":
        base = _jitter(rng, (62, 112, 44), 8)
        L = max(2, H // 16)  # blade length in pixels
        noise = rng.integers(0, 64, size=(H + L, W)).astype(np.int32)
        c = np.cumsum(noise, axis=0)  # integer, exact
        blades = (c[L:] - c[:-L]) // L - 32  # vertical running mean over L rows, in [-32, 31]
        stripes = rng.integers(-10, 11, size=(1, W)).astype(np.int32)
        t = blades + stripes  # (H, W)
        img = np.broadcast_to(base, (H, W, 3)).copy()
        img[..., 0] += t // 2
        img[..., 1] += t
        img[..., 2] += t // 3
    else:
        raise ValueError(f"unknown background {kind!r}; expected one of {BACKGROUNDS}")
    return np.clip(img, 0, 255)


# ----------------------------------------------------------------------------------------------------------
# Scene sampling and rendering
# ----------------------------------------------------------------------------------------------------------
def _rng_for(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """Per-image generator; stream 0 = scene and captions, stream 1 = background texture."""
    key = [int(seed), SPLITS[split], int(index)] + ([stream] if stream else [])
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))


def _sample_pairs(rng: np.random.Generator, split: str, n_obj: int) -> list[tuple[str, str]]:
    """(colour, shape) pairs of one scene, distinct within the scene."""
    all_pairs = [(c, s) for s in SHAPES for c in COLOURS]  # fixed order: shape-major
    ordinary = [p for p in all_pairs if p not in NOVEL_PAIRS]
    novel = [p for p in all_pairs if p in NOVEL_PAIRS]
    pairs: list[tuple[str, str]] = []
    if split == "test_novel":
        slot = int(rng.integers(0, n_obj))
        for k in range(n_obj):
            pool = novel if k == slot else all_pairs
            while True:
                p = pool[int(rng.integers(0, len(pool)))]
                if p not in pairs:
                    break
            pairs.append(p)
    else:
        while len(pairs) < n_obj:
            p = ordinary[int(rng.integers(0, len(ordinary)))]
            if p not in pairs:
                pairs.append(p)
    return pairs


def _place_objects(rng: np.random.Generator, pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Sample size, radius and centre of every object so that their enclosing disks are disjoint."""
    # outline + anti-aliasing margin as a fraction of the side, the same at every resolution (its 64 px
    # value bounds the others), so a scene's layout does not depend on the resolution
    pad = (_OUTLINE_PX_AT_64 + 1.5) / 64.0
    placed: list[dict[str, Any]] = []
    for colour, shape in pairs:
        size_name = SIZES[int(rng.integers(0, 3))]
        ok = False
        while not ok:
            lo, hi = _SIZE_RADIUS[size_name]
            r = lo + (hi - lo) * float(rng.random())
            ext = r * (1.0 + _MAX_ASPECT) * _SHAPE_EXTENT + pad  # enclosing radius incl. outline
            for _ in range(60):
                cx = ext + (1.0 - 2.0 * ext) * float(rng.random())
                cy = ext + (1.0 - 2.0 * ext) * float(rng.random())
                ok = True
                for p in placed:
                    dx, dy = cx - p["cx"], cy - p["cy"]
                    lim = ext + p["ext"]
                    if dx * dx + dy * dy < lim * lim:
                        ok = False
                        break
                if ok:
                    break
            if not ok:
                if size_name == "small":
                    break  # no room left: the scene keeps fewer objects
                size_name = SIZES[SIZES.index(size_name) - 1]
        if ok:
            placed.append({"colour": colour, "shape": shape, "size": size_name, "r": r, "ext": ext,
                           "cx": cx, "cy": cy})
    return placed


def _render_object(
    img: np.ndarray, obj: dict[str, Any], size: int, rng: np.random.Generator
) -> tuple[list[float], np.ndarray]:
    """Composite one object into ``img`` (int32, in place). Returns (box, coverage mask (size, size) uint8)."""
    S = _SS
    N = S * S
    t = _MAX_TAN_HALF * (2.0 * float(rng.random()) - 1.0)
    cos_t, sin_t = (1.0 - t * t) / (1.0 + t * t), (2.0 * t) / (1.0 + t * t)
    e = _MAX_ASPECT * (2.0 * float(rng.random()) - 1.0)
    r_px = obj["r"] * size
    inv_ru, inv_rv = 1.0 / (r_px * (1.0 + e)), 1.0 / (r_px * (1.0 - e))
    cx, cy = obj["cx"] * size, obj["cy"] * size
    ext_px = obj["ext"] * size
    x0, x1 = max(0, int(math.floor(cx - ext_px))), min(size, int(math.ceil(cx + ext_px)))
    y0, y1 = max(0, int(math.floor(cy - ext_px))), min(size, int(math.ceil(cy + ext_px)))
    w, h = x1 - x0, y1 - y0
    # sample positions (exact dyadic numbers) in pixel units
    xs = x0 + (np.arange(w * S, dtype=np.float64) + 0.5) / S - cx
    ys = y0 + (np.arange(h * S, dtype=np.float64) + 0.5) / S - cy
    dx, dy = xs[None, :], ys[:, None]
    u = (dx * cos_t + dy * sin_t) * inv_ru
    v = (dy * cos_t - dx * sin_t) * inv_rv
    fill = _inside(obj["shape"], u, v)
    k = max(1, int(round(_OUTLINE_PX_AT_64 * size / 64.0 * S)))
    outline = _dilate(fill, k)
    f_cnt = fill.reshape(h, S, w, S).sum(axis=(1, 3), dtype=np.int32)
    o_cnt = outline.reshape(h, S, w, S).sum(axis=(1, 3), dtype=np.int32)
    # colour with jitter and linear shading (factor in 1/256 units, floor -> integers)
    base = _jitter(rng, COLOUR_RGB[obj["colour"]], 12)
    amp = 0.05 + 0.10 * float(rng.random())
    gx, gy = 2.0 * float(rng.random()) - 1.0, 2.0 * float(rng.random()) - 1.0
    pxc = (x0 + np.arange(w, dtype=np.float64) + 0.5 - cx) * (1.0 / r_px)
    pyc = (y0 + np.arange(h, dtype=np.float64) + 0.5 - cy) * (1.0 / r_px)
    shade = 1.0 + amp * 0.5 * (pxc[None, :] * gx + pyc[:, None] * gy)
    shade_i = np.floor(np.clip(shade, 1.0 - amp, 1.0 + amp) * 256.0).astype(np.int32)  # (h, w)
    col = np.clip((base[None, None, :] * shade_i[..., None]) >> 8, 0, 255)
    dark = (base * 90) >> 8
    region = img[y0:y1, x0:x1]
    f3, o3 = f_cnt[..., None], o_cnt[..., None]
    img[y0:y1, x0:x1] = (region * (N - o3) + dark[None, None, :] * (o3 - f3) + col * f3 + N // 2) // N
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[y0:y1, x0:x1] = o_cnt.astype(np.uint8)
    rows = np.nonzero(o_cnt.any(axis=1))[0]
    cols = np.nonzero(o_cnt.any(axis=0))[0]
    box = [(x0 + int(cols[0])) / size, (y0 + int(rows[0])) / size,
           (x0 + int(cols[-1]) + 1) / size, (y0 + int(rows[-1]) + 1) / size]
    return box, mask


# ----------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------
def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(0, len(options)))]


def _relation(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Relation of object a to object b from box centres: above/below/left/right/next."""
    ax, ay = (a["box"][0] + a["box"][2]) / 2.0, (a["box"][1] + a["box"][3]) / 2.0
    bx, by = (b["box"][0] + b["box"][2]) / 2.0, (b["box"][1] + b["box"][3]) / 2.0
    dx, dy = ax - bx, ay - by
    if abs(dx) >= 1.5 * abs(dy):
        return "left" if dx < 0 else "right"
    if abs(dy) >= 1.5 * abs(dx):
        return "above" if dy < 0 else "below"
    return "next"


def _position_phrase(o: dict[str, Any]) -> str | None:
    cx, cy = (o["box"][0] + o["box"][2]) / 2.0, (o["box"][1] + o["box"][3]) / 2.0
    h = "left" if cx < 0.35 else "right" if cx > 0.65 else None
    v = "top" if cy < 0.35 else "bottom" if cy > 0.65 else None
    if h and v:
        return f"in the {v} {h} corner"
    if h:
        return f"on the {h}"
    if v:
        return f"at the {v}"
    return "in the middle"


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _np(rng: np.random.Generator, o: dict[str, Any], definite: bool = False) -> str:
    """Noun phrase '[a|an|the] [size] colour shape' with random synonyms."""
    words = []
    if rng.random() < 0.5:
        words.append(_pick(rng, SIZE_WORDS[o["size"]]))
    words.append(_pick(rng, COLOUR_WORDS[o["colour"]]))
    words.append(_pick(rng, SHAPE_WORDS[o["shape"]]))
    body = " ".join(words)
    return ("the " if definite else _article(body) + " ") + body


def _caption(rng: np.random.Generator, objs: list[dict[str, Any]], bg: str) -> str:
    """One caption from a random template; objects are mentioned once each, in a random order."""
    order = [objs[i] for i in rng.permutation(len(objs))]
    suffix = (" " + _pick(rng, _BG_SUFFIX[bg])) if rng.random() < 0.4 else ""
    prefix = _pick(rng, _BG_PREFIX[bg])
    n = len(order)
    if n == 1:
        A = order[0]
        templates: list[Callable[[], str]] = [
            lambda: f"{_np(rng, A)}{suffix}",
            lambda: f"there is {_np(rng, A)}{suffix}",
            lambda: f"{_np(rng, A)} {_position_phrase(A)}",
            lambda: f"a picture of {_np(rng, A)}{suffix}",
            lambda: f"{prefix}, there is {_np(rng, A)}",
            lambda: f"{prefix} {_np(rng, A)} {_position_phrase(A)}",
            lambda: f"a single {_np(rng, A).split(' ', 1)[1]}{suffix}",
            lambda: f"this is {_np(rng, A)}{suffix}",
            lambda: f"an image of {_np(rng, A)} {_position_phrase(A)}",
        ]
    elif n == 2:
        A, B = order
        rel = _relation(A, B)
        R = lambda r=rel: _pick(rng, _REL_WORDS[r])  # noqa: E731
        templates = [
            lambda: f"{_np(rng, A)} {R()} {_np(rng, B)}{suffix}",
            lambda: f"there is {_np(rng, A)} {R()} {_np(rng, B)}{suffix}",
            lambda: f"{_np(rng, A)} is {R()} {_np(rng, B)}{suffix}",
            lambda: f"{_np(rng, A, True)} is {R()} {_np(rng, B, True)}",
            lambda: f"{_np(rng, A)} and {_np(rng, B)}{suffix}",
            lambda: f"{prefix}, {_np(rng, A)} {R()} {_np(rng, B)}",
            lambda: f"a picture of {_np(rng, A)} and {_np(rng, B)}{suffix}",
            lambda: f"{_np(rng, A)} with {_np(rng, B)} {R(_REL_INVERSE[rel])} it",
            lambda: f"two shapes: {_np(rng, A)} and {_np(rng, B)}{suffix}",
        ]
    else:
        A, B, C = order
        rab, rcb = _relation(A, B), _relation(C, B)
        templates = [
            lambda: f"{_np(rng, A)}, {_np(rng, B)} and {_np(rng, C)}{suffix}",
            lambda: f"there are {_np(rng, A)}, {_np(rng, B)} and {_np(rng, C)}{suffix}",
            lambda: f"{_np(rng, A)} {_pick(rng, _REL_WORDS[rab])} {_np(rng, B)} and {_np(rng, C)}",
            lambda: f"{_np(rng, A)} {_pick(rng, _REL_WORDS[rab])} {_np(rng, B)} with {_np(rng, C)} "
            f"{_pick(rng, _REL_WORDS[rcb])} it",
            lambda: f"{prefix}, {_np(rng, A)}, {_np(rng, B)} and {_np(rng, C)}",
            lambda: f"a picture of {_np(rng, A)}, {_np(rng, B)} and {_np(rng, C)}",
            lambda: f"three shapes: {_np(rng, A)}, {_np(rng, B)} and {_np(rng, C)}{suffix}",
        ]
    return templates[int(rng.integers(0, len(templates)))]()


def _captions(rng: np.random.Generator, objs: list[dict[str, Any]], bg: str) -> list[str]:
    caps: list[str] = []
    for _ in range(500):
        c = _caption(rng, objs, bg)
        if len(tokenize(c)) <= MAX_CAPTION_TOKENS and c not in caps:
            caps.append(c)
            if len(caps) == CAPTIONS_PER_IMAGE:
                return caps
    raise RuntimeError("could not draw five distinct captions (internal error in the caption templates)")


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------
def _check_args(split: str, size: int, seed: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if int(size) not in SUPPORTED_SIZES:
        raise ValueError(f"image size must be one of {SUPPORTED_SIZES}, got {size}")
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")


def render_scene(
    split: str, index: int, size: int = 64, seed: int = 0, with_masks: bool = False
) -> tuple[np.ndarray, dict[str, Any]] | tuple[np.ndarray, dict[str, Any], list[np.ndarray]]:
    """Render image ``index`` of ``split``: ``(image uint8 (size, size, 3), record)``.

    The record is ``{"key", "captions", "background", "objects": [{"shape", "colour", "size", "box"}]}``
    with boxes ``[x0, y0, x1, y1]`` in [0, 1] (tight box of the pixels the object covers, outline included).
    ``with_masks=True`` also returns one ``(size, size)`` uint8 coverage mask (0..16) per object.
    """
    _check_args(split, size, seed)
    if int(index) < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    size = int(size)
    rng = _rng_for(seed, split, index)
    # textures draw resolution-dependent amounts of noise: give them their own stream so that the scene
    # (objects, layout, captions) is the same at 64, 128 and 256 px
    tex_rng = _rng_for(seed, split, index, stream=1)
    n_obj = int(rng.integers(1, 4))
    bg = BACKGROUNDS[int(rng.integers(0, len(BACKGROUNDS)))]
    pairs = _sample_pairs(rng, split, n_obj)
    objs = _place_objects(rng, pairs)
    img = _background(bg, size, tex_rng)
    masks = []
    for o in objs:
        o["box"], m = _render_object(img, o, size, rng)
        masks.append(m)
    captions = _captions(rng, objs, bg)
    record = {
        "key": f"{split}_{int(index):06d}",
        "captions": captions,
        "background": bg,
        "objects": [{"shape": o["shape"], "colour": o["colour"], "size": o["size"], "box": o["box"]}
                    for o in objs],
    }
    image = img.astype(np.uint8)
    if with_masks:
        return image, record, masks
    return image, record


def generate_split(split: str, n: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Images ``(n, size, size, 3)`` uint8 and records of the first ``n`` scenes of ``split``."""
    _check_args(split, size, seed)
    if int(n) < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    images = np.zeros((int(n), int(size), int(size), 3), dtype=np.uint8)
    records = []
    for i in range(int(n)):
        images[i], rec = render_scene(split, i, size, seed)
        records.append(rec)
    return images, records


def _sha256_file(path: str) -> str:
    return sha256_file(path)


def _write_json_atomic(path: str, obj: Any) -> None:
    atomic_write_json(path, obj)


def _write_split(out_dir: str, split: str, n: int, size: int, seed: int, progress: bool) -> dict[str, str]:
    """Write one split into a temporary folder, then swap it into place."""
    tmp = tempfile.mkdtemp(prefix=f".{split}.tmp-", dir=out_dir)
    try:
        img_path = os.path.join(tmp, "images.npy")
        images = np.lib.format.open_memmap(img_path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        it: Any = range(n)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc=f"shapes {split}", unit="img")
        with open(os.path.join(tmp, "meta.jsonl"), "w", encoding="utf-8") as meta:
            for i in it:
                images[i], rec = render_scene(split, i, size, seed)
                meta.write(json.dumps(rec, sort_keys=False, separators=(",", ":")) + "\n")
            meta.flush()
            os.fsync(meta.fileno())
        images.flush()
        del images
        digests = {"images.npy": _sha256_file(img_path),
                   "meta.jsonl": _sha256_file(os.path.join(tmp, "meta.jsonl"))}
        final = os.path.join(out_dir, split)
        old = None
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=f".{split}.old-", dir=out_dir)
            os.replace(final, os.path.join(old, split))
        os.replace(tmp, final)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return digests
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_dataset(
    out_dir: str | os.PathLike,
    size: int = 64,
    n_train: int = 10000,
    n_test: int = 1000,
    n_test_novel: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``out_dir/{train,test,test_novel}/{images.npy,meta.jsonl}`` and ``out_dir/info.json``.

    Each split is written to a temporary folder and renamed into place; ``info.json`` (written last,
    atomically) records seed, size, counts, format version, the world's names and the files' sha256.
    Returns the info dict.
    """
    out_dir = os.fspath(out_dir)
    counts = {"train": int(n_train), "test": int(n_test), "test_novel": int(n_test_novel)}
    for split, n in counts.items():
        _check_args(split, size, seed)
        if n < 0:
            raise ValueError(f"n_{split} must be >= 0, got {n}")
    os.makedirs(out_dir, exist_ok=True)
    digests = {split: _write_split(out_dir, split, n, int(size), int(seed), progress)
               for split, n in counts.items()}
    info = {
        "format": "cpgan-shapes",
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        "size": int(size),
        "counts": counts,
        **{f"n_{split}": n for split, n in counts.items()},  # flat copies (read by the data stage)
        "shapes": SHAPES,
        "colours": COLOURS,
        "sizes": SIZES,
        "backgrounds": BACKGROUNDS,
        "novel_pairs": sorted([list(p) for p in NOVEL_PAIRS]),
        "captions_per_image": CAPTIONS_PER_IMAGE,
        "sha256": digests,
    }
    _write_json_atomic(os.path.join(out_dir, "info.json"), info)
    return info


def load_split(out_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Read a split written by ``write_dataset``: ``(images memmap (N, H, W, 3) uint8, records)``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    folder = os.path.join(os.fspath(out_dir), split)
    img_path, meta_path = os.path.join(folder, "images.npy"), os.path.join(folder, "meta.jsonl")
    if not (os.path.isfile(img_path) and os.path.isfile(meta_path)):
        raise FileNotFoundError(
            f"shapes split not found: expected {img_path} and {meta_path}; "
            f"create the data set with `cpgan data shapes --out {os.fspath(out_dir)}`"
        )
    images = np.load(img_path, mmap_mode="r", allow_pickle=False)
    with open(meta_path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{img_path}: expected a uint8 (N, H, W, 3) array, got {images.dtype} {images.shape}")
    if images.shape[0] != len(records):
        raise ValueError(
            f"{folder}: {images.shape[0]} images but {len(records)} records; regenerate it with "
            f"`cpgan data shapes --out {os.fspath(out_dir)}`"
        )
    return images, records


def parse_caption(text: str) -> list[dict[str, str | None]]:
    """Objects named by a caption, in caption order: ``[{"colour", "shape", "size"}]`` (canonical names).

    Size and colour words attach to the next shape word ("a big red ball" -> large red circle). A shape word
    without adjectives gives colour/size None; adjectives with no shape word following (or repeated before
    one, as in "a red and a blue ball") give an object with shape None. Other words are ignored.
    """
    objs: list[dict[str, str | None]] = []
    pending: dict[str, str | None] = {"colour": None, "shape": None, "size": None}

    def flush() -> None:
        nonlocal pending
        if any(x is not None for x in pending.values()):
            objs.append(pending)
        pending = {"colour": None, "shape": None, "size": None}

    for tok in tokenize(text):
        if tok in COLOUR_OF:
            if pending["colour"] is not None:
                flush()
            pending["colour"] = COLOUR_OF[tok]
        elif tok in SIZE_OF:
            if pending["size"] is not None:
                flush()
            pending["size"] = SIZE_OF[tok]
        elif tok in SHAPE_OF:
            pending["shape"] = SHAPE_OF[tok]
            flush()
    flush()
    return objs


def parse_background(text: str) -> str | None:
    """Background named by a caption (``grass``/``sky``/``sand``/``grey``) or None."""
    for tok in tokenize(text):
        if tok in _BACKGROUND_OF:
            return _BACKGROUND_OF[tok]
    return None
