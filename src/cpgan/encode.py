"""Glue between batches and the DAMSM encoders: memories for MATE, object features for OAIE.

:class:`Encoders` bundles the text encoder (plain or MATE, with its memory bank) and the image encoder
(grid or OAIE, with the region stores of real images and, for generated images, the detector), so that
the DAMSM stage, TISCL in the GAN stage, R-precision and the sampler all call the same two methods.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .models.image_encoder import ImageEncoder, ImageFeatures
from .models.text_encoder import TextEncoder, gather_memory

ObjectFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""images (B,3,H,W) in [-1,1] -> (object features (B,36,1024), valid (B,36) bool), differentiable in images."""


class Encoders:
    """Text + image encoders with their side inputs.

    Args:
        text: the text encoder.
        image: the image encoder.
        memory_bank: ``(V, 1024)`` word memories (MATE) or None.
        region_lookup: ``(split, image indices (B,)) -> (feats (B,36,1024), valid (B,36))`` for real images
            whose region features were stored by the detector stage (OAIE) or None.
        object_fn: detector path for images without stored features (generated images; OAIE) or None.
    """

    def __init__(self, text: TextEncoder, image: ImageEncoder, memory_bank: torch.Tensor | None = None,
                 region_lookup: Callable | None = None, object_fn: ObjectFn | None = None):
        self.text, self.image = text, image
        self.memory_bank = memory_bank
        self.region_lookup = region_lookup
        self.object_fn = object_fn

    @property
    def uses_objects(self) -> bool:
        return self.image.object_dim > 0

    def encode_text(self, captions: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T)`` ids -> words ``(B, d, T)``, sentence ``(B, d)``."""
        memory = None
        if self.text.memory_dim > 0:
            if self.memory_bank is None:
                raise RuntimeError("MATE text encoder needs the memory bank (run the memory stage)")
            memory = gather_memory(self.memory_bank, captions)
        return self.text(captions, lengths, memory=memory)

    def encode_images(self, images: torch.Tensor, split: str | None = None,
                      index: torch.Tensor | None = None) -> ImageFeatures:
        """Images ``(B, 3, H, W)`` in [-1, 1] -> regions ``(B, d, R)``, global ``(B, d)``, region mask.

        Real images (``split``/``index`` given) use stored region features; other images go through the
        detector (``object_fn``), which keeps the gradient to the pixels (box choice detached).
        """
        if not self.uses_objects:
            return self.image(images)
        if split is not None and index is not None and self.region_lookup is not None:
            feats, valid = self.region_lookup(split, index)
        elif self.object_fn is not None:
            feats, valid = self.object_fn(images)
        else:
            raise RuntimeError("the object-aware image encoder needs region features or a detector")
        return self.image(images, objects=feats.to(images.device, images.dtype), object_mask=valid.to(images.device))


def store_lookup(run_dir: Path, device: torch.device | str = "cpu") -> Callable:
    """``(split, indices) -> (feats, valid)`` over the detector stage's region stores of real images.

    ``indices`` are positions in :func:`cpgan.data.dataset.load_split`'s order; the stores are keyed by
    image key, so the lookup maps through the split's keys.
    """
    from .data.dataset import load_split
    from .data.regions import RegionStore

    stores: dict[str, tuple] = {}

    def lookup(split: str, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in stores:
            st = RegionStore(Path(run_dir) / "detector" / f"regions_{split}")
            keys = load_split(run_dir, split).keys
            rows = torch.tensor([st.index_of(k) for k in keys], dtype=torch.long)
            stores[split] = (st, rows)
        st, rows = stores[split]
        b = st.get_batch(rows[index.cpu()].numpy())
        return (torch.as_tensor(b["feats"]).float().to(device), torch.as_tensor(b["valid"]).bool().to(device))

    return lookup


def detector_object_fn(cfg, run_dir: Path, device: torch.device | str = "cpu") -> ObjectFn:
    """The OAIE's object path for images without stored features (generated images).

    The run's detector (frozen, eval mode) picks the top boxes without gradient; the RoIAlign features keep
    the graph back to the pixels, so TISCL reaches the generator through the detector's feature path
    (DESIGN §3.2).
    """
    from .models.yolo import region_features
    from .stages.detector import load_detector

    det = load_detector(cfg, run_dir, device)
    d = cfg.detector

    def fn(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rf = region_features(det, images, top_k=cfg.model.num_regions,
                             feature_layer=d.feature_layer if d.feature_layer >= 0 else None,
                             conf_thresh=d.conf_thresh, nms_thresh=d.nms_thresh, value_range=(-1.0, 1.0),
                             input_size=d.input_size)
        return rf.feats, rf.valid

    return fn
