"""Stage ``gan``: train the coarse-to-fine generator against per-stage discriminators (DESIGN §3.4–3.5).

One step (paper eqs. (4)–(5), suppl. 6.1–6.2):

1. the frozen DAMSM text encoder encodes the caption X and a mismatched caption X̄ (another image's);
2. G maps (z, s, W) to images Ĩ_0..Ĩ_{n-1} of the stage resolutions;
3. for each stage i, D_i is updated with the hinge loss
   ½[1−D^uc(I)]₊ + ⅓[1+D^uc(Ĩ)]₊ + ½[1−D^c(I,X)]₊ + ⅓[1+D^c(Ĩ,X)]₊ + ⅓[1+D^c(I,X̄)]₊;
4. G is updated with Σ_i −½D^uc(Ĩ_i) − ½D^c(Ĩ_i,X) + λ·TISCL(Ĩ_last, X) + KL(CA), TISCL being the DAMSM
   loss of the generated final image against its caption with the frozen encoders (AttnGAN applies it to
   the last stage only); with ``model.image_encoder=oaie`` the generated image's object features come from
   the detector with gradients (box choice detached).

Reproducibility: step t's batch, noise and CA noise are functions of ``(gan.seed, t)``, and the checkpoint
holds every weight, optimiser state and the EMA, so a resumed run equals an uninterrupted one on CPU.
SIGTERM/SIGINT saves a checkpoint and stops; ``max_minutes`` bounds the wall time.

Outputs: ``generator.safetensors`` (EMA weights when ``gan.ema_decay > 0``) + sidecar, ``state.safetensors``
(resume), ``samples/step_XXXXXX.png`` grids of fixed test and test_novel captions, ``metrics.jsonl``.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import build
from ..config import Config
from ..data.dataset import CaptionDataset, collate, load_split, load_vocab, make_loader, stage_sizes
from ..diffaug import RANDOM_POLICIES, augment, parse_policy, policy_name
from ..gan_losses import d_hinge_loss, g_hinge_loss, kl_loss
from ..losses import damsm_loss
from ..negatives import encode_hard_negatives, make_swapper
from ..models.discriminator import D_NET
from ..models.image_encoder import ImageFeatures
from ..models.generator import G_NET, init_weights_attngan, truncated_noise
from ..utils import distributed as dist
from ..utils.checkpoint import load_state, save_state, save_weights
from ..utils.logging import echo, progress
from .base import Deadline, Stage, StageContext

STATE = "state.safetensors"


# --------------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------------
def build_generator(cfg: Config) -> G_NET:
    m = cfg.model
    return G_NET(branch_num=m.branch_num, ngf=m.gf_dim, z_dim=m.z_dim, c_dim=m.condition_dim,
                 emb_dim=m.embedding_dim, r_num=m.r_num, base_size=m.base_size,
                 released_mask_bug=m.released_mask_bug, ca_noise=m.ca_noise,
                 stage_grad=m.stage_grad)


def build_discriminators(cfg: Config) -> torch.nn.ModuleList:
    m = cfg.model
    sizes = [m.base_size * 2 ** i for i in range(m.branch_num)]
    return torch.nn.ModuleList([
        D_NET(image_size=s, ndf=m.df_dim, emb_dim=m.embedding_dim, cond_head=m.cond_disc,
              fgcd_grid=min(m.fgcd_patches, s // 2), spectral_norm=m.spectral_norm,
              batch_norm=m.d_batch_norm) for s in sizes])


def final_size(cfg: Config) -> int:
    return cfg.model.base_size * 2 ** (cfg.model.branch_num - 1)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 convolutions natively: a CUDA GPU that supports it, or a CPU with the
    AVX512-BF16 or AMX-BF16 instructions (read from /proc/cpuinfo; False where that file does not exist)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_amp(amp: str, device: torch.device) -> bool:
    """``gan.amp`` -> use bfloat16 autocast? ``""`` no, ``bf16`` yes, ``auto`` where :func:`native_bf16`."""
    if amp not in ("", "bf16", "auto"):
        raise ValueError(f"gan.amp must be '' (off), 'bf16' or 'auto', got {amp!r}")
    return amp == "bf16" or (amp == "auto" and native_bf16(device))


def padding_mask(captions: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool, True at padding (id 0 = ``<end>``)."""
    return captions == 0


def step_generator(seed: int, step: int) -> torch.Generator:
    """The RNG of training step ``step``: noise is a pure function of (seed, step) (exact resume)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2 ** 63))


def ema_decay_at(decay: float, step: int) -> float:
    """EMA decay with warm-up: ``min(decay, (1 + t) / (10 + t))``.

    A fixed 0.999 would keep 0.999**t of the random initialisation (82 % after 200 steps, 61 % after 500),
    which ruins the samples of short CPU runs; the warm-up follows the weights closely early on and reaches
    ``decay`` after about 10 / (1 - decay) steps.
    """
    return min(decay, (1.0 + step) / (10.0 + step))


def _grad_norm(loss: torch.Tensor, x: torch.Tensor) -> float:
    """||d loss / d x|| (float32), keeping the graph for the real backward pass."""
    (gx,) = torch.autograd.grad(loss, x, retain_graph=True)
    return float(gx.float().norm())


def parse_anneal(spec: str) -> tuple[int, int, float] | None:
    """``gan.tiscl_anneal`` ``"START:END:FINAL"`` -> ``(START, END, FINAL)``; empty -> None."""
    if not spec:
        return None
    try:
        a, b, c = spec.split(":")
        start, end, final = int(a), int(b), float(c)
    except ValueError:
        raise ValueError(f"gan.tiscl_anneal={spec!r}: expected START:END:FINAL, e.g. 600:1200:2") from None
    if start < 0 or end < start or final < 0:
        raise ValueError(f"gan.tiscl_anneal={spec!r}: need 0 <= START <= END and FINAL >= 0")
    return start, end, final


def tiscl_weight(lam: float, warmup: int, step: int, anneal: tuple[int, int, float] | None = None) -> float:
    """λ of TISCL at (0-based) ``step``: ``lam * min(1, step / warmup)`` (``warmup`` 0 = ``lam`` throughout),
    then, with ``anneal = (start, end, final)`` (``gan.tiscl_anneal``), linearly from that value at ``start``
    to ``final`` at ``end`` and ``final`` after it."""
    w = lam if warmup <= 0 else lam * min(1.0, step / warmup)
    if anneal is None or step <= anneal[0]:
        return w
    start, end, final = anneal
    t = 1.0 if step >= end else (step - start) / (end - start)
    return w + t * (final - w)


def split_views(f: ImageFeatures, views: int) -> list[ImageFeatures]:
    """Image features of ``views`` stacked batches ``(V*B, ...)`` -> one :class:`ImageFeatures` per view."""
    if views == 1:
        return [f]
    mask = f.region_mask.chunk(views) if f.region_mask is not None else [None] * views
    return [ImageFeatures(r, gl, m) for r, gl, m in zip(f.regions.chunk(views), f.global_features.chunk(views), mask)]


def balanced_weight(lam: float, balance: float, adv_norm: float, tiscl_norm: float) -> float:
    """``gan.tiscl_balance``: λ capped so that ‖∂(λ·TISCL)/∂Ĩ‖ ≤ balance · ‖∂L_adv/∂Ĩ‖ at the last stage image.

    ``min(lam, balance * adv_norm / tiscl_norm)``; ``lam`` when ``tiscl_norm`` is zero.
    """
    if tiscl_norm <= 0.0:
        return lam
    return min(lam, balance * adv_norm / tiscl_norm)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


# --------------------------------------------------------------------------------------------------
# Sample grids
# --------------------------------------------------------------------------------------------------
def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` in [-1, 1] -> uint8 ``(B, H, W, 3)``."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def grid_image(images: list[np.ndarray], cols: int = 8, pad: int = 2) -> Image.Image:
    """Stages stacked: for each stage a block of rows (images upscaled to the final size)."""
    size = images[-1].shape[1]
    n = images[-1].shape[0]
    rows = math.ceil(n / cols)
    canvas = np.full(((size + pad) * rows * len(images), (size + pad) * cols, 3), 255, np.uint8)
    for s, arr in enumerate(images):
        for k in range(n):
            im = arr[k]
            if im.shape[0] != size:
                im = np.asarray(Image.fromarray(im).resize((size, size), Image.NEAREST))
            r, c = divmod(k, cols)
            y = (s * rows + r) * (size + pad)
            canvas[y:y + size, c * (size + pad):c * (size + pad) + size] = im
    return Image.fromarray(canvas)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
class Trainer:
    """Holds the models of the GAN stage; ``run()`` trains until steps, time or a signal stop it."""

    def __init__(self, cfg: Config, ctx: StageContext):
        self.cfg, self.ctx = cfg, ctx
        g = cfg.gan
        self.info, self.device = dist.init(ctx.device)
        dev = self.device
        self.vocab = load_vocab(ctx.run_dir)
        self.sizes = stage_sizes(final_size(cfg), cfg.model.branch_num)
        if self.sizes[-1] != cfg.data.image_size:
            echo(f"[gan] note: the generator's final size {self.sizes[-1]} differs from data.image_size "
                 f"{cfg.data.image_size}; real images are resized")
        train = load_split(ctx.run_dir, "train")
        self.ds = CaptionDataset(train, self.sizes, cfg.text.words_num, train=True, seed=g.seed,
                                 augment=cfg.data.augment)
        from .damsm import make_encoders

        te, ie = build.load_damsm(cfg, ctx.run_dir, len(self.vocab), dev)
        self.enc = make_encoders(cfg, ctx.run_dir, len(self.vocab), dev, te, ie)
        if build.uses_objects(cfg):
            from ..encode import detector_object_fn

            self.enc.object_fn = detector_object_fn(cfg, ctx.run_dir, dev)
        torch.manual_seed(g.seed)
        self.G = build_generator(cfg).to(dev)
        self.Ds = build_discriminators(cfg).to(dev)
        if g.init == "attngan":  # AttnGAN's trainer: G and D .apply(weights_init) (orthogonal, BN ~ N(1, .02))
            self.G.apply(init_weights_attngan)
            self.Ds.apply(init_weights_attngan)
        elif g.init != "pytorch":
            raise ValueError(f"gan.init must be 'attngan' or 'pytorch', got {g.init!r}")
        self.G_ema = copy.deepcopy(self.G).eval() if g.ema_decay > 0 else None
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=g.lr_g, betas=(g.beta1, g.beta2))
        self.opt_d = [torch.optim.Adam(d.parameters(), lr=g.lr_d, betas=(g.beta1, g.beta2)) for d in self.Ds]
        # Under torchrun the gradients are averaged by hand (dist.average_gradients): see its docstring.
        self.Gw, self.Dw = self.G, list(self.Ds)
        self.step, self.spent, self.history = 0, 0.0, []
        self.augment = parse_policy(g.augment)
        self.tiscl_augment = parse_policy(g.tiscl_augment, "gan.tiscl_augment")
        self.tiscl_anneal = parse_anneal(g.tiscl_anneal)
        if g.tiscl_views < 1:
            raise ValueError(f"gan.tiscl_views must be at least 1 (one view = the paper), got {g.tiscl_views}")
        if g.tiscl_views > 1 and not {policy_name(n) for n in self.tiscl_augment} & set(RANDOM_POLICIES):
            raise ValueError(f"gan.tiscl_views={g.tiscl_views} needs a random gan.tiscl_augment "
                             f"({', '.join(RANDOM_POLICIES)}): without it every view is the same image; "
                             "set gan.tiscl_views=1 with it off")
        self.tiscl_swapper = make_swapper(g.tiscl_hard_negatives, "gan.tiscl_hard_negatives",
                                          self.vocab.word2id, cfg.data.source)
        self.d_swapper = make_swapper(g.d_hard_negatives, "gan.d_hard_negatives", self.vocab.word2id,
                                      cfg.data.source)
        if self.d_swapper is not None and self.d_swapper.num_negatives != 1:
            raise ValueError("gan.d_hard_negatives: name one kind with one negative (shape or colour); D's "
                             "mismatched-caption term takes one caption per image")
        last = cfg.model.branch_num - 1  # gan.tiscl_stages: "last" or "all" (checked with the config)
        self.tiscl_stage_ids = list(range(last + 1)) if g.tiscl_stages == "all" else [last]
        self.amp = resolve_amp(g.amp, self.device)
        if g.amp == "auto":
            echo(f"[gan] gan.amp=auto: {'bfloat16 autocast' if self.amp else 'float32'} on this "
                 f"{self.device.type.upper()}")
        self.state_path = ctx.dir / STATE
        if self.state_path.exists():
            self.load(self.state_path)
            echo(f"[gan] resuming at step {self.step}")
        dist.broadcast_module(self.G, self.info)
        dist.broadcast_module(self.Ds, self.info)
        if self.G_ema is not None:
            dist.broadcast_module(self.G_ema, self.info)
        self.fixed = self._fixed_batch()

    # ---- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict:
        return {"G": self.G.state_dict(), "D": self.Ds.state_dict(), "opt_g": self.opt_g.state_dict(),
                "opt_d": [o.state_dict() for o in self.opt_d],
                "G_ema": self.G_ema.state_dict() if self.G_ema is not None else None,
                "step": self.step, "seconds": self.spent, "history": self.history}

    def save(self) -> None:
        if self.info.is_main:
            save_state(self.state_path, self.state())

    def load(self, path: Path) -> None:
        st = load_state(path, self.device)
        self.G.load_state_dict(st["G"])
        self.Ds.load_state_dict(st["D"])
        self.opt_g.load_state_dict(st["opt_g"])
        for o, s in zip(self.opt_d, st["opt_d"]):
            o.load_state_dict(s)
        if self.G_ema is not None and st.get("G_ema") is not None:
            self.G_ema.load_state_dict(st["G_ema"])
        self.step, self.spent, self.history = st["step"], st["seconds"], st["history"]

    @torch.no_grad()
    def sampling_generator(self) -> torch.nn.Module:
        """The generator to sample with: the EMA (when enabled) with *standing* BatchNorm statistics.

        The EMA averages the weights, but its BN running statistics would be the raw generator's (measured with
        other weights): sampling in eval mode with them lost 0.1 colour accuracy at 600 steps (0.46 vs 0.56).
        As BigGAN's "standing statistics", the running mean/var are re-estimated as the plain average over
        ``gan.standing_batches`` training batches (fixed captions and noise: the same at every call) passed
        through the EMA generator in train mode. The next EMA update copies the raw generator's buffers back,
        so training is unaffected. Without EMA, or with ``standing_batches = 0``, the generator is returned as is.
        """
        G = self.G_ema if self.G_ema is not None else self.G
        n = self.cfg.gan.standing_batches
        if self.G_ema is None or n <= 0:
            return G
        bns = [m for m in G.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not bns:
            return G
        moments = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        B = self.cfg.gan.batch_size
        gen = torch.Generator().manual_seed(self.cfg.gan.seed + 7919)
        order = torch.randperm(len(self.ds), generator=gen)
        G.train()
        for k in range(n):
            items = [it for it in (self.ds[int(i)] for i in order[k * B:(k + 1) * B]) if it is not None]
            if len(items) < 2:
                break
            b = collate(items)
            words, sent, mask = self._text(b["captions"].to(self.device), b["lengths"].to(self.device))
            z = truncated_noise(len(items), self.cfg.model.z_dim, None, generator=gen).to(self.device)
            eps = torch.randn(len(items), self.cfg.model.condition_dim, generator=gen).to(self.device)
            G(z, sent, words, mask, eps)
        G.eval()
        for m, mom in zip(bns, moments):
            m.momentum = mom
        return G

    def export(self) -> Path:
        """Write the sampling generator (EMA with standing statistics when enabled) with its sidecar."""
        path = self.ctx.dir / "generator.safetensors"
        g = self.sampling_generator()
        if self.info.is_main:
            save_weights(path, g.state_dict(), {
                "step": self.step, "ema": self.G_ema is not None, "vocab_sha256": self.vocab.sha256(),
                "model": vars(self.cfg.model), "stage_sizes": self.sizes})
        return path

    # ---- one step ------------------------------------------------------------------------------
    def autocast(self):
        """``gan.amp``: bfloat16 autocast of the forward passes (losses stay float32); a no-op when off."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _text(self, caps: torch.Tensor, lens: torch.Tensor):
        with torch.no_grad():
            words, sent = self.enc.encode_text(caps, lens)
        return words.detach(), sent.detach(), padding_mask(caps)

    def train_step(self, batch: dict, diagnose: bool = False) -> dict:
        """One D update per stage, then one G update; returns the scalar logs.

        With ``diagnose`` the logs also hold ``gx_adv{i}`` (norm of the gradient of stage i's adversarial G
        loss with respect to that stage's image) and ``gx_tiscl`` (the same for λ·TISCL at the last stage):
        the balance between the discriminators' signal and TISCL's, measured where they meet (the optimiser
        update itself is unchanged)."""
        cfg, g, dev = self.cfg, self.cfg.gan, self.device
        reals = [x.to(dev) for x in batch["images"]]
        caps, lens = batch["captions"].to(dev), batch["lengths"].to(dev)
        wcaps, wlens = batch["wrong_captions"].to(dev), batch["wrong_lengths"].to(dev)
        words, sent, mask = self._text(caps, lens)
        B = caps.shape[0]
        gen = step_generator(g.seed, self.step * self.info.world + self.info.rank)
        z = truncated_noise(B, cfg.model.z_dim, None, generator=gen).to(dev)
        eps = torch.randn(B, cfg.model.condition_dim, generator=gen).to(dev)
        with self.autocast():
            fakes, _, mu, logvar = self.Gw(z, sent, words, mask, eps)
        if self.d_swapper is not None:  # gan.d_hard_negatives: X̄ = the own caption with one word swapped
            swapped, ok = self.d_swapper(caps, lens, gen)  # (1, B, T), (1, B); no swap -> keep the other caption
            width = max(caps.shape[1], wcaps.shape[1])
            wcaps = torch.where(ok[0, :, None], F.pad(swapped[0], (0, width - caps.shape[1])),
                                F.pad(wcaps, (0, width - wcaps.shape[1])))
            wlens = torch.where(ok[0], lens, wlens)
        wwords, wsent, wmask = self._text(wcaps, wlens)

        def aug(x: torch.Tensor) -> torch.Tensor:  # gan.augment (DiffAugment), off in the paper
            return augment(x, self.augment, gen)

        logs: dict = {}
        # ---- discriminators, eq. (5)
        d_total = 0.0
        for i, (D, opt) in enumerate(zip(self.Dw, self.opt_d)):
            with self.autocast():
                f_real = D(aug(reals[i]))
                f_fake = D(aug(fakes[i].detach()))
                logits = (D.uncond(f_real), D.uncond(f_fake), D.cond(f_real, sent, words, mask),
                          D.cond(f_fake, sent, words, mask), D.cond(f_real, wsent, wwords, wmask))
            out = d_hinge_loss(*(x.float() for x in logits))
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            dist.average_gradients(self.Ds[i], self.info)
            opt.step()
            d_total += float(out["loss"].detach())
            logs[f"d{i}_loss"] = float(out["loss"].detach())
        logs["d_loss"] = d_total
        # ---- generator, eq. (4) + λ TISCL + KL
        for D in self.Ds:
            D.requires_grad_(False)
        g_adv = 0.0
        loss = torch.zeros((), device=dev)
        for i, D in enumerate(self.Dw):
            with self.autocast():
                f_fake = D(aug(fakes[i]))
                logits = (D.uncond(f_fake), D.cond(f_fake, sent, words, mask))
            out = g_hinge_loss(*(x.float() for x in logits))
            loss = loss + out["loss"]
            g_adv += float(out["loss"].detach())
            if diagnose or (g.tiscl_balance > 0 and i == len(self.Dw) - 1):
                logs[f"gx_adv{i}"] = _grad_norm(out["loss"], fakes[i])
        kl = kl_loss(mu.float(), logvar.float())
        loss = loss + g.kl_weight * kl
        lam = tiscl_weight(g.lambda_tiscl, g.tiscl_warmup, self.step, self.tiscl_anneal)
        if self.tiscl_anneal is not None:
            logs["lambda_tiscl"] = lam
        if lam > 0:
            feats = []  # gan.tiscl_stages: the scored stages, the last one last (its draws as with "last")
            for k in self.tiscl_stage_ids:
                img = fakes[k] if k == len(fakes) - 1 else F.interpolate(
                    fakes[k], size=fakes[-1].shape[-2:], mode="bilinear", align_corners=False)
                # gan.tiscl_views: V augmented views as one encoder batch of V*B images (V = 1: the single view)
                views = [augment(img, self.tiscl_augment, gen) for _ in range(g.tiscl_views)]
                with self.autocast():
                    feats.append(self.enc.encode_images(views[0] if len(views) == 1 else torch.cat(views)))
            cls = batch["class_ids"].to(dev) if bool((batch["class_ids"] >= 0).all()) else None
            hard = None
            if self.tiscl_swapper is not None:  # gan.tiscl_hard_negatives (drawn last: the other draws stay)
                with torch.no_grad():
                    hard = encode_hard_negatives(self.enc.encode_text, self.tiscl_swapper, caps, lens, gen)
            terms = [torch.stack([damsm_loss(v.regions.float(), v.global_features.float(), words, sent, lens,
                                             class_ids=cls, region_mask=v.region_mask, gamma1=cfg.damsm.gamma1,
                                             gamma2=cfg.damsm.gamma2, gamma3=cfg.damsm.gamma3, hard=hard)["loss"]
                                  for v in split_views(f, g.tiscl_views)]).mean() for f in feats]
            for k, term in zip(self.tiscl_stage_ids[:-1], terms[:-1]):  # earlier stages: at the fixed λ
                loss = loss + lam * term
                logs[f"tiscl{k}"] = float(term.detach())
            # ‖∂TISCL/∂Ĩ‖ at the last image, once: the cap and the diagnostics both use it (λ ≥ 0 scales it)
            gx = _grad_norm(terms[-1], fakes[-1]) if (diagnose or g.tiscl_balance > 0) else 0.0
            if g.tiscl_balance > 0:  # cap λ by the adversarial gradient at the last image (not in the paper)
                lam = balanced_weight(lam, g.tiscl_balance, logs[f"gx_adv{len(self.Dw) - 1}"], gx)
                logs["lambda_tiscl"] = lam
            loss = loss + lam * terms[-1]
            logs["tiscl"] = float(terms[-1].detach())
            if diagnose:
                logs["gx_tiscl"] = lam * gx
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(self.G, self.info)
        self.opt_g.step()
        for D in self.Ds:
            D.requires_grad_(True)
        if self.G_ema is not None:
            ema_update(self.G_ema, self.G, ema_decay_at(g.ema_decay, self.step))
        logs.update(g_adv=g_adv, kl=float(kl.detach()), g_loss=float(loss.detach()))
        return logs

    # ---- samples -------------------------------------------------------------------------------
    def _fixed_batch(self) -> dict:
        """16 test + 8 test_novel captions (or 24 test captions), fixed noise: the sample grid's input."""
        items = []
        for split, n in (("test", 16), ("test_novel", 8)):
            try:
                data = load_split(self.ctx.run_dir, split)
            except Exception:  # noqa: BLE001 - test_novel only exists for the shapes world
                continue
            ds = CaptionDataset(data, self.sizes, self.cfg.text.eval_words_num, train=False)
            items += [ds[i] for i in range(min(n, len(ds)))]
        b = collate(items)
        gen = torch.Generator().manual_seed(12345)
        b["z"] = truncated_noise(b["size"], self.cfg.model.z_dim, None, generator=gen)
        b["eps"] = torch.randn(b["size"], self.cfg.model.condition_dim, generator=gen)
        return b

    @torch.no_grad()
    def sample(self, tag: str) -> Path | None:
        if not self.info.is_main:
            return None
        G = self.sampling_generator()
        was = G.training
        G.eval()
        b = self.fixed
        caps, lens = b["captions"].to(self.device), b["lengths"].to(self.device)
        words, sent, mask = self._text(caps, lens)
        imgs, _, _, _ = G(b["z"].to(self.device), sent, words, mask, torch.zeros_like(b["eps"]).to(self.device))
        G.train(was)
        out = self.ctx.dir / "samples" / f"{tag}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        grid = grid_image([to_uint8(x) for x in imgs] + [to_uint8(b["images"][-1])])
        grid.save(out)
        with open(self.ctx.dir / "samples" / "captions.txt", "w") as f:
            for c, l in zip(b["captions"], b["lengths"]):
                f.write(" ".join(self.vocab.decode(c[:l].tolist())) + "\n")
        return out

    # ---- loop ----------------------------------------------------------------------------------
    def run(self) -> dict:
        g = self.cfg.gan
        deadline = Deadline(g.max_minutes, self.spent)
        loader = make_loader(self.ds, g.batch_size, seed=g.seed, start_step=self.step,
                             num_workers=self.cfg.data.num_workers, rank=self.info.rank, world=self.info.world)
        if self.step == 0:
            self.sample("step_000000")
        bar = progress(total=g.steps, initial=self.step, desc="gan")
        sums: dict = {}
        n = 0
        skipped = 0
        stopped = False
        evaluator = _QuickEval.maybe(self.cfg, self.ctx, self.device)
        for batch in loader:
            if self.step >= g.steps:
                break
            stop = self.ctx.stop_requested or deadline.expired()
            if dist.broadcast_flag(stop, self.info, self.device):
                stopped = True
                break
            skipped += batch.get("skipped", 0)
            if batch.get("size", 0) < 2:
                self.step += 1
                continue
            # the last step of each logging window also measures the gradient balance (train_step's docstring)
            logs = self.train_step(batch, diagnose=(self.step + 1) % g.log_every == 0)
            self.step += 1
            bar.update(1)
            diag = {k: logs.pop(k) for k in list(logs) if k.startswith("gx_")}
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            if self.step % g.log_every == 0:
                rec = {k: v / n for k, v in sums.items()}
                rec.update(diag)
                rec.update(minutes=deadline.elapsed / 60, skipped_images=skipped)
                if self.info.is_main:
                    self.ctx.log(self.step, **rec)
                bar.set_postfix(d=f"{rec['d_loss']:.2f}", g=f"{rec['g_adv']:.2f}")
                sums, n = {}, 0
            if self.step % g.sample_every == 0:
                self.sample(f"step_{self.step:06d}")
                if evaluator is not None and self.info.is_main:
                    m = evaluator(self.sampling_generator(), self)
                    m["minutes"] = deadline.elapsed / 60
                    self.history.append({"step": self.step, **m})
                    self.ctx.log(self.step, **{f"eval_{k}": v for k, v in m.items()})
                    echo(f"[gan] step {self.step}: colour {m['colour_acc']:.3f} shape {m['shape_acc']:.3f} "
                         f"SOA-I {m['soa_i']:.3f} ({m['minutes']:.1f} min)")
            if self.step % g.checkpoint_every == 0:
                self.spent = deadline.elapsed
                self.save()
        bar.close()
        self.spent = deadline.elapsed
        self.save()
        self.export()
        self.sample(f"step_{self.step:06d}")
        return {"steps": self.step, "minutes": self.spent / 60, "stopped_early": stopped,
                "skipped_images": skipped, "history": self.history[-20:]}


class _QuickEval:
    """Evaluator scores of the current generator on a few hundred test captions (shapes world only)."""

    def __init__(self, judge, data, ds, device, n):
        self.judge, self.data, self.ds, self.device, self.n = judge, data, ds, device, n

    @classmethod
    def maybe(cls, cfg: Config, ctx: StageContext, device) -> "_QuickEval | None":
        if cfg.data.source != "shapes" or not (ctx.run_dir / "evaluator" / "done.json").exists():
            return None
        from .evaluator import load_evaluator

        judge = load_evaluator(ctx.run_dir, device)
        data = load_split(ctx.run_dir, "test")
        sizes = stage_sizes(final_size(cfg), cfg.model.branch_num)
        return cls(judge, data, CaptionDataset(data, sizes, cfg.text.eval_words_num, train=False), device,
                   min(cfg.gan.eval_images, len(data)))

    @torch.no_grad()
    def __call__(self, G, trainer: Trainer) -> dict:
        from .evaluate import generate_batches, soa_of_images

        was = G.training
        G.eval()
        imgs, caps = [], []
        for fake, b in generate_batches(G, trainer.enc, self.ds, self.device, self.n, batch_size=50,
                                        seed=0, truncation=None):
            imgs.append(fake[-1].cpu())
            caps += [self.data.records[int(i)]["captions"][0] for i in b["index"]]
        G.train(was)
        return soa_of_images(self.judge, torch.cat(imgs), caps, self.device)


def run(cfg: Config, ctx: StageContext) -> dict:
    trainer = Trainer(cfg, ctx)
    return trainer.run()


STAGE = Stage(name="gan", run=run, distributed=True, upstream=("vocab", "detector", "memory", "damsm"),
              config_keys=("gan", "model", "text.words_num", "text.eval_words_num", "data.augment"),
              budget_keys=("gan.steps", "gan.max_minutes", "gan.checkpoint_every", "gan.sample_every", "gan.log_every", "gan.eval_images"),
              help="train the generator and discriminators")
