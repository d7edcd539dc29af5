"""YOLOv3 decoding, loss, NMS, mAP and CPGAN's per-box region features.

All functions take the output dict of :class:`cpgan.models.darknet.Darknet` (``yolo`` raw head tensors,
``heads`` anchors/classes, ``img_size``), so they work for any cfg (yolov3, yolov3-tiny, shapes-small).

Decoding (REFERENCE.md §4.1-§4.2; pjreddie/darknet src/yolo_layer.c ``get_yolo_box``): raw head
``(B, A*(5+C), ny, nx)``, channel ``a*(5+C)+e``; ``bx = (sigmoid(tx) + cx) * W/nx``,
``by = (sigmoid(ty) + cy) * H/ny``, ``bw = exp(tw) * anchor_w``, ``bh = exp(th) * anchor_h`` (anchors in
network-input pixels), objectness ``sigmoid(to)``, classes independent logistic ``sigmoid(tc)``; the score of
class c is ``obj * p_c``.  Predictions are ordered head by head (cfg order), then anchor, row, column.

Loss (:class:`YoloLoss`): darknet's YOLOv3 formulation (REFERENCE §4.4, src/yolo_layer.c ``forward_yolo_layer``),
written as a PyTorch loss whose gradient equals darknet's deltas:

* each ground truth goes to the single best anchor among *all* ``num`` anchors (IoU of the centred w, h), on the
  head whose ``mask`` holds that anchor, at cell ``(floor(x*nx), floor(y*ny))``;
* box: ``scale = 2 - w*h``; x, y: ``scale * [BCE-with-logits(t_xy, target) - H(target)]`` (subtracting the
  target's entropy H leaves darknet's gradient ``scale*(target - sigmoid)`` unchanged and makes the loss 0 for
  a perfect prediction); w, h: ``scale * 0.5 * (t_wh - log(w*W/anchor_w))^2``;
* objectness: BCE-with-logits, target 1 at assigned predictions, 0 elsewhere, except that unassigned
  predictions whose decoded box has IoU > ``ignore_thresh`` with a ground truth of their image get no
  objectness loss (``truth_thresh`` is taken as 1, i.e. off, as in every YOLOv3 cfg);
* classes: BCE-with-logits against one-hot (multi-label union when two truths share a prediction), summed;
* everything summed and divided by the batch size (darknet divides the step by the batch).

Region features (:func:`region_features`, DESIGN §3.1-§3.2, REFERENCE §3.4): boxes are chosen without
gradients: score = obj x max class probability, class-aware NMS (IoU 0.45, per image), the top ``top_k`` (36)
survivors by score; when fewer survive the remaining slots are the next-best *pre-NMS* predictions
(``pad="prenms"``, the default) or whole-image boxes (``pad="image"``), flagged ``valid=False``.  Features:
RoIAlign (7x7, sampling_ratio 2, aligned=True) on the chosen feature map (option A/B of REFERENCE §3.4: by
default the cfg's ``region_feature_layer`` or the last 1024-channel layer: layer 80 of yolov3.cfg, 12 of
yolov3-tiny, 17 of shapes-small), then the mean over the 7x7 bins -> one vector per box.  The mean of RoIAlign's
samples is computed in closed form by :func:`roi_mean` (same numbers as ``torchvision.ops.roi_align`` + mean,
tested against it; ~100x faster on CPU); ``pool_impl="torchvision"`` uses roi_align itself.  The feature path keeps
the autograd graph, so gradients reach generated images (TISCL, DESIGN §3.2); the box choice is detached.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, nms, roi_align

__all__ = [
    "Decoded",
    "decode",
    "postprocess",
    "select_regions",
    "RegionFeatures",
    "region_features",
    "roi_mean",
    "targets_from_boxes",
    "YoloLoss",
    "yolo_loss",
    "average_precision",
]


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------
class Decoded(NamedTuple):
    """Decoded predictions of all heads: ``boxes`` (B, N, 4) xyxy in network-input pixels, ``obj`` (B, N)
    objectness probability, ``cls`` (B, N, C) class probabilities (independent logistic)."""

    boxes: torch.Tensor
    obj: torch.Tensor
    cls: torch.Tensor


def _head_view(raw: torch.Tensor, num_anchors: int, classes: int) -> torch.Tensor:
    """``(B, A*(5+C), ny, nx) -> (B, A, ny, nx, 5+C)``."""
    b, ch, ny, nx = raw.shape
    if ch != num_anchors * (5 + classes):
        raise ValueError(f"yolo head has {ch} channels, expected {num_anchors} x (5 + {classes}).")
    return raw.view(b, num_anchors, 5 + classes, ny, nx).permute(0, 1, 3, 4, 2)


def decode(outputs: dict[str, Any]) -> Decoded:
    """Decode every ``[yolo]`` head of a :class:`Darknet` output dict (REFERENCE §4.2).

    Returns :class:`Decoded` with ``N = sum_heads A * ny * nx`` predictions per image (10,647 for yolov3 at 416).
    """
    h_img, w_img = outputs["img_size"]
    boxes, objs, clss = [], [], []
    for raw, head in zip(outputs["yolo"], outputs["heads"]):
        p = _head_view(raw, head.num_anchors, head.classes)  # (B, A, ny, nx, 5+C)
        b, a, ny, nx, _ = p.shape
        gy, gx = torch.meshgrid(
            torch.arange(ny, device=raw.device, dtype=raw.dtype),
            torch.arange(nx, device=raw.device, dtype=raw.dtype),
            indexing="ij",
        )
        anc = torch.tensor(head.anchors, device=raw.device, dtype=raw.dtype).view(1, a, 1, 1, 2)
        cx = (torch.sigmoid(p[..., 0]) + gx) * (w_img / nx)
        cy = (torch.sigmoid(p[..., 1]) + gy) * (h_img / ny)
        wh = torch.exp(p[..., 2:4]) * anc
        xyxy = torch.stack((cx - wh[..., 0] / 2, cy - wh[..., 1] / 2, cx + wh[..., 0] / 2, cy + wh[..., 1] / 2), -1)
        boxes.append(xyxy.reshape(b, -1, 4))
        objs.append(torch.sigmoid(p[..., 4]).reshape(b, -1))
        clss.append(torch.sigmoid(p[..., 5:]).reshape(b, -1, head.classes))
    if not boxes:
        raise ValueError("the network has no [yolo] layers to decode.")
    return Decoded(torch.cat(boxes, 1), torch.cat(objs, 1), torch.cat(clss, 1))


def _clip(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    lim = boxes.new_tensor([w, h, w, h])
    return torch.minimum(boxes.clamp(min=0), lim).nan_to_num(0.0)


# --------------------------------------------------------------------------------------------------
# NMS / postprocessing
# --------------------------------------------------------------------------------------------------
def _grouped_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou: float) -> torch.Tensor:
    """NMS within groups (image x class); indices kept, by decreasing score.

    Same result as ``torchvision.ops.batched_nms``; for up to 3000 boxes it always uses the coordinate-offset trick
    (one ``nms`` call; torchvision switches to a per-group loop above 1000 boxes on CPU, which is ~8x slower for
    the few-hundred-boxes-per-image, many-groups case of region selection).
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    if boxes.shape[0] > 3000:
        return batched_nms(boxes, scores, groups, iou)
    offsets = groups.to(boxes.dtype) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou)


@torch.no_grad()
def postprocess(
    outputs: dict[str, Any],
    conf_thresh: float = 0.25,
    nms_thresh: float = 0.45,
    max_det: int = 300,
    multi_label: bool = False,
    max_candidates: int = 10000,
    normalize: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Detections per image: threshold, class-aware NMS per image (as ``torchvision.ops.batched_nms``), top ``max_det``.

    Score of (prediction, class) = obj x p_class.  ``multi_label=False``: one class per prediction (argmax p_c);
    ``True``: every class whose score exceeds ``conf_thresh`` (darknet / PyTorch-YOLOv3 style, REFERENCE §4.3).
    At most ``max_candidates`` highest-scoring candidates per image enter NMS.  Boxes are clipped to the image,
    xyxy in network-input pixels (``normalize=True``: divided by the image size).

    Returns: list (length B) of dicts ``boxes`` (K, 4), ``scores`` (K,), ``labels`` (K,) int64, sorted by score.
    """
    dec = decode(outputs)
    h, w = outputs["img_size"]
    boxes = _clip(dec.boxes, h, w)
    b, n, c = dec.cls.shape
    if multi_label:
        flat = (dec.obj.unsqueeze(-1) * dec.cls).reshape(b, n * c)
    else:
        best, lab = dec.cls.max(-1)
        flat = dec.obj * best
    k = min(max_candidates, flat.shape[1])
    top, idx = flat.topk(k, dim=1)  # (B, k), sorted
    bi, ki = (top > conf_thresh).nonzero(as_tuple=True)
    scores = top[bi, ki]
    fi = idx[bi, ki]
    if multi_label:
        pi, labels = fi // c, fi % c
    else:
        pi, labels = fi, lab[bi, fi]
    cand = boxes[bi, pi]
    keep = _grouped_nms(cand, scores, bi * c + labels, nms_thresh)  # sorted by decreasing score
    kb = bi[keep]
    order = torch.sort(kb, stable=True).indices  # group by image, score order kept within an image
    keep, kb = keep[order], kb[order]
    counts = torch.bincount(kb, minlength=b)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(kb.numel(), device=kb.device) - starts[kb]
    sel = rank < max_det
    keep, kb = keep[sel], kb[sel]
    out_boxes = cand[keep]
    if normalize:
        out_boxes = out_boxes / out_boxes.new_tensor([w, h, w, h])
    counts = torch.bincount(kb, minlength=b).tolist()
    return [
        {"boxes": bx, "scores": sc, "labels": lb}
        for bx, sc, lb in zip(out_boxes.split(counts), scores[keep].split(counts), labels[keep].split(counts))
    ]


@torch.no_grad()
def select_regions(
    outputs: dict[str, Any],
    top_k: int = 36,
    conf_thresh: float = 0.005,
    nms_thresh: float = 0.45,
    pad: str = "prenms",
    max_candidates: int = 300,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose ``top_k`` boxes per image for region features (no gradients; see the module docstring).

    Score = obj x max_c p_c, label = argmax_c p_c.  Among the ``max_candidates`` best predictions of each image,
    those above ``conf_thresh`` go through class-aware NMS (per image).  Slots are filled with the NMS survivors
    by decreasing score (``valid=True``), then with the next-best remaining predictions (``pad="prenms"``) or
    whole-image boxes of score 0 (``pad="image"``), ``valid=False``.  If the network makes fewer than ``top_k``
    predictions in total, the last slots are whole-image boxes either way.

    Returns:
        boxes ``(B, top_k, 4)`` xyxy network-input pixels (clipped), scores ``(B, top_k)``, labels ``(B, top_k)``
        int64 (-1 for whole-image padding), valid ``(B, top_k)`` bool.
    """
    if pad not in ("prenms", "image"):
        raise ValueError(f"pad must be 'prenms' or 'image', got {pad!r}.")
    if top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}.")
    dec = decode({**outputs, "yolo": [y.detach() for y in outputs["yolo"]]})
    h, w = outputs["img_size"]
    boxes = _clip(dec.boxes, h, w)
    best, labels = dec.cls.max(-1)
    score = dec.obj * best  # (B, N)
    b, n = score.shape
    dev = score.device

    k = min(max_candidates, n)
    top, idx = score.topk(k, dim=1)
    bi, ki = (top > conf_thresh).nonzero(as_tuple=True)
    pi = idx[bi, ki]
    keep = _grouped_nms(boxes[bi, pi], top[bi, ki], bi * dec.cls.shape[-1] + labels[bi, pi], nms_thresh)
    kept = torch.zeros(b, n, dtype=torch.bool, device=dev)
    kept[bi[keep], pi[keep]] = True

    # survivors first, then every other prediction, each group by decreasing score (two stable sorts)
    by_score = score.argsort(dim=1, descending=True, stable=True)
    survivors_first = (~kept.gather(1, by_score)).to(torch.int8).argsort(dim=1, stable=True)
    kk = min(top_k, n)
    order = by_score.gather(1, survivors_first[:, :kk])
    sel_boxes = boxes.gather(1, order.unsqueeze(-1).expand(b, kk, 4))
    sel_scores = score.gather(1, order)
    sel_labels = labels.gather(1, order)
    sel_valid = kept.gather(1, order)
    if pad == "image":
        whole = boxes.new_tensor([0.0, 0.0, w, h])
        inv = ~sel_valid
        sel_boxes = torch.where(inv.unsqueeze(-1), whole, sel_boxes)
        sel_scores = sel_scores.masked_fill(inv, 0.0)
        sel_labels = sel_labels.masked_fill(inv, -1)
    if kk < top_k:  # fewer predictions than slots: whole-image boxes
        extra = top_k - kk
        sel_boxes = torch.cat([sel_boxes, boxes.new_tensor([0.0, 0.0, w, h]).expand(b, extra, 4)], 1)
        sel_scores = torch.cat([sel_scores, sel_scores.new_zeros(b, extra)], 1)
        sel_labels = torch.cat([sel_labels, sel_labels.new_full((b, extra), -1)], 1)
        sel_valid = torch.cat([sel_valid, sel_valid.new_zeros(b, extra)], 1)
    return sel_boxes, sel_scores, sel_labels, sel_valid


def _axis_weights(start: torch.Tensor, end: torch.Tensor, size: int, scale: float, bins: int, grid: int, aligned: bool) -> torch.Tensor:
    """Per-box weights ``(..., size)`` of one axis: the mean, over ``bins * grid`` RoIAlign sample positions, of
    their 1-D linear-interpolation weights (torchvision's CPU kernel: samples outside [-1, size] count as 0,
    positions clamped at 0 and at size-1)."""
    off = 0.5 if aligned else 0.0
    s = start * scale - off
    length = end * scale - off - s
    if not aligned:
        length = length.clamp(min=1.0)
    step = length / bins
    k = torch.arange(bins * grid, device=start.device, dtype=start.dtype)
    frac = (k // grid) + ((k % grid) + 0.5) / grid  # bin index + position inside the bin
    pos = s.unsqueeze(-1) + step.unsqueeze(-1) * frac  # (..., S)
    inside = ((pos >= -1.0) & (pos <= size)).to(start.dtype)
    pos = pos.clamp(min=0.0)
    low = pos.floor().long()
    at_end = low >= size - 1
    low = torch.where(at_end, torch.full_like(low, size - 1), low)
    high = torch.where(at_end, low, low + 1)
    frac_hi = torch.where(at_end, torch.zeros_like(pos), pos - low.to(pos.dtype))
    w = torch.zeros(*pos.shape[:-1], size, device=start.device, dtype=start.dtype)
    w.scatter_add_(-1, low, (1.0 - frac_hi) * inside)
    w.scatter_add_(-1, high, frac_hi * inside)
    return w / (bins * grid)


def roi_mean(
    fmap: torch.Tensor,
    boxes: torch.Tensor,
    spatial_scale: float,
    output_size: int = 7,
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> torch.Tensor:
    """``roi_align(fmap, boxes, output_size, spatial_scale, sampling_ratio, aligned).mean((2, 3))``, computed exactly
    but without the per-bin loop.

    The average of RoIAlign's bilinear samples over all ``output_size**2`` bins is linear in the feature map with
    weights that factor into a row part and a column part, so the pooled vector is
    ``sum_{y,x} wy[y] * wx[x] * fmap[:, :, y, x]`` (two small matrix products).  That is ~100x faster than
    ``torchvision.ops.roi_align`` on CPU for 36 boxes x 1024 channels, and differentiable in ``fmap`` (not in the
    boxes).  Requires ``sampling_ratio > 0`` (fixed sample grid).

    Args: ``fmap (B, C, H, W)``, ``boxes (B, K, 4)`` xyxy in input pixels.  Returns ``(B, K, C)``.
    """
    if sampling_ratio <= 0:
        raise ValueError("roi_mean needs a fixed sampling_ratio > 0; use torchvision.ops.roi_align for adaptive sampling.")
    _, _, h, w = fmap.shape
    with torch.no_grad():
        bx = boxes.detach().to(fmap.dtype)
        wy = _axis_weights(bx[..., 1], bx[..., 3], h, spatial_scale, output_size, sampling_ratio, aligned)  # (B, K, H)
        wx = _axis_weights(bx[..., 0], bx[..., 2], w, spatial_scale, output_size, sampling_ratio, aligned)  # (B, K, W)
    rows = torch.einsum("bky,bcyx->bkcx", wy, fmap)  # (B, K, C, W)
    return torch.einsum("bkcx,bkx->bkc", rows, wx)


class RegionFeatures(NamedTuple):
    """Per-image region features: ``boxes`` (B, K, 4) xyxy **normalised** to [0, 1] (like the shapes-world
    metadata), ``feats`` (B, K, C_feat) (C_feat = 1024 for the shipped cfgs), ``scores`` (B, K), ``valid``
    (B, K) bool."""

    boxes: torch.Tensor
    feats: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor


def region_features(
    model: nn.Module,
    images: torch.Tensor,
    top_k: int = 36,
    feature_layer: int | None = None,
    roi_size: int = 7,
    sampling_ratio: int = 2,
    aligned: bool = True,
    conf_thresh: float = 0.005,
    nms_thresh: float = 0.45,
    pad: str = "prenms",
    value_range: tuple[float, float] = (0.0, 1.0),
    input_size: int | None = None,
    max_candidates: int = 300,
    pool_impl: str = "separable",
) -> RegionFeatures:
    """Top-``top_k`` boxes and one feature vector per box (CPGAN's V_o / region features, DESIGN §3.1-§3.2).

    Args:
        model: a :class:`~cpgan.models.darknet.Darknet` (put it in ``eval()`` mode first for frozen BN stats;
            this function does not change the mode).
        images: ``(B, 3, H, W)``, square, values in ``value_range`` (use ``(-1, 1)`` for generator outputs).
        feature_layer: layer whose output is pooled; ``None`` or negative -> ``model.default_feature_layer``.
        roi_size, sampling_ratio, aligned: ``torchvision.ops.roi_align`` settings; the ``roi_size x roi_size``
            bins are then averaged.
        conf_thresh, nms_thresh, pad, max_candidates: box selection, see :func:`select_regions`.
        input_size: resize (bilinear, differentiable) to ``input_size x input_size`` before the detector;
            ``None`` keeps the size (it must be a multiple of ``model.max_stride``).
        pool_impl: ``"separable"`` (:func:`roi_mean`, the same numbers as RoIAlign + mean, much faster on CPU)
            or ``"torchvision"`` (``torchvision.ops.roi_align`` then the mean).

    Returns:
        :class:`RegionFeatures` ``(boxes (B,K,4) normalised xyxy, feats (B,K,C), scores (B,K), valid (B,K))``.
        ``feats`` carries the autograd graph back to ``images`` when gradients are enabled; boxes, scores and
        valid never do.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}.")
    lo, hi = value_range
    x = images if (lo, hi) == (0.0, 1.0) else (images - lo) / (hi - lo)
    if input_size is not None and tuple(x.shape[-2:]) != (input_size, input_size):
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    layer = getattr(model, "default_feature_layer") if feature_layer is None or feature_layer < 0 else feature_layer
    out = model(x, keep=[layer])
    fmap = out["features"][layer]  # (B, C, h, w)
    boxes, scores, _, valid = select_regions(
        out, top_k=top_k, conf_thresh=conf_thresh, nms_thresh=nms_thresh, pad=pad, max_candidates=max_candidates
    )
    h_in, w_in = x.shape[-2:]
    sx, sy = fmap.shape[-1] / w_in, fmap.shape[-2] / h_in
    if abs(sx - sy) > 1e-9:
        raise ValueError(f"feature layer {layer} has unequal x/y scales ({sx}, {sy}); use square inputs.")
    b = x.shape[0]
    if pool_impl == "separable":
        feats = roi_mean(fmap, boxes, sx, roi_size, sampling_ratio, aligned)
    elif pool_impl == "torchvision":
        bidx = torch.arange(b, device=x.device, dtype=fmap.dtype).view(b, 1, 1).expand(b, top_k, 1)
        rois = torch.cat([bidx, boxes.to(fmap.dtype)], -1).reshape(-1, 5)
        pooled = roi_align(fmap, rois, output_size=roi_size, spatial_scale=sx, sampling_ratio=sampling_ratio, aligned=aligned)
        feats = pooled.mean(dim=(2, 3)).view(b, top_k, -1)
    else:
        raise ValueError(f"pool_impl must be 'separable' or 'torchvision', got {pool_impl!r}.")
    norm = boxes / boxes.new_tensor([w_in, h_in, w_in, h_in])
    return RegionFeatures(norm, feats, scores, valid)


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------
def targets_from_boxes(
    boxes: Sequence[torch.Tensor | np.ndarray | Sequence[Sequence[float]]],
    labels: Sequence[torch.Tensor | np.ndarray | Sequence[int]],
) -> torch.Tensor:
    """Per-image normalised xyxy boxes and class ids -> YOLO targets ``(M, 6)``: ``[image, class, cx, cy, w, h]``.

    ``boxes[i]``: ``(n_i, 4)`` in [0, 1] (e.g. the shapes-world ``box`` fields); ``labels[i]``: ``(n_i,)``.
    """
    if len(boxes) != len(labels):
        raise ValueError(f"got {len(boxes)} box lists but {len(labels)} label lists.")
    rows = []
    for i, (bx, lb) in enumerate(zip(boxes, labels)):
        bx = torch.as_tensor(np.asarray(bx, dtype=np.float32)).reshape(-1, 4)
        lb = torch.as_tensor(np.asarray(lb, dtype=np.float32)).reshape(-1)
        if bx.shape[0] != lb.shape[0]:
            raise ValueError(f"image {i}: {bx.shape[0]} boxes but {lb.shape[0]} labels.")
        if bx.shape[0] == 0:
            continue
        cxcy = (bx[:, :2] + bx[:, 2:]) / 2
        wh = bx[:, 2:] - bx[:, :2]
        rows.append(torch.cat([torch.full((bx.shape[0], 1), float(i)), lb[:, None], cxcy, wh], 1))
    return torch.cat(rows) if rows else torch.zeros(0, 6)


def _iou_cxcywh(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of ``a (..., P, 4)`` and ``b (..., G, 4)`` boxes in (cx, cy, w, h) -> ``(..., P, G)``."""
    a1, a2 = a[..., :2] - a[..., 2:] / 2, a[..., :2] + a[..., 2:] / 2
    b1, b2 = b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2
    lt = torch.maximum(a1.unsqueeze(-2), b1.unsqueeze(-3))
    rb = torch.minimum(a2.unsqueeze(-2), b2.unsqueeze(-3))
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = a[..., 2:].prod(-1).unsqueeze(-1)
    area_b = b[..., 2:].prod(-1).unsqueeze(-2)
    return inter / (area_a + area_b - inter).clamp(min=1e-12)


class YoloLoss(nn.Module):
    """Darknet's YOLOv3 loss (module docstring; REFERENCE §4.4).

    Args:
        ignore_thresh: IoU above which an unassigned prediction gets no objectness loss; ``None`` = each
            ``[yolo]`` layer's own value (0.7 in yolov3.cfg).
        weights: multipliers of the four parts ``xy, wh, obj, cls`` (darknet: all 1).

    Two truths assigned to the same prediction (same cell and anchor) both contribute box terms (darknet keeps
    the later one's deltas) and their classes are united in the one-hot target (as darknet's ``delta_yolo_class``).

    ``forward(outputs, targets)``: ``outputs`` from :class:`Darknet`, ``targets (M, 6)`` rows
    ``[image, class, cx, cy, w, h]`` normalised to [0, 1] (see :func:`targets_from_boxes`).
    Returns ``(loss, parts)``: the scalar loss (sum / batch size) and a dict of detached floats
    ``xy, wh, obj, cls, assigned``.
    """

    def __init__(self, ignore_thresh: float | None = None, weights: dict[str, float] | None = None) -> None:
        super().__init__()
        self.ignore_thresh = ignore_thresh
        self.weights = {"xy": 1.0, "wh": 1.0, "obj": 1.0, "cls": 1.0, **(weights or {})}

    def forward(self, outputs: dict[str, Any], targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        raws = outputs["yolo"]
        if not raws:
            raise ValueError("the network has no [yolo] layers; nothing to train.")
        h_img, w_img = outputs["img_size"]
        bsz = raws[0].shape[0]
        dev, dt = raws[0].device, raws[0].dtype
        t = torch.as_tensor(targets, dtype=dt, device=dev).reshape(-1, 6)
        if t.numel():
            if (t[:, 0] < 0).any() or (t[:, 0] >= bsz).any():
                raise ValueError(f"targets: image index outside 0..{bsz - 1}.")
            if (t[:, 4:] <= 0).any():
                raise ValueError("targets: every box needs w > 0 and h > 0 (normalised cx, cy, w, h).")
            if (t[:, 2:4] < 0).any() or (t[:, 2:4] > 1).any():
                raise ValueError("targets: box centres must be normalised to [0, 1].")
        tb = t[:, 0].long()
        tc = t[:, 1].long()
        ncls = outputs["heads"][0].classes
        if t.numel() and ((tc < 0).any() or (tc >= ncls).any()):
            raise ValueError(f"targets: class id outside 0..{ncls - 1}.")

        # ground truths padded per image for the ignore test: (B, G, 4) + validity (B, G)
        counts = torch.bincount(tb, minlength=bsz)
        g = int(counts.max()) if t.numel() else 0
        gt = t.new_zeros(bsz, max(g, 1), 4)
        gvalid = torch.zeros(bsz, max(g, 1), dtype=torch.bool, device=dev)
        if t.numel():
            order = torch.sort(tb, stable=True).indices
            sb = tb[order]
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(sb.numel(), device=dev) - starts[sb]
            gt[sb, slot] = t[order, 2:6]
            gvalid[sb, slot] = True

        zero = raws[0].sum() * 0.0
        parts = {"xy": zero, "wh": zero, "obj": zero, "cls": zero}
        assigned_total = 0
        for raw, head in zip(raws, outputs["heads"]):
            p = _head_view(raw, head.num_anchors, head.classes)  # (B, A, ny, nx, 5+C)
            _, a, ny, nx, _ = p.shape
            all_anc = torch.tensor(head.all_anchors, dtype=dt, device=dev) / t.new_tensor([w_img, h_img])  # (num, 2)
            anc = all_anc[torch.tensor(head.mask, device=dev)]  # (A, 2)

            # --- ignore mask from the decoded (detached) predictions
            with torch.no_grad():
                gy, gx = torch.meshgrid(torch.arange(ny, device=dev, dtype=dt), torch.arange(nx, device=dev, dtype=dt), indexing="ij")
                pd = p.detach()
                pbox = torch.stack(
                    (
                        (torch.sigmoid(pd[..., 0]) + gx) / nx,
                        (torch.sigmoid(pd[..., 1]) + gy) / ny,
                        torch.exp(pd[..., 2]) * anc[:, 0].view(1, a, 1, 1),
                        torch.exp(pd[..., 3]) * anc[:, 1].view(1, a, 1, 1),
                    ),
                    -1,
                ).reshape(bsz, -1, 4)
                iou = _iou_cxcywh(pbox, gt).masked_fill(~gvalid.unsqueeze(1), 0.0)  # (B, P, G)
                thr = head.ignore_thresh if self.ignore_thresh is None else self.ignore_thresh
                ignore = (iou.max(-1).values > thr).view(bsz, a, ny, nx)

            obj_t = torch.zeros(bsz, a, ny, nx, dtype=dt, device=dev)
            obj_w = (~ignore).to(dt)

            # --- assignment: best of all anchors, kept if it belongs to this head
            if t.numel():
                wh = t[:, 4:6]
                inter = torch.minimum(wh[:, None, :], all_anc[None]).prod(-1)
                iou_a = inter / (wh.prod(-1)[:, None] + all_anc.prod(-1)[None] - inter)
                best = iou_a.argmax(1)  # (M,)
                slot_of = torch.full((len(head.all_anchors),), -1, dtype=torch.long, device=dev)
                slot_of[torch.tensor(head.mask, device=dev)] = torch.arange(a, device=dev)
                ai = slot_of[best]
                on = ai >= 0
            else:
                on = torch.zeros(0, dtype=torch.bool, device=dev)
            if on.any():
                ts = t[on]
                a_i, b_i, c_i = ai[on], tb[on], tc[on]
                gxf, gyf = ts[:, 2] * nx, ts[:, 3] * ny
                ci = gxf.long().clamp(0, nx - 1)
                cj = gyf.long().clamp(0, ny - 1)
                pa = p[b_i, a_i, cj, ci]  # (m, 5+C)
                txy = torch.stack((gxf - ci, gyf - cj), -1).clamp(0.0, 1.0)
                twh = torch.log(ts[:, 4:6] / anc[a_i])
                scale = (2.0 - ts[:, 4] * ts[:, 5]).unsqueeze(-1)
                entropy = -(torch.special.xlogy(txy, txy) + torch.special.xlogy(1 - txy, 1 - txy))
                bce_xy = F.binary_cross_entropy_with_logits(pa[:, 0:2], txy, reduction="none") - entropy
                parts["xy"] = parts["xy"] + (scale * bce_xy).sum()
                parts["wh"] = parts["wh"] + (scale * 0.5 * (pa[:, 2:4] - twh) ** 2).sum()
                obj_t[b_i, a_i, cj, ci] = 1.0
                obj_w[b_i, a_i, cj, ci] = 1.0
                assigned = torch.zeros(bsz, a, ny, nx, dtype=torch.bool, device=dev)
                assigned[b_i, a_i, cj, ci] = True
                cls_t = torch.zeros(bsz, a, ny, nx, head.classes, dtype=dt, device=dev)
                cls_t[b_i, a_i, cj, ci, c_i] = 1.0
                parts["cls"] = parts["cls"] + F.binary_cross_entropy_with_logits(
                    p[..., 5:][assigned], cls_t[assigned], reduction="sum"
                )
                assigned_total += int(on.sum())
            parts["obj"] = parts["obj"] + F.binary_cross_entropy_with_logits(p[..., 4], obj_t, weight=obj_w, reduction="sum")

        total = sum(self.weights[k] * v for k, v in parts.items()) / bsz
        info = {k: float(v.detach()) / bsz for k, v in parts.items()}
        info["assigned"] = float(assigned_total)
        return total, info


def yolo_loss(outputs: dict[str, Any], targets: torch.Tensor, ignore_thresh: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Functional form of :class:`YoloLoss`."""
    return YoloLoss(ignore_thresh)(outputs, targets)


# --------------------------------------------------------------------------------------------------
# mAP
# --------------------------------------------------------------------------------------------------
def _np(x: Any, shape_tail: tuple[int, ...] = ()) -> np.ndarray:
    """Tensor/array/list -> float64 numpy array of shape ``(-1, *shape_tail)``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape((-1,) + shape_tail)


def average_precision(
    pred_boxes: Sequence[Any],
    pred_scores: Sequence[Any],
    pred_labels: Sequence[Any],
    gt_boxes: Sequence[Any],
    gt_labels: Sequence[Any],
    iou_thresh: float = 0.5,
    num_classes: int | None = None,
) -> tuple[float, dict[int, float]]:
    """mAP@``iou_thresh`` with PASCAL VOC all-point interpolation (VOC2010+ ``voc_ap``), per class then mean.

    Inputs are per-image sequences (boxes ``(K, 4)`` xyxy in any consistent unit, scores ``(K,)``, labels ``(K,)``).
    Per class, detections of all images are ranked by score; a detection is a true positive when its best-IoU
    ground truth (same image, same class) has IoU > ``iou_thresh`` (strict, as VOC) and is not yet matched,
    else a false positive.  AP = area under the monotone (upper-envelope) precision-recall curve.  Classes with
    no ground truth are left out of the mean (VOC); classes with ground truth but no detection score 0.
    ``num_classes`` restricts to ids ``0..num_classes-1`` (default: every id seen in the ground truth).

    Returns ``(mAP, {class_id: AP})`` (mAP is 0.0 when there is no ground truth at all).
    """
    n_img = len(gt_boxes)
    if not (len(pred_boxes) == len(pred_scores) == len(pred_labels) == len(gt_labels) == n_img):
        raise ValueError("average_precision: all inputs must be per-image sequences of the same length.")
    pb = [_np(b, (4,)) for b in pred_boxes]
    ps = [_np(s) for s in pred_scores]
    pl = [_np(lb).astype(np.int64) for lb in pred_labels]
    gb = [_np(b, (4,)) for b in gt_boxes]
    gl = [_np(lb).astype(np.int64) for lb in gt_labels]
    classes = sorted(set(np.concatenate(gl).tolist())) if n_img else []
    if num_classes is not None:
        classes = [c for c in classes if 0 <= c < num_classes]
    ap: dict[int, float] = {}
    for c in classes:
        gts = [g[lab == c] for g, lab in zip(gb, gl)]
        n_gt = sum(len(g) for g in gts)
        dets = [(s, i, b) for i in range(n_img) for s, b in zip(ps[i][pl[i] == c], pb[i][pl[i] == c])]
        if not dets:
            ap[c] = 0.0
            continue
        dets.sort(key=lambda d: -d[0])  # stable: ties keep input order
        used = [np.zeros(len(g), dtype=bool) for g in gts]
        tp = np.zeros(len(dets))
        for k, (_, i, box) in enumerate(dets):
            g = gts[i]
            if len(g) == 0:
                continue
            lt = np.maximum(g[:, :2], box[:2])
            rb = np.minimum(g[:, 2:], box[2:])
            inter = np.clip(rb - lt, 0, None).prod(1)
            union = (box[2:] - box[:2]).prod() + (g[:, 2:] - g[:, :2]).prod(1) - inter
            iou = inter / np.maximum(union, 1e-12)
            j = int(iou.argmax())
            if iou[j] > iou_thresh and not used[i][j]:
                used[i][j] = True
                tp[k] = 1.0
        ctp = np.cumsum(tp)
        rec = ctp / n_gt
        prec = ctp / np.arange(1, len(dets) + 1)
        mrec = np.concatenate([[0.0], rec, [1.0]])
        mpre = np.concatenate([[0.0], prec, [0.0]])
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        idx = np.nonzero(mrec[1:] != mrec[:-1])[0]
        ap[c] = float(((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]).sum())
    mean = float(np.mean(list(ap.values()))) if ap else 0.0
    return mean, ap
