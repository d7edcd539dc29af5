"""Tests for cpgan.metrics: FID, IS, R-precision (both protocols) and SOA.

Every number is checked against an independent reference: closed forms (Gaussian FID, IS of one-hot
predictions), hand-computed small cases, or slow Python loops written here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cpgan.metrics import (
    FeatureStats,
    InceptionScoreAccumulator,
    SOAAccumulator,
    fid_from_features,
    fold_mean_std,
    frechet_distance,
    inception_score,
    r_precision_batch,
    r_precision_dmgan,
    retrieval_hits,
    sample_negatives,
    soa_scores,
)
import cpgan.metrics.fid as fid_module


# ----------------------------------------------------------------------------------------------- FID


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _closed_form_fid(mu1, s1, mu2, s2) -> float:
    """FID via the symmetric form Tr((S1^1/2 S2 S1^1/2)^1/2), eigh only (no scipy.sqrtm)."""
    r1 = _psd_sqrt(s1)
    cross = np.trace(_psd_sqrt(r1 @ s2 @ r1))
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * cross)


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.2 * np.eye(d)


def test_fid_diagonal_gaussians_match_closed_form():
    rng = np.random.default_rng(0)
    d, n = 8, 50_000
    mu1, mu2 = np.zeros(d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 4.0, d)
    # commuting (diagonal) covariances: the square root is elementwise
    closed = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2))
    a = mu1 + rng.normal(size=(n, d)) * np.sqrt(v1)
    b = mu2 + rng.normal(size=(n, d)) * np.sqrt(v2)
    assert fid_from_features(a, b) == pytest.approx(closed, rel=0.01)
    # exact population parameters: agreement to numerical precision
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(closed, rel=1e-9)


def test_fid_general_gaussians_match_closed_form():
    rng = np.random.default_rng(1)
    d, n = 8, 50_000
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    closed = _closed_form_fid(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-8)
    a = rng.multivariate_normal(mu1, s1, size=n)
    b = rng.multivariate_normal(mu2, s2, size=n)
    assert fid_from_features(a, b) == pytest.approx(closed, rel=0.01)
    # torch tensors are accepted and give the same value
    assert fid_from_features(torch.from_numpy(a).float(), b) == pytest.approx(closed, rel=0.01)


def test_fid_of_sample_with_itself_is_zero():
    rng = np.random.default_rng(2)
    a = rng.multivariate_normal(np.ones(8), _random_spd(rng, 8), size=5000)
    assert abs(fid_from_features(a, a)) < 1e-6


def test_fid_singular_covariances_stay_finite():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(5, 12))  # fewer samples than dimensions: rank-deficient covariance
    val = fid_from_features(a, a)
    assert math.isfinite(val) and abs(val) < 1e-3 * np.trace(np.cov(a, rowvar=False))


def test_fid_raises_on_large_imaginary_component():
    s1 = np.eye(3)
    s2 = np.diag([1.0, -1.0, 1.0])  # not PSD: sqrt of -1 has imaginary part 1
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(3), s1, np.zeros(3), s2)


def test_fid_retries_with_eps_offset_when_sqrtm_is_not_finite(monkeypatch):
    calls = []
    real_sqrtm = fid_module.linalg.sqrtm

    def fake_sqrtm(m):
        calls.append(np.array(m))
        if len(calls) == 1:
            return np.full_like(m, np.nan)
        return real_sqrtm(m)

    monkeypatch.setattr(fid_module.linalg, "sqrtm", fake_sqrtm)
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    eps = 1e-2
    val = frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=eps)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s1 + eps * np.eye(2)) @ (s2 + eps * np.eye(2)))
    expected = 1 + 4 + 9 + 1 - 2 * (math.sqrt((1 + eps) * (9 + eps)) + math.sqrt((4 + eps) * (1 + eps)))
    assert val == pytest.approx(expected, rel=1e-10)


def test_fid_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_feature_stats_streaming_equals_np_cov(tmp_path):
    rng = np.random.default_rng(4)
    batches = [1000.0 + rng.normal(size=(k, 6)) * rng.uniform(0.1, 3, 6) for k in (7, 1, 50, 13, 2)]
    full = np.concatenate(batches)
    st = FeatureStats()
    for i, b in enumerate(batches):
        st.update(torch.from_numpy(b) if i % 2 else b)
    assert st.n == len(full)
    np.testing.assert_allclose(st.mean(), full.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(st.cov(), np.cov(full, rowvar=False), rtol=1e-9, atol=1e-12)

    # save / load round trip, then keep accumulating
    path = tmp_path / "real_stats.npz"
    st.save(path)
    st2 = FeatureStats.load(path)
    np.testing.assert_allclose(st2.cov(), np.cov(full, rowvar=False), rtol=1e-9, atol=1e-12)
    extra = rng.normal(size=(30, 6))
    st2.update(extra)
    both = np.concatenate([full, extra])
    np.testing.assert_allclose(st2.mean(), both.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(st2.cov(), np.cov(both, rowvar=False), rtol=1e-9, atol=1e-12)
    with np.load(path) as f:  # pytorch-fid key names
        np.testing.assert_allclose(f["mu"], full.mean(axis=0), rtol=1e-12)


def test_feature_stats_loads_pytorch_fid_npz(tmp_path):
    mu, sigma = np.arange(3.0), np.diag([1.0, 2.0, 3.0])
    np.savez(tmp_path / "fid_stats.npz", mu=mu, sigma=sigma)
    st = FeatureStats.load(tmp_path / "fid_stats.npz")
    np.testing.assert_array_equal(st.mean(), mu)
    np.testing.assert_array_equal(st.cov(), sigma)
    with pytest.raises(ValueError, match="cannot be updated"):
        st.update(np.zeros((2, 3)))
    with pytest.raises(FileNotFoundError):
        FeatureStats.load(tmp_path / "missing.npz")


# ------------------------------------------------------------------------------------------------ IS


@pytest.mark.parametrize("n_classes", [1, 7, 10])
def test_is_of_evenly_spread_one_hot_is_n(n_classes):
    splits = 10
    probs = np.eye(n_classes)[np.arange(n_classes * splits * 3) % n_classes]
    mean, std = inception_score(probs, splits=splits)
    assert mean == pytest.approx(n_classes, rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_is_of_identical_predictions_is_one():
    row = np.array([0.1, 0.2, 0.3, 0.4, 0.0])
    mean, std = inception_score(np.tile(row, (40, 1)), splits=4)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_is_hand_computed_case():
    # split 1: p = [1,0], [.5,.5]; p(y) = [.75,.25]
    #   KL1 = log(4/3); KL2 = .5 log(2/3) + .5 log 2 = .5 log(4/3); IS = exp(.75 log(4/3)) = (4/3)^.75
    # split 2: p = [1,0], [0,1]; IS = exp(log 2) = 2
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    s1, s2 = (4 / 3) ** 0.75, 2.0
    mean, std = inception_score(probs, splits=2)
    assert mean == pytest.approx((s1 + s2) / 2, rel=1e-12)
    assert std == pytest.approx(abs(s2 - s1) / 2, rel=1e-12)  # population std (ddof 0)
    assert inception_score(probs[:2], splits=1)[0] == pytest.approx(s1, rel=1e-12)
    acc = InceptionScoreAccumulator(splits=2)
    acc.update(probs[:1]).update(probs[1:3]).update_logits(torch.tensor([[-1e4, 0.0]]))
    assert acc.compute()[0] == pytest.approx((s1 + s2) / 2, rel=1e-9)


def test_is_uneven_splits_use_every_sample():
    # N=5, splits=2: parts [0:2] and [2:5] (k*N//splits); part 1 = two different one-hots -> 2,
    # part 2 = three identical rows -> 1
    probs = np.array([[1, 0], [0, 1], [0.3, 0.7], [0.3, 0.7], [0.3, 0.7]], dtype=float)
    assert inception_score(probs, splits=2)[0] == pytest.approx(1.5, rel=1e-12)


def test_is_rejects_logits():
    with pytest.raises(ValueError, match="softmax"):
        inception_score(np.array([[2.0, -1.0], [0.5, 3.0]]), splits=1)


# -------------------------------------------------------------------------------------- R-precision


def _slow_cos(a, b) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / max(na * nb, 1e-8)


def test_r_precision_random_codes_near_chance():
    g = torch.Generator().manual_seed(0)
    img, sent = torch.randn(3000, 32, generator=g), torch.randn(3000, 32, generator=g)
    dm = r_precision_dmgan(img, sent, seed=1)
    assert dm["protocol"] == "dmgan" and dm["n"] == 3000 and dm["folds"] == 10
    assert 0.003 < dm["mean"] < 0.025
    b = r_precision_batch(img, sent)
    assert b["protocol"] == "cpgan-batch" and b["n"] == 3000 and b["batches"] == 30
    assert 0.003 < b["mean"] < 0.025


def test_r_precision_oracle_is_perfect():
    g = torch.Generator().manual_seed(1)
    codes = torch.randn(1000, 16, generator=g)
    dm = r_precision_dmgan(codes, codes.clone(), class_ids=torch.arange(1000) % 50, seed=3)
    assert dm["mean"] == 1.0 and dm["std"] == 0.0
    b = r_precision_batch(codes, codes.clone())
    assert b["mean"] == 1.0 and b["std"] == 0.0


def test_sample_negatives_excludes_own_class_and_is_uniform():
    pool_cls = torch.tensor([0, 1, 1, 2, 0, 3, 2, 2, 1, 3])
    cls = torch.tensor([1, 2, 0])
    k = 20_000
    neg = sample_negatives(cls, pool_cls, n_negatives=k, generator=torch.Generator().manual_seed(0))
    assert neg.shape == (3, k)
    for i in range(3):
        eligible = [j for j in range(10) if pool_cls[j] != cls[i]]
        counts = np.bincount(neg[i].numpy(), minlength=10)
        assert all(counts[j] == 0 for j in range(10) if j not in eligible)
        expected = k / len(eligible)
        sd = math.sqrt(k * (1 / len(eligible)) * (1 - 1 / len(eligible)))
        assert all(abs(counts[j] - expected) < 5 * sd for j in eligible)
    # deterministic for a seed
    again = sample_negatives(cls, pool_cls, n_negatives=k, generator=torch.Generator().manual_seed(0))
    assert torch.equal(neg, again)
    with pytest.raises(ValueError, match="no caption of another class"):
        sample_negatives(torch.tensor([0]), torch.tensor([0, 0]), 5)


def test_r_precision_dmgan_matches_slow_loop():
    g = torch.Generator().manual_seed(5)
    n, d = 40, 4
    sent = torch.randn(n, d, generator=g)
    img = sent + 0.9 * torch.randn(n, d, generator=g)  # noisy: an intermediate hit rate
    cls = torch.arange(n) % 7
    k = 9
    seed = 11
    neg = sample_negatives(cls, cls, k, generator=torch.Generator().manual_seed(seed))
    hits_ref = []
    for i in range(n):
        assert all(int(cls[j]) != int(cls[i]) for j in neg[i])
        true = _slow_cos(img[i].tolist(), sent[i].tolist())
        best_neg = max(_slow_cos(img[i].tolist(), sent[j].tolist()) for j in neg[i].tolist())
        hits_ref.append(true > best_neg)
    assert 0 < sum(hits_ref) < n
    hits = retrieval_hits(img, sent, sent, neg)
    assert hits.tolist() == hits_ref
    res = r_precision_dmgan(img, sent, class_ids=cls, n_negatives=k, folds=1, seed=seed)
    assert res["mean"] == pytest.approx(sum(hits_ref) / n, abs=1e-12)
    # with an explicit caption pool and precomputed negatives
    pool = torch.randn(15, d, generator=g)
    pool_cls = torch.arange(15) % 5
    neg2 = torch.randint(0, 15, (n, k), generator=g)
    ref2 = [
        _slow_cos(img[i].tolist(), sent[i].tolist())
        > max(_slow_cos(img[i].tolist(), pool[j].tolist()) for j in neg2[i].tolist())
        for i in range(n)
    ]
    res2 = r_precision_dmgan(
        img, sent, class_ids=cls, pool_sentence_codes=pool, pool_class_ids=pool_cls, n_negatives=k, folds=1, negatives=neg2
    )
    assert res2["mean"] == pytest.approx(sum(ref2) / n, abs=1e-12)
    with pytest.raises(ValueError, match="pool_class_ids"):
        r_precision_dmgan(img, sent, class_ids=cls, pool_sentence_codes=pool)


def test_r_precision_ties_count_as_misses():
    sent = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # caption 2 duplicates caption 0
    img = torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, -0.1]])
    neg = torch.tensor([[2], [0], [1]])
    assert retrieval_hits(img, sent, sent, neg).tolist() == [False, True, True]
    # in-batch: images 0 and 2 tie between captions 0 and 2 -> both misses; image 1 hits
    res = r_precision_batch(img, sent, batch=3)
    assert res["mean"] == pytest.approx(1 / 3)


def test_fold_mean_std_hand_case():
    hits = [1, 1, 0, 0, 0, 1, 0, 0, 0, 0]
    mean, std = fold_mean_std(hits, folds=2)  # folds in order: 0.4 and 0.2
    assert mean == pytest.approx(0.3) and std == pytest.approx(0.1)
    mean, _ = fold_mean_std(hits, folds=5, generator=torch.Generator().manual_seed(0))
    assert mean == pytest.approx(0.3)  # equal folds: mean of fold means = overall rate


def test_r_precision_batch_matches_slow_loop_and_drops_partial_batch():
    g = torch.Generator().manual_seed(7)
    n, d, batch = 250, 6, 100
    sent = torch.randn(n, d, generator=g)
    img = sent + 1.2 * torch.randn(n, d, generator=g)

    def slow(img_rows, sent_rows):
        rates = []
        for b in range(len(img_rows) // batch):  # the partial last batch is dropped
            hits = 0
            for i in range(batch):
                q = img_rows[b * batch + i]
                scores = [_slow_cos(q, sent_rows[b * batch + j]) for j in range(batch)]
                hits += all(scores[i] > s for j, s in enumerate(scores) if j != i)
            rates.append(hits / batch)
        return float(np.mean(rates)), float(np.std(rates)), rates

    m_ref, s_ref, rates = slow(img.tolist(), sent.tolist())
    assert len(rates) == 2 and 0 < m_ref < 1
    res = r_precision_batch(img, sent, batch=batch)
    assert res["n"] == 200 and res["batches"] == 2 and res["batch"] == 100
    assert res["mean"] == pytest.approx(m_ref, abs=1e-12)
    assert res["std"] == pytest.approx(s_ref, abs=1e-12)
    # seeded shuffle before batching
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    m_ref2, _, _ = slow(img[perm].tolist(), sent[perm].tolist())
    assert r_precision_batch(img, sent, batch=batch, seed=3)["mean"] == pytest.approx(m_ref2, abs=1e-12)
    with pytest.raises(ValueError, match="full batch"):
        r_precision_batch(img[:50], sent[:50])


# ----------------------------------------------------------------------------------------------- SOA


def test_soa_hand_computed():
    named = [
        [("red", "circle"), {"colour": "red", "shape": "circle", "size": "small"}, ("blue", "square")],
        [("red", "circle"), ("green", "star")],
        [(None, "circle"), ("blue", None)],
        [],
        [("red", "circle")],
    ]
    detected = [
        [("red", "circle"), ("blue", "square"), ("green", "star")],
        [("red", "circle"), ("green", "square")],
        [("red", "circle")],
        [("red", "circle")],
        [],
    ]
    named_bg = ["grass", "sky", None, "grass", None]
    detected_bg = ["grass", "sand", "grey", "grass", "sky"]
    r = soa_scores(named, detected, named_bg, detected_bg)
    # all named found: img1 yes, img2 no (green star), img3 no (blue), img5 no; img4 names nothing
    assert r["soa_i"] == pytest.approx(1 / 4)
    assert r["n_images"] == 4 and r["n_skipped"] == 1
    # partial credit: 1, 1/2, 1/2, 0
    assert r["object_partial"] == pytest.approx(2 / 4)
    # colours: {red,blue}->1, {red,green}->1, {blue}->0, {red}->0
    assert r["colour_acc"] == pytest.approx(2 / 4) and r["colour_partial"] == pytest.approx(2 / 4)
    # shapes: {circle,square}->1, {circle,star}->0 (1/2), {circle}->1, {circle}->0
    assert r["shape_acc"] == pytest.approx(2 / 4) and r["shape_partial"] == pytest.approx(2.5 / 4)
    # classes: red circle 2/3, blue square 1/1, green star 0/1
    assert r["per_class"] == pytest.approx({"blue square": 1.0, "green star": 0.0, "red circle": 2 / 3})
    assert r["soa_c"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert r["soa_i_weighted"] == pytest.approx(3 / 5)
    assert r["n_classes"] == 3
    # background: img1 1, img2 0, img4 1
    assert r["background_acc"] == pytest.approx(2 / 3) and r["n_background"] == 3


def test_soa_accumulator_empty_and_errors():
    acc = SOAAccumulator()
    r = acc.compute()
    assert r["soa_i"] is None and r["soa_c"] is None and r["background_acc"] is None
    with pytest.raises(ValueError, match="detections"):
        acc.update([("red", "circle")], [("red", None)])
    with pytest.raises(ValueError, match="pair"):
        acc.update(["red"], [])
    with pytest.raises(ValueError, match="images"):
        soa_scores([[]], [[], []])
