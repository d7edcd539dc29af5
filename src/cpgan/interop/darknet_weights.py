"""Read and write Darknet ``.weights`` files for :class:`cpgan.models.darknet.Darknet` (REFERENCE.md §2).

Layout (little-endian, no padding, no per-layer markers; pjreddie/darknet src/parser.c ``load_weights_upto``,
``load_convolutional_weights``, ``save_weights_upto``)::

    int32 major, int32 minor, int32 revision
    seen: uint64 if (major*10 + minor) >= 2 and major < 1000 and minor < 1000   (pjreddie's rule; 20-byte header)
          int32  otherwise                                                     (16-byte header)
    for each [convolutional] layer with index < cutoff, in cfg order (layers with dontload=1 are skipped):
        float32 biases[filters]          BN beta with batch_normalize=1, else the conv bias
        if batch_normalize and not dontloadscales:
            float32 scales[filters]      BN gamma
            float32 rolling_mean[filters]
            float32 rolling_variance[filters]
        float32 weights[filters * (c/groups) * size * size]   (out, in, kh, kw) order

Nothing in the file says which cfg it belongs to, so the reader checks that the float count matches the cfg
exactly (a mismatch would otherwise load silently into the wrong layers) and explains a mismatch.  Backbone
prefixes are supported: ``cutoff=74`` (``darknet53.conv.74`` for yolov3.cfg), or inferred when the file holds
exactly the first k conv layers of the cfg.

Known sizes (REFERENCE §2.2): yolov3.weights 62,001,757 floats / 248,007,048 bytes; yolov3-tiny.weights
8,858,734 / 35,434,956; darknet53.conv.74 40,620,640 / 162,482,580.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["count_weights", "read_header", "read_weights", "write_weights", "conv_float_counts"]


def _conv_layers(model: nn.Module) -> list[tuple[int, Any]]:
    convs = getattr(model, "conv_layers", None)
    if convs is None:
        raise TypeError(f"expected a cpgan Darknet model (with .conv_layers), got {type(model).__name__}.")
    return list(convs)


def _tensors(block: Any, reading: bool) -> list[torch.Tensor]:
    """Tensors of one conv block in file order (``reading``: honour ``dontloadscales`` like darknet's loader)."""
    if block.bn is not None:
        if reading and block.dontloadscales:
            return [block.bn.bias, block.conv.weight]
        return [block.bn.bias, block.bn.weight, block.bn.running_mean, block.bn.running_var, block.conv.weight]
    return [block.conv.bias, block.conv.weight]


def conv_float_counts(model: nn.Module, reading: bool = True) -> list[tuple[int, int]]:
    """``(layer_index, float32 count)`` of every conv layer in cfg order (0 for ``dontload`` layers when reading)."""
    out = []
    for idx, block in _conv_layers(model):
        n = 0 if (reading and block.dontload) else sum(t.numel() for t in _tensors(block, reading))
        out.append((idx, n))
    return out


def count_weights(model: nn.Module, cutoff: int | None = None) -> int:
    """Number of float32 values the reader consumes for layers ``< cutoff`` (all layers when ``None``)."""
    return sum(n for idx, n in conv_float_counts(model) if cutoff is None or idx < cutoff)


def read_header(path: str | Path) -> dict[str, int]:
    """Header of a ``.weights`` file: ``major, minor, revision, seen, header_bytes``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Darknet weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 16:
        raise ValueError(f"{path}: {len(head)} bytes is too short for a Darknet .weights header (16-20 bytes).")
    major, minor, revision = struct.unpack("<3i", head[:12])
    if major * 10 + minor >= 2 and major < 1000 and minor < 1000:
        if len(head) < 20:
            raise ValueError(f"{path}: version {major}.{minor} needs a 20-byte header but the file has {len(head)} bytes.")
        (seen,) = struct.unpack("<Q", head[12:20])
        hbytes = 20
    else:
        (seen,) = struct.unpack("<i", head[12:16])
        hbytes = 16
    return {"major": major, "minor": minor, "revision": revision, "seen": int(seen), "header_bytes": hbytes}


def read_weights(model: nn.Module, path: str | Path, cutoff: int | None = None, strict: bool = True) -> dict[str, Any]:
    """Load a Darknet ``.weights`` file into ``model`` (a :class:`~cpgan.models.darknet.Darknet`), in place.

    Args:
        cutoff: load only layers with index ``< cutoff`` (darknet's ``load_weights_upto``), e.g. 74 for
            ``darknet53.conv.74``.  ``None``: the whole cfg, or, when the file holds exactly the first k conv
            layers, those k (a backbone prefix).
        strict: with a ``cutoff``, require the file to end exactly after layer ``cutoff - 1``; ``False`` allows
            a longer file (e.g. the backbone of a full ``yolov3.weights``) and ignores the rest.

    Returns the header fields plus ``convs_loaded`` (number of conv layers filled), ``last_layer`` (index of the
    last filled layer, -1 if none) and ``floats`` (values consumed).

    Raises ``ValueError`` (expected vs found float counts and the likely cause) when the file does not fit the cfg.
    """
    path = Path(path)
    hdr = read_header(path)
    size = path.stat().st_size
    body = size - hdr["header_bytes"]
    if body % 4:
        raise ValueError(
            f"{path}: {body} bytes after the {hdr['header_bytes']}-byte header is not a whole number of float32 "
            "values; the file is truncated or not a Darknet .weights file."
        )
    found = body // 4
    counts = conv_float_counts(model)
    full = sum(n for _, n in counts)
    if cutoff is not None:
        limit_idx = cutoff
        needed = sum(n for idx, n in counts if idx < cutoff)
        if found < needed or (strict and found != needed):
            cause = (
                "the file is truncated or belongs to a smaller network / another cfg"
                if found < needed
                else "the file holds more layers than the cutoff (pass strict=False to ignore the rest) or belongs to another cfg"
            )
            raise ValueError(
                f"{path}: expected {needed} float32 values for layers < {cutoff} of the cfg, found {found}; {cause}."
            )
    else:
        if found == full:
            limit_idx = None
            needed = full
        else:
            cum, prefix = 0, None
            for k, (idx, n) in enumerate(counts):
                cum += n
                if n and cum == found and k < len(counts) - 1:
                    prefix = idx + 1
                    break
            if prefix is None:
                if found < full:
                    cause = (
                        "the file is truncated, or it belongs to a cfg with fewer/smaller layers (e.g. other 'classes' "
                        "or 'filters'); a backbone file must end at a conv layer boundary (e.g. darknet53.conv.74: cutoff=74)"
                    )
                else:
                    cause = (
                        "the file belongs to a bigger network (e.g. more 'classes' or 'filters', or another cfg), "
                        "or its header version is wrong"
                    )
                raise ValueError(f"{path}: expected {full} float32 values for the cfg, found {found}; {cause}.")
            limit_idx, needed = prefix, found

    data = np.memmap(path, dtype="<f4", mode="r", offset=hdr["header_bytes"], shape=(found,)) if found else np.zeros(0, "<f4")
    ptr, loaded, last = 0, 0, -1
    with torch.no_grad():
        for idx, block in _conv_layers(model):
            if limit_idx is not None and idx >= limit_idx:
                break
            if block.dontload:
                continue
            for t in _tensors(block, reading=True):
                n = t.numel()
                chunk = np.array(data[ptr : ptr + n], dtype=np.float32)
                t.copy_(torch.from_numpy(chunk).view_as(t))
                ptr += n
            loaded += 1
            last = idx
    del data
    if ptr != needed:  # internal consistency; cannot happen when the counts above agree
        raise ValueError(f"{path}: consumed {ptr} float32 values but expected {needed}.")
    return {**hdr, "convs_loaded": loaded, "last_layer": last, "floats": ptr}


def write_weights(
    model: nn.Module,
    path: str | Path,
    header: tuple[int, int, int] = (0, 2, 0),
    seen: int = 0,
    cutoff: int | None = None,
) -> int:
    """Write ``model`` as a Darknet ``.weights`` file (layers ``< cutoff``, all when ``None``); returns bytes written.

    ``header = (major, minor, revision)``; ``seen`` (images seen) is written as uint64 for version >= 0.2 (pjreddie
    writes 0.2.0), else int32.  Layers are streamed one by one and the file is replaced atomically (temp file,
    fsync, rename).  Like darknet's ``save_weights``, ``dontload``/``dontloadscales`` flags are not applied.
    """
    major, minor, revision = (int(v) for v in header)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    wide = major * 10 + minor >= 2 and major < 1000 and minor < 1000
    written = 0
    with open(tmp, "wb") as f:
        f.write(struct.pack("<3i", major, minor, revision))
        f.write(struct.pack("<Q", int(seen)) if wide else struct.pack("<i", int(seen)))
        written += 20 if wide else 16
        for idx, block in _conv_layers(model):
            if cutoff is not None and idx >= cutoff:
                break
            for t in _tensors(block, reading=False):
                buf = t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()
                f.write(buf)
                written += len(buf)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return written
