"""Tests of the shapes-world evaluator (cpgan.models.evaluator) and its training/scoring (cpgan.evaluator_train)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from cpgan.evaluator_train import (
    evaluate_evaluator,
    make_targets,
    objectness_loss,
    records_to_wanted,
    score_detections,
    train_evaluator,
)
from cpgan.models.evaluator import ShapesEvaluator

COLOURS = ["red", "green", "blue"]
SHAPES = ["circle", "square"]
BACKGROUNDS = ["grass", "sky"]


def _obj(colour: str, shape: str, box: list[float]) -> dict:
    return {"colour": colour, "shape": shape, "size": "small", "box": box}


# ------------------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("size", [32, 64, 128])
def test_forward_shapes_any_input_size(size: int) -> None:
    torch.manual_seed(0)
    m = ShapesEvaluator(n_colours=8, n_shapes=8, n_backgrounds=4, widths=(8, 16, 24), context_layers=1).eval()
    x = torch.rand(3, 3, size, size) * 2 - 1
    out = m(x)
    assert m.grid == 8
    assert out["obj"].shape == (3, 8, 8)
    assert out["colour"].shape == (3, 8, 8, 8)
    assert out["shape"].shape == (3, 8, 8, 8)
    assert out["background"].shape == (3, 4)
    assert out["features"].shape == (3, 24) and m.feature_dim == 24
    assert m.features(x).shape == (3, 24)
    assert m.class_posterior(x).shape == (3, 64)
    dets = m.detect(x)
    assert len(dets) == 3 and all(isinstance(d.pairs, set) and 0 <= d.background < 4 for d in dets)


def test_bad_inputs_raise_clear_errors() -> None:
    m = ShapesEvaluator(widths=(4, 4, 4), context_layers=0)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m(torch.zeros(2, 64, 64))
    with pytest.raises(ValueError, match="float"):
        m(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="divisible"):
        ShapesEvaluator(native_size=60)
    with pytest.raises(ValueError, match="nms_kernel"):
        ShapesEvaluator.peaks(torch.zeros(1, 4, 4), nms_kernel=2)


def _peaks_loop(prob: torch.Tensor, threshold: float, k: int) -> torch.Tensor:
    """Reference peak picking with explicit loops."""
    b, g, _ = prob.shape
    out = torch.zeros(b, g, g, dtype=torch.bool)
    r = k // 2
    for i in range(b):
        for y in range(g):
            for x in range(g):
                v = prob[i, y, x]
                neigh = prob[i, max(0, y - r):y + r + 1, max(0, x - r):x + r + 1]
                out[i, y, x] = bool(v >= threshold) and bool(v >= neigh.max())
    return out


@pytest.mark.parametrize("k", [1, 3, 5])
def test_peaks_match_loop_reference(k: int) -> None:
    g = torch.Generator().manual_seed(1)
    prob = torch.rand(4, 6, 6, generator=g)
    prob[0, 2, 2] = prob[0, 2, 3] = 0.9  # a tie: both kept
    got = ShapesEvaluator.peaks(prob, threshold=0.5, nms_kernel=k)
    assert torch.equal(got, _peaks_loop(prob, 0.5, k))


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def test_decode_hand_built_map() -> None:
    g, c, s = 4, 3, 2
    obj = torch.full((2, g, g), _logit(0.01))
    colour = torch.zeros(2, g, g, c)
    shape = torch.zeros(2, g, g, s)
    # image 0: strong peak at (0,0) red-square; weaker neighbour at (0,1) blue-circle is suppressed by 3x3 NMS;
    # separate peak at (3,3) green-circle; (2,0) at 0.45 is below threshold.
    for (y, x, p, ci, si) in [(0, 0, 0.95, 0, 1), (0, 1, 0.7, 2, 0), (3, 3, 0.6, 1, 0), (2, 0, 0.45, 2, 1)]:
        obj[0, y, x] = _logit(p)
        colour[0, y, x, ci] = 5.0
        shape[0, y, x, si] = 5.0
    # image 1: two peaks far apart with the same class collapse to one pair
    for (y, x) in [(0, 0), (3, 3)]:
        obj[1, y, x] = _logit(0.8)
        colour[1, y, x, 2] = 3.0
        shape[1, y, x, 1] = 3.0
    bg = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    out = {"obj": obj, "colour": colour, "shape": shape, "background": bg}
    dets = ShapesEvaluator.decode(out, threshold=0.5, nms_kernel=3)
    assert dets[0].pairs == {(0, 1), (1, 0)} and dets[0].background == 1
    assert dets[1].pairs == {(2, 1)} and dets[1].background == 0
    # without NMS the suppressed neighbour appears; a lower threshold admits the 0.45 cell
    assert ShapesEvaluator.decode(out, 0.5, 1)[0].pairs == {(0, 1), (2, 0), (1, 0)}
    assert ShapesEvaluator.decode(out, 0.4, 3)[0].pairs == {(0, 1), (1, 0), (2, 1)}
    # detect() goes through forward(): same result with a model whose forward returns the hand-built map
    m = ShapesEvaluator(n_colours=c, n_shapes=s, n_backgrounds=2, native_size=32, widths=(4, 4, 4))
    m.forward = lambda images: out  # type: ignore[method-assign]
    assert m.detect(torch.zeros(2, 3, 32, 32))[0].pairs == {(0, 1), (1, 0)}


def test_class_posterior_is_dominant_cell_outer_product() -> None:
    torch.manual_seed(3)
    m = ShapesEvaluator(n_colours=8, n_shapes=8, n_backgrounds=4, widths=(8, 8, 8), context_layers=1).eval()
    x = torch.rand(5, 3, 64, 64) * 2 - 1
    post = m.class_posterior(x)
    with torch.no_grad():
        out = m(x)
    assert post.shape == (5, 64)
    assert torch.allclose(post.sum(1), torch.ones(5), atol=1e-5)
    assert bool((post >= 0).all())
    for i in range(5):  # reference: loop over cells to find the dominant one, then loop over classes
        best, by, bx = -1e9, 0, 0
        for y in range(m.grid):
            for xx in range(m.grid):
                if out["obj"][i, y, xx] > best:
                    best, by, bx = float(out["obj"][i, y, xx]), y, xx
        pc = torch.softmax(out["colour"][i, by, bx], 0)
        ps = torch.softmax(out["shape"][i, by, bx], 0)
        for ci in range(8):
            for si in range(8):
                assert abs(float(post[i, ci * 8 + si]) - float(pc[ci] * ps[si])) < 1e-6


# ------------------------------------------------------------------------------------------------------ targets
def test_make_targets_hand_built() -> None:
    recs = [
        {"background": "sky", "objects": [
            _obj("green", "square", [0.0, 0.0, 0.2, 0.2]),     # centre (0.1, 0.1) -> cell (0, 0)
            _obj("blue", "circle", [0.5, 0.6, 0.9, 1.0]),      # centre (0.7, 0.8) -> row 3, col 2
        ]},
        {"background": "grass", "objects": [
            _obj("red", "circle", [0.3, 0.3, 0.45, 0.45]),     # centre (0.375, 0.375) -> (1, 1), small
            _obj("blue", "square", [0.26, 0.26, 0.48, 0.48]),  # centre (0.37, 0.37) -> (1, 1), larger: wins
            _obj("green", "circle", [1.0, 0.0, 1.0, 0.5]),     # centre x = 1.0 clipped to col 3, row 1
        ]},
    ]
    t = make_targets(recs, 4, COLOURS, SHAPES, BACKGROUNDS)
    exp_obj = np.zeros((2, 4, 4), np.float32)
    exp_col = np.full((2, 4, 4), -1)
    exp_shp = np.full((2, 4, 4), -1)
    for (i, y, x, c, s) in [(0, 0, 0, 1, 1), (0, 3, 2, 2, 0), (1, 1, 1, 2, 1), (1, 1, 3, 1, 0)]:
        exp_obj[i, y, x], exp_col[i, y, x], exp_shp[i, y, x] = 1, c, s
    assert np.array_equal(t["obj"].numpy(), exp_obj)
    assert np.array_equal(t["colour"].numpy(), exp_col)
    assert np.array_equal(t["shape"].numpy(), exp_shp)
    assert t["background"].tolist() == [1, 0]
    assert int(t["collisions"]) == 1
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        make_targets([{"background": "sky", "objects": [_obj("pink", "circle", [0, 0, 1, 1])]}], 4,
                     COLOURS, SHAPES, BACKGROUNDS)


def test_make_targets_center_sampling_hand_built() -> None:
    recs = [{"background": "grass", "objects": [
        _obj("red", "square", [0.1, 0.1, 0.9, 0.9]),      # shrunk by 0.5: [0.3, 0.7]^2 holds cell centres
                                                          # 0.375 and 0.625 -> rows/cols 1..2
        _obj("blue", "circle", [0.3, 0.3, 0.45, 0.45]),   # only cell (1, 1), taken by the larger red square
        _obj("green", "circle", [0.0, 0.75, 0.2, 0.95]),  # centre (0.1, 0.85) -> cell (3, 0)
    ]}]
    t = make_targets(recs, 4, COLOURS, SHAPES, BACKGROUNDS, center_sampling=0.5)
    exp_col = np.full((1, 4, 4), -1)
    exp_col[0, 1:3, 1:3] = 0
    exp_col[0, 3, 0] = 1
    exp_shp = np.full((1, 4, 4), -1)
    exp_shp[0, 1:3, 1:3] = 1
    exp_shp[0, 3, 0] = 0
    assert np.array_equal(t["colour"].numpy(), exp_col)
    assert np.array_equal(t["shape"].numpy(), exp_shp)
    assert np.array_equal(t["obj"].numpy(), (exp_col >= 0).astype(np.float32))
    assert int(t["collisions"]) == 1
    # centre margin: a centre on a cell border claims the cells on both sides; one mid-cell claims only its own
    recs2 = [{"background": "sky", "objects": [
        _obj("blue", "circle", [0.2, 0.2, 0.3, 0.3]),      # centre (0.25, 0.25) = border of cells 0|1 (G = 4)
        _obj("red", "square", [0.55, 0.8, 0.65, 0.9]),     # centre (0.6, 0.85): 2.4 +- 0.25, 3.4 +- 0.25
    ]}]
    t2 = make_targets(recs2, 4, COLOURS, SHAPES, BACKGROUNDS, center_margin=0.25)
    exp = np.zeros((1, 4, 4), np.float32)
    exp[0, 0:2, 0:2] = 1
    exp[0, 3, 2] = 1
    assert np.array_equal(t2["obj"].numpy(), exp)
    assert t2["colour"][0, 1, 0] == 2 and t2["colour"][0, 3, 2] == 0
    with pytest.raises(ValueError, match="center_margin"):
        make_targets(recs2, 4, COLOURS, SHAPES, BACKGROUNDS, center_margin=0.7)
    with pytest.raises(ValueError, match="center_sampling"):
        make_targets(recs, 4, COLOURS, SHAPES, BACKGROUNDS, center_sampling=1.5)


def test_objectness_loss_closed_form() -> None:
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 0.5]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    sp = lambda v: float(np.log1p(np.exp(v)))  # softplus
    expected = (sp(-0.0) + sp(2.0) + sp(-1.0) + sp(-0.5)) / 2
    assert abs(float(objectness_loss(logits, target, "bce")) - expected) < 1e-6
    p = 1 / (1 + np.exp(-np.array([0.0, 2.0, -1.0, 0.5])))
    pt = np.array([p[0], 1 - p[1], 1 - p[2], p[3]])
    at = np.array([0.25, 0.75, 0.75, 0.25])
    focal = float((at * (1 - pt) ** 2 * -np.log(pt)).sum() / 2)
    assert abs(float(objectness_loss(logits, target, "focal")) - focal) < 1e-6


# ------------------------------------------------------------------------------------------------------ scoring
def test_score_detections_hand_built() -> None:
    dets = [
        ({(0, 1), (2, 0)}, 1),  # image 0 wants (0,1),(2,0): all found; bg right
        ({(0, 1)}, 0),          # image 1 wants (0,1),(1,1): (1,1) missed; colour 1 missed, shape 1 found; bg wrong
        ({(2, 1), (1, 0)}, 0),  # image 2 wants (2,None) and (None,0): both found (partial descriptions)
        ({(1, 1), (0, 0)}, 1),  # image 3 wants (1,1): found, one false positive
    ]
    wanted = [
        ([(0, 1), (2, 0)], 1),
        ([(0, 1), (1, 1)], 1),
        ([(2, None), (None, 0)], None),
        ([(1, 1)], 1),
    ]
    s = score_detections(dets, wanted)
    assert s["soa_i"] == pytest.approx(3 / 4)
    assert s["object_recall"] == pytest.approx(6 / 7)
    assert s["colour_acc"] == pytest.approx(5 / 6)  # named colours: 0,2 | 0,1 | 2 | 1 -> 1 missed
    assert s["shape_acc"] == pytest.approx(6 / 6)   # named shapes: 1,0 | 1,1 | 0 | 1
    assert s["background_acc"] == pytest.approx(2 / 3)
    # classes: (0,1): 2 images, both found; (2,0): 1/1; (1,1): images 1 (miss) and 3 (hit) -> 0.5
    assert s["soa_c"] == pytest.approx((1.0 + 1.0 + 0.5) / 3)
    assert s["precision"] == pytest.approx((2 + 1 + 1) / (2 + 1 + 2))
    assert s["exact_set_acc"] == pytest.approx(1 / 3)
    assert s["mean_detections"] == pytest.approx(7 / 4)
    with pytest.raises(ValueError, match="must match"):
        score_detections(dets, wanted[:2])


class _Oracle(ShapesEvaluator):
    """Returns logits built from the true targets of the images it is shown, in order (optionally corrupted)."""

    def __init__(self, records: list[dict], wrong_shape_in: set[int]) -> None:
        super().__init__(n_colours=3, n_shapes=2, n_backgrounds=2, native_size=32, widths=(4, 4), context_layers=0)
        self.t = make_targets(records, self.grid, COLOURS, SHAPES, BACKGROUNDS)
        self.wrong = wrong_shape_in
        self.seen = 0

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        b = images.shape[0]
        sl = slice(self.seen, self.seen + b)
        self.seen += b
        obj = self.t["obj"][sl] * 20 - 10
        colour = torch.nn.functional.one_hot(self.t["colour"][sl].clamp(min=0), 3).float()
        shape_t = self.t["shape"][sl].clone()
        for j, i in enumerate(range(sl.start, sl.stop)):
            if i in self.wrong:
                shape_t[j] = torch.where(shape_t[j] >= 0, 1 - shape_t[j], shape_t[j])
        shape = torch.nn.functional.one_hot(shape_t.clamp(min=0), 2).float()
        bg = torch.nn.functional.one_hot(self.t["background"][sl], 2).float()
        return {"obj": obj, "colour": colour, "shape": shape, "background": bg,
                "features": torch.zeros(b, 4)}


def test_evaluate_evaluator_with_oracle_model() -> None:
    imgs, recs = _toy_split(7, 4)
    s = evaluate_evaluator(_Oracle(recs, set()), imgs, recs, batch_size=3,
                           colours=COLOURS, shapes=SHAPES, backgrounds=BACKGROUNDS)
    for k in ("soa_i", "object_recall", "colour_acc", "shape_acc", "background_acc", "precision",
              "cell_obj_recall", "cell_colour_acc", "cell_shape_acc"):
        assert s[k] == 1.0, (k, s)
    # every shape of images 1 and 5 is wrong: those images fail SOA and their objects count as misses
    s = evaluate_evaluator(_Oracle(recs, {1, 5}), imgs, recs, batch_size=3,
                           colours=COLOURS, shapes=SHAPES, backgrounds=BACKGROUNDS)
    n_obj = sum(len(r["objects"]) for r in recs)
    n_bad = len(recs[1]["objects"]) + len(recs[5]["objects"])
    assert s["soa_i"] == pytest.approx(5 / 7)
    assert s["object_recall"] == pytest.approx((n_obj - n_bad) / n_obj)
    assert s["cell_shape_acc"] == pytest.approx((n_obj - n_bad) / n_obj)
    assert s["colour_acc"] == 1.0 and s["cell_colour_acc"] == 1.0


def test_records_to_wanted_partial() -> None:
    recs = [{"background": "grass", "objects": [{"colour": "blue", "shape": None}, {"shape": "square"}]}]
    assert records_to_wanted(recs, COLOURS, SHAPES, BACKGROUNDS) == [([(2, None), (None, 1)], 0)]


# ----------------------------------------------------------------------------------------------------- training
def _toy_split(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, list[dict]]:
    """Tiny independent scenes for tests that need no real shapes world: 1-2 filled squares/discs."""
    rng = np.random.default_rng(seed)
    rgb = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    bgs = {"grass": (60, 120, 60), "sky": (140, 170, 230)}
    yy, xx = np.mgrid[0:size, 0:size]
    imgs = np.zeros((n, size, size, 3), np.uint8)
    recs = []
    for i in range(n):
        bg = BACKGROUNDS[rng.integers(2)]
        imgs[i] = bgs[bg]
        objs = []
        for k in range(int(rng.integers(1, 3))):
            c, s = COLOURS[rng.integers(3)], SHAPES[rng.integers(2)]
            r = size // 8
            # object k lives in its own half of the image so objects never overlap
            cx = int(rng.integers(r, size // 2 - r)) + k * size // 2
            cy = int(rng.integers(r, size - r))
            if s == "square":
                m = (abs(xx - cx) <= r) & (abs(yy - cy) <= r)
            else:
                m = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            imgs[i][m] = rgb[c]
            objs.append(_obj(c, s, [(cx - r) / size, (cy - r) / size, (cx + r + 1) / size, (cy + r + 1) / size]))
        recs.append({"background": bg, "objects": objs})
    return imgs, recs


def test_augment_flip_matches_mirrored_boxes_and_recolour_blanks_colour() -> None:
    from cpgan.evaluator_train import _augment

    imgs, recs = _toy_split(16, 3)
    t = make_targets(recs, 4, COLOURS, SHAPES, BACKGROUNDS)
    t.pop("collisions")
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    gen = torch.Generator().manual_seed(0)
    xa, ta = _augment(x, t, gen, flip=True, brightness=0.0, noise=0.0, recolour=0.0)
    flipped = [i for i in range(16) if not torch.equal(xa[i], x[i])]
    assert 0 < len(flipped) < 16
    mirrored = [{"background": r["background"], "objects": [
        {**o, "box": [1 - o["box"][2], o["box"][1], 1 - o["box"][0], o["box"][3]]} for o in r["objects"]]}
        for r in recs]
    tm = make_targets(mirrored, 4, COLOURS, SHAPES, BACKGROUNDS)
    for i in range(16):
        src = tm if i in flipped else t
        assert torch.equal(xa[i], x[i].flip(-1) if i in flipped else x[i])
        for k in ("obj", "colour", "shape"):
            assert torch.equal(ta[k][i], src[k][i]), (i, k)
    gen = torch.Generator().manual_seed(1)
    xm = x * 0.4  # muted colours: |Q v| = |v| <= 0.4 * sqrt(3) < 1, so nothing is clipped
    xp, tp = _augment(xm, t, gen, flip=False, brightness=0.0, noise=0.0, recolour=0.5)
    n_rec = 0
    for i in range(16):
        if torch.equal(xp[i], xm[i]):
            assert torch.equal(tp["colour"][i], t["colour"][i]) and tp["background"][i] == t["background"][i]
            continue
        n_rec += 1
        assert bool((tp["colour"][i] == -1).all()) and int(tp["background"][i]) == -1
        assert torch.equal(tp["shape"][i], t["shape"][i]) and torch.equal(tp["obj"][i], t["obj"][i])
        # the recolouring is a rotation/reflection of RGB space about mid-grey: dst = Q src with Q orthogonal
        # <=> the Gram matrix of the (centred) colours is unchanged
        src = xm[i].reshape(3, -1).T.double()  # (P, 3)
        dst = xp[i].reshape(3, -1).T.double()
        _, first = np.unique(src.numpy(), axis=0, return_index=True)  # one pixel per distinct colour
        a_, b_ = src[first], dst[first]
        assert torch.allclose(a_ @ a_.T, b_ @ b_.T, atol=1e-4)
        assert not torch.allclose(a_, b_, atol=1e-2)
    assert 0 < n_rec < 16


def test_resume_continues_exactly() -> None:
    imgs, recs = _toy_split(40, 0)
    kw = dict(batch_size=8, lr=1e-3, seed=5, model_kwargs={"native_size": 32, "widths": (4, 8, 8),
              "context_layers": 1}, colours=COLOURS, shapes=SHAPES, backgrounds=BACKGROUNDS)
    full, _ = train_evaluator(imgs, recs, steps=8, **kw)
    states = []
    train_evaluator(imgs, recs, steps=8, checkpoint_every=4, checkpoint_fn=states.append, **kw)
    assert [s["step"] for s in states] == [4, 8, 8]
    resumed, hist = train_evaluator(imgs, recs, steps=8, resume_state=states[0], **kw)
    assert hist["steps"] == 8
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def _chance_soa_i(records: list[dict], n_perm: int = 20) -> float:
    """SOA-I of a detector that returns another (random) image's true pair set: the data's chance level."""
    sets = [{(o["colour"], o["shape"]) for o in r["objects"]} for r in records]
    rng = random.Random(0)
    hits = 0
    for _ in range(n_perm):
        other = sets[:]
        rng.shuffle(other)
        hits += sum(a <= b for a, b in zip(sets, other))
    return hits / (n_perm * len(sets))


def _colour_only_chance_soa_i(records: list[dict], n_shapes: int = 8) -> float:
    """SOA-I of a detector that finds every object and its colour but guesses shapes uniformly."""
    return float(np.mean([(1.0 / n_shapes) ** len(r["objects"]) for r in records]))


def test_quick_training_on_shapes_world_beats_chance() -> None:
    from cpgan.data import shapes

    torch.set_num_threads(1)
    tr_x, tr_r = shapes.generate_split("train", 600, 64, 11)
    te_x, te_r = shapes.generate_split("test", 150, 64, 12)
    _, hist = train_evaluator(
        tr_x, tr_r, te_x, te_r, steps=400, batch_size=32, lr=5e-3, seed=7, recolour=0.0,
        model_kwargs={"widths": (8, 16, 32), "context_layers": 1},
    )
    test = hist["test"]
    chance = max(_chance_soa_i(te_r), _colour_only_chance_soa_i(te_r))
    assert test["colour_acc"] > 0.8, test
    assert test["background_acc"] > 0.9, test
    assert test["shape_acc"] > 0.3, test  # uniform guessing: 1/8
    assert test["soa_i"] > chance + 0.1, (test, chance)
    assert hist["train"][-1]["loss"] < 0.5 * hist["train"][0]["loss"]
