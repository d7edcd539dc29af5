"""Tests of the shapes world (cpgan.data.shapes): determinism, splits, captions, boxes, files."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from cpgan.data import shapes
from cpgan.data.shapes import (
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    NOVEL_PAIRS,
    SHAPES,
    SIZES,
    generate_split,
    load_split,
    parse_background,
    parse_caption,
    render_scene,
    write_dataset,
)
from cpgan.data.text import tokenize


def _digest(images: np.ndarray, records: list[dict]) -> tuple[str, str]:
    return (
        hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest(),
        hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest(),
    )


@pytest.fixture(scope="module")
def train2000():
    return generate_split("train", 2000, 64, seed=0)


# -- determinism --------------------------------------------------------------------------------------------
def test_same_seed_is_byte_identical_and_other_seed_differs():
    a = generate_split("train", 24, 64, seed=5)
    b = generate_split("train", 24, 64, seed=5)
    c = generate_split("train", 24, 64, seed=6)
    assert _digest(*a) == _digest(*b)
    da, dc = _digest(*a), _digest(*c)
    assert da[0] != dc[0] and da[1] != dc[1]
    # an image does not depend on how many images are generated, nor on the split's other images
    short = generate_split("train", 7, 64, seed=5)
    assert _digest(*short) == _digest(a[0][:7], a[1][:7])
    img, rec = render_scene("train", 19, 64, seed=5)
    assert np.array_equal(img, a[0][19]) and rec == a[1][19]
    # splits are different streams
    t = generate_split("test", 24, 64, seed=5)
    assert _digest(*t)[0] != da[0]


_SUBPROCESS_CODE = """
import hashlib, json, sys
from cpgan.data.shapes import generate_split
out = {}
for split, n, size in [("train", 10, 64), ("test_novel", 6, 64), ("test", 2, 128)]:
    ims, recs = generate_split(split, n, size, seed=11)
    out[split] = [hashlib.sha256(ims.tobytes()).hexdigest(),
                  hashlib.sha256(json.dumps(recs, sort_keys=True).encode()).hexdigest()]
print(json.dumps(out))
"""


def test_identical_in_a_fresh_process_without_simd():
    """Another process with numpy's SIMD dispatch switched off (baseline x86-64 / generic code paths, as on a
    different CPU) must produce the same bytes: guards against platform-dependent float code."""
    expected = {}
    for split, n, size in [("train", 10, 64), ("test_novel", 6, 64), ("test", 2, 128)]:
        expected[split] = list(_digest(*generate_split(split, n, size, seed=11)))
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env = dict(os.environ)
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["NPY_DISABLE_CPU_FEATURES"] = "X86_V3 X86_V4 AVX512_ICL AVX512_SPR ASIMDHP ASIMDDP ASIMDFHM SVE"
    env["PYTHONHASHSEED"] = "123"
    res = subprocess.run([sys.executable, "-c", _SUBPROCESS_CODE], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == expected


def test_scene_is_the_same_at_every_resolution():
    _, r64 = render_scene("test", 3, 64, seed=2)
    _, r256 = render_scene("test", 3, 256, seed=2)
    strip = lambda r: [(o["shape"], o["colour"], o["size"]) for o in r["objects"]]  # noqa: E731
    assert strip(r64) == strip(r256) and r64["background"] == r256["background"]
    for a, b in zip(r64["objects"], r256["objects"]):
        assert max(abs(x - y) for x, y in zip(a["box"], b["box"])) < 2.0 / 64


# -- splits and novel pairs ---------------------------------------------------------------------------------
def test_novel_pairs_definition():
    assert len(NOVEL_PAIRS) == 8
    assert sorted(s for _, s in NOVEL_PAIRS) == sorted(SHAPES)  # one per shape
    assert len({c for c, _ in NOVEL_PAIRS}) == 8  # distinct colours
    assert all(c in COLOURS and s in SHAPES for c, s in NOVEL_PAIRS)


def test_train_and_test_never_contain_novel_pairs_and_test_novel_always_does(train2000):
    _, train = train2000
    train_pairs = {(o["colour"], o["shape"]) for r in train for o in r["objects"]}
    assert not train_pairs & NOVEL_PAIRS
    assert len(train_pairs) == 64 - 8  # every ordinary pair occurs in 2000 images
    _, test = generate_split("test", 300, 64, seed=0)
    assert not {(o["colour"], o["shape"]) for r in test for o in r["objects"]} & NOVEL_PAIRS
    _, novel = generate_split("test_novel", 300, 64, seed=0)
    for r in novel:
        assert any((o["colour"], o["shape"]) in NOVEL_PAIRS for o in r["objects"]), r["key"]
    # the held-out pairs all appear, and test_novel shares no held-out pair with train
    novel_pairs_seen = {(o["colour"], o["shape"]) for r in novel for o in r["objects"]} & NOVEL_PAIRS
    assert novel_pairs_seen == set(NOVEL_PAIRS)


def test_scene_statistics(train2000):
    _, recs = train2000
    n_obj = Counter(len(r["objects"]) for r in recs)
    assert set(n_obj) == {1, 2, 3} and min(n_obj.values()) > 400
    assert set(Counter(r["background"] for r in recs)) == set(BACKGROUNDS)
    assert set(Counter(o["size"] for r in recs for o in r["objects"])) == set(SIZES)
    for r in recs:
        pairs = [(o["colour"], o["shape"]) for o in r["objects"]]
        assert len(set(pairs)) == len(pairs)  # distinct (colour, shape) within a scene
    assert [r["key"] for r in recs[:3]] == ["train_000000", "train_000001", "train_000002"]


# -- captions -----------------------------------------------------------------------------------------------
def test_captions_are_distinct_short_and_name_exactly_the_objects(train2000):
    _, recs = train2000
    for r in recs:
        caps = r["captions"]
        assert len(caps) == 5 and len(set(caps)) == 5, r["key"]
        truth = Counter((o["colour"], o["shape"]) for o in r["objects"])
        size_of = {(o["colour"], o["shape"]): o["size"] for o in r["objects"]}
        for c in caps:
            assert 1 <= len(tokenize(c)) <= 20, c
            assert all(ch.isascii() for ch in c) and "-" not in c
            parsed = parse_caption(c)
            assert Counter((p["colour"], p["shape"]) for p in parsed) == truth, (c, r["objects"])
            for p in parsed:
                if p["size"] is not None:
                    assert p["size"] == size_of[(p["colour"], p["shape"])], (c, r["objects"])
            bg = parse_background(c)
            assert bg is None or bg == r["background"], c


def _centre(o):
    x0, y0, x1, y1 = o["box"]
    return (x0 + x1) / 2, (y0 + y1) / 2


def test_relations_in_two_object_captions_match_the_geometry(train2000):
    """Independent reading of 'A <rel> B' / 'A with B <rel> it' against the box centres."""
    _, recs = train2000
    checked = 0
    for r in recs:
        if len(r["objects"]) != 2:
            continue
        by_pair = {(o["colour"], o["shape"]): o for o in r["objects"]}
        for c in r["captions"]:
            toks = tokenize(c)
            rel = None
            for words, name in [(("above",), "above"), (("over",), "above"), (("below",), "below"),
                                (("under",), "below"), (("beneath",), "below"), (("left",), "left"),
                                (("right",), "right")]:
                if words[0] in toks:
                    rel = name
            if rel is None:
                continue
            first, second = [by_pair[(p["colour"], p["shape"])] for p in parse_caption(c)]
            subj, ref = (second, first) if "with" in toks else (first, second)
            (sx, sy), (rx, ry) = _centre(subj), _centre(ref)
            dx, dy = sx - rx, sy - ry
            ok = {"above": dy < 0 and abs(dy) >= 1.5 * abs(dx) - 1e-9,
                  "below": dy > 0 and abs(dy) >= 1.5 * abs(dx) - 1e-9,
                  "left": dx < 0 and abs(dx) >= 1.5 * abs(dy) - 1e-9,
                  "right": dx > 0 and abs(dx) >= 1.5 * abs(dy) - 1e-9}[rel]
            assert ok, (c, r["objects"])
            checked += 1
    assert checked > 500


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A big red ball above a small blue box.", [("red", "circle", "large"), ("blue", "square", "small")]),
        ("there is a small blue square below a large red circle",
         [("blue", "square", "small"), ("red", "circle", "large")]),
        ("a red circle on grass", [("red", "circle", None)]),
        ("a medium sized violet rhombus", [("purple", "diamond", "medium")]),
        ("a mid-sized WHITE plus, a tiny pink heart and a green star on the beach",
         [("white", "cross", "medium"), ("pink", "heart", "small"), ("green", "star", None)]),
        ("an orange disc with a little yellow block to the right of it",
         [("orange", "circle", None), ("yellow", "square", "small")]),
        ("a hexagon", [(None, "hexagon", None)]),
        ("a red and a blue triangle", [("red", None, None), ("blue", "triangle", None)]),
        ("a big purple", [("purple", None, "large")]),
        ("on a plain grey background", []),
        ("", []),
    ],
)
def test_parse_caption_hand_written(text, expected):
    got = [(p["colour"], p["shape"], p["size"]) for p in parse_caption(text)]
    assert got == expected


def test_parse_background_hand_written():
    assert parse_background("a red ball on the lawn") == "grass"
    assert parse_background("In the SKY, a star") == "sky"
    assert parse_background("a box on a beach") == "sand"
    assert parse_background("a heart on a gray background") == "grey"
    assert parse_background("a red heart") is None


# -- images and boxes ---------------------------------------------------------------------------------------
def test_images_shape_dtype_not_blank(train2000):
    images, _ = train2000
    assert images.shape == (2000, 64, 64, 3) and images.dtype == np.uint8
    flat = images.reshape(2000, -1, 3).astype(np.int64)
    assert (flat.max(axis=1) - flat.min(axis=1)).max(axis=1).min() > 40  # every image has contrast
    img, _ = render_scene("train", 0, 128, seed=0)
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8


def test_boxes_contain_their_object_and_centre_has_its_colour():
    palette = np.array([COLOUR_RGB[c] for c in COLOURS], dtype=np.float64)
    for i in range(150):
        img, rec, masks = render_scene("test", i, 64, seed=1, with_masks=True)
        assert len(masks) == len(rec["objects"])
        for o, m in zip(rec["objects"], masks):
            x0, y0, x1, y1 = o["box"]
            assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
            ys, xs = np.nonzero(m)
            # every covered pixel inside the box, and the box is tight (touches the object on all sides)
            assert xs.min() == round(x0 * 64) and xs.max() + 1 == round(x1 * 64)
            assert ys.min() == round(y0 * 64) and ys.max() + 1 == round(y1 * 64)
            # the colour nearest to the box centre's 3x3 mean is the object's colour
            cx, cy = int((x0 + x1) / 2 * 64), int((y0 + y1) / 2 * 64)
            mean = img[cy - 1: cy + 2, cx - 1: cx + 2].reshape(-1, 3).astype(np.float64).mean(axis=0)
            assert COLOURS[int(np.argmin(((palette - mean) ** 2).sum(axis=1)))] == o["colour"], (rec["key"], o)
        # objects do not overlap: masks disjoint, boxes have small IoU
        for a in range(len(masks)):
            for b in range(a + 1, len(masks)):
                assert not np.any((masks[a] > 0) & (masks[b] > 0))
                A, B = rec["objects"][a]["box"], rec["objects"][b]["box"]
                iw = max(0.0, min(A[2], B[2]) - max(A[0], B[0]))
                ih = max(0.0, min(A[3], B[3]) - max(A[1], B[1]))
                inter = iw * ih
                union = (A[2] - A[0]) * (A[3] - A[1]) + (B[2] - B[0]) * (B[3] - B[1]) - inter
                assert inter / union < 0.15


def test_object_sizes_follow_their_labels(train2000):
    _, recs = train2000
    side = {s: [] for s in SIZES}
    for r in recs:
        for o in r["objects"]:
            side[o["size"]].append(math.sqrt((o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1])))
    med = {s: float(np.median(v)) for s, v in side.items()}
    assert med["small"] < med["medium"] < med["large"]


def test_unit_shape_areas_match_closed_forms():
    """Area of each unit shape on a fine grid vs its closed form (independent geometry check)."""
    n = 1200
    g = (np.arange(n) + 0.5) / n * 2.4 - 1.2
    u, v = np.meshgrid(g, g)
    cell = (2.4 / n) ** 2
    s5 = math.sqrt(5)
    expected = {
        "circle": math.pi,
        "square": 1.44 ** 2,
        "diamond": 2 * 0.68 * 1.0,
        "triangle": 0.5 * 1.6 * 1.6,
        "hexagon": 3 * math.sqrt(3) / 2,
        "cross": 2 * (0.68 * 1.9) - 0.68 ** 2,
        "star": 5 * 1.0 * 0.45 * (math.sqrt(10 - 2 * s5) / 4),  # 10 triangles of area R r sin(36)/2
    }
    for shape, area in expected.items():
        got = shapes._inside(shape, u, v).sum() * cell
        assert abs(got - area) < 0.01 * area, (shape, got, area)
    # placement assumes every shape lies in the disk of radius _SHAPE_EXTENT and contains its centre
    outside = u * u + v * v > shapes._SHAPE_EXTENT ** 2
    for shape in SHAPES:
        assert not np.any(shapes._inside(shape, u, v) & outside), shape
        assert shapes._inside(shape, np.zeros(1), np.zeros(1))[0], shape
    # heart: symmetric, lobes and point inside, notch between the lobes outside
    m = shapes._inside("heart", u, v)
    assert np.array_equal(m, m[:, ::-1])
    assert shapes._inside("heart", np.array([-0.42, 0.42, 0.0]), np.array([-0.33, -0.33, 0.8])).all()
    assert not shapes._inside("heart", np.array([0.0]), np.array([-0.7]))[0]  # the notch


# -- files --------------------------------------------------------------------------------------------------
def test_write_and_load_round_trip(tmp_path):
    out = tmp_path / "shapes"
    info = write_dataset(out, size=64, n_train=12, n_test=5, n_test_novel=4, seed=3)
    assert info["counts"] == {"train": 12, "test": 5, "test_novel": 4}
    on_disk = json.loads((out / "info.json").read_text())
    assert on_disk["seed"] == 3 and on_disk["size"] == 64 and on_disk["format_version"] == shapes.FORMAT_VERSION
    assert (on_disk["n_train"], on_disk["n_test"], on_disk["n_test_novel"]) == (12, 5, 4)
    for split, n in info["counts"].items():
        images, records = load_split(out, split)
        assert isinstance(images, np.memmap) and images.shape == (n, 64, 64, 3) and images.dtype == np.uint8
        ref_images, ref_records = generate_split(split, n, 64, seed=3)
        assert np.array_equal(np.asarray(images), ref_images)
        assert records == ref_records
        with open(out / split / "images.npy", "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == on_disk["sha256"][split]["images.npy"]
    # rewriting replaces the splits and leaves no temporary folders behind
    write_dataset(out, size=64, n_train=3, n_test=2, n_test_novel=1, seed=3)
    assert load_split(out, "train")[0].shape[0] == 3
    assert sorted(os.listdir(out)) == ["info.json", "test", "test_novel", "train"]


def test_load_split_missing_folder_says_how_to_create_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cpgan data shapes --out"):
        load_split(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="unknown split"):
        load_split(tmp_path, "validation")


def test_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        generate_split("train", 2, 100)
    with pytest.raises(ValueError, match="split"):
        generate_split("val", 2, 64)
    with pytest.raises(ValueError, match="seed"):
        generate_split("train", 2, 64, seed=-1)
