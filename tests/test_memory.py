"""Memory construction, eq. (7): streaming top-K vs an independent brute force."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from cpgan.models.memory import MemoryBuilder, attention_records

torch.set_num_threads(1)


def make_records(seed: int, n: int, num_words: int, used_words: list[int], num_images: int, feat_dim: int):
    """Random records with many ties: weights from a 4-value set, few regions, repeated (word, image)."""
    g = torch.Generator().manual_seed(seed)
    words = torch.tensor(used_words)[torch.randint(len(used_words), (n,), generator=g)]
    images = torch.randint(num_images, (n,), generator=g)
    weights = torch.tensor([0.25, 0.5, 0.75, 1.0])[torch.randint(4, (n,), generator=g)]
    regions = torch.randint(3, (n,), generator=g)
    feats = torch.randn(n, feat_dim, generator=g)
    return words, images, weights, feats, regions


def brute_force(words, images, weights, feats, regions, num_words: int, k: int, feat_dim: int):
    """Eq. (7) written out record by record with Python sorting (float64)."""
    recs = {}
    for s in range(words.numel()):
        recs.setdefault(int(words[s]), []).append(
            (float(weights[s]), int(images[s]), int(regions[s]), s)
        )
    bank = torch.zeros(num_words, feat_dim, dtype=torch.float64)
    seen = torch.zeros(num_words, dtype=torch.bool)
    kept_images = {}
    for r, lst in recs.items():
        best = {}
        for w, img, reg, s in lst:
            key = (-w, reg, s)  # max weight, then smaller region, then earlier record
            if img not in best or key < best[img][0]:
                best[img] = (key, s)
        ranked = sorted(best.items(), key=lambda kv: (kv[1][0][0], kv[0]))[:k]  # weight desc, image asc
        num = torch.zeros(feat_dim, dtype=torch.float64)
        den = 0.0
        for img, (key, s) in ranked:
            num += -key[0] * feats[s].double()
            den += -key[0]
        bank[r] = num / den
        seen[r] = True
        kept_images[r] = [img for img, _ in ranked]
    return bank, seen, kept_images


def feed(builder: MemoryBuilder, recs, chunk: int, start: int = 0, stop: int | None = None):
    words, images, weights, feats, regions = recs
    stop = words.numel() if stop is None else stop
    for lo in range(start, stop, chunk):
        hi = min(stop, lo + chunk)
        builder.update(words[lo:hi], images[lo:hi], weights[lo:hi], feats[lo:hi], regions[lo:hi])


V, K, F = 11, 4, 8
USED = [0, 2, 3, 5, 6, 9]  # words 1, 4, 7, 8, 10 never occur


@pytest.fixture(scope="module")
def case():
    recs = make_records(0, 700, V, USED, num_images=25, feat_dim=F)
    return recs, brute_force(*recs, num_words=V, k=K, feat_dim=F)


def test_streaming_equals_brute_force(case):
    recs, (ref_bank, ref_seen, ref_images) = case
    b = MemoryBuilder(V, K, F)
    feed(b, recs, chunk=64)
    out = b.finalize()
    assert torch.equal(out.seen, ref_seen)
    assert torch.allclose(out.bank.double(), ref_bank, atol=1e-5)
    for r in range(V):
        if r in ref_images:
            assert out.image_ids[r, : out.num_images[r]].tolist() == ref_images[r]
            assert int(out.num_images[r]) == min(K, len(set(recs[1][recs[0] == r].tolist())))
        else:
            assert not out.seen[r] and int(out.num_images[r]) == 0
            assert torch.count_nonzero(out.bank[r]) == 0
    assert torch.equal(out.occurrences, torch.bincount(recs[0], minlength=V))
    assert b.records_consumed == 700


def test_ties_are_deterministic_and_favour_smaller_image_and_earlier_record():
    # word 0: four images with equal weight 0.5 -> K=2 keeps the two smallest image ids.
    # word 1: one image, two occurrences, equal weight and region -> the earlier record's feature.
    b = MemoryBuilder(3, 2, 2)
    words = torch.tensor([0, 0, 0, 0, 1, 1])
    images = torch.tensor([7, 3, 9, 5, 4, 4])
    w = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.3, 0.3])
    feats = torch.tensor([[1.0, 0], [2, 0], [3, 0], [4, 0], [10, 1], [20, 2]])
    regions = torch.tensor([0, 0, 0, 0, 1, 1])
    for i in range(6):  # one record per chunk
        b.update(words[i : i + 1], images[i : i + 1], w[i : i + 1], feats[i : i + 1], regions[i : i + 1])
    out = b.finalize()
    assert out.image_ids[0].tolist() == [3, 5]
    assert torch.allclose(out.bank[0], torch.tensor([3.0, 0.0]))  # mean of features 2 and 4
    assert torch.allclose(out.bank[1], torch.tensor([10.0, 1.0]))
    assert out.seen.tolist() == [True, True, False]


def test_max_over_occurrences_in_one_image():
    b = MemoryBuilder(1, 1, 1)
    # image 2 occurs twice (0.2 then 0.9); image 1 once at 0.5 -> image 2 wins with its 0.9 feature
    b.update(torch.tensor([0, 0]), torch.tensor([2, 1]), torch.tensor([0.2, 0.5]), torch.tensor([[1.0], [2.0]]))
    b.update(torch.tensor([0]), torch.tensor([2]), torch.tensor([0.9]), torch.tensor([[7.0]]))
    out = b.finalize()
    assert out.image_ids[0].tolist() == [2]
    assert float(out.bank[0, 0]) == 7.0


@pytest.mark.parametrize("chunk", [1, 5, 37, 700])
def test_chunk_size_independence(case, chunk):
    recs, _ = case
    ref = MemoryBuilder(V, K, F)
    feed(ref, recs, chunk=100)
    ref_out = ref.finalize()
    b = MemoryBuilder(V, K, F)
    feed(b, recs, chunk=chunk)
    out = b.finalize()
    assert torch.equal(out.image_ids, ref_out.image_ids)
    assert torch.equal(out.weights, ref_out.weights)
    assert torch.allclose(out.bank, ref_out.bank, atol=1e-6)


def test_resume_from_state_dict_equals_single_pass(case):
    recs, (ref_bank, _, _) = case
    first = MemoryBuilder(V, K, F)
    feed(first, recs, chunk=50, stop=350)
    blob = st_save(first.state_dict())  # the checkpoint round-trips through safetensors
    second = MemoryBuilder(V, K, F)
    second.load_state_dict(st_load(blob))
    assert second.records_consumed == 350
    feed(second, recs, chunk=50, start=350)
    single = MemoryBuilder(V, K, F)
    feed(single, recs, chunk=50)
    a, b = second.finalize(), single.finalize()
    assert torch.equal(a.image_ids, b.image_ids)
    assert torch.allclose(a.bank, b.bank, atol=1e-6)
    assert torch.allclose(a.bank.double(), ref_bank, atol=1e-5)
    with pytest.raises(ValueError, match="checkpoint"):
        MemoryBuilder(V, K + 1, F).load_state_dict(first.state_dict())


def test_pointer_mode_and_fp16_pool_match():
    g = torch.Generator().manual_seed(3)
    table = torch.randn(30, 3, F, generator=g)  # region store: (image, region) -> feature
    words, images, weights, _, regions = make_records(1, 400, V, USED, num_images=30, feat_dim=F)
    feats = table[images, regions]
    full = MemoryBuilder(V, K, F)
    full.update(words, images, weights, feats, regions)
    ptr = MemoryBuilder(V, K, F, store_features=False)
    for lo in range(0, 400, 33):
        ptr.update(words[lo : lo + 33], images[lo : lo + 33], weights[lo : lo + 33], None, regions[lo : lo + 33])
    half = MemoryBuilder(V, K, F, feature_dtype=torch.float16)
    half.update(words, images, weights, feats, regions)
    ref = brute_force(words, images, weights, feats, regions, V, K, F)[0]
    calls = []

    def lookup(img, reg):
        calls.append(img.numel())
        return table[img, reg]

    assert torch.allclose(ptr.finalize(lookup).bank.double(), ref, atol=1e-5)
    assert sum(calls) <= V * K
    assert torch.allclose(full.finalize().bank.double(), ref, atol=1e-5)
    assert torch.allclose(half.finalize().bank.double(), ref, atol=5e-3)
    # the documented bound: V*K*36 bytes of tables (+ V*8 counts), plus V*K*F*bytes for the pool
    assert ptr.state_bytes() == V * K * 36 + V * 8
    assert full.state_bytes() == ptr.state_bytes() + V * K * F * 4
    assert half.state_bytes() == ptr.state_bytes() + V * K * F * 2
    with pytest.raises(ValueError, match="feature_lookup"):
        ptr.finalize()


def test_bad_records_are_rejected():
    b = MemoryBuilder(4, 2, 3)
    f = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="word ids"):
        b.update(torch.tensor([4]), torch.tensor([0]), torch.tensor([0.5]), f)
    with pytest.raises(ValueError, match="finite"):
        b.update(torch.tensor([1]), torch.tensor([0]), torch.tensor([float("nan")]), f)
    with pytest.raises(ValueError, match="features"):
        b.update(torch.tensor([1]), torch.tensor([0]), torch.tensor([0.5]), torch.zeros(1, 2))


def test_attention_records_flattening():
    captions = torch.tensor([[5, 6, 7], [8, 9, 0]])
    lengths = torch.tensor([3, 2])
    q = torch.tensor([[0, 2, 1], [1, 1, -1]])
    a = torch.tensor([[0.9, 0.8, 0.7], [0.6, 0.5, 0.0]])
    feats = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    w, img, wt, ft, reg = attention_records(captions, lengths, torch.tensor([10, 11]), q, a, feats, ignore_ids=(6,))
    assert w.tolist() == [5, 7, 8, 9]
    assert img.tolist() == [10, 10, 11, 11]
    assert torch.allclose(wt, torch.tensor([0.9, 0.7, 0.6, 0.5]))
    assert reg.tolist() == [0, 1, 1, 1]
    assert torch.equal(ft, torch.stack([feats[0, 0], feats[0, 1], feats[1, 1], feats[1, 1]]))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_million_records_bounded_memory():
    """1,000,000 records of 1024-d features (4 GB if held) in 50 chunks; RSS stays near the bound."""
    v, k, f, n, chunk = 400, 6, 1024, 1_000_000, 20_000
    num_images = 50_000
    table = torch.randn(4096, f, generator=torch.Generator().manual_seed(0))  # region store stand-in
    check_words = (0, 1, 2)
    kept = {r: [] for r in check_words}
    builder = MemoryBuilder(v, k, f)
    bound = builder.state_bytes() + 3 * chunk * f * 4 + 96 * 2**20

    peak = [0]
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    base = _rss_bytes()
    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    t0 = time.time()
    try:
        for c in range(n // chunk):
            g = torch.Generator().manual_seed(1000 + c)
            words = torch.randint(v, (chunk,), generator=g)
            images = torch.randint(num_images, (chunk,), generator=g)
            weights = torch.rand(chunk, generator=g)
            regions = torch.randint(36, (chunk,), generator=g)
            feats = table[(images * 36 + regions) % table.shape[0]]
            builder.update(words, images, weights, feats, regions)
            for r in check_words:
                sel = words == r
                kept[r].append((weights[sel], images[sel], regions[sel]))
            del feats
            peak[0] = max(peak[0], _rss_bytes())
    finally:
        stop.set()
        th.join()
    elapsed = time.time() - t0
    out = builder.finalize()
    assert builder.records_consumed == n
    assert peak[0] - base < bound, f"RSS grew by {(peak[0] - base) / 2**20:.0f} MiB > bound {bound / 2**20:.0f} MiB"
    assert elapsed < 60
    # brute-force check of a few words over the whole stream (all their records kept in RAM)
    for r in check_words:
        w = torch.cat([x[0] for x in kept[r]])
        img = torch.cat([x[1] for x in kept[r]])
        reg = torch.cat([x[2] for x in kept[r]])
        best = {}
        for wi, ii, ri in zip(w.tolist(), img.tolist(), reg.tolist()):
            if ii not in best or (-wi, ri) < (-best[ii][0], best[ii][1]):
                best[ii] = (wi, ri)
        top = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))[:k]
        ws = torch.tensor([t[1][0] for t in top], dtype=torch.float64)
        fs = torch.stack([table[(t[0] * 36 + t[1][1]) % table.shape[0]] for t in top]).double()
        assert out.image_ids[r].tolist() == [t[0] for t in top]
        assert torch.allclose(out.bank[r].double(), (ws[:, None] * fs).sum(0) / ws.sum(), atol=1e-5)
