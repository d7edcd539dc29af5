"""Stage ``evaluate`` (and ``cpgan evaluate --run RUN_DIR``): every metric, with the real images as the ceiling.

For each test split (``test``, and ``test_novel`` in the shapes world) the run's generator draws one image per
test caption (caption 0 of the first ``evaluate.n_images`` images), and the same metrics are computed on the
real images of those captions:

* R-precision with the run's DAMSM encoders, both protocols (``dmgan``: own caption + 99 of other images,
  10 folds; ``cpgan-batch``: batches of 100) — note the generator was trained against these encoders;
* semantic object accuracy (SOA-I, SOA-C, colour / shape / background accuracy) by the shapes evaluator;
* FID and IS with the evaluator's features / posterior (shapes world) or Inception-v3 from
  ``evaluate.inception_weights`` (other data; which weights is written in the report).

Results go to ``RUN_DIR/evaluate/metrics.json`` and a printed table; sample grids to ``evaluate/``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .. import build
from ..config import Config
from ..data import shapes
from ..data.dataset import CaptionDataset, collate, load_split, load_vocab, stage_sizes
from ..metrics.fid import FeatureStats, frechet_distance
from ..metrics.inception_score import InceptionScoreAccumulator
from ..metrics.r_precision import r_precision_batch, r_precision_dmgan
from ..metrics.soa import SOAAccumulator
from ..models.generator import G_NET, truncated_noise
from ..utils.checkpoint import atomic_write_json, load_weights
from ..utils.logging import echo, progress
from .base import Stage, StageContext


def load_generator(cfg: Config, run_dir: Path, device: torch.device | str = "cpu") -> G_NET:
    from .gan import build_generator

    G = build_generator(cfg)
    sd, _ = load_weights(Path(run_dir) / "gan" / "generator.safetensors", device="cpu")
    G.load_state_dict(sd)
    return G.to(device).eval()


def _batch_items(ds: CaptionDataset, start: int, stop: int) -> dict:
    return collate([ds[i] for i in range(start, stop)])


@torch.no_grad()
def generate_batches(G, enc, ds: CaptionDataset, device, n: int, batch_size: int = 50, seed: int = 0,
                     truncation: float | None = None) -> Iterator[tuple[list[torch.Tensor], dict]]:
    """Generated images for the first ``n`` items of ``ds`` (deterministic noise per batch)."""
    n = min(n, len(ds))
    for s in range(0, n, batch_size):
        b = _batch_items(ds, s, min(n, s + batch_size))
        if not b["size"]:
            continue
        caps, lens = b["captions"].to(device), b["lengths"].to(device)
        words, sent = enc.encode_text(caps, lens)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + s)
        z = truncated_noise(b["size"], G.z_dim, truncation, generator=gen).to(device)
        eps = torch.randn(b["size"], G.c_dim, generator=gen).to(device)
        fakes, _, _, _ = G(z, sent, words, caps == 0, eps)
        yield fakes, b


@torch.no_grad()
def soa_of_images(judge, images: torch.Tensor, captions: list[str], device, batch_size: int = 200) -> dict:
    """Semantic accuracy of images ``(N, 3, H, W)`` against the captions they were made from."""
    acc = SOAAccumulator()
    for s in range(0, images.shape[0], batch_size):
        dets = judge.detect(images[s:s + batch_size].to(device))
        for det, cap in zip(dets, captions[s:s + batch_size]):
            _soa_update(acc, det, cap)
    return acc.compute()


def _soa_update(acc: SOAAccumulator, det, caption: str) -> None:
    named = [(o["colour"], o["shape"]) for o in shapes.parse_caption(caption)]
    found = [(shapes.COLOURS[c], shapes.SHAPES[s]) for c, s in det.pairs]
    bg = shapes.parse_background(caption)
    acc.update(named, found, bg, shapes.BACKGROUNDS[det.background] if bg is not None else None)


def _r_precision(img_codes: torch.Tensor, sent_codes: torch.Tensor, cls: torch.Tensor, folds: int, seed: int) -> dict:
    """R-precision, ``dmgan`` protocol, as every metrics table of this stage computes it (same-class negatives
    masked when every class id is known; up to 99 negatives; a fold per 100 images, at most ``folds``)."""
    n = img_codes.shape[0]
    return r_precision_dmgan(img_codes, sent_codes, class_ids=cls if bool((cls >= 0).all()) else None,
                             n_negatives=min(99, n - 1), folds=max(1, min(folds, n // 100)), seed=seed)


class _Metrics:
    """Streaming accumulators for one image set (generated or real) of one split."""

    def __init__(self, judge, inception):
        self.judge, self.inception = judge, inception
        self.img_codes, self.sent_codes, self.cls = [], [], []
        self.stats = FeatureStats()
        self.is_acc = InceptionScoreAccumulator(splits=10)
        self.soa = SOAAccumulator() if judge is not None else None

    @torch.no_grad()
    def update(self, images: torch.Tensor, img_codes, sent_codes, cls, captions: list[str]) -> None:
        self.img_codes.append(img_codes.float().cpu())
        self.sent_codes.append(sent_codes.float().cpu())
        self.cls.append(cls.cpu())
        if self.judge is not None:
            out = self.judge(images)
            self.stats.update(out["features"].double().cpu().numpy())
            self.is_acc.update(self.judge.class_posterior(images).double().cpu().numpy())
            for det, cap in zip(self.judge.detect(images), captions):
                _soa_update(self.soa, det, cap)
        elif self.inception is not None:
            out = self.inception(images)
            self.stats.update(out["pool"].double().cpu().numpy())
            if "logits" in out and out["logits"] is not None:
                self.is_acc.update_logits(out["logits"].double().cpu().numpy())

    def compute(self, folds: int, seed: int) -> dict:
        ic, sc, cls = torch.cat(self.img_codes), torch.cat(self.sent_codes), torch.cat(self.cls)
        n = ic.shape[0]
        res = {"n_images": n}
        if n >= 2:
            rp = _r_precision(ic, sc, cls, folds, seed)
            res["r_precision_dmgan"], res["r_precision_dmgan_std"] = rp["mean"], rp["std"]
        if n >= 100:
            rb = r_precision_batch(ic, sc, batch=100)
            res["r_precision_cpgan_batch"] = rb["mean"]
        if self.stats.n >= 2:
            res["_stats"] = self.stats
        if self.is_acc.n if hasattr(self.is_acc, "n") else True:
            try:
                m, s = self.is_acc.compute()
                res["inception_score"], res["inception_score_std"] = m, s
            except ValueError:
                pass
        if self.soa is not None:
            soa = self.soa.compute()
            for k in ("soa_i", "soa_c", "colour_acc", "shape_acc", "object_partial", "background_acc"):
                res[k] = soa.get(k)
        return res


def load_independent_damsm(path: str, vocab, device):
    """Encoders of another run's plain+grid DAMSM (``evaluate.independent_damsm``), checked against ``vocab``."""
    from ..config import load_config
    from .base import StageError, stage_status
    from .damsm import make_encoders

    d = Path(path)
    if not stage_status(d, "damsm") or not (d / "config.yaml").exists():
        raise StageError(f"evaluate.independent_damsm: {d} holds no finished damsm stage (damsm/done.json and "
                         "config.yaml); train one with `cpgan run CONFIG --out DIR --stages damsm`")
    other = load_config(str(d / "config.yaml"))
    if other.model.text_encoder != "plain" or other.model.image_encoder != "grid":
        raise StageError(f"evaluate.independent_damsm: {d} was trained with {other.model.text_encoder}+"
                         f"{other.model.image_encoder}; use a plain+grid DAMSM (it needs no memory or detector)")
    if load_vocab(d).sha256() != vocab.sha256():
        raise StageError(f"evaluate.independent_damsm: {d} has another vocabulary than this run")
    te, ie = build.load_damsm(other, d, len(vocab), device)
    return make_encoders(other, d, len(vocab), device, te, ie)


def evaluate_run(cfg: Config, run_dir: Path, device: torch.device, out_dir: Path, n_images: int | None = None,
                 untrained: bool = False, log=None) -> dict:
    """Compute every metric for a run; returns the ``metrics.json`` content."""
    from .damsm import make_encoders
    from .gan import build_generator, grid_image, to_uint8

    ev = cfg.evaluate
    n_images = n_images or ev.n_images
    vocab = load_vocab(run_dir)
    te, ie = build.load_damsm(cfg, run_dir, len(vocab), device)
    enc = make_encoders(cfg, run_dir, len(vocab), device, te, ie)
    if build.uses_objects(cfg):
        from ..encode import detector_object_fn

        enc.object_fn = detector_object_fn(cfg, run_dir, device)
    indep = load_independent_damsm(ev.independent_damsm, vocab, device) if ev.independent_damsm else None
    if untrained:
        torch.manual_seed(cfg.gan.seed)
        G = build_generator(cfg).to(device).eval()
    else:
        G = load_generator(cfg, run_dir, device)
    sizes = stage_sizes(G.base_size * 2 ** (G.branch_num - 1), G.branch_num)
    judge, inception, feat_desc = None, None, ""
    if cfg.data.source == "shapes":
        from .evaluator import load_evaluator

        judge = load_evaluator(run_dir, device)
        feat_desc = "shapes-world evaluator (pooled features for FID, dominant-object posterior for IS)"
    elif ev.inception_weights:
        from ..interop.inception import InceptionFeatures

        inception = InceptionFeatures.from_file(ev.inception_weights).to(device)
        feat_desc = inception.net.weights_description if hasattr(inception, "net") else "Inception-v3"
    else:
        feat_desc = "none (FID/IS skipped: pass evaluate.inception_weights=PATH)"
    splits = ["test", "test_novel"] if cfg.data.source == "shapes" else ["test"]
    result = {"generator": "untrained" if untrained else "trained", "n_images": n_images,
              "features": feat_desc, "r_precision_encoders": "the run's DAMSM (the generator was trained against it)",
              "independent_damsm": ev.independent_damsm or None,
              "truncation": ev.truncation, "splits": {}}
    t0 = time.time()
    for split in splits:
        data = load_split(run_dir, split)
        ds = CaptionDataset(data, sizes, cfg.text.eval_words_num, train=False)
        n = min(n_images, len(ds))
        gen_m, real_m = _Metrics(judge, inception), _Metrics(judge, inception)
        ind_codes: dict[str, list] = {"gen": [], "real": [], "sent": [], "cls": []}
        bar = progress(total=n, desc=f"evaluate {split}")
        grid_imgs, grid_real = [], []
        trunc = ev.truncation if ev.truncation and ev.truncation > 0 else None
        for fakes, b in generate_batches(G, enc, ds, device, n, ev.batch_size, ev.seed, trunc):
            caps_text = [data.records[int(i)]["captions"][0] for i in b["index"]]
            caps, lens = b["captions"].to(device), b["lengths"].to(device)
            _, sent = enc.encode_text(caps, lens)
            fake = fakes[-1]
            real = b["images"][-1].to(device)
            gen_m.update(fake, enc.encode_images(fake).global_features, sent, b["class_ids"], caps_text)
            real_m.update(real, enc.encode_images(real, split, b["index"]).global_features, sent, b["class_ids"],
                          caps_text)
            if indep is not None:
                with torch.no_grad():
                    ind_codes["sent"].append(indep.encode_text(caps, lens)[1].float().cpu())
                    ind_codes["gen"].append(indep.encode_images(fake).global_features.float().cpu())
                    ind_codes["real"].append(indep.encode_images(real).global_features.float().cpu())
                ind_codes["cls"].append(b["class_ids"].cpu())
            if len(grid_imgs) < 32:
                grid_imgs += list(to_uint8(fake)[: 32 - len(grid_imgs)])
                grid_real += list(to_uint8(real)[: 32 - len(grid_real)])
            bar.update(b["size"])
        bar.close()
        out_dir.mkdir(parents=True, exist_ok=True)
        tag = "untrained_" if untrained else ""
        grid_image([np.stack(grid_imgs), np.stack(grid_real)]).save(out_dir / f"{tag}samples_{split}.png")
        g, r = gen_m.compute(ev.r_precision_folds, ev.seed), real_m.compute(ev.r_precision_folds, ev.seed)
        gs, rs = g.pop("_stats", None), r.pop("_stats", None)
        if gs is not None and rs is not None:
            g["fid"] = frechet_distance(gs.mean(), gs.cov(), rs.mean(), rs.cov())
            r["fid"] = 0.0
        if indep is not None and ind_codes["sent"]:
            sc, cls = torch.cat(ind_codes["sent"]), torch.cat(ind_codes["cls"])
            for codes, res in ((ind_codes["gen"], g), (ind_codes["real"], r)):
                ic = torch.cat(codes)
                if ic.shape[0] >= 2:
                    res["r_precision_dmgan_indep"] = _r_precision(ic, sc, cls, ev.r_precision_folds, ev.seed)["mean"]
        result["splits"][split] = {"generated": g, "real": r}
        if log:
            log(**{f"{split}_{k}": v for k, v in g.items() if isinstance(v, (int, float))})
    result["seconds"] = time.time() - t0
    return result


def format_table(result: dict) -> str:
    keys = [("r_precision_dmgan", "R-precision (dmgan)"), ("r_precision_cpgan_batch", "R-precision (cpgan-batch)"),
            ("soa_i", "SOA-I"), ("soa_c", "SOA-C"), ("colour_acc", "colour acc"), ("shape_acc", "shape acc"),
            ("background_acc", "background acc"), ("fid", "FID"), ("inception_score", "IS")]
    lines = []
    for split, sets in result["splits"].items():
        lines.append(f"{split} ({sets['generated'].get('n_images', '?')} captions; {result['generator']} generator)")
        lines.append(f"  {'metric':28s} {'generated':>10s} {'real':>10s}")
        for k, name in keys:
            g, r = sets["generated"].get(k), sets["real"].get(k)
            if g is None and r is None:
                continue
            fmt = lambda v: "-" if v is None else f"{v:10.3f}"  # noqa: E731
            lines.append(f"  {name:28s} {fmt(g):>10s} {fmt(r):>10s}")
    lines.append(f"features: {result['features']}")
    return "\n".join(lines)


def run(cfg: Config, ctx: StageContext) -> dict:
    result = evaluate_run(cfg, ctx.run_dir, ctx.device, ctx.dir, log=ctx.log)
    atomic_write_json(ctx.dir / "metrics.json", result)
    echo(format_table(result))
    flat = {}
    for split, sets in result["splits"].items():
        for which, vals in sets.items():
            for k in ("r_precision_dmgan", "soa_i", "colour_acc", "fid"):
                if vals.get(k) is not None:
                    flat[f"{split}_{which}_{k}"] = vals[k]
    return flat


STAGE = Stage(name="evaluate", run=run, upstream=("gan", "evaluator", "damsm"),
              config_keys=("evaluate", "text.eval_words_num"), help="compute every metric")
