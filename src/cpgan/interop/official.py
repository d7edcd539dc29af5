"""Import the CPGAN authors' released files (and AttnGAN's DAMSM encoders) without running their code.

Released files (dongdongdong666/CPGAN; DESIGN.md §4, ``shared/fixtures/official/keys.md``):

=========================  ======================  ============================================
file                        kind                    content
=========================  ======================  ============================================
``models/NET_T.pkl``        ``MEM_TRANS``           whole pickled ``model.MEM_TRANS`` (3 tensors)
``models/Text_Encoder.pkl`` ``RNN_ENCODER``         whole ``model.RNN_ENCODER`` with memory conv
``models/NET_G.pkl``        ``G_NET``               whole ``model.G_NET`` (128 state entries)
``memory/memoryft_*.pkl``   ``MEMORY_FEATURES``     dict ``str(memory id) -> 1024-d vector``
``memory/transvob.pkl``     ``TRANSVOB``            int64 array: caption-vocab id -> memory id
``memory/vocab.pkl``        ``VOCAB``               dict ``str(memory id) -> word`` (``'9487'`` = UNK)
AttnGAN ``text_encoder*``   ``ATTNGAN_RNN_ENCODER`` state_dict (Embedding ``encoder`` + Bi-LSTM)
AttnGAN ``image_encoder*``  ``CNN_ENCODER``         state_dict (Inception trunk + 2 projections);
 / ``Inception_Encoder``                            the CPGAN R-precision encoder has the same keys
=========================  ======================  ============================================

Every file is read by :mod:`cpgan.interop.unpickle` (allow-listed globals mapped to inert
stand-ins; ``torch.load`` is never called) and recognised by its *content* (state_dict keys,
Python types), not by its name.

``memoryft_9487.pkl`` is not in the fixtures.  What is known of it: ``code/datasets.py`` of the
release reads it with ``pickle.load`` and looks vectors up as ``memory_feats[str(transvob[w])]``
(then ``np.array`` of the list), and REFERENCE.md §5.3/§6 fixes 9,487 slots of 1024-d vectors with
slot 9487 = UNK.  The importer accepts any dict whose keys are decimal ids (``str`` or ``int``) and
whose values are equal-length 1-D numeric vectors (numpy arrays, tensors or lists) and converts it
to a dense ``memory`` tensor ``(max_id + 1, D)`` (row ``i`` = vector of id ``i``; absent ids are
zero rows) plus a ``present`` bool mask ``(max_id + 1,)``.

``import_official`` writes, per recognised file ``<stem>``: ``<stem>.safetensors`` (tensors; not
for ``VOCAB``) and ``<stem>.json`` (sidecar: kind, source file, its sha256 and size, tensor
shapes/dtypes, and file-specific info; the vocabulary itself for ``VOCAB``), plus
``import_report.json``.  Every write is atomic (temp file, fsync, ``os.replace``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from ..utils.atomic import atomic_write_bytes, sha256_file
from .unpickle import (
    InertModule,
    PickleFormatError,
    UnsafePickleError,
    module_state_dict,
    restricted_load,
    to_state_dict,
)

__all__ = [
    "KINDS",
    "UnrecognizedFileError",
    "load_official",
    "import_official",
    "load_mem_trans",
    "MEM_TRANS_SHAPES",
    "cli_import_official",
]

KINDS = (
    "MEM_TRANS",
    "RNN_ENCODER",
    "G_NET",
    "MEMORY_FEATURES",
    "TRANSVOB",
    "VOCAB",
    "ATTNGAN_RNN_ENCODER",
    "CNN_ENCODER",
)

# Released MEM_TRANS (keys.md "MEM_TRANS"): Conv1d 1024->512 (bias), LeakyReLU(0.01), Conv1d 512->256.
MEM_TRANS_SHAPES: dict[str, tuple[int, ...]] = {
    "memory_emb_1.weight": (512, 1024, 1),
    "memory_emb_1.bias": (512,),
    "memory_emb_2.weight": (256, 512, 1),
}

CANDIDATE_SUFFIXES = (".pkl", ".pickle", ".pth", ".pt", ".bin", ".ckpt", ".tar")


class UnrecognizedFileError(ValueError):
    """The file was read safely but its content matches none of the known release files."""


# --------------------------------------------------------------------------------------------
# Recognition
# --------------------------------------------------------------------------------------------


def _strip_module_prefix(sd: "OrderedDict[str, torch.Tensor]") -> tuple["OrderedDict[str, torch.Tensor]", bool]:
    """Drop a ``module.`` prefix present on every key (``nn.DataParallel`` checkpoints)."""
    if sd and all(k.startswith("module.") for k in sd):
        return OrderedDict((k[len("module."):], v) for k, v in sd.items()), True
    return sd, False


def _classify_state_dict(sd: Mapping[str, torch.Tensor]) -> str | None:
    keys = set(sd)
    if keys == set(MEM_TRANS_SHAPES):
        return "MEM_TRANS"
    if "ca_net.fc.weight" in keys and any(k.startswith("h_net1.") for k in keys):
        return "G_NET"
    if "rnn.weight_ih_l0" in keys:
        if "word_encoder.weight" in keys and "encoder.weight" in keys and sd["encoder.weight"].dim() == 3:
            return "RNN_ENCODER"
        if "encoder.weight" in keys and sd["encoder.weight"].dim() == 2 and "word_encoder.weight" not in keys:
            return "ATTNGAN_RNN_ENCODER"
    if "emb_features.weight" in keys and "emb_cnn_code.weight" in keys:
        return "CNN_ENCODER"
    return None


def _is_int_key(k: Any) -> bool:
    if isinstance(k, bool):
        return False
    if isinstance(k, (int, np.integer)):
        return int(k) >= 0
    return isinstance(k, str) and re.fullmatch(r"\d+", k) is not None


def _as_vector(v: Any) -> np.ndarray | None:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    try:
        arr = np.asarray(v)
    except (ValueError, TypeError):
        return None
    if arr.dtype.kind not in "fiu":
        return None
    arr = arr.reshape(-1) if arr.ndim == 2 and 1 in arr.shape else arr
    return arr if arr.ndim == 1 else None


def _describe(obj: Any) -> str:
    if isinstance(obj, InertModule):
        return f"a pickled module {obj.qualname}"
    if isinstance(obj, dict):
        keys = list(obj)[:5]
        return f"a dict with {len(obj)} entries (first keys {keys})"
    if isinstance(obj, np.ndarray):
        return f"a numpy array {obj.dtype} {obj.shape}"
    return f"a {type(obj).__name__}"


def _shape_warnings(kind: str, sd: Mapping[str, torch.Tensor]) -> list[str]:
    if kind != "MEM_TRANS":
        return []
    out = []
    for k, shape in MEM_TRANS_SHAPES.items():
        if k == "memory_emb_2.weight" and sd[k].shape[1:] == (512, 1):
            continue  # nef may differ from 256 in a TRAIN.FLAG build
        if tuple(sd[k].shape) != shape:
            out.append(f"{k} has shape {tuple(sd[k].shape)}, the release has {shape}")
    return out


def load_official(path: str | os.PathLike[str]) -> tuple[str, "OrderedDict[str, torch.Tensor]", dict[str, Any]]:
    """Read one released file safely and say what it is.

    Returns ``(kind, state_dict, info)``: ``kind`` one of :data:`KINDS`; ``state_dict`` a flat
    ``name -> CPU tensor`` mapping (``{'memory': (N, D) float32, 'present': (N,) bool}`` for
    ``MEMORY_FEATURES``, ``{'transvob': (N,) int64}`` for ``TRANSVOB``, empty for ``VOCAB``);
    ``info`` a JSON-serialisable dict (container, pickle protocol, globals referenced, storages,
    pickled class, file-specific facts; ``ix_to_word`` for ``VOCAB``).

    Raises ``FileNotFoundError``; :class:`~cpgan.interop.unpickle.UnsafePickleError` (refused global);
    :class:`~cpgan.interop.unpickle.PickleFormatError` (malformed); :class:`UnrecognizedFileError`.
    """
    p = Path(path)
    res = restricted_load(p)
    obj = res.obj
    info: dict[str, Any] = {
        "container": res.container,
        "pickle_protocol": res.pickle_protocol,
        "globals": res.globals,
    }
    if res.storages:
        info["storages"] = res.storages
        info["storage_locations"] = sorted({s["location"] for s in res.storages})
    if res.sys_info is not None:
        info["sys_info"] = res.sys_info

    # Whole pickled modules and torch state_dicts.
    if isinstance(obj, InertModule) or (
        isinstance(obj, dict) and obj and any(isinstance(v, (torch.Tensor, dict, InertModule)) for v in obj.values())
        and not all(_is_int_key(k) for k in obj)
    ):
        if isinstance(obj, InertModule):
            sd = module_state_dict(obj)
            info["class"] = obj.qualname
            info["attributes"] = {
                k: v for k, v in obj.state.items()
                if not k.startswith("_") and isinstance(v, (int, float, str, bool))
            }
        else:
            sd = to_state_dict(obj)
        sd, stripped = _strip_module_prefix(sd)
        if stripped:
            info["stripped_prefix"] = "module."
        kind = _classify_state_dict(sd)
        if kind is None:
            raise UnrecognizedFileError(
                f"{p.name}: {_describe(obj)} whose {len(sd)} tensors match no known release file "
                f"(first keys: {list(sd)[:4]})"
            )
        if "class" in info and info["class"].rsplit(".", 1)[-1] not in (kind, "DataParallel"):
            info.setdefault("warnings", []).append(
                f"pickled class {info['class']} but the keys look like {kind}"
            )
        warnings = _shape_warnings(kind, sd)
        if warnings:
            info.setdefault("warnings", []).extend(warnings)
        info["num_tensors"] = len(sd)
        info["num_elements"] = int(sum(t.numel() for t in sd.values()))
        return kind, sd, info

    # transvob.pkl: 1-D integer array.
    if isinstance(obj, np.ndarray):
        if obj.ndim == 1 and obj.dtype.kind in "iu":
            t = torch.from_numpy(obj.astype(np.int64))
            unk = int(t.max()) if t.numel() else 0
            info.update(
                size=int(t.numel()),
                max_id=unk,
                num_mapped_to_max_id=int((t == unk).sum()),
                num_distinct_other_ids=int(torch.unique(t[t != unk]).numel()),
            )
            return "TRANSVOB", OrderedDict(transvob=t), info
        raise UnrecognizedFileError(f"{p.name}: {_describe(obj)} is not a transvob id map")

    if isinstance(obj, dict) and obj and all(_is_int_key(k) for k in obj):
        values = list(obj.values())
        # vocab.pkl: id -> word.
        if all(isinstance(v, str) for v in values):
            ix_to_word = {int(k): v for k, v in obj.items()}
            ids = sorted(ix_to_word)
            info.update(
                size=len(ix_to_word),
                min_id=ids[0],
                max_id=ids[-1],
                contiguous=ids == list(range(ids[0], ids[-1] + 1)),
                last_word=ix_to_word[ids[-1]],
                ix_to_word={str(i): ix_to_word[i] for i in ids},
            )
            return "VOCAB", OrderedDict(), info
        # memoryft_*.pkl: id -> vector.
        vecs = [_as_vector(v) for v in values]
        if all(v is not None for v in vecs):
            dims = {int(v.shape[0]) for v in vecs}  # type: ignore[union-attr]
            if len(dims) != 1:
                raise UnrecognizedFileError(f"{p.name}: memory vectors of several lengths {sorted(dims)}")
            dim = dims.pop()
            ids = [int(k) for k in obj]
            n = max(ids) + 1
            memory = torch.zeros(n, dim, dtype=torch.float32)
            present = torch.zeros(n, dtype=torch.bool)
            idx = torch.tensor(ids, dtype=torch.int64)
            memory[idx] = torch.from_numpy(np.stack(vecs).astype(np.float32))  # type: ignore[arg-type]
            present[idx] = True
            info.update(
                num_entries=len(ids),
                dim=dim,
                max_id=n - 1,
                source_dtype=str(vecs[0].dtype),  # type: ignore[union-attr]
                num_zero_vectors=int((memory[present].abs().sum(1) == 0).sum()),
            )
            return "MEMORY_FEATURES", OrderedDict(memory=memory, present=present), info
    raise UnrecognizedFileError(f"{p.name}: {_describe(obj)} matches no known release file")


# --------------------------------------------------------------------------------------------
# Loading MEM_TRANS into a module
# --------------------------------------------------------------------------------------------


def load_mem_trans(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load released ``MEM_TRANS`` weights into ``module`` (strict names and shapes).

    ``module`` must own parameters ``memory_emb_1.weight``, ``memory_emb_1.bias`` and
    ``memory_emb_2.weight`` and nothing else in its state_dict (e.g. the MATE ``MemoryProjection``;
    pass the submodule, not the whole text encoder).  Layers may be ``Conv1d`` (weights
    ``(out, in, 1)``, as released) or ``Linear`` (``(out, in)``); the kernel axis of size 1 is
    dropped/added as needed, no other reshaping is done.  Raises ``ValueError`` naming every
    missing/unexpected key or shape mismatch.  Returns ``module``.
    """
    target = module.state_dict()
    expected = set(MEM_TRANS_SHAPES)
    problems = []
    if set(target) != expected:
        problems.append(
            f"module state keys {sorted(target)} are not exactly {sorted(expected)} "
            "(pass the memory projection submodule itself)"
        )
    if set(state_dict) != expected:
        missing = sorted(expected - set(state_dict))
        extra = sorted(set(state_dict) - expected)
        problems.append(f"weights missing {missing} / unexpected {extra}")
    if problems:
        raise ValueError("cannot load MEM_TRANS weights: " + "; ".join(problems))
    converted = OrderedDict()
    for k in MEM_TRANS_SHAPES:
        src = state_dict[k]
        want = tuple(target[k].shape)
        if tuple(src.shape) != want:
            if src.dim() == 3 and src.shape[2] == 1 and tuple(src.shape[:2]) == want:
                src = src[:, :, 0]
            elif src.dim() == 2 and len(want) == 3 and want[2] == 1 and tuple(src.shape) == want[:2]:
                src = src.unsqueeze(-1)
            else:
                problems.append(f"{k}: weights {tuple(src.shape)} vs module {want}")
                continue
        converted[k] = src.to(dtype=target[k].dtype)
    if problems:
        raise ValueError("cannot load MEM_TRANS weights: shape mismatch: " + "; ".join(problems))
    with torch.no_grad():
        module.load_state_dict(converted, strict=True)
    return module


# --------------------------------------------------------------------------------------------
# Conversion to safetensors
# --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return sha256_file(path)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def _expand(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    seen: set[Path] = set()
    out = []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            out.append(f)
    return out


def import_official(paths: list[str] | list[Path], out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Convert every recognised release file under ``paths`` to safetensors + JSON sidecars.

    ``paths``: files and/or folders (searched recursively). Returns (and writes as
    ``out_dir/import_report.json``) ``{"out_dir", "converted": [{source, kind, sha256, outputs,
    tensors}], "skipped": [{source, reason}]}``.  Files whose suffix is not one of
    ``.pkl .pickle .pth .pt .bin .ckpt .tar`` are skipped unread; unreadable, unsafe or
    unrecognised files are skipped with the reason.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"out_dir": str(out), "converted": [], "skipped": []}
    used_stems: set[str] = set()
    for src in _expand(paths):
        if src.resolve().parent == out.resolve() and src.suffix in (".safetensors", ".json"):
            continue
        if src.suffix.lower() not in CANDIDATE_SUFFIXES:
            report["skipped"].append({"source": str(src), "reason": f"suffix {src.suffix or '(none)'!r} is not a pickle/torch file"})
            continue
        try:
            kind, sd, info = load_official(src)
        except UnsafePickleError as exc:
            report["skipped"].append({"source": str(src), "reason": f"unsafe pickle refused: {exc}"})
            continue
        except (PickleFormatError, UnrecognizedFileError, ValueError) as exc:
            report["skipped"].append({"source": str(src), "reason": str(exc)})
            continue
        stem = src.stem
        n = 1
        while stem in used_stems:
            stem = f"{src.stem}_{n}"
            n += 1
        used_stems.add(stem)
        sha = _sha256(src)
        tensors = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in sd.items()}
        outputs = []
        if sd:
            from safetensors.torch import save as st_save

            blob = st_save(
                {k: v.contiguous().clone() for k, v in sd.items()},
                metadata={"kind": kind, "source_file": src.name, "source_sha256": sha},
            )
            st_path = out / f"{stem}.safetensors"
            _atomic_write_bytes(st_path, blob)
            outputs.append(str(st_path))
        sidecar = {
            "format": "cpgan-official-import/1",
            "kind": kind,
            "source_file": src.name,
            "source_path": str(src.resolve()),
            "source_sha256": sha,
            "source_bytes": src.stat().st_size,
            "tensors": tensors,
            "info": info,
        }
        js_path = out / f"{stem}.json"
        _atomic_write_json(js_path, sidecar)
        outputs.append(str(js_path))
        report["converted"].append(
            {"source": str(src), "kind": kind, "sha256": sha, "outputs": outputs, "tensors": tensors}
        )
    _atomic_write_json(out / "import_report.json", report)
    return report


def cli_import_official(argv: list[str] | None = None) -> int:
    """``cpgan import-official PATH... --out DIR``: convert, print a summary, return an exit code."""
    ap = argparse.ArgumentParser(prog="cpgan import-official", description=import_official.__doc__)
    ap.add_argument("paths", nargs="+", help="release files or folders")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    try:
        report = import_official(args.paths, args.out)
    except FileNotFoundError as exc:
        print(f"error: {exc}")
        return 2
    for c in report["converted"]:
        print(f"converted {c['source']} -> {c['kind']}: {', '.join(c['outputs'])}")
    for s in report["skipped"]:
        print(f"skipped {s['source']}: {s['reason']}")
    return 0 if report["converted"] else 1
