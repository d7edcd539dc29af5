"""Restricted unpickling of PyTorch files and plain Python pickles (no code execution).

The CPGAN authors released whole pickled PyTorch-1.0 modules (``NET_T.pkl``, ``Text_Encoder.pkl``,
``NET_G.pkl``: Python-2 pickles inside the *legacy* torch container) and plain Python-2 pickles
(``vocab.pkl``, ``transvob.pkl``, ``memoryft_9487.pkl``).  ``torch.load`` cannot read the whole
modules without the authors' ``model`` package, and ``pickle.load`` on an untrusted file executes
whatever callables the file names.  This module reads all of these formats with a
:class:`pickle.Unpickler` whose ``find_class`` resolves only an allow-list of globals, every one of
them mapped to an *inert* replacement written here:

* ``collections.OrderedDict``, ``builtins.set`` / ``frozenset`` (plain containers),
  ``_codecs.encode`` (how Python 3 protocol-2 pickles spell ``bytes``; only ``latin1`` accepted);
* ``torch._utils._rebuild_tensor`` / ``_rebuild_tensor_v2`` / ``_rebuild_parameter`` /
  ``_rebuild_parameter_with_state`` -> local functions that make a strided view of a storage that
  this module allocated itself (never torch's own functions);
* ``torch.<Dtype>Storage`` -> a marker carrying the dtype;
* module classes of the authors' code (top-level modules ``model`` and ``GlobalAttention``) and
  ``torch.nn.modules.*`` -> dynamically created :class:`InertModule` subclasses that only record
  their pickled ``__dict__``;
* ``torch.nn.backends.thnn._get_thnn_function_backend`` (the torch-1.0 ``_backend`` attribute) ->
  a function returning an :class:`InertObject`;
* numpy array reconstruction (``numpy[._]core.multiarray._reconstruct`` / ``scalar``,
  ``numpy[._]core.numeric._frombuffer``, ``numpy.ndarray``, ``numpy.dtype``) -> stand-ins, turned
  into real arrays afterwards from the raw bytes, for plain numeric dtypes only.

Anything else raises :class:`UnsafePickleError` naming the refused global, *before* it could be
called.  ``torch.load`` is never used.

Containers understood (see ``torch/serialization.py`` for the writers):

* legacy torch (``torch.save(..., _use_new_zipfile_serialization=False)`` and every file written by
  torch < 1.6): pickled magic number ``0x1950a86a20f9469cfc6c``, protocol version 1001, ``sys_info``
  dict, the object pickle (storages as persistent ids ``('storage', StorageType, key, location,
  numel, view_metadata)``; module classes as ``('module', cls, source_file, source)``), the pickled
  list of storage keys, then per key an int64 element count and the raw bytes;
* zip torch (torch >= 1.6 default): ``<prefix>/data.pkl`` with persistent ids ``('storage',
  StorageType, key, location, numel)`` and raw bytes in ``<prefix>/data/<key>``;
* plain pickles (protocols 0-5, Python 2 or 3).

Python-2 byte strings are decoded with ``encoding="latin1"`` (bytes are recovered losslessly with
``str.encode("latin1")`` where raw data is expected).  Storages saved on ``cuda:N`` are read into
CPU memory (the location is only recorded).
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

__all__ = [
    "UnsafePickleError",
    "PickleFormatError",
    "InertObject",
    "InertModule",
    "LoadResult",
    "restricted_load",
    "restricted_loads",
    "module_state_dict",
    "to_state_dict",
    "TORCH_LEGACY_MAGIC",
]

TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
TORCH_LEGACY_PROTOCOL = 1001


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a global outside the allow-list (nothing was executed)."""


class PickleFormatError(ValueError):
    """The file is not a well-formed pickle / torch container of a supported kind."""


# --------------------------------------------------------------------------------------------
# Inert stand-ins
# --------------------------------------------------------------------------------------------


class InertObject:
    """Stand-in for an object of a non-allow-listed-but-known class: records args and state only.

    Attributes: ``qualname`` (``"module.Class"`` of the original global), ``args`` (constructor
    arguments, if the pickle called it), ``state`` (the dict given to ``BUILD``).
    """

    qualname: str = "<inert>"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["args"] = args
        self.__dict__["kwargs"] = kwargs
        self.__dict__.setdefault("state", {})

    def __setstate__(self, state: Any) -> None:
        # BUILD: ``state`` or ``(state, slotstate)``; both dicts (or None) for the objects we read.
        merged: dict[str, Any] = {}
        parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
        for part in parts:
            if part is None:
                continue
            if not isinstance(part, dict):
                raise PickleFormatError(
                    f"unexpected pickled state of type {type(part).__name__} for {self.qualname}"
                )
            merged.update(part)
        self.__dict__.setdefault("args", ())
        self.__dict__.setdefault("kwargs", {})
        self.__dict__["state"] = merged

    def __repr__(self) -> str:
        return f"<inert {self.qualname}>"


class InertModule(InertObject):
    """Stand-in for a pickled ``nn.Module`` subclass; ``state`` holds its pickled ``__dict__``."""

    @property
    def children(self) -> "OrderedDict[str, InertModule]":
        mods = self.state.get("_modules") or {}
        return OrderedDict((k, v) for k, v in mods.items() if v is not None)


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: torch.dtype


_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _NumpyDType:
    """Stand-in for ``numpy.dtype(obj, align, copy)``; BUILD gives ``(version, byteorder, ...)``."""

    def __init__(self, obj: Any, align: Any = False, copy: Any = False) -> None:
        self.obj = obj
        self.byteorder = "|"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) >= 2 and isinstance(state[1], str):
            self.byteorder = state[1]
        if isinstance(state, tuple) and len(state) >= 3 and state[2] is not None:
            raise PickleFormatError("structured numpy dtypes are not supported")

    def resolve(self) -> np.dtype:
        code = self.obj.decode("latin1") if isinstance(self.obj, bytes) else self.obj
        if not isinstance(code, str) or not re.fullmatch(r"[fiub?][1248]?", code):
            raise PickleFormatError(f"numpy dtype {code!r} is not a plain numeric dtype")
        order = self.byteorder if self.byteorder in "<>" else "="
        return np.dtype(order + code if code != "?" else code)


def _raw_bytes(data: Any) -> bytes:
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, str):  # Python-2 str read with encoding="latin1"
        return data.encode("latin1")
    raise PickleFormatError(f"expected raw array bytes, got {type(data).__name__}")


class _Marker:
    """A named, non-callable placeholder for an allowed global that is only ever an argument."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<marker {self.name}>"


_NDARRAY_MARKER = _Marker("numpy.ndarray")


class _NumpyArray:
    """Stand-in for ``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`` + BUILD."""

    def __init__(self, *args: Any) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        # ndarray.__setstate__: (version, shape, dtype, is_fortran, data) or without version.
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise PickleFormatError("unexpected numpy array state")
        if len(state) == 5:
            state = state[1:]
        shape, dtype, is_fortran, data = state
        if not isinstance(dtype, _NumpyDType):
            raise PickleFormatError("numpy array without a plain dtype")
        dt = dtype.resolve()
        if isinstance(data, list):
            raise PickleFormatError("object numpy arrays are not supported")
        raw = _raw_bytes(data)
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) * dt.itemsize != len(raw):
            raise PickleFormatError("numpy array byte count does not match its shape")
        arr = np.frombuffer(raw, dtype=dt).reshape(shape, order="F" if is_fortran else "C")
        self.array = np.array(arr, dtype=dt.newbyteorder("="), order="C")


def _numpy_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if not isinstance(dtype, _NumpyDType):
        raise PickleFormatError("numpy buffer without a plain dtype")
    dt = dtype.resolve()
    raw = _raw_bytes(buf)
    shape = tuple(int(s) for s in shape)
    if math.prod(shape) * dt.itemsize != len(raw):
        raise PickleFormatError("numpy buffer byte count does not match its shape")
    arr = np.frombuffer(raw, dtype=dt).reshape(shape, order="F" if order == "F" else "C")
    return np.array(arr, dtype=dt.newbyteorder("="), order="C")


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, _NumpyDType):
        raise PickleFormatError("numpy scalar without a plain dtype")
    dt = dtype.resolve()
    raw = _raw_bytes(data)
    if len(raw) != dt.itemsize:
        raise PickleFormatError("numpy scalar byte count does not match its dtype")
    return np.frombuffer(raw, dtype=dt)[0].astype(dt.newbyteorder("="))


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode is only allowed as the latin1 bytes idiom")
    return text.encode("latin1")


def _thnn_backend(*args: Any) -> InertObject:
    obj = InertObject()
    obj.__dict__["qualname"] = "torch.nn.backends.thnn._get_thnn_function_backend()"
    return obj


# --------------------------------------------------------------------------------------------
# Tensor rebuilding on storages allocated here
# --------------------------------------------------------------------------------------------


class _Storage:
    """A flat CPU buffer for one pickled storage, filled from the file after the pickle is read."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int, location: str) -> None:
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.location = location
        self.flat = torch.empty(numel, dtype=dtype)
        self.filled = False


def _check_view(numel: int, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(
        st < 0 for st in stride
    ):
        raise PickleFormatError(f"invalid tensor geometry size={size} stride={stride}")
    if math.prod(size) == 0:
        return
    extent = offset + sum((s - 1) * st for s, st in zip(size, stride))
    if extent >= numel:
        raise PickleFormatError(
            f"tensor view (offset {offset}, size {size}, stride {stride}) exceeds its storage "
            f"of {numel} elements"
        )


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise PickleFormatError("tensor rebuilt from something that is not a pickled storage")
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    offset = int(storage_offset)
    _check_view(storage.numel, offset, size, stride)
    return storage.flat.as_strided(size, stride, offset)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None, *rest: Any) -> Any:
    if not isinstance(data, torch.Tensor):
        raise PickleFormatError("parameter rebuilt from something that is not a tensor")
    return data


def _stand_in_factory() -> Callable[[str, str], type]:
    cache: dict[tuple[str, str], type] = {}

    def make(module: str, name: str) -> type:
        key = (module, name)
        if key not in cache:
            cache[key] = type(
                name,
                (InertModule,),
                {"qualname": f"{module}.{name}", "__module__": __name__ + ".standins"},
            )
        return cache[key]

    return make


# --------------------------------------------------------------------------------------------
# The restricted unpickler
# --------------------------------------------------------------------------------------------

_MODULE_CLASS_ROOTS = ("model", "GlobalAttention")
_BUILTINS = ("builtins", "__builtin__")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(
        self,
        file: BinaryIO,
        *,
        make_stand_in: Callable[[str, str], type],
        persistent: Callable[[Any], Any] | None,
        globals_seen: set[str],
        module_roots: tuple[str, ...],
    ) -> None:
        super().__init__(file, encoding="latin1")
        self._make_stand_in = make_stand_in
        self._persistent = persistent
        self._globals_seen = globals_seen
        self._module_roots = module_roots

    def find_class(self, module: str, name: str) -> Any:  # noqa: C901 - one flat allow-list
        qual = f"{module}.{name}"
        self._globals_seen.add(qual)
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module in _BUILTINS and name == "set":
            return set
        if module in _BUILTINS and name == "frozenset":
            return frozenset
        if module == "_codecs" and name == "encode":
            return _codecs_encode
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "torch.nn.backends.thnn" and name == "_get_thnn_function_backend":
            return _thnn_backend
        if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            if name == "_reconstruct":
                return _NumpyArray
            if name == "scalar":
                return _numpy_scalar
        if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
            return _numpy_frombuffer
        if module == "numpy" and name == "dtype":
            return _NumpyDType
        if module == "numpy" and name == "ndarray":
            return _NDARRAY_MARKER  # only ever passed as the first argument of _reconstruct
        if _IDENT.match(name) and (
            module in self._module_roots
            or any(module.startswith(root + ".") for root in self._module_roots)
            or module.startswith("torch.nn.modules.")
        ):
            return self._make_stand_in(module, name)
        raise UnsafePickleError(
            f"refused to load global '{qual}': it is not in the restricted unpickler's allow-list "
            "(tensors, containers, and module classes only); the file may be malicious or of an "
            "unsupported kind"
        )

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise UnsafePickleError("persistent id in a plain pickle (not a torch file): refused")
        return self._persistent(pid)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """Outcome of :func:`restricted_load`.

    ``obj``: the unpickled object (tensors as CPU ``torch.Tensor``, numpy arrays as ``np.ndarray``,
    module instances as :class:`InertModule`); ``container``: ``"torch-legacy"``, ``"torch-zip"`` or
    ``"pickle"``; ``pickle_protocol``: protocol of the main pickle; ``globals``: every global the
    file referenced (sorted); ``storages``: ``[{key, dtype, numel, location}]``; ``sys_info``: the
    legacy container's header dict.
    """

    obj: Any
    container: str
    pickle_protocol: int
    globals: list[str] = field(default_factory=list)
    storages: list[dict[str, Any]] = field(default_factory=list)
    sys_info: dict[str, Any] | None = None


def _protocol_of(head: bytes) -> int:
    return head[1] if len(head) >= 2 and head[0] == 0x80 else 0


def _to_str(x: Any) -> str:
    return x.decode("latin1") if isinstance(x, (bytes, bytearray)) else str(x)


def _finalize(obj: Any) -> Any:
    """Replace numpy stand-ins by arrays, recursively (memoised, containers rebuilt as needed)."""
    memo: dict[int, Any] = {}

    def walk(x: Any, depth: int) -> Any:
        if depth > 500:
            raise PickleFormatError("pickled object nested too deeply")
        if isinstance(x, (str, bytes, int, float, bool, type(None), torch.Tensor, np.ndarray)):
            return x
        key = id(x)
        if key in memo:
            return memo[key]
        if isinstance(x, _NumpyArray):
            if x.array is None:
                raise PickleFormatError("numpy array without data")
            memo[key] = x.array
            return x.array
        if isinstance(x, dict):
            memo[key] = x
            for k in list(x.keys()):
                x[k] = walk(x[k], depth + 1)
            return x
        if isinstance(x, list):
            memo[key] = x
            for i, v in enumerate(x):
                x[i] = walk(v, depth + 1)
            return x
        if isinstance(x, tuple):
            out = tuple(walk(v, depth + 1) for v in x)
            memo[key] = out
            return out
        if isinstance(x, InertObject):
            memo[key] = x
            x.__dict__["state"] = walk(x.state, depth + 1)
            return x
        return x

    return walk(obj, 0)


def _read_exact_into(f: BinaryIO, view: memoryview, what: str) -> None:
    got = 0
    n = len(view)
    while got < n:
        k = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not k:
            raise PickleFormatError(f"file truncated while reading {what}")
        got += k


def _byteswap_(flat: torch.Tensor) -> None:
    es = flat.element_size()
    if es > 1 and flat.numel():
        u8 = flat.view(torch.uint8).view(-1, es)
        u8.copy_(u8.flip(1))


def _load_legacy(f: BinaryIO, size: int, head_proto: int, common: dict[str, Any]) -> LoadResult:
    seen: set[str] = common["globals_seen"]
    make = common["make_stand_in"]
    roots = common["module_roots"]

    def plain() -> _RestrictedUnpickler:
        return _RestrictedUnpickler(
            f, make_stand_in=make, persistent=None, globals_seen=seen, module_roots=roots
        )

    protocol_version = plain().load()
    if protocol_version != TORCH_LEGACY_PROTOCOL:
        raise PickleFormatError(f"unsupported legacy torch protocol version {protocol_version!r}")
    sys_info = plain().load()
    if not isinstance(sys_info, dict):
        raise PickleFormatError("legacy torch file without a sys_info header")
    little = bool(sys_info.get("little_endian", True))

    storages: dict[str, _Storage] = {}
    views: dict[str, _Storage] = {}
    allocated = [0]

    def persistent(pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise PickleFormatError("malformed persistent id")
        kind = _to_str(pid[0])
        if kind == "module":
            cls = pid[1]
            if not (isinstance(cls, type) and issubclass(cls, InertModule)):
                raise UnsafePickleError("module persistent id does not name an allowed module class")
            return cls
        if kind == "storage" and len(pid) == 6:
            stype, key, location, numel, view_meta = pid[1:]
            if not isinstance(stype, _StorageType):
                raise UnsafePickleError("storage persistent id without an allowed storage type")
            key, location, numel = _to_str(key), _to_str(location), int(numel)
            if key not in storages:
                nbytes = numel * torch.empty((), dtype=stype.dtype).element_size()
                allocated[0] += nbytes
                if numel < 0 or allocated[0] > size:  # storages cannot hold more bytes than the file
                    raise PickleFormatError(f"storage {key} claims {numel} elements, more than the file holds")
                storages[key] = _Storage(key, stype.dtype, numel, location)
            root = storages[key]
            if root.dtype != stype.dtype:
                raise PickleFormatError(f"storage {key} used with two dtypes")
            if view_meta is None:
                return root
            view_key, offset, view_size = _to_str(view_meta[0]), int(view_meta[1]), int(view_meta[2])
            if view_key not in views:
                if offset < 0 or offset + view_size > root.numel:
                    raise PickleFormatError(f"storage view {view_key} out of bounds")
                v = _Storage.__new__(_Storage)
                v.key, v.dtype, v.numel, v.location = view_key, root.dtype, view_size, root.location
                v.flat = root.flat[offset : offset + view_size]
                v.filled = True
                views[view_key] = v
            return views[view_key]
        raise PickleFormatError(f"unknown persistent id kind {kind!r}")

    obj = _RestrictedUnpickler(
        f, make_stand_in=make, persistent=persistent, globals_seen=seen, module_roots=roots
    ).load()
    keys = plain().load()
    if not isinstance(keys, list):
        raise PickleFormatError("legacy torch file without a storage key list")
    for key in keys:
        key = _to_str(key)
        if key not in storages:
            raise PickleFormatError(f"storage data for unknown key {key!r}")
        st = storages[key]
        header = f.read(8)
        if len(header) != 8:
            raise PickleFormatError(f"file truncated before storage {key}")
        numel = int.from_bytes(header, "little" if little else "big", signed=True)
        if numel != st.numel:
            raise PickleFormatError(f"storage {key}: header says {numel} elements, pickle says {st.numel}")
        if numel:
            _read_exact_into(f, memoryview(st.flat.view(torch.uint8).numpy()), f"storage {key}")
        if not little:
            _byteswap_(st.flat)
        st.filled = True
    missing = [k for k, s in storages.items() if not s.filled]
    if missing:
        raise PickleFormatError(f"no data for storages {missing}")
    return LoadResult(
        obj=_finalize(obj),
        container="torch-legacy",
        pickle_protocol=head_proto,
        globals=sorted(seen),
        storages=[
            {"key": s.key, "dtype": str(s.dtype).replace("torch.", ""), "numel": s.numel, "location": s.location}
            for s in storages.values()
        ],
        sys_info=sys_info,
    )


def _load_zip(path_or_buf: Any, common: dict[str, Any]) -> LoadResult:
    seen: set[str] = common["globals_seen"]
    try:
        zf = zipfile.ZipFile(path_or_buf)
    except zipfile.BadZipFile as exc:
        raise PickleFormatError(f"corrupt zip container: {exc}") from None
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise PickleFormatError("zip file is not a torch checkpoint (no single data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        little = True
        if prefix + "byteorder" in names:
            little = zf.read(prefix + "byteorder").strip() != b"big"
        storages: dict[str, _Storage] = {}

        def persistent(pid: Any) -> Any:
            if not isinstance(pid, tuple) or len(pid) != 5 or _to_str(pid[0]) != "storage":
                raise PickleFormatError("malformed persistent id in zip checkpoint")
            stype, key, location, numel = pid[1], _to_str(pid[2]), _to_str(pid[3]), int(pid[4])
            if not isinstance(stype, _StorageType):
                raise UnsafePickleError("storage persistent id without an allowed storage type")
            if key in storages:
                return storages[key]
            rec = f"{prefix}data/{key}"
            try:
                info = zf.getinfo(rec)
            except KeyError:
                raise PickleFormatError(f"zip checkpoint lacks the record {rec}") from None
            st = _Storage(key, stype.dtype, numel, location)
            nbytes = numel * st.flat.element_size()
            if info.file_size != nbytes:
                raise PickleFormatError(f"storage {key}: {info.file_size} bytes for {numel} elements")
            if nbytes:
                with zf.open(rec) as src:
                    _read_exact_into(src, memoryview(st.flat.view(torch.uint8).numpy()), rec)
            if not little:
                _byteswap_(st.flat)
            st.filled = True
            storages[key] = st
            return st

        data = zf.read(pkl[0])
        obj = _RestrictedUnpickler(
            io.BytesIO(data),
            make_stand_in=common["make_stand_in"],
            persistent=persistent,
            globals_seen=seen,
            module_roots=common["module_roots"],
        ).load()
    return LoadResult(
        obj=_finalize(obj),
        container="torch-zip",
        pickle_protocol=_protocol_of(data[:2]),
        globals=sorted(seen),
        storages=[
            {"key": s.key, "dtype": str(s.dtype).replace("torch.", ""), "numel": s.numel, "location": s.location}
            for s in storages.values()
        ],
    )


def _load_stream(f: BinaryIO, size: int, extra_module_roots: tuple[str, ...]) -> LoadResult:
    common = {
        "globals_seen": set(),
        "make_stand_in": _stand_in_factory(),
        "module_roots": _MODULE_CLASS_ROOTS + tuple(extra_module_roots),
    }
    start = f.tell()
    head = f.read(4)
    f.seek(start)
    if head == b"PK\x03\x04":
        return _load_zip(f, common)
    if not head:
        raise PickleFormatError("empty file")
    first = _RestrictedUnpickler(
        f,
        make_stand_in=common["make_stand_in"],
        persistent=None,
        globals_seen=common["globals_seen"],
        module_roots=common["module_roots"],
    )
    try:
        obj = first.load()
    except UnsafePickleError:
        raise
    except PickleFormatError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, UnicodeDecodeError, OverflowError, MemoryError, RecursionError) as exc:
        raise PickleFormatError(f"not a readable pickle ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, int) and not isinstance(obj, bool) and obj == TORCH_LEGACY_MAGIC:
        try:
            return _load_legacy(f, size, _protocol_of(head), common)
        except (UnsafePickleError, PickleFormatError):
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
                AttributeError, UnicodeDecodeError, OverflowError, RuntimeError) as exc:
            raise PickleFormatError(f"corrupt legacy torch file ({type(exc).__name__}: {exc})") from None
    return LoadResult(
        obj=_finalize(obj),
        container="pickle",
        pickle_protocol=_protocol_of(head),
        globals=sorted(common["globals_seen"]),
    )


def restricted_load(path: str | os.PathLike[str], *, extra_module_roots: tuple[str, ...] = ()) -> LoadResult:
    """Read a torch file (legacy or zip container) or a plain pickle without executing code.

    ``extra_module_roots``: further top-level module names whose classes may be read as
    :class:`InertModule` stand-ins (default: ``model``, ``GlobalAttention``, ``torch.nn.modules``).
    Raises :class:`UnsafePickleError` for a refused global, :class:`PickleFormatError` for a
    malformed file, ``FileNotFoundError`` for a missing one.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"no such file: {p}")
    size = os.path.getsize(p)
    with open(p, "rb") as f:
        return _load_stream(f, size, tuple(extra_module_roots))


def restricted_loads(data: bytes, *, extra_module_roots: tuple[str, ...] = ()) -> LoadResult:
    """Like :func:`restricted_load`, for bytes in memory."""
    return _load_stream(io.BytesIO(data), len(data), tuple(extra_module_roots))


# --------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------


def module_state_dict(root: InertModule) -> "OrderedDict[str, torch.Tensor]":
    """Flat state_dict of a pickled module, in ``nn.Module.state_dict`` order.

    Walks ``_parameters`` (``None`` entries skipped), ``_buffers`` (minus
    ``_non_persistent_buffers_set``) and ``_modules`` recursively; every other attribute (e.g. a
    saved attention ``mask`` of ``GlobalAttentionGeneral``, ``_backend``, hooks) is ignored.
    Tensors are returned as independent contiguous CPU copies.
    """
    if not isinstance(root, InertModule):
        raise TypeError(f"expected a pickled module, got {type(root).__name__}")
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()

    def walk(m: InertModule, prefix: str, stack: tuple[int, ...]) -> None:
        if id(m) in stack:
            raise PickleFormatError(f"cyclic module graph at {prefix or '<root>'}")
        st = m.state
        for group in ("_parameters", "_buffers"):
            entries = st.get(group) or {}
            if not isinstance(entries, dict):
                raise PickleFormatError(f"{prefix}{group} is not a dict")
            skip = set(st.get("_non_persistent_buffers_set") or ()) if group == "_buffers" else set()
            for name, value in entries.items():
                if value is None or name in skip:
                    continue
                if not isinstance(value, torch.Tensor):
                    raise PickleFormatError(
                        f"{prefix}{name} in {group} is a {type(value).__name__}, not a tensor"
                    )
                out[prefix + str(name)] = value.detach().clone(memory_format=torch.contiguous_format)
        mods = st.get("_modules") or {}
        if not isinstance(mods, dict):
            raise PickleFormatError(f"{prefix}_modules is not a dict")
        for name, child in mods.items():
            if child is None:
                continue
            if not isinstance(child, InertModule):
                raise PickleFormatError(f"submodule {prefix}{name} is a {type(child).__name__}")
            walk(child, f"{prefix}{name}.", stack + (id(m),))

    walk(root, "", ())
    return out


def to_state_dict(obj: Any) -> "OrderedDict[str, torch.Tensor]":
    """Flat ``name -> tensor`` mapping from a pickled module or a (possibly nested) dict of tensors.

    Nested dicts are flattened with ``.``; non-tensor leaves are dropped. Raises ``ValueError`` if
    no tensor is found.
    """
    if isinstance(obj, InertModule):
        return module_state_dict(obj)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a module or a dict of tensors, got {type(obj).__name__}")
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            name = prefix + str(k)
            if isinstance(v, torch.Tensor):
                out[name] = v.detach().clone(memory_format=torch.contiguous_format)
            elif isinstance(v, dict):
                walk(v, name + ".")
            elif isinstance(v, InertModule):
                for kk, vv in module_state_dict(v).items():
                    out[f"{name}.{kk}"] = vv

    walk(obj, "")
    if not out:
        raise ValueError("the file holds no tensors")
    return out


if sys.byteorder != "little":  # pragma: no cover - all supported platforms are little-endian
    raise ImportError("cpgan.interop.unpickle assumes a little-endian host")
