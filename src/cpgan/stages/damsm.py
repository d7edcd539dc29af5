"""Stage ``damsm``: pretrain the text and image encoders with the DAMSM loss (DESIGN §3.3).

AttnGAN ``pretrain_DAMSM.py`` semantics (REFERENCE §7.5): one random caption per image, loss
``w_loss0 + w_loss1 + s_loss0 + s_loss1`` (suppl. eqs. (15)–(25)), Adam(β 0.5, 0.999) re-created every
epoch with lr multiplied by ``lr_decay`` after each epoch while above a tenth of the start, gradient-norm clip
``rnn_grad_clip`` on the LSTM only. With ``model.text_encoder=mate`` the MATE encoder is trained (memories
from the memory stage); with ``model.image_encoder=oaie`` the OAIE encoder (stored region features of the
detector stage).

Each epoch is validated on the test split: DAMSM loss and R-precision (``dmgan`` protocol) of the real test
images; the best epoch by R-precision is kept as ``text_encoder.safetensors`` / ``image_encoder.safetensors``.
``attention/`` holds word-attention maps of a few test captions; the summary reports how often the
attention peak of a colour/shape word falls inside the box of the object it names (shapes world).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import build
from ..config import Config
from ..data.dataset import CaptionDataset, eval_batches, load_split, load_vocab, make_loader
from ..diffaug import augment, parse_policy
from ..encode import Encoders, store_lookup
from ..losses import damsm_loss, paired_cosine, word_level_scores
from ..negatives import KINDS, WordSwapper, encode_hard_negatives, make_swapper
from ..metrics.r_precision import r_precision_dmgan
from ..utils.checkpoint import load_state, rng_state, save_state, save_weights, set_rng_state
from ..utils.logging import echo, progress
from .base import Deadline, Stage, StageContext

STATE = "state.safetensors"


def make_encoders(cfg: Config, run_dir: Path, vocab_size: int, device: torch.device,
                  text=None, image=None) -> Encoders:
    te = text if text is not None else build.text_encoder(cfg, vocab_size)
    ie = image if image is not None else build.image_encoder(cfg)
    bank = build.load_memory_bank(run_dir, device) if build.uses_memory(cfg) else None
    lookup = store_lookup(run_dir, device) if build.uses_objects(cfg) else None
    return Encoders(te.to(device), ie.to(device), bank, lookup)


@torch.no_grad()
def encode_real(enc: Encoders, ds: CaptionDataset, split: str, device: torch.device, batch_size: int = 100,
                limit: int | None = None) -> dict[str, torch.Tensor]:
    """Global image codes and sentence codes of the real images of a split (caption ``ds.caption_index``)."""
    imgs, sents, cls = [], [], []
    for b in eval_batches(ds, batch_size, limit):
        x = b["images"][-1].to(device)
        f = enc.encode_images(x, split, b["index"])
        _, s = enc.encode_text(b["captions"].to(device), b["lengths"].to(device))
        imgs.append(f.global_features.float().cpu())
        sents.append(s.float().cpu())
        cls.append(b["class_ids"])
    return {"image": torch.cat(imgs), "sentence": torch.cat(sents), "class_ids": torch.cat(cls)}


def r_precision_real(enc: Encoders, ds: CaptionDataset, split: str, device: torch.device, seed: int = 0,
                     folds: int = 10, limit: int | None = None) -> dict:
    codes = encode_real(enc, ds, split, device, limit=limit)
    cls = codes["class_ids"] if bool((codes["class_ids"] >= 0).all()) else None
    n = codes["image"].shape[0]
    return r_precision_dmgan(codes["image"], codes["sentence"], class_ids=cls, folds=min(folds, max(1, n // 100)),
                             n_negatives=min(99, n - 1), seed=seed)


def batch_loss(enc: Encoders, batch: dict, split: str, device: torch.device, d,
               swapper: WordSwapper | None = None, policy: tuple[str, ...] = ()) -> dict:
    """DAMSM loss (suppl. eqs. (15)–(25)) of one collated batch of real pairs, with its attention maps.

    ``swapper`` (``damsm.hard_negatives``) adds word-swap hard negatives and ``policy`` (``damsm.augment``)
    augments the images, both drawn from the global torch RNG (saved with the training state, so a resumed
    run draws the same ones).
    """
    x = augment(batch["images"][-1].to(device), policy)
    caps, lens = batch["captions"].to(device), batch["lengths"].to(device)
    words, sent = enc.encode_text(caps, lens)
    feats = enc.encode_images(x, split, batch["index"])
    cls = batch["class_ids"] if bool((batch["class_ids"] >= 0).all()) else None
    hard = None if swapper is None else encode_hard_negatives(enc.encode_text, swapper, caps, lens)
    return damsm_loss(feats.regions, feats.global_features, words, sent, lens, class_ids=cls,
                      region_mask=feats.region_mask, gamma1=d.gamma1, gamma2=d.gamma2, gamma3=d.gamma3, hard=hard)


def _epoch_lr(cfg: Config, epoch: int) -> float:
    d = cfg.damsm
    lr = d.lr
    for _ in range(epoch):  # AttnGAN: lr *= 0.98 after each epoch while lr > lr0 / 10
        if lr > d.lr / 10.0:
            lr *= d.lr_decay
    return lr


def _train_mode(enc: Encoders, on: bool) -> None:
    enc.text.train(on)
    enc.image.train(on)


def _trainable(enc: Encoders) -> list[torch.nn.Parameter]:
    return [p for p in list(enc.text.parameters()) + list(enc.image.parameters()) if p.requires_grad]


def run(cfg: Config, ctx: StageContext) -> dict:
    d = cfg.damsm
    device = ctx.device
    torch.manual_seed(d.seed)
    vocab = load_vocab(ctx.run_dir)
    train, test = load_split(ctx.run_dir, "train"), load_split(ctx.run_dir, "test")
    size = cfg.data.image_size
    ds_train = CaptionDataset(train, [size], d.words_num, train=True, seed=d.seed, augment=cfg.data.augment)
    ds_test = CaptionDataset(test, [size], cfg.text.eval_words_num, train=False)
    enc = make_encoders(cfg, ctx.run_dir, len(vocab), device)
    swapper = make_swapper(d.hard_negatives, "damsm.hard_negatives", vocab.word2id, cfg.data.source)
    policy = parse_policy(d.augment, "damsm.augment")
    if d.text_weights:
        from ..interop.official import load_official  # AttnGAN text_encoder*.pth

        _, sd, _ = load_official(d.text_weights)
        enc.text.load_release_state_dicts(sd)
    if d.image_weights:
        enc.image.load_pretrained(d.image_weights)

    steps_per_epoch = len(ds_train) // d.batch_size
    state_path = ctx.dir / STATE
    epoch, step_in_epoch, best, history, spent = 0, 0, -1.0, [], 0.0
    opt_state = None
    if state_path.exists():
        st = load_state(state_path)
        enc.text.load_state_dict(st["text"])
        enc.image.load_state_dict(st["image"])
        epoch, step_in_epoch, best, history, spent = (st["epoch"], st["step_in_epoch"], st["best"], st["history"],
                                                       st["seconds"])
        opt_state = st.get("opt")
        set_rng_state(st["rng"])
        echo(f"[damsm] resuming at epoch {epoch} step {step_in_epoch} (best R-precision {best:.3f})")
    deadline = Deadline(d.max_minutes, spent)
    rnn_params = list(enc.text.rnn.parameters())
    params = _trainable(enc)

    def save(opt) -> None:
        save_state(state_path, {"text": enc.text.state_dict(), "image": enc.image.state_dict(), "epoch": epoch,
                                "step_in_epoch": step_in_epoch, "best": best, "history": history,
                                "seconds": deadline.elapsed, "opt": opt.state_dict() if opt else None,
                                "rng": rng_state()})

    def save_best(r: float) -> None:
        meta = {"epoch": epoch, "r_precision": r, "vocab_sha256": vocab.sha256(), "model": vars(cfg.model),
                "damsm": vars(d)}
        save_weights(ctx.dir / "text_encoder.safetensors", enc.text.state_dict(), meta)
        save_weights(ctx.dir / "image_encoder.safetensors", enc.image.state_dict(), meta)

    stopped = False
    while epoch < d.epochs and not stopped:
        lr = _epoch_lr(cfg, epoch)
        opt = torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999))  # re-created every epoch (AttnGAN)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
            opt_state = None
        _train_mode(enc, True)
        loader = make_loader(ds_train, d.batch_size, seed=d.seed, start_step=epoch * steps_per_epoch + step_in_epoch,
                             num_workers=cfg.data.num_workers)
        bar = progress(total=steps_per_epoch, initial=step_in_epoch, desc=f"damsm epoch {epoch}")
        sums = np.zeros(3)
        count = 0
        for batch in loader:
            if step_in_epoch >= steps_per_epoch:
                break
            if ctx.stop_requested or deadline.expired():
                stopped = True
                break
            out = batch_loss(enc, batch, "train", device, d, swapper, policy)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(rnn_params, d.rnn_grad_clip)
            opt.step()
            sums += [float(out["loss"].detach()), float(out["word_loss"].detach()), float(out["sent_loss"].detach())]
            count += 1
            step_in_epoch += 1
            bar.update(1)
            if step_in_epoch % 50 == 0:
                ctx.log(epoch * steps_per_epoch + step_in_epoch, epoch=epoch, loss=sums[0] / count,
                        word_loss=sums[1] / count, sent_loss=sums[2] / count, lr=lr)
        bar.close()
        if stopped and step_in_epoch < steps_per_epoch:
            save(opt)
            break
        # ---- end of epoch: validate, keep the best
        _train_mode(enc, False)
        val = validate(enc, ds_test, device, d, limit=1000)
        rp = r_precision_real(enc, ds_test, "test", device, seed=d.seed, limit=1000)
        rec = {"epoch": epoch, "minutes": deadline.elapsed / 60, "train_loss": sums[0] / max(count, 1),
               "val_loss": val["loss"], "val_word_loss": val["word_loss"], "val_sent_loss": val["sent_loss"],
               "r_precision": rp["mean"], "r_precision_std": rp["std"]}
        history.append(rec)
        ctx.log((epoch + 1) * steps_per_epoch, **rec)
        echo(f"[damsm] epoch {epoch}: train {rec['train_loss']:.3f} val {val['loss']:.3f} "
             f"R-precision {rp['mean']:.3f} ({rec['minutes']:.1f} min)")
        epoch, step_in_epoch = epoch + 1, 0
        if rp["mean"] > best:
            best = rp["mean"]
            save_best(best)
        save(None)
        if ctx.stop_requested or deadline.expired():
            stopped = True

    if not (ctx.dir / "text_encoder.safetensors").exists():  # stopped before the first validation
        _train_mode(enc, False)
        best = r_precision_real(enc, ds_test, "test", device, seed=d.seed, limit=1000)["mean"]
        save_best(best)
    if ctx.stop_requested:
        return {"epochs": epoch, "best_r_precision": best}
    # ---- final report with the best encoders
    te, ie = build.load_damsm(cfg, ctx.run_dir, len(vocab), device)
    enc = make_encoders(cfg, ctx.run_dir, len(vocab), device, te, ie)
    rp = r_precision_real(enc, ds_test, "test", device, seed=d.seed, folds=cfg.evaluate.r_precision_folds)
    summary = {"epochs": epoch, "best_r_precision": best, "r_precision_test": rp["mean"],
               "r_precision_test_std": rp["std"], "r_precision_protocol": rp["protocol"],
               "minutes": deadline.elapsed / 60, "curve": [(round(h["minutes"], 2), round(h["r_precision"], 4))
                                                           for h in history]}
    if cfg.data.source == "shapes":
        from .damsm_attention import attention_report

        summary.update(attention_report(enc, ds_test, test, device, ctx.dir / "attention", cfg))
        summary.update(swap_accuracy(enc, ds_test, "test", device, vocab.word2id, d, seed=d.seed))
    ctx.log(**{k: v for k, v in summary.items() if not isinstance(v, list)})
    return summary


@torch.no_grad()
def validate(enc: Encoders, ds: CaptionDataset, device: torch.device, d, limit: int = 1000) -> dict:
    """Mean DAMSM loss on test batches of the training batch size (AttnGAN: up to 50 batches)."""
    sums, n = np.zeros(3), 0
    for b in eval_batches(ds, d.batch_size, limit):
        if b["size"] < 2:
            continue
        out = batch_loss(enc, b, "test", device, d)
        sums += [float(out["loss"]), float(out["word_loss"]), float(out["sent_loss"])]
        n += 1
    sums /= max(n, 1)
    return {"loss": float(sums[0]), "word_loss": float(sums[1]), "sent_loss": float(sums[2])}


@torch.no_grad()
def swap_accuracy(enc: Encoders, ds: CaptionDataset, split: str, device: torch.device, word2id, d,
                  limit: int = 1000, seed: int = 0) -> dict[str, float]:
    """How often the encoders prefer an image's caption to the same caption with one word swapped.

    Shapes world: for each test image, the caption with one shape (colour) word replaced by another class's
    (:mod:`cpgan.negatives`); ``swap_{kind}_word`` / ``swap_{kind}_sentence`` = fraction of images whose
    word-level (sentence-level) score is higher for the true caption. 0.5 = blind to that attribute.
    """

    gen = torch.Generator().manual_seed(seed)
    swappers = {k: make_swapper(k, "swap_accuracy", word2id, "shapes") for k in KINDS}
    wins: dict[str, list[float]] = {f"swap_{k}_{lv}": [] for k in KINDS for lv in ("word", "sentence")}
    for b in eval_batches(ds, 100, limit):
        feats = enc.encode_images(b["images"][-1].to(device), split, b["index"])
        caps, lens = b["captions"].to(device), b["lengths"].to(device)
        words, sent = enc.encode_text(caps, lens)
        w_true, _ = word_level_scores(feats.regions, words, lens, feats.region_mask, d.gamma1, d.gamma2,
                                      paired=True)
        s_true = paired_cosine(feats.global_features, sent)
        for kind, sw in swappers.items():
            hard = encode_hard_negatives(enc.encode_text, sw, caps, lens, gen)
            w_neg, _ = word_level_scores(feats.regions, hard.words[0], lens, feats.region_mask, d.gamma1, d.gamma2,
                                         paired=True)
            s_neg = paired_cosine(feats.global_features, hard.sentence[0])
            ok = hard.valid[0]
            wins[f"swap_{kind}_word"] += (w_true[:, 0] > w_neg[:, 0])[ok].float().tolist()
            wins[f"swap_{kind}_sentence"] += (s_true > s_neg)[ok].float().tolist()
    return {k: float(np.mean(v)) if v else float("nan") for k, v in wins.items()}


STAGE = Stage(name="damsm", run=run, upstream=("vocab", "detector", "memory"),
              config_keys=("damsm", "data.augment", "text.eval_words_num", "model.text_encoder",
                           "model.image_encoder", "model.embedding_dim", "model.word_dim", "model.memory_dim",
                           "model.image_backbone", "model.image_backbone_width", "model.inception_weights",
                           "model.grid_size"),
              budget_keys=("damsm.epochs", "damsm.max_minutes"),
              help="pretrain the DAMSM text/image encoders")
