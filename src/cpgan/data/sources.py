"""Data sources: turn a data set on disk into one index format (DESIGN §2 ``data`` stage).

Supported layouts (``data.source``):

``shapes``
    The built-in shapes world (:mod:`cpgan.data.shapes`): ``<split>/images.npy`` + ``<split>/meta.jsonl``.
``coco``
    Raw MS-COCO 2014: ``annotations/captions_{train,val}2014.json`` and ``train2014/``, ``val2014/`` image
    folders. ``val2014`` is the test split, as in AttnGAN/CPGAN.
``attngan``
    The AttnGAN/CPGAN layout: ``train/filenames.pickle``, ``test/filenames.pickle`` (lists of names),
    ``text/<name>.txt`` (one caption per line) and ``images/<name>.jpg``; optional
    ``{train,test}/class_info.pickle`` (class ids, birds). ``captions.pickle`` is not needed: captions are
    re-tokenised from ``text/`` so every source shares one tokenizer. Pickles are read with a loader that
    only accepts plain containers (lists, dicts, strings, numbers).
``folder``
    Your own data: image files anywhere under ``root`` with a same-named ``.txt`` beside each (one caption per
    line), or a JSONL manifest (``data.manifest``) of ``{"image": PATH, "captions": [...] | "caption": str,
    "split": "train"|"test"}``. Without split information, a stable hash of the key puts
    ``data.test_fraction`` of the images in ``test``.

Every source produces, per split, a list of records ``{"key", "image", "captions", "class_id"}`` written as
``RUN_DIR/data/<split>/index.jsonl`` by the data stage.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path
from typing import Iterable

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DataSourceError(ValueError):
    """The data set on disk does not have the expected layout; the message says what is missing where."""


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataSourceError(f"expected {what} at '{path}' but it does not exist")
    return path


class _PlainUnpickler(pickle.Unpickler):
    """Accepts only built-in containers and scalars: refuses every global (no code can run)."""

    def find_class(self, module: str, name: str):  # noqa: D102
        raise DataSourceError(f"refusing to load '{module}.{name}' from a data pickle: only plain lists/dicts are allowed")


def load_plain_pickle(path: Path):
    data = path.read_bytes()
    try:
        return _PlainUnpickler(io.BytesIO(data), encoding="latin1").load()
    except DataSourceError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse error is a bad file
        raise DataSourceError(f"'{path}' is not a readable pickle of plain data ({e.__class__.__name__})") from None


def _read_captions(path: Path) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise DataSourceError(f"cannot read captions '{path}': {e}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _split_of(key: str, test_fraction: float) -> str:
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if h < test_fraction else "train"


def coco_records(root: str | Path) -> dict[str, list[dict]]:
    root = Path(root)
    out = {}
    for split, year_split in (("train", "train2014"), ("test", "val2014")):
        ann = _need(root / "annotations" / f"captions_{year_split}.json", f"the COCO caption file for {split}")
        img_dir = _need(root / year_split, f"the COCO {year_split} image folder")
        try:
            data = json.loads(ann.read_text())
        except json.JSONDecodeError as e:
            raise DataSourceError(f"'{ann}' is not valid JSON ({e.msg} at line {e.lineno})") from None
        caps: dict[int, list[str]] = {}
        for a in data.get("annotations", []):
            caps.setdefault(int(a["image_id"]), []).append(str(a["caption"]).strip())
        recs = []
        for im in sorted(data.get("images", []), key=lambda r: r["file_name"]):
            recs.append({"key": Path(im["file_name"]).stem, "image": str(img_dir / im["file_name"]),
                         "captions": caps.get(int(im["id"]), []), "class_id": None})
        out[split] = recs
    return out


def attngan_records(root: str | Path) -> dict[str, list[dict]]:
    root = Path(root)
    out = {}
    img_dir = _need(root / "images", "the AttnGAN-layout image folder 'images/'")
    text_dir = _need(root / "text", "the AttnGAN-layout caption folder 'text/'")
    for split in ("train", "test"):
        names = load_plain_pickle(_need(root / split / "filenames.pickle", f"the {split} file list"))
        if not isinstance(names, list):
            raise DataSourceError(f"'{root / split / 'filenames.pickle'}' should hold a list of file names")
        cls_path = root / split / "class_info.pickle"
        classes = load_plain_pickle(cls_path) if cls_path.exists() else None
        recs = []
        for i, name in enumerate(names):
            name = name.decode() if isinstance(name, bytes) else str(name)
            img = None
            for ext in IMAGE_EXTS:
                if (img_dir / f"{name}{ext}").exists():
                    img = img_dir / f"{name}{ext}"
                    break
            if img is None:
                img = img_dir / f"{name}.jpg"  # reported as corrupt/missing when loaded
            txt = text_dir / f"{name}.txt"
            caps = _read_captions(txt) if txt.exists() else []
            cid = int(classes[i]) if classes is not None and i < len(classes) else None
            recs.append({"key": name, "image": str(img), "captions": caps, "class_id": cid})
        out[split] = recs
    return out


def folder_records(root: str | Path, manifest: str = "", test_fraction: float = 0.1) -> dict[str, list[dict]]:
    root = _need(Path(root), "the data folder")
    out: dict[str, list[dict]] = {"train": [], "test": []}
    if manifest:
        mpath = Path(manifest)
        if not mpath.is_absolute() and not mpath.exists():
            mpath = root / manifest
        _need(mpath, "the JSONL manifest")
        for ln, line in enumerate(mpath.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                raise DataSourceError(f"{mpath}:{ln}: not valid JSON") from None
            if "image" not in r:
                raise DataSourceError(f"{mpath}:{ln}: each line needs an \"image\" field")
            img = Path(r["image"])
            if not img.is_absolute():
                img = mpath.parent / img
            caps = r.get("captions")
            if caps is None:
                caps = [r["caption"]] if "caption" in r else []
            key = r.get("key") or str(Path(r["image"]).with_suffix(""))
            split = r.get("split") or _split_of(key, test_fraction)
            if split not in out:
                raise DataSourceError(f"{mpath}:{ln}: split must be 'train' or 'test', got '{split}'")
            out[split].append({"key": key, "image": str(img), "captions": [str(c) for c in caps],
                               "class_id": r.get("class_id")})
        return out
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not images:
        raise DataSourceError(f"no images ({', '.join(IMAGE_EXTS)}) found under '{root}'; "
                              "put images with same-named .txt caption files there, or pass data.manifest")
    for img in images:
        key = str(img.relative_to(root).with_suffix(""))
        txt = img.with_suffix(".txt")
        caps = _read_captions(txt) if txt.exists() else []
        out[_split_of(key, test_fraction)].append({"key": key, "image": str(img), "captions": caps, "class_id": None})
    return out


def records_for(source: str, root: str, manifest: str = "", test_fraction: float = 0.1) -> dict[str, list[dict]]:
    """Records per split for a non-shapes source."""
    if not root:
        raise DataSourceError(f"data.source={source} needs data.root=PATH (the data set folder)")
    if source == "coco":
        return coco_records(root)
    if source == "attngan":
        return attngan_records(root)
    if source == "folder":
        return folder_records(root, manifest, test_fraction)
    raise DataSourceError(f"unknown data source '{source}'; use shapes, coco, attngan or folder")


def iter_jsonl(path: Path) -> Iterable[dict]:
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
