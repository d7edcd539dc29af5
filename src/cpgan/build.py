"""Build models from the config tree, and load the trained ones of a run directory.

Stages, ``cpgan generate``, ``cpgan evaluate`` and the web server all construct networks here, so the
mapping config -> constructor arguments exists once.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import Config
from .models.image_encoder import ImageEncoder
from .models.text_encoder import TextEncoder
from .utils.checkpoint import load_weights

OBJECT_DIM = 1024  # YOLOv3 region feature size (paper §3.2, §3.3)


def uses_memory(cfg: Config) -> bool:
    return cfg.model.text_encoder == "mate"


def uses_objects(cfg: Config) -> bool:
    return cfg.model.image_encoder == "oaie"


def uses_detector(cfg: Config) -> bool:
    return uses_memory(cfg) or uses_objects(cfg)


def text_encoder(cfg: Config, vocab_size: int) -> TextEncoder:
    """Plain AttnGAN ``RNN_ENCODER`` or MATE (``model.text_encoder``)."""
    m = cfg.model
    # MATE: the CPGAN release leaves the word embedding at PyTorch's N(0, 1) (its init only touches the 1x1
    # conv). With AttnGAN's U(-0.1, 0.1) the tanh(cat(e, p(m))) input is dominated by the memory half, whose
    # rows are similar across words, and the sentence code does not learn (measured: sentence loss stuck at
    # chance for 60 steps on the shapes world, vs learning with N(0, 1)).
    return TextEncoder(vocab_size, embed_dim=m.word_dim, hidden_dim=m.embedding_dim, dropout=cfg.damsm.dropout,
                       memory_dim=m.memory_dim if uses_memory(cfg) else 0,
                       embedding_init="normal" if uses_memory(cfg) else "uniform")


def image_encoder(cfg: Config) -> ImageEncoder:
    """AttnGAN grid encoder or the Object-Aware Image Encoder (``model.image_encoder``)."""
    m = cfg.model
    weights = m.inception_weights or None if m.image_backbone == "inception" else None
    return ImageEncoder(out_dim=m.embedding_dim, backbone=m.image_backbone, grid_size=m.grid_size,
                        object_dim=OBJECT_DIM if uses_objects(cfg) else 0, small_width=m.image_backbone_width,
                        weights=weights)


def load_damsm(cfg: Config, run_dir: Path, vocab_size: int, device: torch.device | str = "cpu"
               ) -> tuple[TextEncoder, ImageEncoder]:
    """The frozen DAMSM encoders trained by the ``damsm`` stage (eval mode, no gradients)."""
    d = Path(run_dir) / "damsm"
    te, ie = text_encoder(cfg, vocab_size), image_encoder(cfg)
    sd, _ = load_weights(d / "text_encoder.safetensors")
    te.load_state_dict(sd)
    sd, _ = load_weights(d / "image_encoder.safetensors")
    ie.load_state_dict(sd)
    for mod in (te, ie):
        mod.to(device).eval()
        for p in mod.parameters():
            p.requires_grad_(False)
    return te, ie


def load_memory_bank(run_dir: Path, device: torch.device | str = "cpu") -> torch.Tensor:
    """The (V, 1024) word memory bank of the ``memory`` stage, eq. (7)."""
    sd, _ = load_weights(Path(run_dir) / "memory" / "memory.safetensors", device=device)
    return sd["bank"]
