"""Atomic, pickle-free checkpoints (DESIGN §8).

* :func:`save_weights` / :func:`load_weights`: a model's ``state_dict`` as safetensors plus a JSON sidecar
  (config, vocabulary hash, step, ...) — what later stages and users load.
* :func:`save_state` / :func:`load_state`: a whole training state (models, optimisers, RNG states, step,
  history) as ONE safetensors file. Nested Python structures are flattened: tensors go into the file's
  tensor table, everything else (ints, floats, strings, lists, dicts) into a JSON "skeleton" stored in the
  safetensors metadata. Loading never unpickles anything.

Every write goes to a temporary file in the same folder, is fsync'ed, then renamed over the target, so a
kill at any moment leaves either the old file or the new one, never a torn one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

_SKELETON_KEY = "cpgan_skeleton"
_TENSOR_TAG = "__tensor__"


from .atomic import atomic_write, atomic_write_json, atomic_write_text, fsync_dir  # noqa: F401 (re-exported)


# --------------------------------------------------------------------------------------------------
# Weights: safetensors + JSON sidecar
# --------------------------------------------------------------------------------------------------
def _tensor_table(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; clone to contiguous CPU tensors.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def save_weights(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Write ``state_dict`` to ``path`` (.safetensors) and ``meta`` to the ``.json`` sidecar, atomically."""
    table = _tensor_table(state_dict)
    atomic_write(path, lambda tmp: save_file(table, tmp))
    atomic_write_json(sidecar_path(path), meta or {})


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read weights written by :func:`save_weights`; returns ``(state_dict, meta)``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file '{path}' not found; run the stage that produces it first")
    try:
        sd = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"'{path}' is not a readable safetensors file ({e}); re-run the stage that wrote it") from None
    side = sidecar_path(path)
    meta = json.loads(side.read_text()) if side.exists() else {}
    return sd, meta


# --------------------------------------------------------------------------------------------------
# Whole training states
# --------------------------------------------------------------------------------------------------
def check_state_dict(own: dict[str, torch.Tensor], given: dict[str, torch.Tensor], what: str, hint: str,
                     optional: tuple[str, ...] = ()) -> None:
    """Raise a one-line ``ValueError`` unless ``given`` has every key of ``own`` (keys starting with one of the
    ``optional`` prefixes may be absent), no other key, and ``own``'s shapes; ``hint`` says what to check."""
    missing = sorted(k for k in own if k not in given and not k.startswith(optional))
    unexpected = sorted(k for k in given if k not in own)
    if missing or unexpected:
        raise ValueError(f"weights do not fit {what}: {len(missing)} keys missing (e.g. {missing[:3]}), "
                         f"unexpected keys {unexpected[:3]}; {hint}")
    for key, value in given.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"weights key {key!r} has shape {tuple(value.shape)} but {what} has "
                             f"{tuple(own[key].shape)}; {hint}")


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = prefix or "root"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {_TENSOR_TAG: key}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out[str(k)] = _flatten(v, f"{prefix}/{k}" if prefix else str(k), tensors)
        # Keep the key types (optimizer states use int keys).
        if any(not isinstance(k, str) for k in obj):
            return {"__dict_items__": [[_key_repr(k), out[str(k)]] for k in obj]}
        return out
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint value of type {type(obj).__name__} at '{prefix}'")


def _key_repr(k: Any) -> Any:
    if isinstance(k, (int, str, float, bool)) or k is None:
        return k
    raise TypeError(f"cannot checkpoint dict key of type {type(k).__name__}")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR_TAG}:
            return tensors[obj[_TENSOR_TAG]]
        if set(obj) == {"__tuple__"}:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__dict_items__"}:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict_items__"]}
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(path: str | os.PathLike, state: dict) -> None:
    """Write a nested training state (tensors + plain values) to one safetensors file, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "", tensors)
    meta = {_SKELETON_KEY: json.dumps(skeleton)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """Read a state written by :func:`save_state`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint '{path}' not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint '{path}' is unreadable ({e}); delete it to restart the stage") from None
    if _SKELETON_KEY not in meta:
        raise ValueError(f"'{path}' is a safetensors file but not a cpgan training state")
    return _unflatten(json.loads(meta[_SKELETON_KEY]), tensors)


# --------------------------------------------------------------------------------------------------
# RNG states (exact resume)
# --------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """The global torch RNG states (CPU and, when present, CUDA)."""
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"].to(torch.uint8))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in st["cuda"]])
