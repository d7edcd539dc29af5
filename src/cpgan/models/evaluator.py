"""Shapes-world evaluator: a box-trained per-cell grid detector that judges generated images.

DESIGN.md §6 asks for an evaluator CNN trained on *real* shapes-world images with their boxes, independent of
the project's own YOLOv3-style detector.  It is the judge behind three shapes-world metrics:

* **Semantic object accuracy** (SOA, Hinz et al., TPAMI 2020; REFERENCE.md §8.4): :meth:`ShapesEvaluator.detect`
  returns, per image, the set of (colour, shape) pairs it finds plus the background; an image scores when every
  pair its caption names is in that set.
* **FID**: :meth:`ShapesEvaluator.features` is the global average pool of the last trunk block, ``(B, F)``.
* **IS**: :meth:`ShapesEvaluator.class_posterior` is the posterior over the 64 colour x shape classes of the
  dominant (most object-like) object, ``(B, C*S)``.

Architecture (chosen here, deliberately unlike Darknet-53/YOLOv3's anchor boxes and 3 scales): a small
fully-convolutional CenterNet/FCOS-like grid detector.  A VGG-style trunk of ``len(widths)`` stages (each two 3x3
conv + BatchNorm + ReLU, the second with stride 2) maps the native ``native_size`` input to a ``G x G`` grid,
``G = native_size / 2**len(widths)`` (8 x 8 cells of 8 px at 64 px with the default 3 stages), followed by
``context_layers`` dilated 3x3 convs that widen the receptive field to whole large objects.  Per cell, 1x1 heads
predict

* objectness (one logit: "the centre of an object's box lies in this cell"),
* colour logits (``n_colours``) and shape logits (``n_shapes``) of that object;

and a linear head on the globally pooled feature predicts the background (``n_backgrounds``).

Input resolution: images are ``(B, 3, H, W)`` in ``[-1, 1]``; any square size is accepted and resized to
``native_size`` inside :meth:`forward` (bilinear, anti-aliased when shrinking), so the same network judges the
32/64/128 px outputs of the generator stages.  Because boxes are normalised, the grid and its targets do not depend
on the input size.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ShapesEvaluator", "Detections"]


class Detections(NamedTuple):
    """What the evaluator finds in one image.

    ``pairs``: set of ``(colour_index, shape_index)`` of the objects found; ``background``: background index.
    """

    pairs: set[tuple[int, int]]
    background: int


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ShapesEvaluator(nn.Module):
    """Per-cell grid detector of (colour, shape) objects plus a background classifier.

    Args:
        n_colours: number of colour classes ``C`` (``len(shapes.COLOURS)``, 8).
        n_shapes: number of shape classes ``S`` (``len(shapes.SHAPES)``, 8).
        n_backgrounds: number of backgrounds ``NB`` (``len(shapes.BACKGROUNDS)``, 4).
        native_size: input side the network works at; inputs of other sizes are resized to it.
        widths: channels of the trunk stages; each stage halves the resolution, so
            ``grid = native_size // 2**len(widths)``.
        context_layers: number of dilated (dilation 2) 3x3 conv layers at grid resolution, keeping ``widths[-1]``
            channels; they give each cell a view of large objects whose centre it holds.

    Attributes:
        grid: ``G``, cells per side of the prediction grid.
        feature_dim: ``F = widths[-1]``, size of :meth:`features`.

    The trunk uses BatchNorm: put the model in ``eval()`` mode before judging images (:meth:`detect`,
    :meth:`class_posterior` and :meth:`features` do not switch modes themselves).
    """

    def __init__(
        self,
        n_colours: int = 8,
        n_shapes: int = 8,
        n_backgrounds: int = 4,
        native_size: int = 64,
        widths: Sequence[int] = (16, 32, 64),
        context_layers: int = 2,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must be a non-empty list of positive channel counts, got {widths}")
        if min(n_colours, n_shapes, n_backgrounds) < 1:
            raise ValueError("n_colours, n_shapes and n_backgrounds must all be >= 1")
        stride = 2 ** len(widths)
        if native_size % stride != 0:
            raise ValueError(
                f"native_size {native_size} must be divisible by 2**len(widths) = {stride}; "
                "change native_size or the number of trunk stages"
            )
        self.n_colours = int(n_colours)
        self.n_shapes = int(n_shapes)
        self.n_backgrounds = int(n_backgrounds)
        self.native_size = int(native_size)
        self.grid = self.native_size // stride
        self.feature_dim = widths[-1]

        layers: list[nn.Module] = []
        c_in = 3
        for w in widths:
            layers += [_conv_bn_relu(c_in, w), _conv_bn_relu(w, w, stride=2)]
            c_in = w
        for _ in range(context_layers):
            layers.append(_conv_bn_relu(c_in, c_in, dilation=2))
        self.trunk = nn.Sequential(*layers)
        self.obj_head = nn.Conv2d(c_in, 1, 1)
        self.colour_head = nn.Conv2d(c_in, self.n_colours, 1)
        self.shape_head = nn.Conv2d(c_in, self.n_shapes, 1)
        self.background_head = nn.Linear(c_in, self.n_backgrounds)
        # Start objectness at a low prior (~1/G^2 of the cells are positive), as RetinaNet/CenterNet do, so early
        # training is not dominated by the many negative cells.
        nn.init.constant_(self.obj_head.bias, -4.0)

    # ------------------------------------------------------------------------------------------------ helpers
    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Check ``(B, 3, H, W)`` and resize to ``(B, 3, native_size, native_size)``."""
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"ShapesEvaluator expects images of shape (B, 3, H, W) in [-1, 1], got {shape}")
        if not images.is_floating_point():
            raise ValueError(
                f"ShapesEvaluator expects float images in [-1, 1], got dtype {images.dtype}; "
                "convert uint8 with x / 127.5 - 1"
            )
        h, w = images.shape[-2:]
        if (h, w) != (self.native_size, self.native_size):
            images = F.interpolate(
                images,
                size=(self.native_size, self.native_size),
                mode="bilinear",
                align_corners=False,
                antialias=bool(h > self.native_size or w > self.native_size),
            )
        return images

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the detector.

        Args:
            images: ``(B, 3, H, W)`` float in ``[-1, 1]`` (any ``H = W``; resized to ``native_size``).

        Returns:
            dict with logits ``obj (B, G, G)``, ``colour (B, G, G, C)``, ``shape (B, G, G, S)``,
            ``background (B, NB)`` and the pooled feature ``features (B, F)``.  Grid index order is
            ``[row (y), column (x)]``.
        """
        x = self.trunk(self._prepare(images))  # (B, F, G, G)
        pooled = x.mean(dim=(2, 3))  # (B, F)
        return {
            "obj": self.obj_head(x).squeeze(1),
            "colour": self.colour_head(x).permute(0, 2, 3, 1),
            "shape": self.shape_head(x).permute(0, 2, 3, 1),
            "background": self.background_head(pooled),
            "features": pooled,
        }

    # --------------------------------------------------------------------------------------------- inference
    @staticmethod
    def peaks(obj_prob: torch.Tensor, threshold: float = 0.5, nms_kernel: int = 3) -> torch.Tensor:
        """Peak picking on an objectness map (CenterNet-style max-pool NMS).

        Args:
            obj_prob: ``(B, G, G)`` objectness probabilities.
            threshold: a cell is a detection when its probability is ``>= threshold`` (SOA's ``obj >= 0.5``)…
            nms_kernel: …and no cell in its ``k x k`` neighbourhood is higher (ties keep both).  ``1`` disables NMS.

        Returns:
            ``(B, G, G)`` bool mask of detected cells.
        """
        if nms_kernel < 1 or nms_kernel % 2 == 0:
            raise ValueError(f"nms_kernel must be a positive odd integer, got {nms_kernel}")
        keep = obj_prob >= threshold
        if nms_kernel > 1:
            pooled = F.max_pool2d(obj_prob.unsqueeze(1), nms_kernel, stride=1, padding=nms_kernel // 2).squeeze(1)
            keep = keep & (obj_prob >= pooled)
        return keep

    @staticmethod
    def decode(
        out: dict[str, torch.Tensor], threshold: float = 0.5, nms_kernel: int = 3
    ) -> list[Detections]:
        """Turn a :meth:`forward` output into per-image detections (see :meth:`detect`)."""
        keep = ShapesEvaluator.peaks(torch.sigmoid(out["obj"]), threshold, nms_kernel)  # (B, G, G)
        colour = out["colour"].argmax(dim=-1)  # (B, G, G)
        shape = out["shape"].argmax(dim=-1)  # (B, G, G)
        background = out["background"].argmax(dim=-1)  # (B,)
        b_idx, ys, xs = keep.nonzero(as_tuple=True)
        rows = torch.stack([b_idx, colour[b_idx, ys, xs], shape[b_idx, ys, xs]], dim=1).tolist()
        pairs: list[set[tuple[int, int]]] = [set() for _ in range(keep.shape[0])]
        for b, c, s in rows:  # one entry per detection (a handful per image), not per pixel
            pairs[b].add((c, s))
        return [Detections(p, int(bg)) for p, bg in zip(pairs, background.tolist())]

    @torch.no_grad()
    def detect(self, images: torch.Tensor, threshold: float = 0.5, nms_kernel: int = 3) -> list[Detections]:
        """Find the (colour, shape) objects and the background of each image.

        A detection is a cell whose objectness probability is ``>= threshold`` and a local maximum in its
        ``nms_kernel x nms_kernel`` neighbourhood; its class is the argmax of the colour and of the shape logits
        (not thresholded, like SOA's YOLOv3 evaluator, REFERENCE.md §4.3).  Duplicate pairs collapse in the set.

        Args:
            images: ``(B, 3, H, W)`` in ``[-1, 1]``.

        Returns:
            ``B`` :class:`Detections` ``(pairs: set[(colour, shape)], background: int)``.
        """
        return self.decode(self(images), threshold, nms_kernel)

    @torch.no_grad()
    def class_posterior(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior over the ``C * S`` colour x shape classes of the dominant object (for IS).

        The dominant object is the cell of highest objectness; its posterior is the outer product
        ``softmax(colour) ⊗ softmax(shape)``, flattened with class index ``colour * S + shape``.

        Args:
            images: ``(B, 3, H, W)`` in ``[-1, 1]``.

        Returns:
            ``(B, C * S)``, rows sum to 1.
        """
        out = self(images)
        b = out["obj"].shape[0]
        cell = out["obj"].reshape(b, -1).argmax(dim=1)  # (B,)
        rows = torch.arange(b, device=cell.device)
        colour = out["colour"].reshape(b, -1, self.n_colours)[rows, cell].softmax(-1)  # (B, C)
        shape = out["shape"].reshape(b, -1, self.n_shapes)[rows, cell].softmax(-1)  # (B, S)
        return (colour.unsqueeze(2) * shape.unsqueeze(1)).reshape(b, -1)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled trunk feature for FID: ``(B, 3, H, W)`` in ``[-1, 1]`` -> ``(B, F)``."""
        return self(images)["features"]
