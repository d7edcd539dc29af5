"""Per-stage discriminators of CPGAN (paper §3.1, §3.4, suppl. 6.2; DESIGN §3.5).

One :class:`D_NET` per generator stage (image size s = 64/128/256 in the paper, 8/16/32 allowed for CPU
presets).  Usage::

    feats = d(images)                                   # DFeatures
    uc = d.uncond(feats)                                # (B,)  D^uc
    c = d.cond(feats, sentence, words, mask)            # (B,)  D^c (fgcd or global head)

Image encoder (AttnGAN ``D_NET64/128/256``: ``encode_image_by_16times`` + ``downBlock`` +
``Block3x3_leakRelu``), generalised to any power-of-two size s >= 8:

* ``down[j]`` for j = 0 .. log2(s/4)-1: conv 4x4 stride 2 pad 1 (no bias) ``ndf*2**j`` channels,
  BN (not on j = 0), LeakyReLU(0.2).  s -> s/2 -> ... -> 4x4.  (64 px: AttnGAN's 16-times encoder,
  4 blocks; 128 px: + ``img_code_s32``; 256 px: + ``img_code_s32`` + ``img_code_s64``.  The paper's
  "five stride-2 blocks" is the 128-px case; the count always brings the grid to 4x4.)
* ``squeeze``: 3x3 conv blocks (no bias, BN, LeakyReLU(0.2)) bringing the channels to ``ndf*8``:
  for s > 64 halving steps as AttnGAN (``img_code_s32_1``, ``img_code_s64_1/_2``); for s < 64 (last
  down block has fewer than ``ndf*8`` channels) one 3x3 block ``ndf*2**(n-1) -> ndf*8`` (our choice);
  none for 64.
  => image code (B, ndf*8, 4, 4) at every size.

Heads:

* D^uc (``uncond_fc``): reshape -> FC(ndf*8*4*4 -> 1) (suppl. 6.2; the same linear map as AttnGAN's
  4x4/stride-4 ``outlogits`` conv).  ``uncond=False`` drops it (AttnGAN ``b_jcu=False``).
* ``cond_head="global"`` (:class:`GlobalCondHead`, AttnGAN ``D_GET_LOGITS(bcondition=True)``,
  ablation baseline): cat(code, s tiled 4x4) -> 3x3 block -> 4x4/stride-4 conv -> logit.
* ``cond_head="fgcd"`` (:class:`FGCDHead`, Fine-grained Conditional Discriminator, eq. (11)): patch
  features v_ij on an N x N grid (N = ``fgcd_grid``), word attention per patch, logits per patch from
  [v_ij ; p_ij ; s], averaged over patches.  The grid is adaptive average pooling of the encoder map
  with the smallest resolution >= N: the 4x4 image code for N <= 4, else the output of the down block
  at that resolution (e.g. 8x8 with ``ndf*4`` channels for s = 64, N = 8).

Logits are raw scores (no sigmoid): CPGAN trains with hinge losses (:mod:`cpgan.gan_losses`).
Options: ``spectral_norm`` wraps every conv / linear (``torch.nn.utils.parametrizations``);
``batch_norm=False`` removes the BatchNorm layers (commonly paired with spectral norm).

Under DistributedDataParallel note that ``uncond``/``cond`` are methods, not ``forward``: wrap the
discriminator in a module whose ``forward`` computes every logit of a step.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["D_NET", "DFeatures", "FGCDHead", "GlobalCondHead"]

_LRELU = 0.2


class DFeatures(NamedTuple):
    """Output of :meth:`D_NET.forward`.

    code: (B, ndf*8, 4, 4) image code (both unconditional and ``global`` heads).
    patches: (B, C_p, r, r) encoder map the FGCD head pools to N x N (r >= N); None for ``global``.
    """

    code: Tensor
    patches: Tensor | None


def _block3x3(in_ch: int, out_ch: int, batch_norm: bool) -> nn.Sequential:
    """AttnGAN ``Block3x3_leakRelu``: conv3x3 (no bias) -> BN -> LeakyReLU(0.2), spatial size kept."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.LeakyReLU(_LRELU, inplace=True))
    return nn.Sequential(*layers)


def _down_block(in_ch: int, out_ch: int, batch_norm: bool) -> nn.Sequential:
    """AttnGAN ``downBlock``: conv 4x4 stride 2 pad 1 (no bias) -> BN -> LeakyReLU(0.2); halves the size."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 4, 2, 1, bias=False)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.LeakyReLU(_LRELU, inplace=True))
    return nn.Sequential(*layers)


def _check_text(
    batch: int, emb_dim: int, sentence: Tensor, words: Tensor | None, mask: Tensor | None, need_words: bool
) -> Tensor | None:
    """Validate conditional inputs; returns the mask cut to T (or None)."""
    if sentence.shape != (batch, emb_dim):
        raise ValueError(f"sentence must have shape ({batch}, {emb_dim}), got {tuple(sentence.shape)}")
    if not need_words:
        return None
    if words is None:
        raise ValueError("the fgcd conditional head needs word features: pass words (B, d, T) (and mask)")
    if words.dim() != 3 or words.shape[0] != batch or words.shape[1] != emb_dim:
        raise ValueError(f"words must have shape ({batch}, {emb_dim}, T), got {tuple(words.shape)}")
    if mask is None:
        return None
    n_words = words.shape[2]
    if mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < n_words:
        raise ValueError(
            f"mask must be a bool tensor of shape ({batch}, T={n_words}) with True = padding, "
            f"got {tuple(mask.shape)} {mask.dtype}"
        )
    mask = mask[:, :n_words]
    if bool(mask.all(dim=1).any()):
        raise ValueError("every caption needs at least one non-padding word (a mask row is all True)")
    return mask


class GlobalCondHead(nn.Module):
    """AttnGAN-style conditional head (``D_GET_LOGITS`` with ``bcondition=True``), no sigmoid.

    forward(code (B, C, 4, 4), sentence (B, d)) -> logits (B,):
    cat(code, sentence tiled to 4x4) -> ``joint_conv`` (3x3 block C+d -> C) -> ``out_logits``
    (conv 4x4 stride 4, C -> 1, with bias).
    """

    def __init__(self, code_ch: int, emb_dim: int, batch_norm: bool = True) -> None:
        super().__init__()
        self.emb_dim = emb_dim
        self.joint_conv = _block3x3(code_ch + emb_dim, code_ch, batch_norm)
        self.out_logits = nn.Conv2d(code_ch, 1, kernel_size=4, stride=4)

    def forward(self, code: Tensor, sentence: Tensor) -> Tensor:
        s = sentence[:, :, None, None].expand(-1, -1, code.shape[2], code.shape[3])
        h = self.joint_conv(torch.cat((code, s), dim=1))
        return self.out_logits(h).view(-1)


class FGCDHead(nn.Module):
    """Fine-grained Conditional Discriminator head (paper eq. (11)).

    For each of the N x N patch features v_ij (C_p channels):

    * ``proj``: 1x1 conv C_p -> d (no bias), so patches and words share a space (our choice; the paper
      writes v_ij^T w_n);
    * a_ij,n = softmax_n((proj v_ij) . w_n) over the caption's words, padding masked (no temperature);
    * p_ij = sum_n a_ij,n w_n  (d);
    * ``joint``: 1x1 conv (C_p + 2d -> hidden) -> LeakyReLU(0.2) -> 1x1 conv (hidden -> 1) on
      [v_ij ; p_ij ; s] (PatchGAN style) = patch logit;
    * score = mean of the N*N patch logits.

    forward(v (B, C_p, r, r), sentence (B, d), words (B, d, T), mask (B, T) bool True=padding or None)
        -> (score (B,), patch logits (B, N, N), attention (B, N*N, T))
    v is adaptively average-pooled to N x N first when r != N.
    """

    def __init__(self, patch_ch: int, emb_dim: int, grid: int = 4, hidden: int | None = None) -> None:
        super().__init__()
        if grid < 1:
            raise ValueError(f"fgcd grid N must be >= 1, got {grid}")
        hidden = hidden or patch_ch
        self.grid = grid
        self.emb_dim = emb_dim
        self.proj = nn.Conv2d(patch_ch, emb_dim, kernel_size=1, bias=False)
        self.joint = nn.Sequential(
            nn.Conv2d(patch_ch + 2 * emb_dim, hidden, kernel_size=1),
            nn.LeakyReLU(_LRELU, inplace=True),
            nn.Conv2d(hidden, 1, kernel_size=1),
        )

    def attention(self, v: Tensor, words: Tensor, mask: Tensor | None) -> Tensor:
        """v (B, C_p, N, N), words (B, d, T), mask (B, T) -> attention over words (B, N*N, T)."""
        q = self.proj(v).flatten(2)  # (B, d, P)
        logits = torch.bmm(q.transpose(1, 2), words)  # (B, P, T)
        if mask is not None:
            logits = logits.masked_fill(mask.unsqueeze(1), float("-inf"))
        return torch.softmax(logits, dim=2)

    def forward(
        self, v: Tensor, sentence: Tensor, words: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        if v.shape[2] != self.grid or v.shape[3] != self.grid:
            v = F.adaptive_avg_pool2d(v, self.grid)
        batch, _, n, _ = v.shape
        attn = self.attention(v, words, mask)  # (B, P, T)
        p = torch.bmm(words, attn.transpose(1, 2)).view(batch, self.emb_dim, n, n)  # (B, d, N, N)
        s = sentence[:, :, None, None].expand(-1, -1, n, n)
        patch_logits = self.joint(torch.cat((v, p, s), dim=1)).view(batch, n, n)
        return patch_logits.mean(dim=(1, 2)), patch_logits, attn


class D_NET(nn.Module):  # noqa: N801 (AttnGAN name)
    """Discriminator for one stage (see the module docstring for the structure).

    Args:
        image_size: s, a power of two >= 8 (64/128/256 paper; 16/32 CPU presets).
        ndf: GAN.DF_DIM (96 COCO release, 64 AttnGAN birds).
        emb_dim: text embedding size d (256).
        cond_head: ``"fgcd"`` (CPGAN) or ``"global"`` (AttnGAN, ablation baseline).
        fgcd_grid: N, patches per side of the FGCD head (1 <= N <= s/2).
        fgcd_hidden: hidden channels of the FGCD per-patch 1x1 convs (default: the patch channels).
        uncond: build the unconditional head D^uc.
        spectral_norm: spectral-normalise every conv / linear layer.
        batch_norm: keep AttnGAN's BatchNorm layers in the encoder and global head.

    forward(images (B, 3, s, s)) -> DFeatures; uncond(features) -> (B,);
    cond(features, sentence (B, d), words (B, d, T) | None, mask (B, T) | None) -> (B,).
    """

    def __init__(
        self,
        image_size: int = 64,
        ndf: int = 96,
        emb_dim: int = 256,
        cond_head: str = "fgcd",
        fgcd_grid: int = 4,
        fgcd_hidden: int | None = None,
        uncond: bool = True,
        spectral_norm: bool = False,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        n_down = (image_size // 4).bit_length() - 1
        if image_size < 8 or 4 * 2**n_down != image_size:
            raise ValueError(f"image_size must be a power of two >= 8 (e.g. 16, 32, 64, 128, 256), got {image_size}")
        if cond_head not in ("fgcd", "global"):
            raise ValueError(f"cond_head must be 'fgcd' or 'global', got {cond_head!r}")
        if ndf < 1 or emb_dim < 1:
            raise ValueError(f"ndf and emb_dim must be positive, got ndf={ndf}, emb_dim={emb_dim}")
        self.image_size = image_size
        self.ndf = ndf
        self.emb_dim = emb_dim
        self.cond_head_type = cond_head
        self.code_ch = ndf * 8

        self.down = nn.ModuleList()
        ch = 3
        for j in range(n_down):
            out = ndf * 2**j
            if j == 0:  # AttnGAN: no BN after the first conv
                self.down.append(nn.Sequential(nn.Conv2d(ch, out, 4, 2, 1, bias=False), nn.LeakyReLU(_LRELU, inplace=True)))
            else:
                self.down.append(_down_block(ch, out, batch_norm))
            ch = out
        self.squeeze = nn.ModuleList()
        if ch < self.code_ch:
            self.squeeze.append(_block3x3(ch, self.code_ch, batch_norm))
        while ch > self.code_ch:
            self.squeeze.append(_block3x3(ch, ch // 2, batch_norm))
            ch //= 2

        self.uncond_fc = nn.Linear(self.code_ch * 4 * 4, 1) if uncond else None

        self.fgcd_grid = fgcd_grid
        self._patch_index: int | None = None  # None -> the 4x4 code; j -> output of down[j]
        if cond_head == "global":
            self.cond_head: nn.Module = GlobalCondHead(self.code_ch, emb_dim, batch_norm)
        else:
            if not 1 <= fgcd_grid <= image_size // 2:
                raise ValueError(f"fgcd_grid must be in [1, {image_size // 2}] for {image_size}-px images, got {fgcd_grid}")
            if fgcd_grid <= 4:
                patch_ch = self.code_ch
            else:
                # smallest encoder resolution >= N: down[j] outputs image_size / 2**(j+1)
                j = max(k for k in range(n_down) if image_size // 2 ** (k + 1) >= fgcd_grid)
                self._patch_index = j
                patch_ch = ndf * 2**j
            self.cond_head = FGCDHead(patch_ch, emb_dim, fgcd_grid, fgcd_hidden)

        if spectral_norm:
            for m in list(self.modules()):
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.utils.parametrizations.spectral_norm(m)

    def forward(self, images: Tensor) -> DFeatures:
        """images (B, 3, s, s) -> DFeatures(code (B, ndf*8, 4, 4), patches or None)."""
        if images.dim() != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(
                f"images must have shape (B, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}"
            )
        h = images
        patches = None
        for j, block in enumerate(self.down):
            h = block(h)
            if j == self._patch_index:
                patches = h
        for block in self.squeeze:
            h = block(h)
        if self.cond_head_type == "fgcd" and self._patch_index is None:
            patches = h
        return DFeatures(h, patches)

    def uncond(self, features: DFeatures) -> Tensor:
        """D^uc logits (B,)."""
        if self.uncond_fc is None:
            raise ValueError("this D_NET was built with uncond=False: it has no unconditional head")
        return self.uncond_fc(features.code.flatten(1)).view(-1)

    def cond(
        self,
        features: DFeatures,
        sentence: Tensor,
        words: Tensor | None = None,
        mask: Tensor | None = None,
        return_map: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """D^c logits (B,); with ``return_map`` also the FGCD per-patch logits (B, N, N)
        (the ``global`` head returns its single logit as a (B, 1, 1) map)."""
        batch = features.code.shape[0]
        mask = _check_text(batch, self.emb_dim, sentence, words, mask, self.cond_head_type == "fgcd")
        if self.cond_head_type == "global":
            score = self.cond_head(features.code, sentence)
            return (score, score.view(batch, 1, 1)) if return_map else score
        if features.patches is None:
            raise ValueError("features carry no patch grid: compute them with this D_NET's forward()")
        score, patch_logits, _ = self.cond_head(features.patches, sentence, words, mask)
        return (score, patch_logits) if return_map else score
