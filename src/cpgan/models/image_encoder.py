"""Image encoders for DAMSM / TISCL: AttnGAN's ``CNN_ENCODER`` and CPGAN's Object-Aware Image Encoder.

Grid encoder (AttnGAN ``CNN_ENCODER``, REFERENCE.md §7.3; CPGAN ``evaluation/model.py``)::

    x        = bilinear resize of the [-1, 1] image to 299 x 299 (inside forward; no transform_input)
    local    = Inception-v3 Conv2d_1a_3x3 ... Mixed_6e                 (B, 768, 17, 17)
    local    = grid pooling to G x G                                    (B, 768, G, G)
    V'_e     = emb_features(local)   1x1 conv 768 -> d (no bias in AttnGAN)  -> (B, d, G*G)
    global   = Mixed_7a..7c -> average pool -> emb_cnn_code Linear(2048 -> d)   (B, d)

Grid pooling (``grid_size`` G, ``grid_pool``): AttnGAN keeps all 17 x 17 = 289 regions
(``grid_size=None``); the CPGAN paper states an 8 x 8 grid, and the released ``CNN_ENCODER`` gets it
with ``F.max_pool2d(kernel_size=3, stride=2)`` on the Mixed_6e output (17 -> 8) before the 1x1
projection (``grid_pool="max3s2"``). ``"adaptive_avg"`` / ``"adaptive_max"`` pool any grid to G x G.
``"auto"`` (default) = ``"max3s2"`` for the Inception backbone at G = 8, ``"adaptive_avg"`` otherwise
(for the small backbone at 64 px the native grid is already 8 x 8, so pooling is the identity).

Object-Aware Image Encoder (OAIE, CPGAN paper §3.3, suppl. 6.3, DESIGN.md §3.2), enabled by
``object_dim > 0`` (1024 for YOLOv3 box features)::

    V'_o = emb_objects(V_o) = M_o V_o + b_o           (B, d, N)     N detector boxes (36)
    V'_e = emb_features(V_e) = M_e V_e + b_e          (B, d, G*G)   grid projection gains a bias
    V    = [V'_o ; V'_e]                              (B, d, N + G*G) regions; boxes first
    region_mask = [object_mask ; all True]            (B, N + G*G)

Backbones:

* ``"inception"``: torchvision ``inception_v3`` built without downloading (``weights=None``,
  ``init_weights=False``); the trunk's submodules are registered under their torchvision names
  (``Conv2d_1a_3x3`` ... ``Mixed_7c``) so an AttnGAN ``image_encoder*.pth`` / CPGAN
  ``Inception_Encoder.pth`` state dict loads directly. The trunk is frozen (AttnGAN) and, by default,
  kept in eval mode even when the encoder trains (``trunk_eval``; AttnGAN's ``pretrain_DAMSM.py``
  leaves it in train mode, so its BatchNorm statistics drift; ``trunk_eval=False`` reproduces that).
  Gradients still flow to the input image (TISCL).
* ``"small"``: a small CNN for CPU presets with the same interface, trained whole: four conv blocks
  (Conv-BN-LeakyReLU(0.2); strides 2, 2, 2, 1) give the local grid (4w channels, 8 x 8 at 64 px),
  one more stride-2 block and global average pooling give the global vector (8w), w = ``small_width``.

Pretrained weights (local files only): ``weights=path`` or :meth:`ImageEncoder.load_pretrained`.
Accepted: an AttnGAN/CPGAN ``CNN_ENCODER`` state dict (trunk + ``emb_features`` + ``emb_cnn_code``),
a torchvision Inception-v3 state dict (trunk only; ``AuxLogits``/``fc`` are ignored), or a state dict
saved from this class. Files are read with ``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.checkpoint import check_state_dict

__all__ = ["ImageEncoder", "ImageFeatures", "read_state_dict", "INCEPTION_TRUNK"]

#: torchvision Inception-v3 submodules used by AttnGAN's ``CNN_ENCODER``, in forward order.
INCEPTION_TRUNK: tuple[str, ...] = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
    "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
    "Mixed_7a", "Mixed_7b", "Mixed_7c",
)
_LOCAL_END = INCEPTION_TRUNK.index("Mixed_6e") + 1
_HEADS = ("emb_features", "emb_cnn_code", "emb_objects")
# torchvision classifier parts that a full inception state dict carries and the encoder ignores.
_TORCHVISION_EXTRAS = ("AuxLogits.", "fc.")


class ImageFeatures(NamedTuple):
    """Output of :class:`ImageEncoder`.

    ``regions`` ``(B, d, R)``; ``global_features`` ``(B, d)``; ``region_mask`` ``(B, R)`` bool
    (``True`` = valid) or ``None`` when every region is valid.
    """

    regions: Tensor
    global_features: Tensor
    region_mask: Tensor | None


def _conv_block(cin: int, cout: int, stride: int) -> nn.Sequential:
    kernel = 4 if stride == 2 else 3
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.2, inplace=True),
    )


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from a local ``.pth``/``.pt`` (``weights_only=True``) or ``.safetensors`` file.

    A ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper and DataParallel ``module.`` prefixes
    are removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image encoder weights not found: {path} (give a local file path)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: object = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - turn any unpickling failure into one clear line
            raise ValueError(
                f"cannot read {path} as a weights-only state dict ({type(exc).__name__}); whole "
                "pickled modules must be converted first (cpgan interop)"
            ) from None
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if wrapper in obj and isinstance(obj[wrapper], dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


class ImageEncoder(nn.Module):
    """Grid (AttnGAN ``CNN_ENCODER``) or object-aware (CPGAN OAIE) image encoder.

    Args:
        out_dim: common embedding width d (256).
        backbone: ``"inception"`` or ``"small"``.
        grid_size: G, side of the region grid; ``None`` keeps the backbone's native grid
            (Inception: 17 x 17 as AttnGAN).
        grid_pool: ``"auto"``, ``"max3s2"`` (released CNN_ENCODER), ``"adaptive_avg"``,
            ``"adaptive_max"`` (see module docstring).
        object_dim: 0 = grid encoder; > 0 (1024) = OAIE with ``emb_objects`` Linear(object_dim -> d).
        grid_bias: bias of ``emb_features``; ``None`` = only for OAIE (``M_e V_e + b_e``), AttnGAN's
            grid projection has none.
        small_width: channel width w of the small backbone.
        freeze_trunk: Inception only: freeze the trunk (AttnGAN). The small backbone always trains.
        trunk_eval: keep a frozen trunk in eval mode (BatchNorm running statistics) in ``train()``.
        align_corners: of the bilinear resize to 299 (released CPGAN under torch 1.0: False;
            AttnGAN under torch 0.3 and DM-GAN: True).
        init_range: U(-r, r) init of the projection weights (AttnGAN ``init_trainable_weights``);
            ``emb_features.bias`` starts at zero, other biases at PyTorch defaults.
        weights: optional local weights file loaded with :meth:`load_pretrained` (see module doc).
    """

    def __init__(
        self,
        out_dim: int = 256,
        backbone: str = "inception",
        grid_size: int | None = 8,
        grid_pool: str = "auto",
        object_dim: int = 0,
        grid_bias: bool | None = None,
        small_width: int = 32,
        freeze_trunk: bool = True,
        trunk_eval: bool = True,
        align_corners: bool = False,
        init_range: float = 0.1,
        weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        if backbone not in ("inception", "small"):
            raise ValueError(f"backbone must be 'inception' or 'small', got {backbone!r}")
        if grid_pool not in ("auto", "max3s2", "adaptive_avg", "adaptive_max"):
            raise ValueError(
                f"grid_pool must be auto, max3s2, adaptive_avg or adaptive_max, got {grid_pool!r}"
            )
        if grid_size is not None and grid_size < 1:
            raise ValueError(f"grid_size must be a positive int or None, got {grid_size}")
        if grid_pool == "auto":
            grid_pool = "max3s2" if backbone == "inception" and grid_size == 8 else "adaptive_avg"
        if backbone == "inception" and grid_size is not None and grid_pool == "max3s2" and grid_size != 8:
            raise ValueError("grid_pool='max3s2' turns Inception's 17x17 grid into 8x8; set grid_size=8")
        self.out_dim = out_dim
        self.backbone = backbone
        self.grid_size = grid_size
        self.grid_pool = grid_pool
        self.object_dim = object_dim
        self.align_corners = align_corners
        self.trunk_eval = trunk_eval

        if backbone == "inception":
            from torchvision.models import inception_v3

            net = inception_v3(weights=None, aux_logits=False, init_weights=False)
            for name in INCEPTION_TRUNK:  # top-level names = CNN_ENCODER state-dict keys
                self.add_module(name, getattr(net, name))
            self._trunk_names: tuple[str, ...] = INCEPTION_TRUNK
            local_ch, global_ch = 768, 2048
            self.trunk_frozen = freeze_trunk
        else:
            w = small_width
            self.local_net = nn.Sequential(
                _conv_block(3, w, 2), _conv_block(w, 2 * w, 2),
                _conv_block(2 * w, 4 * w, 2), _conv_block(4 * w, 4 * w, 1),
            )
            self.global_net = _conv_block(4 * w, 8 * w, 2)
            self._trunk_names = ("local_net", "global_net")
            local_ch, global_ch = 4 * w, 8 * w
            self.trunk_frozen = False
        if self.trunk_frozen:
            for p in self.trunk_parameters():
                p.requires_grad_(False)

        if grid_bias is None:
            grid_bias = object_dim > 0
        self.emb_features = nn.Conv2d(local_ch, out_dim, kernel_size=1, bias=grid_bias)
        self.emb_cnn_code = nn.Linear(global_ch, out_dim)
        nn.init.uniform_(self.emb_features.weight, -init_range, init_range)
        nn.init.uniform_(self.emb_cnn_code.weight, -init_range, init_range)
        if self.emb_features.bias is not None:
            nn.init.zeros_(self.emb_features.bias)
        if object_dim > 0:
            self.emb_objects = nn.Linear(object_dim, out_dim)
            nn.init.uniform_(self.emb_objects.weight, -init_range, init_range)
        if weights is not None:
            self.load_pretrained(read_state_dict(weights))
        if self.trunk_frozen and trunk_eval:
            self.train(self.training)

    # ------------------------------------------------------------ bookkeeping
    @property
    def uses_objects(self) -> bool:
        """True for the object-aware (OAIE) variant."""
        return self.object_dim > 0

    def trunk_parameters(self) -> list[nn.Parameter]:
        """Backbone parameters (frozen for Inception)."""
        return [p for n in self._trunk_names for p in getattr(self, n).parameters()]

    def train(self, mode: bool = True) -> "ImageEncoder":
        """As ``nn.Module.train``; a frozen trunk stays in eval mode when ``trunk_eval``."""
        super().train(mode)
        if self.trunk_frozen and self.trunk_eval:
            for name in self._trunk_names:
                getattr(self, name).eval()
        return self

    def num_regions(self, num_objects: int = 36) -> int:
        """R for 64 px (small) / any size (inception) inputs with ``num_objects`` boxes (OAIE)."""
        if self.grid_size is None:
            native = 17 if self.backbone == "inception" else 8
            grid = native * native
        else:
            grid = self.grid_size * self.grid_size
        return grid + (num_objects if self.uses_objects else 0)

    # ---------------------------------------------------------------- forward
    def _backbone(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if self.backbone == "small":
            local = self.local_net(images)
            top = self.global_net(local)
            return local, F.adaptive_avg_pool2d(top, 1).flatten(1)
        x = images
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=self.align_corners)
        for i, name in enumerate(INCEPTION_TRUNK[:_LOCAL_END]):
            x = getattr(self, name)(x)
            if name in ("Conv2d_2b_3x3", "Conv2d_4a_3x3"):
                x = F.max_pool2d(x, kernel_size=3, stride=2)
        local = x  # Mixed_6e, (B, 768, 17, 17)
        for name in INCEPTION_TRUNK[_LOCAL_END:]:
            x = getattr(self, name)(x)
        return local, F.adaptive_avg_pool2d(x, 1).flatten(1)  # 8x8 average pool -> (B, 2048)

    def _pool_grid(self, local: Tensor) -> Tensor:
        g = self.grid_size
        if g is None:
            return local
        if self.grid_pool == "max3s2":
            local = F.max_pool2d(local, kernel_size=3, stride=2)
            if local.shape[-2:] != (g, g):
                raise ValueError(
                    f"max3s2 pooling gave a {tuple(local.shape[-2:])} grid, not {g}x{g}; "
                    "use grid_pool='adaptive_avg' for this input size"
                )
            return local
        if self.grid_pool == "adaptive_max":
            return F.adaptive_max_pool2d(local, g)
        return F.adaptive_avg_pool2d(local, g)

    def forward(
        self,
        images: Tensor,
        objects: Tensor | None = None,
        object_mask: Tensor | None = None,
    ) -> ImageFeatures:
        """Encode images.

        Args:
            images: ``(B, 3, H, W)`` in [-1, 1] (Inception resizes to 299 internally).
            objects: OAIE only (required there): ``(B, N, object_dim)`` detector box features
                (N = 36 in the paper), e.g. from the region store or the detector's feature path.
            object_mask: OAIE only, optional ``(B, N)`` bool, ``True`` = real box; padded/invalid
                boxes are masked out of the DAMSM attention (their features must be finite).

        Returns:
            :class:`ImageFeatures` ``(regions (B, d, R), global_features (B, d), region_mask)``
            with ``R = G*G`` (grid encoder) or ``N + G*G`` (OAIE: boxes first, then the grid in
            row-major order). ``region_mask`` is ``None`` when all regions are valid.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        batch = images.shape[0]
        if not self.uses_objects and (objects is not None or object_mask is not None):
            raise ValueError("objects given to a grid ImageEncoder; build it with object_dim>0 (OAIE)")
        if self.uses_objects:
            if objects is None:
                raise ValueError(
                    f"this ImageEncoder is object-aware: pass objects (B, N, {self.object_dim})"
                )
            if objects.dim() != 3 or objects.shape[0] != batch or objects.shape[2] != self.object_dim:
                raise ValueError(
                    f"objects must be (B={batch}, N, {self.object_dim}), got {tuple(objects.shape)}"
                )
            if object_mask is not None and object_mask.shape != objects.shape[:2]:
                raise ValueError(
                    f"object_mask must be (B, N) = {tuple(objects.shape[:2])}, got {tuple(object_mask.shape)}"
                )

        local, pooled = self._backbone(images)
        grid = self.emb_features(self._pool_grid(local)).flatten(2)  # (B, d, G*G)
        global_features = self.emb_cnn_code(pooled)
        if not self.uses_objects:
            return ImageFeatures(grid, global_features, None)

        assert objects is not None
        obj = self.emb_objects(objects.to(grid.dtype)).transpose(1, 2)  # (B, d, N)
        regions = torch.cat((obj, grid), dim=2)
        region_mask = None
        if object_mask is not None:
            grid_valid = torch.ones(batch, grid.shape[2], dtype=torch.bool, device=grid.device)
            region_mask = torch.cat((object_mask.to(device=grid.device, dtype=torch.bool), grid_valid), 1)
        return ImageFeatures(regions, global_features, region_mask)

    # ---------------------------------------------------------------- weights
    def load_pretrained(self, state_dict: Mapping[str, Tensor]) -> dict[str, list[str]]:
        """Load a CNN_ENCODER / torchvision Inception / own state dict (no file I/O).

        Every trunk key must be present. Head keys (``emb_*``) present in ``state_dict`` are
        loaded; absent ones keep their values, except that a grid-projection bias missing from a
        bias-free (AttnGAN) file is set to zero so the projection equals the file's.

        Returns:
            ``{"loaded": [...], "kept": [...]}`` key lists.
        """
        own = self.state_dict()
        given = {(k[7:] if k.startswith("module.") else k): v for k, v in state_dict.items()}
        given = {k: v for k, v in given.items() if not k.startswith(_TORCHVISION_EXTRAS)}
        check_state_dict(own, given, f"the {self.backbone} image encoder", "check out_dim / object_dim / small_width",
                         optional=_HEADS)
        to_load = dict(given)
        if (
            "emb_features.weight" in given
            and "emb_features.bias" not in given
            and self.emb_features.bias is not None
        ):
            to_load["emb_features.bias"] = torch.zeros_like(own["emb_features.bias"])
        self.load_state_dict(to_load, strict=False)
        return {"loaded": sorted(to_load), "kept": sorted(set(own) - set(to_load))}
