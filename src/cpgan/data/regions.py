"""On-disk region store: top-36 boxes and 1024-d region features for a whole data set (DESIGN §2 "[detector]").

COCO scale is the design target: 123k images x 36 regions x 1024 dims in float16 is about 9 GB, so the store is
written in fixed-size shards, streamed (the writer holds one batch in memory; rows are appended to the open
shard's files), and read back through ``np.memmap`` (the reader never loads the data set).

Layout of a store directory::

    manifest.json            format, shapes, dtypes, shard_size, committed shards [{name, rows}], complete flag
    shard_00000/             one committed shard (rows 0 .. shard_size-1 of the data set, in insertion order)
        feats.bin            (rows, R, D)  little-endian float16 (or float32)
        boxes.bin            (rows, R, 4)  float32, xyxy normalised to [0, 1]
        scores.bin           (rows, R)     float32
        valid.bin            (rows, R)     bool (1 byte)
        keys.json            list of the rows' keys
    .partial_00001/          the shard being written (discarded on restart)

Resumability: a shard is committed by fsyncing its files, renaming ``.partial_k`` to ``shard_k`` and then
atomically replacing ``manifest.json`` (temp file, fsync, rename).  The manifest is the only source of truth:
on restart, partial directories and shard directories not listed in it are deleted, ``done_keys()`` returns the
keys of the committed shards, and the caller continues with the remaining keys *in the same order*; because shard
k always holds rows ``k*shard_size ..`` of the sequence, the resumed store is byte-identical to a single pass.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..utils.atomic import atomic_write_json, fsync_dir

__all__ = ["RegionStoreWriter", "RegionStore"]

_FORMAT = "cpgan-region-store"
_VERSION = 1
_MANIFEST = "manifest.json"
_FEAT_DTYPES = {"float16": "<f2", "float32": "<f4"}


def _arrays_spec(num_regions: int, feat_dim: int, feat_dtype: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (numpy dtype string, per-row shape)."""
    return {
        "feats": (_FEAT_DTYPES[feat_dtype], (num_regions, feat_dim)),
        "boxes": ("<f4", (num_regions, 4)),
        "scores": ("<f4", (num_regions,)),
        "valid": ("|b1", (num_regions,)),
    }


def _fsync_dir(path: Path) -> None:
    fsync_dir(path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj)


def _read_manifest(root: Path) -> dict[str, Any]:
    p = root / _MANIFEST
    if not p.is_file():
        raise FileNotFoundError(f"no region store at {root} ({_MANIFEST} missing); write one with RegionStoreWriter.")
    m = json.loads(p.read_text(encoding="utf-8"))
    if m.get("format") != _FORMAT or m.get("version") != _VERSION:
        raise ValueError(f"{p} is not a cpgan region store (format {m.get('format')!r}, version {m.get('version')!r}).")
    return m


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class RegionStoreWriter:
    """Streamed, resumable writer of a region store (see the module docstring).

    Args:
        directory: store directory (created if needed; an existing store with the same settings is resumed).
        num_regions: regions per image R (36).
        feat_dim: feature size D (1024).
        shard_size: images per shard (the last shard may be shorter).
        feat_dtype: ``"float16"`` (default) or ``"float32"`` for the features.

    Use::

        w = RegionStoreWriter(path)
        done = w.done_keys()
        for batch in batches_of([k for k in keys if k not in done]):   # same order as a single pass
            w.add(batch_keys, boxes, feats, scores, valid)
        w.close()
    """

    def __init__(
        self,
        directory: str | Path,
        num_regions: int = 36,
        feat_dim: int = 1024,
        shard_size: int = 2048,
        feat_dtype: str = "float16",
    ) -> None:
        if feat_dtype not in _FEAT_DTYPES:
            raise ValueError(f"feat_dtype must be one of {sorted(_FEAT_DTYPES)}, got {feat_dtype!r}.")
        if num_regions <= 0 or feat_dim <= 0 or shard_size <= 0:
            raise ValueError("num_regions, feat_dim and shard_size must be positive.")
        self.root = Path(directory)
        self.root.mkdir(parents=True, exist_ok=True)
        self.num_regions, self.feat_dim, self.shard_size, self.feat_dtype = num_regions, feat_dim, shard_size, feat_dtype
        self._spec = _arrays_spec(num_regions, feat_dim, feat_dtype)
        settings = {"num_regions": num_regions, "feat_dim": feat_dim, "shard_size": shard_size, "feat_dtype": feat_dtype}
        if (self.root / _MANIFEST).is_file():
            m = _read_manifest(self.root)
            diff = {k: (m.get(k), v) for k, v in settings.items() if m.get(k) != v}
            if diff:
                raise ValueError(
                    f"{self.root} holds a region store written with other settings {diff} (stored, requested); "
                    "use the same settings to resume or choose a new directory."
                )
            self._manifest = m
        else:
            self._manifest = {"format": _FORMAT, "version": _VERSION, **settings, "shards": [], "complete": False}
            _atomic_write_json(self.root / _MANIFEST, self._manifest)
        committed = {s["name"] for s in self._manifest["shards"]}
        for child in self.root.iterdir():  # discard everything not committed by the manifest
            if child.is_dir() and (child.name.startswith(".partial_") or (child.name.startswith("shard_") and child.name not in committed)):
                shutil.rmtree(child)
        self._done: set[str] = set()
        self._num_done = 0
        for s in self._manifest["shards"]:
            keys = json.loads((self.root / s["name"] / "keys.json").read_text(encoding="utf-8"))
            self._done.update(keys)
            self._num_done += len(keys)
        self._cur_keys: list[str] = []
        self._cur_set: set[str] = set()
        self._files: dict[str, Any] | None = None
        self._closed = bool(self._manifest["complete"])

    # ------------------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """True once :meth:`close` has committed the last shard."""
        return bool(self._manifest["complete"])

    @property
    def num_done(self) -> int:
        """Images in committed shards."""
        return self._num_done

    def done_keys(self) -> set[str]:
        """Keys of the images in committed shards (skip these when resuming)."""
        return set(self._done)

    def _partial_dir(self) -> Path:
        return self.root / f".partial_{len(self._manifest['shards']):05d}"

    def _open_shard(self) -> None:
        d = self._partial_dir()
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        self._files = {name: open(d / f"{name}.bin", "wb") for name in self._spec}

    def add(self, keys: Sequence[str], boxes: Any, feats: Any, scores: Any, valid: Any) -> None:
        """Append a batch: ``keys`` (n,), ``boxes`` (n, R, 4), ``feats`` (n, R, D), ``scores`` (n, R), ``valid`` (n, R).

        Arrays may be numpy arrays or torch tensors.  Keys must be new (not already stored or added).
        """
        if self._closed:
            raise ValueError(f"region store {self.root} is complete; write to a new directory to add images.")
        keys = [str(k) for k in keys]
        n = len(keys)
        arrays = {"boxes": _to_numpy(boxes), "feats": _to_numpy(feats), "scores": _to_numpy(scores), "valid": _to_numpy(valid)}
        for name, (_, shape) in self._spec.items():
            if arrays[name].shape != (n, *shape):
                raise ValueError(f"add(): {name} has shape {arrays[name].shape}, expected {(n, *shape)} for {n} keys.")
        if self.feat_dtype == "float16" and np.issubdtype(arrays["feats"].dtype, np.floating):
            peak = float(np.abs(arrays["feats"]).max()) if arrays["feats"].size else 0.0
            if not np.isfinite(peak) or peak > 65504.0:
                raise ValueError(
                    f"add(): features reach {peak:g}, beyond the float16 range (65504) or not finite; "
                    "use RegionStoreWriter(..., feat_dtype='float32') or fix the feature extractor."
                )
        if len(set(keys)) != n:
            raise ValueError("add(): duplicate keys within the batch.")
        dup = [k for k in keys if k in self._done or k in self._cur_set]
        if dup:
            raise ValueError(f"add(): {len(dup)} key(s) already stored, e.g. {dup[0]!r}; skip writer.done_keys() when resuming.")
        start = 0
        while start < n:
            if self._files is None:
                self._open_shard()
            assert self._files is not None
            take = min(self.shard_size - len(self._cur_keys), n - start)
            for name, (dtype, _) in self._spec.items():
                chunk = np.ascontiguousarray(arrays[name][start : start + take], dtype=np.dtype(dtype))
                self._files[name].write(chunk.tobytes())
            self._cur_keys.extend(keys[start : start + take])
            self._cur_set.update(keys[start : start + take])
            start += take
            if len(self._cur_keys) == self.shard_size:
                self._commit()

    def _commit(self) -> None:
        """Make the open shard durable, then publish it in the manifest (atomic)."""
        assert self._files is not None
        d = self._partial_dir()
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self._files = None
        with open(d / "keys.json", "w", encoding="utf-8") as f:
            json.dump(self._cur_keys, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(d)
        name = f"shard_{len(self._manifest['shards']):05d}"
        os.replace(d, self.root / name)
        _fsync_dir(self.root)
        shards = self._manifest["shards"] + [{"name": name, "rows": len(self._cur_keys)}]
        manifest = {**self._manifest, "shards": shards}
        _atomic_write_json(self.root / _MANIFEST, manifest)
        self._manifest = manifest
        self._done.update(self._cur_keys)
        self._num_done += len(self._cur_keys)
        self._cur_keys, self._cur_set = [], set()

    def close(self) -> None:
        """Commit the last (possibly short) shard and mark the store complete.  Idempotent."""
        if self._closed:
            return
        if self._files is not None and self._cur_keys:
            self._commit()
        elif self._files is not None:
            for f in self._files.values():
                f.close()
            shutil.rmtree(self._partial_dir(), ignore_errors=True)
            self._files = None
        self._manifest = {**self._manifest, "complete": True}
        _atomic_write_json(self.root / _MANIFEST, self._manifest)
        self._closed = True

    def abort(self) -> None:
        """Close open files without committing the current shard (it is discarded on the next open)."""
        if self._files is not None:
            for f in self._files.values():
                f.close()
            self._files = None

    def __enter__(self) -> "RegionStoreWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # keep committed shards, drop the partial one: a later writer resumes
            self.abort()


class RegionStore:
    """Memory-mapped reader of a region store.

    Args:
        directory: the store directory.
        allow_incomplete: read the committed shards of a store whose writer has not called ``close()`` yet.

    ``len(store)``, ``store.keys`` (list, insertion order), ``store.index_of(key)``, ``store.get(key)`` and
    ``store[i]`` (dict of one item: ``boxes`` (R, 4) float32, ``feats`` (R, D) float16, ``scores`` (R,) float32,
    ``valid`` (R,) bool), ``store.get_batch(indices)`` (same keys, stacked: (n, R, ...)).  Arrays returned are
    copies; the shards stay memory-mapped.
    """

    def __init__(self, directory: str | Path, allow_incomplete: bool = False) -> None:
        self.root = Path(directory)
        m = _read_manifest(self.root)
        if not m["complete"] and not allow_incomplete:
            raise ValueError(
                f"region store {self.root} is incomplete (the writer did not finish); resume writing it, "
                "or pass allow_incomplete=True to read the committed shards."
            )
        self.manifest = m
        self.num_regions: int = m["num_regions"]
        self.feat_dim: int = m["feat_dim"]
        self._spec = _arrays_spec(self.num_regions, self.feat_dim, m["feat_dtype"])
        self._shards = [s["name"] for s in m["shards"]]
        rows = [int(s["rows"]) for s in m["shards"]]
        self._offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self.keys: list[str] = []
        for name, r in zip(self._shards, rows):
            k = json.loads((self.root / name / "keys.json").read_text(encoding="utf-8"))
            if len(k) != r:
                raise ValueError(f"{self.root / name}: {len(k)} keys but the manifest says {r} rows; the store is damaged.")
            self.keys.extend(k)
        self._index = {k: i for i, k in enumerate(self.keys)}
        self._maps: dict[tuple[int, str], np.memmap] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def index_of(self, key: str) -> int:
        """Row of ``key`` in the store (insertion order)."""
        try:
            return self._index[key]
        except KeyError:
            raise KeyError(f"key {key!r} is not in the region store {self.root}") from None

    def _map(self, shard: int, name: str) -> np.memmap:
        mp = self._maps.get((shard, name))
        if mp is None:
            dtype, shape = self._spec[name]
            rows = int(self._offsets[shard + 1] - self._offsets[shard])
            mp = np.memmap(self.root / self._shards[shard] / f"{name}.bin", dtype=dtype, mode="r", shape=(rows, *shape))
            self._maps[(shard, name)] = mp
        return mp

    def get_batch(self, indices: Iterable[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Items at ``indices`` (any order, repeats allowed): dict of arrays ``(n, R, ...)``."""
        idx = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, dtype=np.int64).reshape(-1)
        n_total = len(self)
        if idx.size and (idx.min() < -n_total or idx.max() >= n_total):
            raise IndexError(f"index out of range for a region store of {n_total} items.")
        idx = np.where(idx < 0, idx + n_total, idx)
        shard = np.searchsorted(self._offsets, idx, side="right") - 1
        out = {name: np.empty((idx.size, *shape), dtype=np.dtype(dtype).newbyteorder("=")) for name, (dtype, shape) in self._spec.items()}
        for s in np.unique(shard):
            sel = shard == s
            rows = idx[sel] - self._offsets[s]
            for name in self._spec:
                out[name][sel] = self._map(int(s), name)[rows]
        return out

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.get_batch([i]).items()}

    def get(self, key: str) -> dict[str, np.ndarray]:
        """Item stored under ``key``."""
        return self[self.index_of(key)]
