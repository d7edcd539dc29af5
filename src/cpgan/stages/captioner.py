"""Stage ``captioner``: train the Bottom-Up/Top-Down captioner on the detector's region features (DESIGN §2, §3.1).

CPGAN (paper §3.2) reads, for every word of every training caption, where a BUTD captioner attends among the
36 detected regions of the image; the ``memory`` stage turns that attention into the word memory bank, eq. (7).
This stage trains that captioner with teacher forcing and the per-token cross-entropy L_XE (REFERENCE §5.1;
no SCST: only the attention of teacher-forced ground-truth captions is used downstream).

Inputs: the train/test splits with their cached caption ids (``vocab`` stage) and the region stores
``RUN_DIR/detector/regions_<split>/`` (``detector`` stage), keyed by the split's image keys.

Choices (documented; the configurable ones are ``captioner.*`` keys):

* **Vocabulary**: the GAN's own caption vocabulary (``vocab`` stage; REFERENCE §6 choice 3, so the memory bank
  is indexed by the same ids as the text encoder and needs no id map) plus ONE extra token, BOS, at id ``V``
  (``V = len(vocab)``); the captioner has ``V + 1`` classes.  Id 0, ``<end>``, is both the end-of-sentence token
  and the padding, its role in AttnGAN (``ixtoword[0]``) and in ruotianluo's captioner (index 0 = EOS/pad).
  See :func:`special_ids`.
* **Batches**: ``batch_size`` images per step, one uniformly drawn caption each (cut to its first ``max_words``
  words); images visited by epoch permutations.  Step t's batch is a pure function of ``(seed, t)``
  (:class:`cpgan.data.dataset.ResumableBatchSampler`, caption choice seeded by ``(seed, epoch, image)``), so a
  resumed run sees exactly the batches of an uninterrupted one.  Images whose region store entry has no valid
  box are left out of training (nothing to attend to) and counted.
* **Optimiser**: Adam (lr ``captioner.lr``; ruotianluo's ``updown`` recipe: Adam 5e-4, gradients clipped
  element-wise at ``grad_clip``), dropout ``dropout`` before the classifier.  Sizes from ``embed_dim``,
  ``hidden_dim``, ``att_dim``; the rest of the architecture is :class:`cpgan.models.captioner.UpDownCaptioner`'s
  paper defaults (bias-free attention, N(0, 0.01) init, forget bias 1).
* **Budget**: ``steps`` optimiser steps or ``max_minutes`` of wall clock, whichever ends first; the final
  weights are kept (the validation history is in ``metrics.jsonl``).  These and the logging cadences are the
  stage's budget keys: raising ``steps`` or ``max_minutes`` later continues from the final checkpoint.

Validation (every ``val_every`` steps and at the end): teacher-forced loss and next-word accuracy over all
captions of the first ``val_images`` test images, plus greedy-decoded captions of ``num_samples`` test images
logged as text next to a reference caption.

Outputs: ``captioner/captioner.safetensors`` + ``captioner.json`` sidecar (constructor arguments under
``model``, vocabulary sha256, step, final validation figures); resumable state ``captioner/state.safetensors``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..data.dataset import ResumableBatchSampler, SplitData, load_split, load_vocab
from ..data.regions import RegionStore
from ..data.text import Vocabulary, pad_captions
from ..models.captioner import UpDownCaptioner, caption_loss, teacher_forcing_batch
from ..utils.checkpoint import load_state, load_weights, rng_state, save_state, save_weights, set_rng_state
from ..utils.logging import echo, progress
from .base import Deadline, Stage, StageContext, StageError

STATE = "state.safetensors"
WEIGHTS = "captioner.safetensors"


# --------------------------------------------------------------------------------------------------
# Shared helpers (also used by the memory stage)
# --------------------------------------------------------------------------------------------------
def special_ids(num_words: int) -> dict[str, int]:
    """Captioner token ids for a caption vocabulary of ``num_words`` ids (``<end>`` = 0 included).

    Returns ``{"vocab_size": V + 1, "bos_id": V, "eos_id": 0, "pad_id": 0}``: word ids are the caption
    vocabulary's own, BOS is the one extra class, ``<end>`` (id 0) ends a caption and pads it.
    """
    return {"vocab_size": num_words + 1, "bos_id": num_words, "eos_id": 0, "pad_id": 0}


class RegionView:
    """The detector's region store of one split, addressed by the split's image index (``SplitData`` order).

    ``batch(idx)`` -> ``feats (B, R, D)`` float32, ``valid (B, R)`` bool, ``boxes (B, R, 4)`` float32 (normalised
    xyxy), on ``device``.
    """

    def __init__(self, run_dir: Path, split: str, keys: list[str]):
        path = Path(run_dir) / "detector" / f"regions_{split}"
        if not (path / "manifest.json").exists():
            raise StageError(
                f"no region store for split '{split}' at {path}; run the detector stage first "
                f"(`cpgan run CONFIG --out {run_dir} --stages detector`)")
        try:
            self.store = RegionStore(path)
        except ValueError as e:
            raise StageError(f"{e}; re-run the detector stage") from None
        missing = [k for k in keys if k not in self.store]
        if missing:
            raise StageError(
                f"region store {path} lacks {len(missing)} of the {len(keys)} '{split}' images "
                f"(e.g. '{missing[0]}'); re-run the detector stage for this data")
        self.path = path
        self.rows = np.asarray([self.store.index_of(k) for k in keys], dtype=np.int64)
        self.feat_dim = self.store.feat_dim
        self.num_regions = self.store.num_regions
        self.feat_dtype = str(self.store.manifest.get("feat_dtype", "float16"))

    def batch(self, idx, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = self.store.get_batch(self.rows[np.asarray(idx, dtype=np.int64)])
        feats = torch.from_numpy(b["feats"]).to(device=device, dtype=torch.float32)
        valid = torch.from_numpy(b["valid"]).to(device=device, dtype=torch.bool)
        boxes = torch.from_numpy(b["boxes"]).to(device=device, dtype=torch.float32)
        return feats, valid, boxes


def mean_region_feature(regions: RegionView, n: int, device: torch.device | str = "cpu",
                        max_images: int = 4000, batch: int = 500) -> torch.Tensor:
    """Mean of the valid region features of the first ``min(n, max_images)`` images of a split, ``(D,)``."""
    total = torch.zeros(regions.feat_dim, dtype=torch.float64, device=device)
    count = 0
    for start in range(0, min(n, max_images), batch):
        feats, valid, _ = regions.batch(range(start, min(start + batch, n, max_images)), device)
        total += (feats.double() * valid.unsqueeze(-1)).sum((0, 1))
        count += int(valid.sum())
    return (total / max(count, 1)).float()


def load_captioner(run_dir: Path, device: torch.device | str = "cpu",
                   vocab: Vocabulary | None = None) -> tuple[UpDownCaptioner, dict]:
    """The trained captioner of ``RUN_DIR/captioner`` (eval mode) and its sidecar metadata.

    With ``vocab``, checks that the captioner was trained on this vocabulary.
    """
    path = Path(run_dir) / "captioner" / WEIGHTS
    sd, meta = load_weights(path, device=device)
    if "model" not in meta:
        raise StageError(f"{path}: the sidecar {path.with_suffix('.json')} lacks the model arguments; "
                         "re-run the captioner stage")
    if vocab is not None and meta.get("vocab_sha256") != vocab.sha256():
        raise StageError(f"{path} was trained on another vocabulary than {run_dir}/vocab; re-run the captioner stage")
    model = UpDownCaptioner(**meta["model"])
    model.load_state_dict(sd)
    return model.to(device).eval(), meta


@torch.no_grad()
def validate(model: UpDownCaptioner, data: SplitData, regions: RegionView, n_images: int, batch_size: int,
             max_words: int, device: torch.device) -> dict:
    """Token-weighted teacher-forced loss and next-word accuracy over all captions of the first
    ``n_images`` images of ``data`` (those with at least one valid region)."""
    was = model.training
    model.eval()
    n = len(data) if n_images <= 0 else min(n_images, len(data))
    pairs = [(i, k) for i in range(n) for k in range(len(data.captions[i]))]
    nll_sum, correct, tokens, skipped = 0.0, 0, 0, 0
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        imgs = [i for i, _ in chunk]
        feats, valid, _ = regions.batch(imgs, device)
        keep = valid.any(1)
        skipped += int((~keep).sum())
        if not bool(keep.any()):
            continue
        caps, lens = pad_captions([data.captions[i][k] for i, k in chunk], max_words)
        caps, lens = caps.to(device), lens.to(device)
        inputs, targets, tlens = teacher_forcing_batch(caps, lens, model.bos_id, model.eos_id, model.pad_id)
        logits, _ = model(feats[keep], valid[keep], inputs[keep])
        targets, tlens = targets[keep], tlens[keep]
        n_tok = int(tlens.sum())
        nll_sum += float(caption_loss(logits, targets, tlens)) * n_tok
        mask = torch.arange(targets.shape[1], device=device).unsqueeze(0) < tlens.unsqueeze(1)
        correct += int(((logits.argmax(-1) == targets) & mask).sum())
        tokens += n_tok
    model.train(was)
    if tokens == 0:
        raise StageError("validation found no test image with a valid region; check the detector's test store")
    return {"loss": nll_sum / tokens, "accuracy": correct / tokens, "tokens": tokens, "skipped_captions": skipped}


@torch.no_grad()
def sample_captions(model: UpDownCaptioner, data: SplitData, regions: RegionView, vocab: Vocabulary, n: int,
                    max_len: int, device: torch.device) -> list[dict]:
    """Greedy captions of the first ``n`` test images with a reference caption each (text)."""
    n = min(n, len(data))
    if n <= 0:
        return []
    was = model.training
    model.eval()
    feats, valid, _ = regions.batch(list(range(n)), device)
    tokens, _ = model.greedy_decode(feats, valid, max_len=max_len)
    model.train(was)
    out = []
    for i in range(n):
        ids = tokens[i].tolist()
        ids = ids[:ids.index(model.eos_id)] if model.eos_id in ids else ids
        out.append({"key": data.keys[i], "predicted": " ".join(vocab.decode(ids)),
                    "reference": " ".join(vocab.decode(data.captions[i][0]))})
    return out


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
def run(cfg: Config, ctx: StageContext) -> dict:
    c = cfg.captioner
    device = ctx.device
    vocab = load_vocab(ctx.run_dir)
    train, test = load_split(ctx.run_dir, "train"), load_split(ctx.run_dir, "test")
    reg_train = RegionView(ctx.run_dir, "train", train.keys)
    reg_test = RegionView(ctx.run_dir, "test", test.keys)
    if reg_test.feat_dim != reg_train.feat_dim:
        raise StageError(f"train and test region stores disagree on the feature size "
                         f"({reg_train.feat_dim} vs {reg_test.feat_dim}); re-run the detector stage")
    if len(train) == 0:
        raise StageError("the train split has no captioned image; check the data and vocab stages")

    ids = special_ids(len(vocab))
    model_args = {"vocab_size": ids["vocab_size"], "feat_dim": reg_train.feat_dim, "embed_dim": c.embed_dim,
                  "hidden_dim": c.hidden_dim, "att_hidden_dim": c.att_dim, "dropout": c.dropout,
                  "bos_id": ids["bos_id"], "eos_id": ids["eos_id"], "pad_id": ids["pad_id"],
                  "init_std": c.init_std, "feature_center": c.feature_center,
                  "mean_feature": c.mean_feature, "attention": c.attention}
    torch.manual_seed(c.seed)
    model = UpDownCaptioner(**model_args).to(device)
    if c.feature_center:
        model.feat_center.copy_(mean_region_feature(reg_train, len(train), device))
    opt = torch.optim.Adam(model.parameters(), lr=c.lr)
    batch_size = c.batch_size
    if batch_size > len(train):
        echo(f"[captioner] batch size {batch_size} > {len(train)} train images: using {len(train)}")
        batch_size = len(train)

    state_path = ctx.dir / STATE
    step, spent, history, skipped_images = 0, 0.0, [], 0
    run_sum, run_n = 0.0, 0
    if state_path.exists():
        st = load_state(state_path)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, spent, history, skipped_images = st["step"], st["seconds"], st["history"], st["skipped_images"]
        run_sum, run_n = st["run_sum"], st["run_n"]
        set_rng_state(st["rng"])
        echo(f"[captioner] resuming at step {step}")
    resumed_from = step
    deadline = Deadline(c.max_minutes, spent)

    def save() -> None:
        save_state(state_path, {"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                                "seconds": deadline.elapsed, "history": history, "skipped_images": skipped_images,
                                "run_sum": run_sum, "run_n": run_n, "rng": rng_state()})

    def do_validation() -> dict:
        val = validate(model, test, reg_test, c.val_images, batch_size, c.max_words, device)
        samples = sample_captions(model, test, reg_test, vocab, c.num_samples, c.max_words + 1, device)
        rec = {"step": step, "minutes": round(deadline.elapsed / 60, 3), "val_loss": val["loss"],
               "val_accuracy": val["accuracy"]}
        history.append(rec)
        ctx.log(step, val_loss=val["loss"], val_accuracy=val["accuracy"], val_tokens=val["tokens"],
                samples=[f"{s['key']}: {s['predicted']}  ||  ref: {s['reference']}" for s in samples])
        echo(f"[captioner] step {step}: val loss {val['loss']:.3f}, next-word accuracy {val['accuracy']:.3f}")
        for s in samples[:3]:
            echo(f"[captioner]   {s['key']}: \"{s['predicted']}\"  (ref: \"{s['reference']}\")")
        return {**val, "samples": samples}

    sampler = iter(ResumableBatchSampler(len(train), batch_size, seed=c.seed, start_step=step))
    model.train()
    bar = progress(total=c.steps, initial=step, desc="captioner")
    interrupted = False
    while step < c.steps:
        if ctx.stop_requested:
            interrupted = True
            break
        if deadline.expired():
            echo(f"[captioner] time budget of {c.max_minutes} min reached at step {step}")
            break
        items = next(sampler)
        img = [i for i, _ in items]
        caps = []
        for i, epoch in items:
            k = int(np.random.default_rng([c.seed, epoch, i, 31]).integers(len(train.captions[i])))
            caps.append(train.captions[i][k])
        feats, valid, _ = reg_train.batch(img, device)
        keep = valid.any(1)
        skipped_images += int((~keep).sum())
        step += 1
        bar.update(1)
        if bool(keep.any()):
            cap_t, lens = pad_captions(caps, c.max_words)
            inputs, targets, tlens = teacher_forcing_batch(cap_t.to(device), lens.to(device), ids["bos_id"],
                                                           ids["eos_id"], ids["pad_id"])
            logits, _ = model(feats[keep], valid[keep], inputs[keep])
            loss = caption_loss(logits, targets[keep], tlens[keep])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if c.grad_clip > 0:
                torch.nn.utils.clip_grad_value_(model.parameters(), c.grad_clip)
            opt.step()
            run_sum += float(loss.detach())
            run_n += 1
        if c.log_every > 0 and step % c.log_every == 0 and run_n:
            ctx.log(step, loss=run_sum / run_n, minutes=deadline.elapsed / 60)
            bar.set_postfix(loss=f"{run_sum / run_n:.3f}")
            run_sum, run_n = 0.0, 0
        if c.val_every > 0 and step % c.val_every == 0 and step < c.steps:
            do_validation()
        if c.checkpoint_every > 0 and step % c.checkpoint_every == 0:
            save()
    bar.close()
    if interrupted:
        save()
        return {"steps": step, "interrupted": True}

    final = do_validation()
    meta = {"model": model_args, "vocab_sha256": vocab.sha256(), "vocab_size": len(vocab), "step": step,
            "val_loss": final["loss"], "val_accuracy": final["accuracy"], "captioner": vars(c)}
    save_weights(ctx.dir / WEIGHTS, model.state_dict(), meta)
    save()
    summary = {"steps": step, "resumed_from_step": resumed_from, "minutes": deadline.elapsed / 60,
               "val_loss": final["loss"], "val_accuracy": final["accuracy"], "train_images": len(train),
               "skipped_draws_without_regions": skipped_images,
               "samples": [f"{s['predicted']}  ||  ref: {s['reference']}" for s in final["samples"]],
               "curve": [(h["step"], round(h["val_loss"], 4)) for h in history]}
    return summary


STAGE = Stage(name="captioner", run=run, upstream=("vocab", "detector"), config_keys=("captioner",),
              needed=lambda cfg: cfg.model.text_encoder == "mate",
              help="train the Bottom-Up/Top-Down captioner on region features",
              budget_keys=("captioner.steps", "captioner.max_minutes", "captioner.log_every", "captioner.val_every",
                           "captioner.num_samples", "captioner.checkpoint_every"))
