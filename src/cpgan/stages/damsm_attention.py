"""Word-attention maps of the DAMSM encoders on shapes-world test images, and their localisation rate.

For every colour or shape word of a test caption, the peak of its attention over the grid regions (the
last G×G regions; OAIE's object regions come first and are ignored here) is *a hit* when the peak cell's
centre lies inside the ground-truth box of an object of that colour (resp. shape). The rate over all such
words is reported as ``attention_hit_rate``; chance is roughly the share of the image covered by the
matching objects' boxes (``attention_chance``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..data import shapes
from ..data.dataset import CaptionDataset, SplitData, eval_batches
from ..data.text import Vocabulary
from ..encode import Encoders

_COLOUR = {w: c for c, ws in shapes.COLOUR_WORDS.items() for w in ws}
_SHAPE = {w: s for s, ws in shapes.SHAPE_WORDS.items() for w in ws}


def word_kind(word: str) -> tuple[str, str] | None:
    """``("colour", "red")`` / ``("shape", "circle")`` for attribute words, else None."""
    if word in _COLOUR:
        return "colour", _COLOUR[word]
    if word in _SHAPE:
        return "shape", _SHAPE[word]
    return None


def peak_hits(attn_grid: np.ndarray, words: list[str], objects: list[dict]) -> tuple[int, int, float]:
    """Hits, attribute words and chance for one caption.

    attn_grid: ``(T, G, G)`` attention of each word over the grid cells.
    """
    g = attn_grid.shape[-1]
    hits = total = 0
    chance = 0.0
    for t, w in enumerate(words):
        kind = word_kind(w)
        if kind is None:
            continue
        boxes = [o["box"] for o in objects if o[kind[0]] == kind[1]]
        if not boxes:
            continue
        i, j = np.unravel_index(int(np.argmax(attn_grid[t])), (g, g))
        cx, cy = (j + 0.5) / g, (i + 0.5) / g
        total += 1
        hits += any(b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in boxes)
        ys, xs = (np.arange(g) + 0.5) / g, (np.arange(g) + 0.5) / g
        inside = np.zeros((g, g), bool)
        for b in boxes:
            inside |= ((ys[:, None] >= b[1]) & (ys[:, None] <= b[3]) & (xs[None, :] >= b[0]) & (xs[None, :] <= b[2]))
        chance += inside.mean()
    return hits, total, chance


@torch.no_grad()
def attention_report(enc: Encoders, ds: CaptionDataset, data: SplitData, device: torch.device, out_dir: Path,
                     cfg, limit: int = 500, n_figures: int = 8) -> dict:
    from .damsm import batch_loss

    vocab = Vocabulary.load(Path(out_dir).parent.parent / "vocab" / "vocab.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    g = cfg.model.grid_size
    hits = total = 0
    chance = 0.0
    figures = []
    for b in eval_batches(ds, 50, limit):
        if b["size"] < 2:
            continue
        out = batch_loss(enc, b, "test", device, cfg.damsm)
        x, caps, lens = b["images"][-1], b["captions"], b["lengths"]
        attn = out["attention"][:, :, -g * g:].reshape(len(lens), -1, g, g).cpu().numpy()
        for k in range(len(lens)):
            toks = vocab.decode(caps[k, : lens[k]].tolist())
            i = int(b["index"][k])
            h, t, c = peak_hits(attn[k, : lens[k]], toks, data.records[i]["objects"])
            hits, total, chance = hits + h, total + t, chance + c
            if len(figures) < n_figures:
                figures.append((x[k].cpu(), toks, attn[k, : lens[k]]))
    _save_figure(figures, out_dir / "attention.png")
    return {"attention_hit_rate": hits / max(total, 1), "attention_chance": chance / max(total, 1),
            "attention_words": total}


def _save_figure(figures: list, path: Path, tile: int = 64) -> None:
    """One row per caption: the image, then each word's attention over it."""
    if not figures:
        return
    cols = 1 + max(len(f[1]) for f in figures)
    canvas = Image.new("RGB", (cols * tile, len(figures) * (tile + 12)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (img, toks, attn) in enumerate(figures):
        base = ((img.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy().astype(np.uint8)
        base = np.asarray(Image.fromarray(base).resize((tile, tile), Image.BILINEAR)).astype(np.float32)
        y = r * (tile + 12)
        canvas.paste(Image.fromarray(base.astype(np.uint8)), (0, y + 12))
        for t, w in enumerate(toks):
            a = torch.from_numpy(attn[t])[None, None].float()
            a = F.interpolate(a, size=(tile, tile), mode="bilinear", align_corners=False)[0, 0].numpy()
            a = (a - a.min()) / (a.max() - a.min() + 1e-8)
            over = base * (0.35 + 0.65 * a[..., None])
            over[..., 0] = np.maximum(over[..., 0], 255 * a * 0.6)
            canvas.paste(Image.fromarray(over.clip(0, 255).astype(np.uint8)), ((t + 1) * tile, y + 12))
            draw.text(((t + 1) * tile + 2, y), w[:10], fill="black")
    canvas.save(path)
