"""Loaders on the four layouts (shapes, COCO raw, AttnGAN, custom folder/JSONL), with bad input."""
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cpgan.config import load_config
from cpgan.data.dataset import CaptionDataset, collate, load_split, make_loader
from cpgan.data.sources import DataSourceError, attngan_records, coco_records, folder_records
from cpgan.stages.base import run_stages


def _img(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 24, 3), colour, np.uint8)).save(path)


def _corrupt(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")


def _run(tmp_path, source, root, extra=()):
    cfg = load_config("shapes-quick", [f"data.source={source}", f"data.root={root}", "data.image_size=64",
                                       "data.test_fraction=0.5", *extra])
    run_dir = tmp_path / "run"
    run_stages(cfg, run_dir, only=["data", "vocab"])
    return run_dir


def _check_split(run_dir, split, n_expected_items, n_corrupt):
    data = load_split(run_dir, split)
    ds = CaptionDataset(data, sizes=[16, 32, 64], words_num=5, train=True, seed=0)
    items = [ds[(i, 0)] for i in range(len(ds))]
    assert len(items) == n_expected_items
    assert sum(it is None for it in items) == n_corrupt
    batch = collate(items)
    assert batch["skipped"] == n_corrupt
    assert [t.shape[-1] for t in batch["images"]] == [16, 32, 64]
    assert batch["captions"].shape[1] <= 5 and int(batch["lengths"].min()) >= 1
    assert float(batch["images"][-1].min()) >= -1 and float(batch["images"][-1].max()) <= 1
    return data, batch


def test_coco_layout(tmp_path):
    root = tmp_path / "coco"
    for split, yr in (("train", "train2014"), ("test", "val2014")):
        images = [{"id": 1, "file_name": f"COCO_{yr}_1.jpg"}, {"id": 2, "file_name": f"COCO_{yr}_2.jpg"},
                  {"id": 3, "file_name": f"COCO_{yr}_3.jpg"}]
        anns = [{"image_id": 1, "caption": "A red bus on the street."},
                {"image_id": 2, "caption": "Two dogs playing"}, {"image_id": 2, "caption": "  "},
                {"image_id": 3, "caption": "a red dog"}]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"captions_{yr}.json").write_text(json.dumps({"images": images, "annotations": anns}))
        _img(root / yr / f"COCO_{yr}_1.jpg", (200, 0, 0))
        _img(root / yr / f"COCO_{yr}_2.jpg", (0, 200, 0))
        _corrupt(root / yr / f"COCO_{yr}_3.jpg")
    recs = coco_records(root)
    assert [r["key"] for r in recs["train"]] == ["COCO_train2014_1", "COCO_train2014_2", "COCO_train2014_3"]
    run_dir = _run(tmp_path, "coco", root)
    summary = json.loads((run_dir / "vocab" / "done.json").read_text())["summary"]
    assert summary["train_dropped_captions"] == 1  # the blank caption
    data, batch = _check_split(run_dir, "train", 3, 1)
    assert batch["keys"] == ["COCO_train2014_1", "COCO_train2014_2"]


def test_attngan_layout_with_classes(tmp_path):
    root = tmp_path / "birds"
    names = {"train": ["001.A/a1", "001.A/a2", "002.B/b1"], "test": ["002.B/b2", "003.C/c1"]}
    for split, ns in names.items():
        (root / split).mkdir(parents=True)
        (root / split / "filenames.pickle").write_bytes(pickle.dumps(ns, protocol=2))
        (root / split / "class_info.pickle").write_bytes(pickle.dumps([int(n[:3]) for n in ns], protocol=2))
        for n in ns:
            _img(root / "images" / f"{n}.jpg", (10, 20, 30))
            (root / "text" / n).parent.mkdir(parents=True, exist_ok=True)
            (root / "text" / f"{n}.txt").write_text("this bird is red with a short beak\nA small bird.\n")
    run_dir = _run(tmp_path, "attngan", root)
    data, batch = _check_split(run_dir, "train", 3, 0)
    assert data.class_ids.tolist() == [1, 1, 2]
    # mismatched captions come from another class when classes exist
    ds = CaptionDataset(data, sizes=[64], words_num=20, train=True, seed=0)
    for i in range(3):
        for ep in range(5):
            it = ds[(i, ep)]
            assert it["class_id"] == data.class_ids[i]


def test_attngan_pickle_with_code_is_refused(tmp_path):
    root = tmp_path / "evil"
    (root / "images").mkdir(parents=True)
    (root / "text").mkdir()
    (root / "train").mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (root / "train" / "filenames.pickle").write_bytes(pickle.dumps([Evil()], protocol=2))
    with pytest.raises(DataSourceError, match="refusing to load '(__builtin__|builtins).print'"):
        attngan_records(root)


def test_folder_layout_txt_and_manifest(tmp_path):
    root = tmp_path / "mine"
    for i in range(6):
        _img(root / "sub" / f"im{i}.png", (i * 40, 0, 0))
        (root / "sub" / f"im{i}.txt").write_text(f"picture number {i}\nanother caption\n" if i != 3 else "")
    _corrupt(root / "sub" / "broken.png")
    (root / "sub" / "broken.txt").write_text("a broken image\n")
    recs = folder_records(root, test_fraction=0.0)
    assert len(recs["train"]) == 7 and recs["test"] == []
    run_dir = _run(tmp_path, "folder", root, ["data.test_fraction=0.0"])
    summary = json.loads((run_dir / "vocab" / "done.json").read_text())["summary"]
    assert summary["train_dropped_images"] == 1  # im3 has an empty caption file
    _check_split(run_dir, "train", 6, 1)

    man = root / "manifest.jsonl"
    man.write_text("\n".join(json.dumps(r) for r in [
        {"image": "sub/im0.png", "captions": ["a dark picture"], "split": "train"},
        {"image": "sub/im1.png", "caption": "a brighter picture", "split": "test"},
        {"image": "sub/broken.png", "caption": "broken", "split": "train"}]) + "\n")
    recs = folder_records(root, manifest=str(man))
    assert [r["captions"] for r in recs["train"]] == [["a dark picture"], ["broken"]]
    assert recs["test"][0]["key"] == "sub/im1"
    man.write_text('{"image": "x.png", "split": "val"}\n')
    with pytest.raises(DataSourceError, match="split must be"):
        folder_records(root, manifest=str(man))


def test_missing_layout_is_one_clear_line(tmp_path):
    with pytest.raises(DataSourceError, match="expected the COCO caption file for train at"):
        coco_records(tmp_path)
    with pytest.raises(DataSourceError, match="no images"):
        folder_records(tmp_path)


def test_shapes_layout_and_resumable_sampler(tmp_path):
    cfg = load_config("shapes-quick", ["data.n_train=40", "data.n_test=10", "data.n_test_novel=10"])
    run_dir = tmp_path / "run"
    run_stages(cfg, run_dir, only=["data", "vocab"])
    data = load_split(run_dir, "train")
    assert len(data) == 40 and data.images.shape == (40, 64, 64, 3)
    ds = CaptionDataset(data, sizes=[16, 32, 64], words_num=20, train=True, seed=3)
    # steps 0..5 uninterrupted == steps 0..2 then a fresh loader from step 3
    full = [b for _, b in zip(range(6), make_loader(ds, 8, seed=3))]
    part = [b for _, b in zip(range(3), make_loader(ds, 8, seed=3))]
    rest = [b for _, b in zip(range(3), make_loader(ds, 8, seed=3, start_step=3))]
    for a, b in zip(full, part + rest):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["captions"], b["captions"]) and torch.equal(a["wrong_captions"], b["wrong_captions"])
        assert torch.equal(a["images"][0], b["images"][0])
    # epoch 1 (steps 5..9) is another permutation covering every image once
    ep1 = [b for _, b in zip(range(5), make_loader(ds, 8, seed=3, start_step=5))]
    keys = [k for b in ep1 for k in b["keys"]]
    assert sorted(keys) == sorted(data.keys)
