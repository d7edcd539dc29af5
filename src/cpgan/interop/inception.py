"""Inception-v3 feature extraction for IS and FID, from a local weights file only (REFERENCE §8, §9).

Two weight files are in use and they are **not** interchangeable (DM-GAN's published COCO FID: 26.55
with torchvision weights vs 24.24 with the TF-ported FID weights), so the network records which one it
runs (``weights_description``) and the evaluation report must print it:

``layout="torchvision"`` — torchvision's ImageNet Inception-v3 (``inception_v3_google-0cc3c7bd.pth``,
    older name ``inception_v3_google-1a9a5a14.pth``; 1000 classes, fc with bias, 14 ``AuxLogits.*``
    tensors). Used by CPGAN's IS script (``evaluation/caculate_IS.py``: ``inception_v3(pretrained=True,
    transform_input=False)``, inputs normalised to [-1, 1]) and by DM-GAN / DF-GAN FID. The auxiliary
    head is dropped (training only).

``layout="pt_inception"`` — pytorch-fid's port of the TF graph ``inception-2015-12-05``
    (``pt_inception-2015-12-05-6726825d.pth``; torch-fidelity's ``weights-inception-2015-12-05-
    6726825d.pth`` has the same keys). Its key names are torchvision's ``Inception3`` names without
    ``AuxLogits.*`` and with a 1008-way ``fc``, so the keys map one to one. A state dict of pytorch-fid's
    ``InceptionV3`` feature wrapper (``blocks.<i>.<j>.*``) is also accepted and renamed onto the same
    names (it carries no ``fc``: logits are then unavailable). The TF graph computes four kinds of
    block differently from torchvision's, and those variants are swapped in (pytorch-fid
    ``inception.py`` ``fid_inception_v3``; REFERENCE §8.2):

    * ``Mixed_5b/5c/5d`` (:class:`FIDInceptionA`), ``Mixed_6b-6e`` (:class:`FIDInceptionC`) and
      ``Mixed_7b`` (:class:`FIDInceptionE1`): the 3x3 average pool of the pool branch excludes the
      zero padding from its count (``count_include_pad=False``);
    * ``Mixed_7c`` (:class:`FIDInceptionE2`): the pool branch uses a 3x3 **max** pool (stride 1,
      padding 1) instead of an average pool.

    ``fid_blocks`` in :func:`build_inception` overrides the choice (e.g. ``False`` runs FID weights
    with torchvision semantics, which is wrong for reporting but useful for comparisons).

``layout="auto"`` (default) picks ``pt_inception`` when the file has a 1008-way ``fc`` or the
``blocks.*`` wrapper names, ``torchvision`` otherwise.

Input convention of :class:`InceptionFeatures`: images ``(B, 3, H, W)`` in **[-1, 1]** by default
(the generator's tanh range; DM-GAN feeds generated images straight in), or in [0, 1] with
``input_range="[0,1]"`` (then ``2x - 1`` is applied, pytorch-fid's ``normalize_input``). Both weight
files were trained on [-1, 1] inputs (Google's preprocessing), so the normalisation is the same for
both layouts; torchvision's ``transform_input`` (ImageNet mean/std -> [-1, 1]) is not used. Images are
resized with ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` to 299 (pytorch-fid;
PIL-resized uint8 images as in the TF code differ slightly, REFERENCE §8.2).

Outputs: ``pool`` — the 2048-d average-pooled ``Mixed_7c`` features (FID's ``pool3``); ``logits`` —
``pool @ fc.weight.T`` plus ``fc.bias`` when ``logits_bias`` (default: with bias for torchvision,
matching CPGAN's IS; **without** bias for pt_inception, matching the TF IS code's
``softmax/logits/MatMul`` and torch-fidelity's ``logits_unbiased``).

Nothing is ever downloaded; files are read with ``safetensors`` or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE

__all__ = [
    "build_inception",
    "InceptionFeatures",
    "load_inception_state_dict",
    "use_fid_blocks",
    "FIDInceptionA",
    "FIDInceptionC",
    "FIDInceptionE1",
    "FIDInceptionE2",
    "LAYOUTS",
]

LAYOUTS = ("auto", "torchvision", "pt_inception")

_MISSING_HINT = (
    "pass --inception-weights PATH with a local Inception-v3 file: torchvision ImageNet "
    "inception_v3_google-0cc3c7bd.pth (older name inception_v3_google-1a9a5a14.pth) or pytorch-fid "
    "pt_inception-2015-12-05-6726825d.pth (nothing is downloaded)"
)

# pytorch-fid's InceptionV3 wrapper: blocks.<i>.<j> -> torchvision name (the max pools have no weights).
_WRAPPER_NAMES = {
    "blocks.0.0": "Conv2d_1a_3x3",
    "blocks.0.1": "Conv2d_2a_3x3",
    "blocks.0.2": "Conv2d_2b_3x3",
    "blocks.1.0": "Conv2d_3b_1x1",
    "blocks.1.1": "Conv2d_4a_3x3",
    "blocks.2.0": "Mixed_5b",
    "blocks.2.1": "Mixed_5c",
    "blocks.2.2": "Mixed_5d",
    "blocks.2.3": "Mixed_6a",
    "blocks.2.4": "Mixed_6b",
    "blocks.2.5": "Mixed_6c",
    "blocks.2.6": "Mixed_6d",
    "blocks.2.7": "Mixed_6e",
    "blocks.3.0": "Mixed_7a",
    "blocks.3.1": "Mixed_7b",
    "blocks.3.2": "Mixed_7c",
}


# --------------------------------------------------------------------------------------------------
# FID block variants (TF inception-2015-12-05 semantics)
# --------------------------------------------------------------------------------------------------


class FIDInceptionA(InceptionA):
    """``InceptionA`` whose pool branch averages over valid pixels only (``count_include_pad=False``).

    ``(B, C_in, 35, 35) -> (B, 224 + pool_features, 35, 35)``; same parameters as ``InceptionA``.
    """

    def _forward(self, x: Tensor) -> list[Tensor]:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return [b1, b5, b3, bp]


class FIDInceptionC(InceptionC):
    """``InceptionC`` with ``count_include_pad=False`` in the pool branch. ``(B, 768, 17, 17) -> same``."""

    def _forward(self, x: Tensor) -> list[Tensor]:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return [b1, b7, bd, bp]


class _FIDInceptionEBase(InceptionE):
    """``InceptionE`` with a replaceable pool for the pool branch. ``(B, C_in, 8, 8) -> (B, 2048, 8, 8)``."""

    def _pool(self, x: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def _forward(self, x: Tensor) -> list[Tensor]:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        bp = self.branch_pool(self._pool(x))
        return [b1, b3, bd, bp]


class FIDInceptionE1(_FIDInceptionEBase):
    """``Mixed_7b`` of the FID network: average pool with ``count_include_pad=False``."""

    def _pool(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionE2(_FIDInceptionEBase):
    """``Mixed_7c`` of the FID network: 3x3 **max** pool (stride 1, padding 1) in the pool branch."""

    def _pool(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


_FID_BLOCKS = {
    "Mixed_5b": FIDInceptionA,
    "Mixed_5c": FIDInceptionA,
    "Mixed_5d": FIDInceptionA,
    "Mixed_6b": FIDInceptionC,
    "Mixed_6c": FIDInceptionC,
    "Mixed_6d": FIDInceptionC,
    "Mixed_6e": FIDInceptionC,
    "Mixed_7b": FIDInceptionE1,
    "Mixed_7c": FIDInceptionE2,
}


def use_fid_blocks(model: Inception3) -> Inception3:
    """Replace the nine blocks that the TF FID graph computes differently, in place, keeping weights.

    Each replacement is a subclass with the same parameters, built from the block's constructor
    arguments (read off its convolutions) and given the old block's state dict.
    """
    for name, cls in _FID_BLOCKS.items():
        old = getattr(model, name)
        if isinstance(old, cls):
            continue
        in_ch = old.branch1x1.conv.in_channels
        if cls is FIDInceptionA:
            new = cls(in_ch, pool_features=old.branch_pool.conv.out_channels)
        elif cls is FIDInceptionC:
            new = cls(in_ch, channels_7x7=old.branch7x7_1.conv.out_channels)
        else:
            new = cls(in_ch)
        new.load_state_dict(old.state_dict())
        new.to(device=old.branch1x1.conv.weight.device, dtype=old.branch1x1.conv.weight.dtype)
        new.train(old.training)
        setattr(model, name, new)
    return model


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _sha256_prefix(path: Path, n: int = 8) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:n]


def load_inception_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a ``.pth``/``.pt`` file (``weights_only=True``).

    Unwraps a ``{"state_dict": ...}`` / ``{"model": ...}`` container, strips a ``module.`` prefix and
    renames pytorch-fid wrapper keys (``blocks.<i>.<j>.*``) onto torchvision ``Inception3`` names.
    """
    return _load_state_dict(Path(path))[0]


def _load_state_dict(path: Path) -> tuple[dict[str, Tensor], bool]:
    """``(state dict with torchvision names, whether the file used pytorch-fid wrapper names)``."""
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file not found: {path}; {_MISSING_HINT}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised as one clear line
        raise ValueError(
            f"cannot read {path} as a state dict ({type(e).__name__}); expected a torchvision or pytorch-fid "
            f".pth state_dict or a .safetensors file (TorchScript archives such as inception-2015-12-05.pt are not supported)"
        ) from None
    for wrapper_key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper_key), dict):
            sd = sd[wrapper_key]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    out: dict[str, Tensor] = {}
    wrapper = False
    for k, v in sd.items():
        if k.startswith("module."):
            k = k[len("module.") :]
        if k.startswith("blocks."):
            prefix = ".".join(k.split(".")[:3])
            if prefix not in _WRAPPER_NAMES:
                raise ValueError(f"{path}: unexpected key {k!r} for a pytorch-fid InceptionV3 wrapper state dict")
            k = _WRAPPER_NAMES[prefix] + k[len(prefix) :]
            wrapper = True
        out[k] = v
    return out, wrapper


def _detect_layout(sd: dict[str, Tensor], wrapper: bool) -> str:
    fc = sd.get("fc.weight")
    if wrapper or (fc is not None and fc.shape[0] == 1008):
        return "pt_inception"
    return "torchvision"


def build_inception(
    weights_path: str | os.PathLike | None,
    layout: str = "auto",
    *,
    fid_blocks: bool | None = None,
    allow_random_init: bool = False,
) -> Inception3:
    """Build torchvision's ``Inception3`` and load a local weights file (never downloads).

    Args:
        weights_path: a torchvision or pytorch-fid state dict (``.pth``/``.pt``/``.safetensors``).
            ``None`` raises ``FileNotFoundError`` unless ``allow_random_init`` (tests / smoke runs).
        layout: ``"auto"``, ``"torchvision"`` or ``"pt_inception"`` (module docstring).
        fid_blocks: swap in the FID block variants; default ``layout == "pt_inception"``.
        allow_random_init: with ``weights_path=None``, return a randomly initialised network
            (``layout`` auto -> torchvision, 1000 classes; pt_inception -> 1008 classes).

    Returns:
        ``Inception3`` in eval mode (``aux_logits=False``, ``transform_input=False``) with extra
        attributes ``weights_description`` (str), ``layout`` (str), ``fid_blocks`` (bool) and
        ``has_logits`` (bool: the file had an ``fc``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    has_logits = True
    if weights_path is None:
        if not allow_random_init:
            raise FileNotFoundError(f"no Inception weights given; {_MISSING_HINT}")
        layout = "torchvision" if layout == "auto" else layout
        num_classes = 1008 if layout == "pt_inception" else 1000
        sd = None
    else:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights file not found: {path}; {_MISSING_HINT}")
        sd, wrapper = _load_state_dict(path)
        if layout == "auto":
            layout = _detect_layout(sd, wrapper)
        if "fc.weight" in sd:
            num_classes = int(sd["fc.weight"].shape[0])
        else:
            has_logits = False
            num_classes = 1008 if layout == "pt_inception" else 1000
        sd = {k: v for k, v in sd.items() if not k.startswith("AuxLogits.")}
    if fid_blocks is None:
        fid_blocks = layout == "pt_inception"

    model = Inception3(num_classes=num_classes, aux_logits=False, transform_input=False, init_weights=False)
    if fid_blocks:
        use_fid_blocks(model)

    if sd is not None:
        try:
            result = model.load_state_dict(sd, strict=False)
        except RuntimeError as e:
            first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
            raise ValueError(f"{weights_path} does not fit Inception-v3: {first.strip()}") from None
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        if not has_logits:
            missing = [k for k in missing if not k.startswith("fc.")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{weights_path} is not an Inception-v3 state dict: missing {missing[:3]}"
                f"{'...' if len(missing) > 3 else ''}, unexpected {result.unexpected_keys[:3]}"
                f"{'...' if len(result.unexpected_keys) > 3 else ''}"
            )
        source = f"{Path(weights_path).name} (sha256 {_sha256_prefix(Path(weights_path))})"
    else:
        source = "RANDOM INIT (no weights file; metric values are meaningless)"

    kind = {
        "torchvision": f"torchvision Inception-v3 layout, {num_classes} classes",
        "pt_inception": f"pytorch-fid TF-port layout (inception-2015-12-05), {num_classes} classes",
    }[layout]
    blocks = "FID blocks" if fid_blocks else "torchvision blocks"
    logits = "" if has_logits else ", no fc in file (logits unavailable)"
    model.weights_description = f"{source}; {kind}; {blocks}{logits}"
    model.layout = layout
    model.fid_blocks = bool(fid_blocks)
    model.has_logits = has_logits
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Feature extractor
# --------------------------------------------------------------------------------------------------


class InceptionFeatures(nn.Module):
    """Frozen Inception-v3 returning pool features and logits for FID / IS.

    Args:
        network: an ``Inception3`` from :func:`build_inception`.
        input_range: ``"[-1,1]"`` (default) or ``"[0,1]"``: the range of the images given to
            :meth:`forward`.
        resize: side the images are bilinearly resized to (299); ``None`` keeps the input size
            (must be at least 75).
        logits_bias: add ``fc.bias`` to the logits; default ``True`` for the torchvision layout,
            ``False`` for pt_inception (module docstring).

    The module stays in eval mode (``train()`` is ignored) and its parameters do not require grad.
    ``weights_description`` repeats the network's.
    """

    def __init__(
        self,
        network: Inception3,
        input_range: str = "[-1,1]",
        resize: int | None = 299,
        logits_bias: bool | None = None,
    ) -> None:
        super().__init__()
        if input_range not in ("[-1,1]", "[0,1]"):
            raise ValueError(f"input_range must be '[-1,1]' or '[0,1]', got {input_range!r}")
        self.net = network
        self.input_range = input_range
        self.resize = resize
        layout = getattr(network, "layout", "torchvision")
        self.logits_bias = (layout != "pt_inception") if logits_bias is None else bool(logits_bias)
        self.has_logits = bool(getattr(network, "has_logits", True))
        self.weights_description = getattr(network, "weights_description", "unknown weights")
        self.requires_grad_(False)
        super().train(False)

    @classmethod
    def from_file(
        cls,
        weights_path: str | os.PathLike | None,
        layout: str = "auto",
        *,
        fid_blocks: bool | None = None,
        allow_random_init: bool = False,
        **kwargs: Any,
    ) -> "InceptionFeatures":
        """``InceptionFeatures(build_inception(weights_path, layout, ...), **kwargs)``."""
        net = build_inception(weights_path, layout, fid_blocks=fid_blocks, allow_random_init=allow_random_init)
        return cls(net, **kwargs)

    def train(self, mode: bool = True) -> "InceptionFeatures":
        """Ignored: the extractor always runs in eval mode (batch-norm running statistics)."""
        return super().train(False)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``images (B, 3, H, W)`` in ``input_range`` -> ``{"pool": (B, 2048), "logits": (B, C)}``.

        ``logits`` is absent when the weights file had no ``fc``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        x = images.to(self.net.Conv2d_1a_3x3.conv.weight)  # dtype and device of the network
        if self.input_range == "[0,1]":
            x = 2.0 * x - 1.0
        if self.resize is not None and tuple(x.shape[-2:]) != (self.resize, self.resize):
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False, antialias=False)
        elif min(x.shape[-2:]) < 75:
            raise ValueError(f"Inception-v3 needs images of at least 75x75, got {tuple(x.shape[-2:])}")
        n = self.net
        x = n.maxpool1(n.Conv2d_2b_3x3(n.Conv2d_2a_3x3(n.Conv2d_1a_3x3(x))))
        x = n.maxpool2(n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(x)))
        x = n.Mixed_5d(n.Mixed_5c(n.Mixed_5b(x)))
        x = n.Mixed_6e(n.Mixed_6d(n.Mixed_6c(n.Mixed_6b(n.Mixed_6a(x)))))
        x = n.Mixed_7c(n.Mixed_7b(n.Mixed_7a(x)))
        pool = torch.flatten(n.avgpool(x), 1)  # (B, 2048)
        out = {"pool": pool}
        if self.has_logits:
            logits = pool @ n.fc.weight.t()
            if self.logits_bias:
                logits = logits + n.fc.bias
            out["logits"] = logits
        return out
