"""One sample structure for every source (DESIGN §2; AttnGAN ``TextDataset`` semantics).

A batch (from :func:`collate`) is a dict:

* ``images``: list of float tensors ``(B, 3, s, s)`` in [-1, 1], one per stage resolution (ascending);
* ``captions`` ``(B, T)`` long, 0-padded; ``lengths`` ``(B,)``;
* ``wrong_captions`` ``(B, T')``, ``wrong_lengths``: a caption of another image (another class when class
  ids exist) — the mismatched text X̄ of the hinge loss, eq. (5);
* ``keys`` (list of str), ``index`` ``(B,)`` image indices, ``class_ids`` ``(B,)`` (-1 when unknown);
* ``skipped``: how many items of this batch were dropped (corrupt/missing image).

Randomness (which caption, the word subset, the mismatched caption, augmentation) comes from a generator
seeded by ``(seed, epoch, index)``, so a resumed run sees exactly the batches an uninterrupted run sees.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .sources import DataSourceError, iter_jsonl
from .text import Vocabulary, sample_words, truncate


@dataclass
class SplitData:
    """A split as indexed by the data stage and encoded by the vocab stage."""

    split: str
    keys: list[str]
    records: list[dict]
    images: np.ndarray | list[str]
    """uint8 ``(N, H, W, 3)`` memmap (shapes world) or a list of image paths."""
    captions: list[list[list[int]]]
    """Per image, per caption: token ids (known words only)."""
    class_ids: np.ndarray
    """``(N,)`` int64, -1 when the source has no classes."""

    def __len__(self) -> int:
        return len(self.keys)


def load_records(data_dir: Path, split: str) -> tuple[list[dict], np.ndarray | None]:
    """Records of a split written by the data stage, and the image array when the images are embedded."""
    sdir = data_dir / split
    if (sdir / "meta.jsonl").exists() and (sdir / "images.npy").exists():
        return list(iter_jsonl(sdir / "meta.jsonl")), np.load(sdir / "images.npy", mmap_mode="r")
    if (sdir / "index.jsonl").exists():
        return list(iter_jsonl(sdir / "index.jsonl")), None
    raise DataSourceError(f"no data for split '{split}' in '{data_dir}'; run `cpgan run CONFIG --stages data` first")


def load_split(run_dir: Path, split: str) -> SplitData:
    """Load a split with its cached caption ids (needs the ``data`` and ``vocab`` stages)."""
    run_dir = Path(run_dir)
    data_dir = resolve_data_dir(run_dir)
    records, arr = load_records(data_dir, split)
    cap_path = run_dir / "vocab" / f"captions_{split}.json"
    if not cap_path.exists():
        raise DataSourceError(f"no caption ids for split '{split}' in '{run_dir / 'vocab'}'; run the vocab stage first")
    enc = json.loads(cap_path.read_text())
    keep = enc["keep"]  # indices of records with at least one usable caption and a loadable image entry
    captions = enc["ids"]
    recs = [records[i] for i in keep]
    images = arr if arr is not None else [r["image"] for r in records]
    if arr is None:
        images = [images[i] for i in keep]
    cls = np.array([(-1 if r.get("class_id") is None else int(r["class_id"])) for r in recs], dtype=np.int64)
    split_data = SplitData(split, [r["key"] for r in recs], recs, images, captions, cls)
    split_data._rows = np.asarray(keep, dtype=np.int64) if arr is not None else None  # type: ignore[attr-defined]
    return split_data


def resolve_data_dir(run_dir: Path) -> Path:
    """Where the data stage put (or pointed to) the data: ``RUN_DIR/data/location.json``."""
    loc = Path(run_dir) / "data" / "location.json"
    if loc.exists():
        return Path(json.loads(loc.read_text())["path"])
    return Path(run_dir) / "data"


def load_vocab(run_dir: Path) -> Vocabulary:
    p = Path(run_dir) / "vocab" / "vocab.json"
    if not p.exists():
        raise DataSourceError(f"no vocabulary at '{p}'; run the vocab stage first")
    return Vocabulary.load(p)


def stage_sizes(final_size: int, n_stages: int) -> list[int]:
    """Ascending resolutions of the generator stages, e.g. (256, 3) -> [64, 128, 256]."""
    return [final_size // 2 ** (n_stages - 1 - i) for i in range(n_stages)]


def decode_image(path: str) -> np.ndarray | None:
    """RGB uint8 ``(H, W, 3)`` or None when the file is missing/corrupt."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> float ``(3, H, W)`` in [-1, 1]."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def multi_scale(img: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """One decoded image ``(3, H, W)`` or batch ``(B, 3, H, W)`` -> one tensor per size (antialiased)."""
    single = img.dim() == 3
    x = img.unsqueeze(0) if single else img
    out = []
    for s in sizes:
        y = x if x.shape[-1] == s and x.shape[-2] == s else F.interpolate(
            x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        out.append(y[0] if single else y)
    return out


class CaptionDataset(torch.utils.data.Dataset):
    """Images + captions of one split, with AttnGAN's sampling rules.

    Items are requested as ``index`` or ``(index, epoch)`` (see :class:`ResumableBatchSampler`). In
    training mode a random caption of the image is used and long captions are cut by a random
    order-preserving subset of ``words_num`` words; in evaluation mode caption ``caption_index`` (default 0)
    is used and cut to its first ``words_num`` words.
    """

    def __init__(self, data: SplitData, sizes: Sequence[int], words_num: int, train: bool, seed: int = 0,
                 augment: bool = False, caption_index: int = 0):
        self.data = data
        self.sizes = list(sizes)
        self.words_num = words_num
        self.train = train
        self.seed = seed
        self.augment = augment
        self.caption_index = caption_index
        self._rows = getattr(data, "_rows", None)

    def __len__(self) -> int:
        return len(self.data)

    def _image(self, i: int) -> np.ndarray | None:
        if isinstance(self.data.images, np.ndarray):
            row = int(self._rows[i]) if self._rows is not None else i
            return np.asarray(self.data.images[row])
        return decode_image(self.data.images[i])

    def _augment(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        # AttnGAN: resize to int(size * 76 / 64), random crop to size, random horizontal flip.
        size = self.sizes[-1]
        big = int(size * 76 / 64)
        x = F.interpolate(x[None], size=(big, big), mode="bilinear", align_corners=False, antialias=True)[0]
        ox, oy = rng.integers(0, big - size + 1, size=2)
        x = x[:, oy:oy + size, ox:ox + size]
        if rng.random() < 0.5:
            x = x.flip(-1)
        return x

    def _caption(self, i: int, rng: np.random.Generator, k: int | None = None) -> list[int]:
        caps = self.data.captions[i]
        if k is None:
            k = int(rng.integers(len(caps))) if self.train else min(self.caption_index, len(caps) - 1)
        ids = caps[k]
        return sample_words(ids, self.words_num, rng) if self.train else truncate(ids, self.words_num)

    def __getitem__(self, item) -> dict | None:
        index, epoch = (item if isinstance(item, tuple) else (item, 0))
        rng = np.random.default_rng([self.seed, epoch, index])
        img = self._image(index)
        if img is None:
            return None
        x = to_tensor(img)
        if self.augment and self.train:
            x = self._augment(x, rng)
        elif x.shape[-1] != self.sizes[-1] or x.shape[-2] != self.sizes[-1]:
            x = F.interpolate(x[None], size=(self.sizes[-1],) * 2, mode="bilinear", align_corners=False,
                              antialias=True)[0]
        cap = self._caption(index, rng)
        n = len(self.data)
        cls = self.data.class_ids
        wrong = int(rng.integers(n))
        for _ in range(20):  # a different image (and class, when known)
            if wrong != index and (cls[index] < 0 or cls[wrong] != cls[index]):
                break
            wrong = int(rng.integers(n))
        wrong_cap = self._caption(wrong, rng)
        return {"images": multi_scale(x.clamp(-1, 1), self.sizes), "caption": cap, "wrong_caption": wrong_cap,
                "key": self.data.keys[index], "index": index, "class_id": int(cls[index])}


def _pad(caps: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(c) for c in caps], dtype=torch.long)
    out = torch.zeros(len(caps), int(lengths.max()), dtype=torch.long)
    for i, c in enumerate(caps):
        out[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    return out, lengths


def collate(items: list[dict | None]) -> dict:
    """Stack items, dropping the ``None`` ones (unreadable images) and counting them in ``skipped``."""
    good = [it for it in items if it is not None]
    skipped = len(items) - len(good)
    if not good:
        return {"skipped": skipped, "size": 0}
    caps, lens = _pad([it["caption"] for it in good])
    wcaps, wlens = _pad([it["wrong_caption"] for it in good])
    n_scales = len(good[0]["images"])
    return {
        "images": [torch.stack([it["images"][s] for it in good]) for s in range(n_scales)],
        "captions": caps, "lengths": lens, "wrong_captions": wcaps, "wrong_lengths": wlens,
        "keys": [it["key"] for it in good], "index": torch.tensor([it["index"] for it in good]),
        "class_ids": torch.tensor([it["class_id"] for it in good]), "skipped": skipped, "size": len(good),
    }


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Yields batches of ``(index, epoch)`` for steps ``start_step, start_step + 1, ...`` forever.

    Epoch ``e`` visits a permutation seeded by ``(seed, e)``; the last incomplete batch of an epoch is
    dropped (as AttnGAN's ``drop_last=True``). Under DDP each of ``world`` ranks takes every ``world``-th
    item of the global batch. Step ``t`` is therefore a pure function of ``(seed, t)``: a
    resumed run continues with exactly the batches the uninterrupted run would have used.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, start_step: int = 0, shuffle: bool = True,
                 rank: int = 0, world: int = 1):
        if n < batch_size:
            raise ValueError(f"the split has {n} usable images, fewer than the batch size {batch_size}; "
                             "lower the batch size or add data")
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} must be divisible by the number of processes {world}")
        self.n, self.batch_size, self.seed, self.start_step, self.shuffle = n, batch_size, seed, start_step, shuffle
        self.rank, self.world = rank, world
        self.steps_per_epoch = n // batch_size

    def _perm(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch, 7919]).permutation(self.n)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        epoch, pos = divmod(step, self.steps_per_epoch)
        perm = self._perm(epoch)
        while True:
            idx = perm[pos * self.batch_size:(pos + 1) * self.batch_size][self.rank::self.world]
            yield [(int(i), epoch) for i in idx]
            pos += 1
            if pos == self.steps_per_epoch:
                epoch, pos = epoch + 1, 0
                perm = self._perm(epoch)

    def __len__(self) -> int:  # one epoch; the iterator itself is endless
        return self.steps_per_epoch


def make_loader(ds: CaptionDataset, batch_size: int, seed: int, start_step: int = 0, num_workers: int = 0,
                shuffle: bool = True, rank: int = 0, world: int = 1) -> torch.utils.data.DataLoader:
    sampler = ResumableBatchSampler(len(ds), batch_size, seed, start_step, shuffle, rank, world)
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                                       persistent_workers=num_workers > 0)


def eval_batches(ds: CaptionDataset, batch_size: int, limit: int | None = None) -> Iterator[dict]:
    """Deterministic, ordered, non-repeating batches over (the first ``limit`` images of) a split."""
    n = len(ds) if limit is None else min(limit, len(ds))
    for s in range(0, n, batch_size):
        b = collate([ds[i] for i in range(s, min(n, s + batch_size))])
        if b["size"]:
            yield b
