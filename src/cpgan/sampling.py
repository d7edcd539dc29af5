"""Sampling from a trained run: ``cpgan generate``, the web server and the report use :class:`Sampler`.

Captions are tokenised as in training; unknown words are reported and dropped; a caption with no known
word is an error that says so.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import build
from .config import Config, load_config
from .data.dataset import load_vocab
from .data.text import tokenize
from .models.generator import truncated_noise


class CaptionError(ValueError):
    """A caption that cannot be drawn (empty, no known word)."""


class Sampler:
    """A trained generator with its frozen text encoder (and memory bank).

    Attributes:
        max_words: captions are cut to this many known words (``text.eval_words_num``).
        stage_sizes: image size of every generator stage, ascending.
    """

    def __init__(self, cfg: Config, run_dir: Path, device: torch.device | str = "cpu"):
        from .stages.damsm import make_encoders
        from .stages.evaluate import load_generator

        self.cfg, self.run_dir, self.device = cfg, Path(run_dir), torch.device(device)
        self.vocab = load_vocab(run_dir)
        te, ie = build.load_damsm(cfg, run_dir, len(self.vocab), self.device)
        self.enc = make_encoders(cfg, run_dir, len(self.vocab), self.device, te, ie)
        self.G = load_generator(cfg, run_dir, self.device)
        self.max_words = cfg.text.eval_words_num
        self.stage_sizes = [self.G.base_size * 2 ** i for i in range(self.G.branch_num)]
        self.name = Path(run_dir).name
        self.examples = self._examples()

    def _examples(self, n: int = 6) -> list[str]:
        """A few test captions, shown as clickable examples by the web page."""
        try:
            from .data.dataset import load_split

            recs = load_split(self.run_dir, "test").records
            return [r["captions"][0] for r in recs[:n] if r.get("captions")]
        except Exception:  # noqa: BLE001 - examples are optional
            return []

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "cpu") -> "Sampler":
        run_dir = Path(run_dir)
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.exists():
            raise FileNotFoundError(f"'{run_dir}' is not a cpgan run directory (no config.yaml); "
                                    "train one with `cpgan run shapes-quick --out RUN_DIR` or `cpgan demo`")
        if not (run_dir / "gan" / "generator.safetensors").exists():
            raise FileNotFoundError(f"no trained generator in '{run_dir / 'gan'}'; run the gan stage first "
                                    f"(`cpgan run {cfg_path} --out {run_dir}`)")
        return cls(load_config(str(cfg_path)), run_dir, device)

    def encode_caption(self, caption: str) -> tuple[list[int], list[str], list[str]]:
        """Known word ids (cut to ``max_words``), the known words, and the unknown words."""
        toks = tokenize(caption)
        if not toks:
            raise CaptionError("the caption is empty (no words after tokenising; only ASCII letters/digits count)")
        ids, unknown = self.vocab.encode(toks, on_unknown="drop")
        if not ids:
            raise CaptionError(f"no known word in the caption (unknown: {', '.join(unknown[:10])}); "
                               f"the vocabulary has {len(self.vocab) - 1} words, e.g. "
                               f"{', '.join(self.vocab.id2word[1:9])}")
        ids = ids[: self.max_words]
        return ids, self.vocab.decode(ids), unknown

    @torch.no_grad()
    def generate(self, caption: str, n: int = 4, seed: int = 0, truncation: float = 1.0) -> dict:
        """Images of every stage (uint8 ``(n, s, s, 3)``), attention maps ``(n, T, s, s)``, words, unknown."""
        ids, words, unknown = self.encode_caption(caption)
        caps = torch.tensor([ids] * n, dtype=torch.long, device=self.device)
        lens = torch.full((n,), len(ids), dtype=torch.long, device=self.device)
        w, s = self.enc.encode_text(caps, lens)
        gen = torch.Generator().manual_seed(int(seed))
        trunc = truncation if truncation and truncation > 0 else None
        z = truncated_noise(n, self.G.z_dim, trunc, generator=gen).to(self.device)
        eps = torch.randn(n, self.G.c_dim, generator=gen).to(self.device)
        imgs, atts, _, _ = self.G(z, s, w, caps == 0, eps)
        to_u8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # noqa
        return {"images": [to_u8(x) for x in imgs], "attention": [a.float().cpu().numpy() for a in atts],
                "words": words, "unknown": unknown}


def save_generation_grid(results: list[dict], captions: list[str], path: Path, stages: bool = False,
                         attention: bool = False) -> Path:
    """One row per caption: its n images (optionally every stage, and per-word attention on the first)."""
    from PIL import Image, ImageDraw

    size = results[0]["images"][-1].shape[1]
    rows = []
    for res, cap in zip(results, captions):
        blocks = res["images"] if stages else res["images"][-1:]
        for arr in blocks:
            tiles = [np.asarray(Image.fromarray(a).resize((size, size), Image.NEAREST)) for a in arr]
            rows.append((cap, np.concatenate(tiles, axis=1)))
        if attention and res["attention"]:
            att = res["attention"][-1][0]  # (T, s, s) of the first image
            base = res["images"][-1][0].astype(np.float32)
            tiles = []
            for t in range(att.shape[0]):
                a = np.asarray(Image.fromarray((att[t] / (att[t].max() + 1e-8) * 255).astype(np.uint8)).resize(
                    (size, size), Image.BILINEAR), dtype=np.float32) / 255
                tiles.append((base * (0.3 + 0.7 * a[..., None])).clip(0, 255).astype(np.uint8))
            rows.append((" ".join(res["words"]), np.concatenate(tiles, axis=1)))
    width = max(r[1].shape[1] for r in rows)
    label_h = 12
    canvas = Image.new("RGB", (width, sum(r[1].shape[0] + label_h for r in rows)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for label, arr in rows:
        draw.text((2, y), label[: width // 6], fill="black")
        canvas.paste(Image.fromarray(arr), (0, y + label_h))
        y += arr.shape[0] + label_h
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
