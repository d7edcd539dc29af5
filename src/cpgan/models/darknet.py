"""Darknet ``.cfg`` parser and a PyTorch ``Darknet`` network built from it (YOLOv3 / YOLOv3-tiny / small cfgs).

The detector of CPGAN (DESIGN §2 "[detector]", §3.1-§3.2) is YOLOv3 described by a Darknet cfg file.  This
module follows pjreddie/darknet (REFERENCE.md §1):

* :func:`parse_cfg` implements the lexical rules of ``read_cfg``/``strip``/``read_option`` (REFERENCE §1.1):
  *every* whitespace character inside a line is deleted, lines starting with ``#``/``;`` are comments (there
  are no inline comments), ``key=value`` is split at the first ``=``, and for a duplicated key the **first**
  occurrence wins.  Values stay strings; numbers are read like C's ``atoi``/``atof`` (leading number only).
* :class:`Darknet` applies the per-section defaults of ``src/parser.c`` (REFERENCE §1.2), e.g. a
  ``[convolutional]`` without ``activation`` is **logistic**, ``pad=1`` means ``padding = size // 2``, a
  ``[maxpool]``'s ``size`` defaults to its stride and its ``padding`` to ``size - 1`` (the yolov3-tiny
  ``size=2 stride=1`` layer therefore pads right/bottom with -inf and keeps 13x13, REFERENCE §1.3).

Supported sections: ``[net]``, ``[convolutional]``, ``[shortcut]``, ``[route]`` (incl. AlexeyAB's
``groups``/``group_id``), ``[upsample]``, ``[maxpool]``, ``[avgpool]`` (global), ``[yolo]``.  Anything else is a
clear ``ValueError``.  ``[connected]``/``[batchnorm]`` layers are not supported (no YOLOv3 cfg uses them).

Documented deviations (each a constructor argument):

* BatchNorm is ``nn.BatchNorm2d(momentum=0.01)`` (darknet's rolling average, src/batchnorm_layer.c) with
  ``eps=1e-5`` inside the square root; darknet divides by ``sqrt(var) + 1e-6``.  The difference is negligible
  for trained weights (``var`` >> 1e-5).
* ``[net] channels`` missing or 0 is read as 3 (darknet would build a broken network).
* ``anchor_scale`` multiplies every ``[yolo]`` anchor (anchors are in network-input pixels; running a cfg at
  k times its design resolution on data that scales along needs ``anchor_scale=k``).

Non-darknet key (ignored by darknet, which only reports it as unused): ``[net] region_feature_layer=N`` names the
layer whose output :func:`cpgan.models.yolo.region_features` pools by default.

Forward input: ``(B, C, H, W)`` floats in ``[0, 1]`` (darknet's convention, REFERENCE §3.3), ``H`` and ``W``
multiples of the network's total stride (32 for YOLOv3).  Output: a dict, see :meth:`Darknet.forward`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "parse_cfg",
    "load_cfg",
    "Darknet",
    "ConvBlock",
    "YoloHead",
    "config_path",
    "SECTION_ALIASES",
]

#: Section aliases of darknet's ``string_to_layer_type`` (src/parser.c l.47-87), mapped to canonical names.
SECTION_ALIASES = {
    "net": "net",
    "network": "net",
    "convolutional": "convolutional",
    "conv": "convolutional",
    "maxpool": "maxpool",
    "max": "maxpool",
    "avgpool": "avgpool",
    "avg": "avgpool",
    "softmax": "softmax",
    "soft": "softmax",
    "connected": "connected",
    "conn": "connected",
    "shortcut": "shortcut",
    "route": "route",
    "upsample": "upsample",
    "yolo": "yolo",
    "region": "region",
    "detection": "detection",
    "dropout": "dropout",
    "batchnorm": "batchnorm",
    "crop": "crop",
    "cost": "cost",
    "local": "local",
    "deconvolutional": "deconvolutional",
    "deconv": "deconvolutional",
    "rnn": "rnn",
    "gru": "gru",
    "lstm": "lstm",
    "crnn": "crnn",
    "normalization": "normalization",
    "lrn": "normalization",
    "l2norm": "l2norm",
    "logistic": "logistic",
    "reorg": "reorg",
    "iseg": "iseg",
}

_SUPPORTED = ("convolutional", "shortcut", "route", "upsample", "maxpool", "avgpool", "yolo")

_INT_RE = re.compile(r"^[+-]?\d+")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?)")


def config_path(name: str) -> Path:
    """Path of a cfg shipped with the project, e.g. ``config_path("yolov3")`` -> ``.../configs/darknet/yolov3.cfg``.

    Looks in the repository's ``configs/darknet`` (source checkout) and in ``cpgan/configs/darknet`` (installed
    package data).  Raises ``FileNotFoundError`` naming both places when the file is absent.
    """
    base = Path(name).name
    fname = base if base.endswith(".cfg") else base + ".cfg"
    here = Path(__file__).resolve()
    candidates = [
        here.parents[3] / "configs" / "darknet" / fname,  # <repo>/configs/darknet (src layout)
        here.parents[1] / "configs" / "darknet" / fname,  # <site-packages>/cpgan/configs/darknet
    ]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"Darknet cfg {fname!r} not found in {candidates[0].parent} or {candidates[1].parent}; "
        "pass the path of a .cfg file instead."
    )


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------
def parse_cfg(text: str) -> list[dict[str, str]]:
    """Parse Darknet cfg text into a list of sections (REFERENCE §1.1, pjreddie ``read_cfg``).

    Each section is a dict: ``"type"`` holds the canonical section name (aliases such as ``[conv]`` resolved,
    ``[network]`` -> ``"net"``), every other entry is ``key -> value`` as strings, in file order.  Rules:

    1. every whitespace character of a line is removed (``anchors = 10,13,  16,30`` -> ``10,13,16,30``);
    2. empty lines and lines starting with ``#`` or ``;`` (after stripping) are comments; no inline comments;
    3. ``[name]`` opens a section; unknown section names raise ``ValueError``;
    4. ``key=value`` splits at the first ``=``; a line whose only ``=`` is its last character, or without any
       ``=``, carries no value and is dropped (darknet reports/ignores it);
    5. duplicated keys: the **first** one wins.

    The first section must be ``[net]``/``[network]``.  Defaults are *not* filled in here (darknet reads them
    when it builds each layer; see :class:`Darknet`), so the result mirrors the file.
    """
    sections: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = "".join(raw.split())  # strip(): delete every whitespace character
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            name = line[1:-1] if line.endswith("]") else line[1:]
            canonical = SECTION_ALIASES.get(name.lower())
            if canonical is None:
                raise ValueError(f"cfg line {lineno}: unknown section {line!r}; check the spelling of the section name.")
            current = {"type": canonical}
            sections.append(current)
            continue
        if current is None:
            raise ValueError(f"cfg line {lineno}: option {line!r} before the first section; the file must start with [net].")
        eq = line.find("=")
        if eq < 0 or eq == len(line) - 1:
            continue  # darknet: no value -> acts as absent ("Config file error" for a trailing '=')
        key, value = line[:eq], line[eq + 1 :]
        if key not in current:  # first duplicate wins (option_find returns the first match)
            current[key] = value
    if not sections:
        raise ValueError("cfg text has no sections; expected a Darknet cfg starting with [net].")
    if sections[0]["type"] != "net":
        raise ValueError("the first section of a Darknet cfg must be [net] or [network].")
    return sections


def load_cfg(path_or_text: str | Path) -> list[dict[str, str]]:
    """Parse a cfg given as a file path, a shipped cfg name (``"yolov3"``), or cfg text (contains a newline)."""
    if isinstance(path_or_text, Path) or "\n" not in str(path_or_text):
        p = Path(path_or_text)
        if not p.is_file():
            try:
                p = config_path(str(path_or_text))
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"Darknet cfg {str(path_or_text)!r} not found; give an existing .cfg path or a shipped name "
                    "(yolov3, yolov3-tiny, shapes-small)."
                ) from None
        return parse_cfg(p.read_text(encoding="utf-8", errors="replace"))
    return parse_cfg(str(path_or_text))


def _atoi(s: str | None, default: int) -> int:
    """C ``atoi`` on a darknet option string (leading integer, else 0); ``default`` when the key is absent."""
    if s is None:
        return default
    m = _INT_RE.match(s)
    return int(m.group(0)) if m else 0


def _atof(s: str | None, default: float) -> float:
    """C ``atof`` on a darknet option string (leading float, else 0.0); ``default`` when the key is absent."""
    if s is None:
        return default
    m = _FLOAT_RE.match(s)
    return float(m.group(0)) if m else 0.0


def _int_list(s: str | None) -> list[int]:
    return [] if not s else [_atoi(t, 0) for t in s.split(",") if t != ""]


def _float_list(s: str | None) -> list[float]:
    return [] if not s else [_atof(t, 0.0) for t in s.split(",") if t != ""]


# --------------------------------------------------------------------------------------------------
# Activations (src/activations.c; mish/swish/relu6/gelu from AlexeyAB's fork)
# --------------------------------------------------------------------------------------------------
class _Act(nn.Module):
    """Darknet activation by name."""

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in _ACTS:
            raise ValueError(f"unknown Darknet activation {name!r}; supported: {', '.join(sorted(_ACTS))}.")
        self.name = name
        self.fn = _ACTS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def _linear(x: torch.Tensor) -> torch.Tensor:
    return x


def _loggy(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * torch.sigmoid(x) - 1.0


def _relie(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.01)


def _ramp(x: torch.Tensor) -> torch.Tensor:
    return x * (x > 0) + 0.1 * x


def _leaky(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.1)


def _hardtan(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-1.0, 1.0)


# module-level functions (not lambdas) so that models stay picklable
_ACTS = {
    "linear": _linear,
    "logistic": torch.sigmoid,
    "loggy": _loggy,
    "relu": F.relu,
    "relie": _relie,
    "ramp": _ramp,
    "leaky": _leaky,
    "tanh": torch.tanh,
    "elu": F.elu,
    "selu": F.selu,
    "mish": F.mish,
    "swish": F.silu,
    "relu6": F.relu6,
    "gelu": F.gelu,
    "hardtan": _hardtan,
}


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------
class ConvBlock(nn.Module):
    """``[convolutional]``: Conv2d (bias only without BN) -> optional BatchNorm2d -> activation.

    ``(B, C_in, H, W) -> (B, filters, H', W')``.  ``dontload``/``dontloadscales`` are kept for the weights reader.
    """

    def __init__(
        self,
        in_channels: int,
        filters: int,
        size: int,
        stride: int,
        padding: int,
        groups: int,
        batch_normalize: bool,
        activation: str,
        bn_momentum: float,
        bn_eps: float,
        dontload: bool = False,
        dontloadscales: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, filters, size, stride, padding, groups=groups, bias=not batch_normalize)
        self.bn = nn.BatchNorm2d(filters, eps=bn_eps, momentum=bn_momentum) if batch_normalize else None
        self.act = _Act(activation)
        self.dontload = dontload
        self.dontloadscales = dontloadscales
        # darknet's initialisation (src/convolutional_layer.c make_convolutional_layer): N(0, sqrt(2 / fan_in)),
        # biases 0, BN scales 1.
        fan_in = size * size * in_channels // groups
        nn.init.normal_(self.conv.weight, 0.0, math.sqrt(2.0 / fan_in))
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)


class _MaxPool(nn.Module):
    """``[maxpool]`` with darknet's geometry: out = (w + padding - size) // stride + 1, window starting at
    ``-padding // 2``, taps outside the map are -inf (src/maxpool_layer.c).  ``(B,C,H,W) -> (B,C,H',W')``."""

    def __init__(self, size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.size, self.stride, self.padding = size, stride, padding

    def out_size(self, n: int) -> int:
        return (n + self.padding - self.size) // self.stride + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        oh, ow = self.out_size(h), self.out_size(w)
        lo = self.padding // 2
        right = (ow - 1) * self.stride + self.size - w - lo
        bottom = (oh - 1) * self.stride + self.size - h - lo
        if lo or right > 0 or bottom > 0:
            x = F.pad(x, (lo, max(right, 0), lo, max(bottom, 0)), value=float("-inf"))
        return F.max_pool2d(x, self.size, self.stride)[..., :oh, :ow]


class _Upsample(nn.Module):
    """``[upsample]``: nearest-neighbour x``stride``, times ``scale``.  ``(B,C,H,W) -> (B,C,sH,sW)``."""

    def __init__(self, stride: int, scale: float) -> None:
        super().__init__()
        self.stride, self.scale = stride, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=self.stride, mode="nearest")
        return x * self.scale if self.scale != 1 else x


class _NoParams(nn.Module):
    """Placeholder for parameter-free layers whose work happens in :meth:`Darknet.forward`."""

    def __init__(self, kind: str, desc: str = "") -> None:
        super().__init__()
        self.kind, self.desc = kind, desc

    def extra_repr(self) -> str:
        return f"{self.kind} {self.desc}".strip()


@dataclass
class YoloHead:
    """Static description of one ``[yolo]`` layer.

    ``anchors``: (A, 2) anchors of this head (w, h) in network-input pixels (masked); ``all_anchors``: (num, 2)
    every anchor listed in the cfg (the loss assigns each ground truth to the best of *all* of them, REFERENCE
    §4.4); ``mask``: indices into ``all_anchors``; ``classes``: number of classes C (the previous conv outputs
    ``A * (5 + C)`` channels).
    """

    layer_index: int
    mask: list[int]
    all_anchors: list[tuple[float, float]]
    classes: int
    ignore_thresh: float = 0.5
    truth_thresh: float = 1.0
    jitter: float = 0.2
    random: int = 0

    @property
    def anchors(self) -> list[tuple[float, float]]:
        return [self.all_anchors[m] for m in self.mask]

    @property
    def num_anchors(self) -> int:
        return len(self.mask)


@dataclass
class _Spec:
    """Per-layer routing information used by :meth:`Darknet.forward`."""

    kind: str
    inputs: list[int] = field(default_factory=list)  # absolute indices of extra inputs (route / shortcut)
    alpha: float = 1.0
    beta: float = 1.0
    groups: int = 1
    group_id: int = 0


class Darknet(nn.Module):
    """A network built from parsed Darknet cfg sections.

    Args:
        cfg: parsed sections (:func:`parse_cfg`), cfg text, a path to a ``.cfg`` file, or a shipped cfg name.
        keep: layer indices whose outputs :meth:`forward` returns in ``features`` (negative = from the end).
        bn_momentum: BatchNorm running-stat momentum (darknet: 0.01).
        bn_eps: BatchNorm epsilon (PyTorch places it inside the square root; see module docstring).
        anchor_scale: factor applied to every ``[yolo]`` anchor.

    Attributes:
        blocks: the parsed sections (``blocks[0]`` is ``[net]``).  ``layer_types[i]``: type of layer ``i``.
        out_channels[i], strides[i]: channels and total stride (input pixels per cell) of layer ``i``'s output.
        heads: list of :class:`YoloHead`, in cfg order.  ``conv_layers``: ``(index, ConvBlock)`` in cfg order.
        width, height, channels: the ``[net]`` input size.  ``max_stride``: inputs must be multiples of it.
        default_feature_layer: the layer :func:`~cpgan.models.yolo.region_features` pools by default: ``[net]
        region_feature_layer`` if given, else the last layer with 1024 output channels, else the last layer
        before the first ``[yolo]``'s prediction conv.
    """

    def __init__(
        self,
        cfg: Sequence[dict[str, str]] | str | Path,
        keep: Iterable[int] = (),
        bn_momentum: float = 0.01,
        bn_eps: float = 1e-5,
        anchor_scale: float = 1.0,
    ) -> None:
        super().__init__()
        blocks = list(cfg) if isinstance(cfg, (list, tuple)) else load_cfg(cfg)
        if not blocks or blocks[0].get("type") != "net":
            raise ValueError("Darknet cfg must start with a [net] section.")
        self.blocks = blocks
        net = blocks[0]
        self.width = _atoi(net.get("width"), 0)
        self.height = _atoi(net.get("height"), 0)
        self.channels = _atoi(net.get("channels"), 0) or 3

        self.layers = nn.ModuleList()
        self.layer_types: list[str] = []
        self.specs: list[_Spec] = []
        self.out_channels: list[int] = []
        self.strides: list[float] = []
        self.heads: list[YoloHead] = []
        self.conv_layers: list[tuple[int, ConvBlock]] = []
        sizes: list[tuple[int, int] | None] = []  # (h, w) at the [net] size, for build-time checks

        c, stride = self.channels, 1.0
        hw: tuple[int, int] | None = (self.height, self.width) if self.height > 0 and self.width > 0 else None
        for i, b in enumerate(blocks[1:]):
            kind = b["type"]
            where = f"layer {i} [{kind}]"
            if kind not in _SUPPORTED:
                raise ValueError(f"{where}: section type not supported by cpgan's Darknet; supported: {', '.join(_SUPPORTED)}.")
            spec = _Spec(kind)
            if kind == "convolutional":
                filters = _atoi(b.get("filters"), 1)
                size = _atoi(b.get("size"), 1)
                cstride = _atoi(b.get("stride"), 1)
                pad = _atoi(b.get("pad"), 0)
                padding = size // 2 if pad else _atoi(b.get("padding"), 0)
                groups = _atoi(b.get("groups"), 1)
                if filters <= 0 or size <= 0 or cstride <= 0 or groups <= 0 or c % groups or filters % groups:
                    raise ValueError(f"{where}: invalid filters/size/stride/groups ({filters}, {size}, {cstride}, {groups}) for {c} input channels.")
                module: nn.Module = ConvBlock(
                    c, filters, size, cstride, padding, groups,
                    batch_normalize=bool(_atoi(b.get("batch_normalize"), 0)),
                    activation=b.get("activation", "logistic"),
                    bn_momentum=bn_momentum, bn_eps=bn_eps,
                    dontload=bool(_atoi(b.get("dontload"), 0)),
                    dontloadscales=bool(_atoi(b.get("dontloadscales"), 0)),
                )
                self.conv_layers.append((i, module))  # type: ignore[arg-type]
                if hw is not None:
                    hw = ((hw[0] + 2 * padding - size) // cstride + 1, (hw[1] + 2 * padding - size) // cstride + 1)
                    if min(hw) <= 0:
                        raise ValueError(f"{where}: output would be empty at the [net] input size.")
                c, stride = filters, stride * cstride
            elif kind == "maxpool":
                pstride = _atoi(b.get("stride"), 1)
                psize = _atoi(b.get("size"), pstride)
                ppad = _atoi(b.get("padding"), psize - 1)
                if pstride <= 0 or psize <= 0 or ppad < 0:
                    raise ValueError(f"{where}: invalid size/stride/padding ({psize}, {pstride}, {ppad}).")
                module = _MaxPool(psize, pstride, ppad)
                if hw is not None:
                    hw = (module.out_size(hw[0]), module.out_size(hw[1]))
                stride *= pstride
            elif kind == "avgpool":
                module = _NoParams("avgpool", "global")
                hw = (1, 1) if hw is not None else None
            elif kind == "upsample":
                ustride = _atoi(b.get("stride"), 2)
                if ustride <= 0:
                    raise ValueError(f"{where}: only positive (up-sampling) strides are supported, got {ustride}.")
                module = _Upsample(ustride, _atof(b.get("scale"), 1.0))
                hw = (hw[0] * ustride, hw[1] * ustride) if hw is not None else None
                stride /= ustride
            elif kind == "shortcut":
                if "from" not in b:
                    raise ValueError(f"{where}: missing required key 'from'.")
                src = self._absolute(_atoi(b["from"], 0), i, where)
                if i == 0:
                    raise ValueError(f"{where}: a shortcut cannot be the first layer.")
                if self.out_channels[src] != c or (hw is not None and sizes[src] is not None and sizes[src] != hw):
                    raise ValueError(
                        f"{where}: shapes differ between the previous layer ({c} ch, {hw}) and layer {src} "
                        f"({self.out_channels[src]} ch, {sizes[src]}); only equal shapes are supported."
                    )
                spec.inputs = [src]
                spec.alpha = _atof(b.get("alpha"), 1.0)
                spec.beta = _atof(b.get("beta"), 1.0)
                module = nn.Sequential(_Act(b.get("activation", "linear")))
            elif kind == "route":
                idx = _int_list(b.get("layers"))
                if not idx:
                    raise ValueError(f"{where}: 'layers' is missing or empty.")
                spec.inputs = [self._absolute(j, i, where) for j in idx]
                spec.groups = _atoi(b.get("groups"), 1)
                spec.group_id = _atoi(b.get("group_id"), 0)
                if spec.groups <= 0 or not 0 <= spec.group_id < spec.groups:
                    raise ValueError(f"{where}: invalid groups/group_id ({spec.groups}, {spec.group_id}).")
                in_sizes = {sizes[j] for j in spec.inputs}
                if hw is not None and len(in_sizes) > 1:
                    raise ValueError(f"{where}: routed layers {spec.inputs} have different sizes {sorted(in_sizes)}; all must match.")
                if any(self.out_channels[j] % spec.groups for j in spec.inputs):
                    raise ValueError(f"{where}: routed channels are not divisible by groups={spec.groups}.")
                c = sum(self.out_channels[j] // spec.groups for j in spec.inputs)
                hw = sizes[spec.inputs[0]]
                stride = self.strides[spec.inputs[0]]
                module = _NoParams("route", str(spec.inputs))
            else:  # yolo
                total = _atoi(b.get("num"), 1)
                mask = _int_list(b.get("mask")) or list(range(total))
                anchors = _float_list(b.get("anchors"))
                classes = _atoi(b.get("classes"), 20)
                if len(anchors) < 2 * total:
                    raise ValueError(f"{where}: num={total} needs {2 * total} anchor values, found {len(anchors)}.")
                if any(m < 0 or m >= total for m in mask):
                    raise ValueError(f"{where}: mask {mask} refers to anchors outside 0..{total - 1}.")
                if c != len(mask) * (classes + 5):
                    raise ValueError(
                        f"{where}: the previous layer has {c} channels but {len(mask)} anchors x (classes {classes} + 5) "
                        f"= {len(mask) * (classes + 5)} are needed; fix 'filters' of the conv before it or 'classes'."
                    )
                pairs = [(anchors[2 * k] * anchor_scale, anchors[2 * k + 1] * anchor_scale) for k in range(total)]
                self.heads.append(
                    YoloHead(
                        layer_index=i, mask=mask, all_anchors=pairs, classes=classes,
                        ignore_thresh=_atof(b.get("ignore_thresh"), 0.5),
                        truth_thresh=_atof(b.get("truth_thresh"), 1.0),
                        jitter=_atof(b.get("jitter"), 0.2),
                        random=_atoi(b.get("random"), 0),
                    )
                )
                module = _NoParams("yolo", f"mask={mask} classes={classes}")
            self.layers.append(module)
            self.layer_types.append(kind)
            self.specs.append(spec)
            self.out_channels.append(c)
            self.strides.append(stride)
            sizes.append(hw)

        n = len(self.layers)
        if n == 0:
            raise ValueError("Darknet cfg has no layers after [net].")
        self.max_stride = int(round(max(max(self.strides), 1.0)))
        self.keep = sorted({self._absolute_keep(k) for k in keep})
        # last_use[j]: the last layer that reads layer j's output (the next layer, or a route/shortcut).
        last_use = [min(j + 1, n - 1) for j in range(n)]
        for i, s in enumerate(self.specs):
            for j in s.inputs:
                last_use[j] = max(last_use[j], i)
        self._last_use = last_use
        self.default_feature_layer = self._default_feature_layer()

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _absolute(j: int, i: int, where: str) -> int:
        a = i + j if j < 0 else j
        if not 0 <= a < i:
            raise ValueError(f"{where}: refers to layer {j} (absolute {a}), which is not an earlier layer.")
        return a

    def _absolute_keep(self, k: int) -> int:
        n = len(self.layers)
        a = n + k if k < 0 else k
        if not 0 <= a < n:
            raise ValueError(f"keep: layer index {k} is outside 0..{n - 1}.")
        return a

    def _default_feature_layer(self) -> int:
        declared = self.blocks[0].get("region_feature_layer")
        if declared is not None:
            return self._absolute_keep(_atoi(declared, -1))
        cands = [i for i, ch in enumerate(self.out_channels) if ch == 1024 and self.layer_types[i] != "yolo"]
        if cands:
            return cands[-1]
        if self.heads:
            return max(self.heads[0].layer_index - 2, 0)
        return len(self.layers) - 1

    @classmethod
    def from_cfg(cls, path_or_text: str | Path, **kwargs: Any) -> "Darknet":
        """Build from a cfg path, a shipped cfg name (``"yolov3"``, ``"yolov3-tiny"``, ``"shapes-small"``) or text."""
        return cls(load_cfg(path_or_text), **kwargs)

    @property
    def num_classes(self) -> int:
        return self.heads[0].classes if self.heads else 0

    # ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, keep: Iterable[int] | None = None) -> dict[str, Any]:
        """Run the network.

        Args:
            x: ``(B, C, H, W)`` images in ``[0, 1]``; ``H``, ``W`` multiples of :attr:`max_stride`.
            keep: layer indices to return in ``features`` (default: the constructor's ``keep``).

        Returns:
            dict with
              ``yolo``: list (one per ``[yolo]`` layer, cfg order) of raw head tensors ``(B, A*(5+C), ny, nx)``
              (pre-activation; channel ``a*(5+C)+e`` with e = tx, ty, tw, th, objectness, class logits...);
              ``features``: ``{layer_index: (B, C_l, H_l, W_l)}`` for the requested layers;
              ``heads``: the :class:`YoloHead` list (anchors etc., for decoding/loss);
              ``img_size``: ``(H, W)`` of the input.
        """
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"Darknet expects images of shape (B, {self.channels}, H, W), got {tuple(x.shape)}.")
        h, w = x.shape[-2:]
        if h % self.max_stride or w % self.max_stride:
            raise ValueError(f"input size {h}x{w} is not a multiple of the network stride {self.max_stride}; resize the images.")
        want = set(self.keep) if keep is None else {self._absolute_keep(k) for k in keep}
        outputs: dict[int, torch.Tensor] = {}
        feats: dict[int, torch.Tensor] = {}
        yolo: list[torch.Tensor] = []
        for i, (layer, spec) in enumerate(zip(self.layers, self.specs)):
            kind = spec.kind
            if kind == "route":
                parts = [outputs[j] for j in spec.inputs]
                if spec.groups > 1:
                    parts = [p.chunk(spec.groups, dim=1)[spec.group_id] for p in parts]
                y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            elif kind == "shortcut":
                y = spec.alpha * x + spec.beta * outputs[spec.inputs[0]] if (spec.alpha != 1 or spec.beta != 1) else x + outputs[spec.inputs[0]]
                y = layer(y)
            elif kind == "yolo":
                y = x
                yolo.append(y)
            elif kind == "avgpool":
                y = x.mean(dim=(2, 3), keepdim=True)
            else:
                y = layer(x)
            outputs[i] = y
            if i in want:
                feats[i] = y
            # free outputs nobody reads any more
            for j in [j for j in outputs if self._last_use[j] <= i and j != i]:
                del outputs[j]
            x = y
        return {"yolo": yolo, "features": feats, "heads": self.heads, "img_size": (int(h), int(w))}

    def extra_repr(self) -> str:
        return f"input={self.width}x{self.height}x{self.channels}, layers={len(self.layers)}, heads={len(self.heads)}"
