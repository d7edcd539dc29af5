"""The ``captioner`` and ``memory`` stages end to end on a tiny shapes world (DESIGN §2, §3.1; eq. (7)).

The real ``data`` and ``vocab`` stages build the run directory; the detector's region stores are written here
with :class:`RegionStoreWriter`: the ground-truth boxes of each image come first, with features that encode the
object's colour, shape and size (one-hot, plus noise), then a few background boxes, the rest invalid.  The
images whose captions hold the rarest train word get no valid region at all, so that word (and any word only
they use) must come out unseen.
"""
from __future__ import annotations

import copy
import json
import shutil
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from cpgan.config import load_config
from cpgan.data import shapes
from cpgan.data.dataset import load_split, load_vocab
from cpgan.data.regions import RegionStore, RegionStoreWriter
from cpgan.models.captioner import UpDownCaptioner
from cpgan.stages.base import StageError, run_stages
from cpgan.utils.checkpoint import load_weights, save_weights
from cpgan.utils.logging import read_jsonl

R, D, K = 36, 1024, 3
OVERRIDES = [
    "data.n_train=60", "data.n_test=20", "data.n_test_novel=10", "device=cpu",
    "captioner.embed_dim=32", "captioner.hidden_dim=64", "captioner.att_dim=32", "captioner.steps=30",
    "captioner.batch_size=16", "captioner.lr=2e-3", "captioner.val_every=15", "captioner.val_images=10",
    "captioner.num_samples=3",
    "captioner.checkpoint_every=10", "captioner.log_every=10",
    f"memory.top_k={K}", "memory.chunk_size=32", "memory.checkpoint_every=2",
]


def _cfg(*extra):
    return load_config("shapes-quick", [*OVERRIDES, *extra])


def write_region_stores(run_dir: Path, empty: set[str], seed: int = 0) -> None:
    """Synthetic detector output for every split (see the module docstring)."""
    for split in ("train", "test", "test_novel"):
        data = load_split(run_dir, split)
        rng = np.random.default_rng([seed, len(split)])
        n = len(data)
        boxes = np.zeros((n, R, 4), np.float32)
        feats = np.zeros((n, R, D), np.float32)
        scores = np.zeros((n, R), np.float32)
        valid = np.zeros((n, R), bool)
        for i, rec in enumerate(data.records):
            if rec["key"] in empty:
                continue
            objs = rec["objects"]
            for j, o in enumerate(objs):
                boxes[i, j] = o["box"]
                feats[i, j] = rng.normal(0.0, 0.3, D)
                feats[i, j, shapes.COLOURS.index(o["colour"])] += 3.0
                feats[i, j, 8 + shapes.SHAPES.index(o["shape"])] += 3.0
                feats[i, j, 16 + shapes.SIZES.index(o["size"])] += 3.0
                scores[i, j], valid[i, j] = 0.9, True
            for j in range(len(objs), len(objs) + 3):  # background boxes
                c, h = rng.uniform(0.1, 0.9, 2), rng.uniform(0.04, 0.1, 2)
                boxes[i, j] = [c[0] - h[0], c[1] - h[1], c[0] + h[0], c[1] + h[1]]
                feats[i, j] = rng.normal(0.0, 0.3, D)
                feats[i, j, 19] += 3.0
                scores[i, j], valid[i, j] = 0.3, True
        with RegionStoreWriter(run_dir / "detector" / f"regions_{split}", R, D, shard_size=32) as w:
            w.add(data.keys, boxes, feats.astype(np.float16), scores, valid)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("memstage") / "run"
    cfg = _cfg()
    run_stages(cfg, run_dir, only=["data", "vocab"])
    train = load_split(run_dir, "train")
    # the rarest train word (by images): all images using it get no valid region
    per_word = Counter(w for caps in train.captions for w in {w for c in caps for w in c})
    rare = min(sorted(per_word), key=lambda w: per_word[w])
    empty = {k for k, caps in zip(train.keys, train.captions) if any(rare in c for c in caps)}
    write_region_stores(run_dir, empty)
    res = run_stages(cfg, run_dir, only=["captioner", "memory"], check_upstream=False)
    return {"run_dir": run_dir, "cfg": cfg, "res": res, "empty": empty, "rare": rare}


def _memory(run_dir: Path) -> tuple[dict, dict]:
    return load_weights(run_dir / "memory" / "memory.safetensors")


def test_captioner_outputs(base):
    run_dir, res = base["run_dir"], base["res"]
    assert res["captioner"]["status"] == "done" and res["captioner"]["steps"] == 30
    from cpgan.stages.captioner import load_captioner

    vocab = load_vocab(run_dir)
    model, meta = load_captioner(run_dir, vocab=vocab)
    assert model.vocab_size == len(vocab) + 1 and model.bos_id == len(vocab) and model.eos_id == 0
    assert meta["step"] == 30 and meta["vocab_sha256"] == vocab.sha256()
    logs = read_jsonl(run_dir / "captioner" / "metrics.jsonl")
    vals = [r for r in logs if "val_loss" in r]
    assert [r["step"] for r in vals] == [15, 30]
    assert all(np.isfinite(r["val_loss"]) and len(r["samples"]) == 3 for r in vals)
    # the loss starts at ln(V + 1) (uniform init) and must have gone down
    assert vals[-1]["val_loss"] < np.log(len(vocab) + 1) - 0.3
    assert any("loss" in r and "val_loss" not in r for r in logs)
    # a captioner trained on another vocabulary is refused
    bad = copy.copy(vocab)
    bad.sha256 = lambda: "0" * 64  # type: ignore[method-assign]
    with pytest.raises(StageError, match="another vocabulary"):
        load_captioner(run_dir, vocab=bad)


def test_captioner_resume_after_sigterm_is_identical(base, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(base["run_dir"], run_dir)
    import cpgan.stages.captioner as cap_stage

    original = cap_stage.caption_loss
    calls = [0]

    def loss_then_kill(*a, **kw):
        calls[0] += 1
        if calls[0] == 12:  # SIGTERM during training step 12 (of 30; after the checkpoint of step 10)
            signal.raise_signal(signal.SIGTERM)
        return original(*a, **kw)

    monkeypatch.setattr(cap_stage, "caption_loss", loss_then_kill)
    res = run_stages(base["cfg"], run_dir, only=["captioner"], force=True, check_upstream=False)
    assert res["captioner"]["status"] == "interrupted" and res["captioner"]["steps"] == 12
    assert not (run_dir / "captioner" / "captioner.safetensors").exists()
    monkeypatch.setattr(cap_stage, "caption_loss", original)
    res = run_stages(base["cfg"], run_dir, only=["captioner"], check_upstream=False)
    assert res["captioner"]["status"] == "done" and res["captioner"]["steps"] == 30
    got, _ = load_weights(run_dir / "captioner" / "captioner.safetensors")
    ref, _ = load_weights(base["run_dir"] / "captioner" / "captioner.safetensors")
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert res["captioner"]["val_loss"] == base["res"]["captioner"]["val_loss"]
    # a larger step budget continues from the finished run's checkpoint instead of starting over
    res = run_stages(_cfg("captioner.steps=34"), run_dir, only=["captioner"], check_upstream=False)
    assert res["captioner"]["status"] == "done"
    assert res["captioner"]["resumed_from_step"] == 30 and res["captioner"]["steps"] == 34


def test_bank_shape_and_seen_flags(base):
    run_dir = base["run_dir"]
    assert base["res"]["memory"]["status"] == "done"
    sd, meta = _memory(run_dir)
    vocab = load_vocab(run_dir)
    v = len(vocab)
    bank, seen, occ = sd["bank"], sd["seen"], sd["occurrences"]
    assert bank.shape == (v, D) and bank.dtype == torch.float32
    assert seen.shape == (v,) and seen.dtype == torch.bool and occ.shape == (v,)
    # independent count over the train captions of the images that have at least one valid region
    train = load_split(run_dir, "train")
    counts = np.zeros(v, np.int64)
    images_of = [set() for _ in range(v)]
    for i, (key, caps) in enumerate(zip(train.keys, train.captions)):
        if key in base["empty"]:
            continue
        for c in caps:
            for w in c:
                counts[w] += 1
                images_of[w].add(i)
    expected_seen = torch.from_numpy(counts > 0)
    assert not bool(expected_seen[0]) and not bool(expected_seen[base["rare"]])
    assert torch.equal(seen, expected_seen)
    assert torch.equal(occ, torch.from_numpy(counts))
    assert torch.equal(sd["num_images"], torch.tensor([min(K, len(s)) for s in images_of]))
    assert bool((bank[~seen] == 0).all()) and bool((bank[seen].norm(dim=1) > 0).all())
    assert int((~seen).sum()) >= 2  # <end> and the rare word
    # kept images come from the word's own images and never from the region-less ones
    for w in range(v):
        kept = [int(i) for i in sd["image_ids"][w] if i >= 0]
        assert set(kept) <= images_of[w]
    assert meta["top_k"] == K and meta["vocab_sha256"] == vocab.sha256()
    assert meta["counts"]["seen_words"] == int(expected_seen.sum()) and meta["counts"]["records"] == counts.sum()
    # shapes-world report
    summ = base["res"]["memory"]
    for c in ("colour", "shape", "all"):
        assert 0.0 <= summ["salient_on_object_rate"][c] <= 1.0
        assert 0.0 < summ["salient_on_object_chance"][c] < 1.0
    sim = json.loads((run_dir / "memory" / "similarity.json").read_text())
    assert sim["pairs_synonyms"] > 0 and sim["pairs_unrelated"] > 0
    assert "circle/star" in sim["unrelated"] and "red/blue" in sim["unrelated"]
    for kind in ("synonyms", "unrelated"):
        for pair, row in sim[kind].items():
            a, b = pair.split("/")
            x, y = bank[vocab.word2id[a]].double(), bank[vocab.word2id[b]].double()
            assert row["cosine"] == pytest.approx(float(x @ y / (x.norm() * y.norm())), abs=1e-9)


def test_resume_after_sigterm_is_identical(base, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(base["run_dir"], run_dir)
    import cpgan.stages.memory as mem_stage

    original = mem_stage.MemoryBuilder

    class Killed(original):
        calls = 0

        def update(self, *a, **kw):
            super().update(*a, **kw)
            Killed.calls += 1
            if Killed.calls == 3:  # SIGTERM in the middle of the pass (after batch 3 of 10)
                signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(mem_stage, "MemoryBuilder", Killed)
    res = run_stages(base["cfg"], run_dir, only=["memory"], force=True, check_upstream=False)
    assert res["memory"]["status"] == "interrupted"
    assert (run_dir / "memory" / "state.safetensors").exists()
    assert not (run_dir / "memory" / "memory.safetensors").exists()
    monkeypatch.setattr(mem_stage, "MemoryBuilder", original)
    res = run_stages(base["cfg"], run_dir, only=["memory"], check_upstream=False)
    assert res["memory"]["status"] == "done" and res["memory"]["resumed_at_batch"] == 3
    got, _ = _memory(run_dir)
    ref, _ = _memory(base["run_dir"])
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    for k in ("salient_on_object_rate", "salient_on_object_chance", "records"):
        assert res["memory"][k] == base["res"]["memory"][k]


def test_pointer_mode_gives_the_same_bank(base, tmp_path):
    """memory.store_features=false keeps only (image, region) pointers and reads the features back at the end."""
    run_dir = tmp_path / "run"
    shutil.copytree(base["run_dir"], run_dir)
    res = run_stages(_cfg("memory.store_features=false"), run_dir, only=["memory"], check_upstream=False)
    assert res["memory"]["status"] == "done"
    got, _ = _memory(run_dir)
    ref, _ = _memory(base["run_dir"])
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_bank_matches_slow_reference(base, tmp_path):
    """Eq. (7) and the salience report against a loop over every caption of every image (float64)."""
    run_dir = tmp_path / "run"
    shutil.copytree(base["run_dir"], run_dir)
    # a captioner with large random weights: decisive attention, so argmaxes have clear margins
    _, meta = load_weights(run_dir / "captioner" / "captioner.safetensors")
    torch.manual_seed(3)
    model = UpDownCaptioner(**{**meta["model"], "init_std": 0.3})
    save_weights(run_dir / "captioner" / "captioner.safetensors", model.state_dict(), meta)
    res = run_stages(base["cfg"], run_dir, only=["memory"], force=True, check_upstream=False)["memory"]
    sd, _ = _memory(run_dir)

    m64 = model.double().eval()
    train = load_split(run_dir, "train")
    store = RegionStore(run_dir / "detector" / "regions_train")
    vocab = load_vocab(run_dir)
    colour = {w: c for c, ws in shapes.COLOUR_WORDS.items() for w in ws}
    shape = {w: s for s, ws in shapes.SHAPE_WORDS.items() for w in ws}
    best: dict[int, dict[int, tuple[float, torch.Tensor]]] = {}
    hits = {"colour": 0, "shape": 0}
    chance = {"colour": 0.0, "shape": 0.0}
    n_rec = {"colour": 0, "shape": 0}
    any_hits = {"colour": 0, "shape": 0}
    obj_chance = {"colour": 0.0, "shape": 0.0}
    obj_rec = {"colour": 0, "shape": 0}
    min_margin = 1.0
    for i, (key, caps) in enumerate(zip(train.keys, train.captions)):
        item = store.get(key)
        valid = torch.from_numpy(item["valid"])
        if not bool(valid.any()):
            continue
        feats = torch.from_numpy(item["feats"].astype(np.float64))
        for cap in caps:
            inputs = torch.tensor([[m64.bos_id] + cap[:-1]])
            with torch.no_grad():
                _, attn = m64(feats[None], valid[None], inputs)
            for t, w in enumerate(cap):  # attention of the step that emits word t
                al = attn[0, t]
                top2 = al.topk(2).values
                min_margin = min(min_margin, float(top2[0] - top2[1]))
                q = int(al.argmax())
                a = float(al[q])
                if i not in best.setdefault(w, {}) or a > best[w][i][0]:
                    best[w][i] = (a, feats[q])
                word = vocab.id2word[w]
                for cat, table, attr in (("colour", colour, "colour"), ("shape", shape, "shape")):
                    if word not in table:
                        continue
                    objs = train.records[i]["objects"]
                    named = [o["box"] for o in objs if o[attr] == table[word]]
                    every = [o["box"] for o in objs]

                    def on(r: int, boxes: list) -> bool:
                        x0, y0, x1, y1 = (float(z) for z in item["boxes"][r])
                        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                        return any(b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in boxes)

                    n_rec[cat] += 1
                    hits[cat] += on(q, named)
                    any_hits[cat] += on(q, every)
                    vr = [r for r in range(R) if item["valid"][r]]
                    chance[cat] += sum(on(r, named) for r in vr) / len(vr)
                    vo = [r for r in vr if on(r, every)]
                    if vo:
                        obj_rec[cat] += 1
                        obj_chance[cat] += sum(on(r, named) for r in vo) / len(vo)
    assert min_margin > 1e-6  # no near-tie: the float32 stage must pick the same regions
    for cat in ("colour", "shape"):
        assert res["salient_on_object_records"][cat] == n_rec[cat]
        assert res["salient_on_object_rate"][cat] == pytest.approx(hits[cat] / n_rec[cat], abs=1e-12)
        assert res["salient_on_object_chance"][cat] == pytest.approx(chance[cat] / n_rec[cat], abs=1e-9)
        assert res["salient_on_any_object_rate"][cat] == pytest.approx(any_hits[cat] / n_rec[cat], abs=1e-12)
        assert res["salient_named_given_object_rate"][cat] == pytest.approx(hits[cat] / any_hits[cat], abs=1e-12)
        assert res["salient_named_given_object_chance"][cat] == pytest.approx(obj_chance[cat] / obj_rec[cat],
                                                                              abs=1e-9)
    n_all = n_rec["colour"] + n_rec["shape"]
    assert res["salient_on_object_rate"]["all"] == pytest.approx((hits["colour"] + hits["shape"]) / n_all, abs=1e-12)
    for w in range(len(vocab)):
        imgs = best.get(w, {})
        if not imgs:
            assert bool((sd["bank"][w] == 0).all())
            continue
        top = sorted(imgs.items(), key=lambda kv: (-kv[1][0], kv[0]))[:K]
        a = torch.tensor([x[1][0] for x in top], dtype=torch.float64)
        v = torch.stack([x[1][1] for x in top])
        ref = (a[:, None] * v).sum(0) / a.sum()
        assert [int(x) for x in sd["image_ids"][w][: len(top)]] == [x[0] for x in top], vocab.id2word[w]
        torch.testing.assert_close(sd["bank"][w].double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sd["relevance"][w][: len(top)].double(), a, rtol=1e-5, atol=1e-7)


def test_missing_region_store_is_a_clear_error(base, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(base["run_dir"], run_dir)
    shutil.rmtree(run_dir / "detector" / "regions_train")
    with pytest.raises(StageError, match="no region store for split 'train'.*detector"):
        run_stages(base["cfg"], run_dir, only=["memory"], force=True, check_upstream=False)


def test_emit_step_ceiling_hand_computed():
    """Oracle that attends uniformly among the objects the caption so far allows (hand-computed)."""
    from cpgan.stages.memory import emit_step_ceiling

    objs = [{"colour": "red", "shape": "circle", "size": "small"},
            {"colour": "red", "shape": "square", "size": "large"},
            {"colour": "blue", "shape": "circle", "size": "small"}]
    # size words decide: large -> red square (1, 1); small among {red circle, blue circle}: red 1/2, circle 1;
    # then blue 1, circle 1
    one = emit_step_ceiling([{"objects": objs, "captions": ["a large red square and a small red circle and a "
                                                             "blue circle"]}])
    assert one["colour"] == pytest.approx((1 + 0.5 + 1) / 3) and one["shape"] == 1.0
    assert one["all"] == pytest.approx(5.5 / 6)
    # no size words: red 2/3, circle among red ones 1/2; red among {red square, blue circle} 1/2, square 1; blue 1,
    # circle 1
    two = emit_step_ceiling([{"objects": objs, "captions": ["a red ball and a red box and a blue circle"]}])
    assert two["colour"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert two["shape"] == pytest.approx((1 / 2 + 1 + 1) / 3)
    assert emit_step_ceiling([{"objects": [], "captions": ["grass"]}]) == {"colour": None, "shape": None, "all": None}
