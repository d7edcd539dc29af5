"""Differentiable augmentation for the discriminators (DiffAugment, Zhao et al., NeurIPS 2020), TISCL's views
of the generated image and the DAMSM's training images.

Not part of CPGAN: an option (``gan.augment``) for short runs, where the discriminators see few images.
Every image D looks at — real, generated for D's step and generated for G's step — passes through the same
random family of transforms; they are differentiable in the image, so G's gradient flows through them.

* ``translation``: each image shifted by an integer offset in [-s/8, s/8] pixels on both axes, zero padded;
* ``cutout``: one square of side s/2 at a random centre set to zero (grey, in [-1, 1] images);
* ``lowpass``: 2x2 average pooling, then bilinear upsampling back to s (no randomness): the next loss sees only
  the image's content below half its resolution — for TISCL (``gan.tiscl_augment``), so that G cannot satisfy
  the DAMSM with pixel-scale patterns (checkerboards, stripes) and the discriminators alone judge those;
* ``zoom``: a random square crop of side f·s, f uniform in [3/4, 1], at a random position inside the image,
  resized back to s bilinearly (edge pixels clamped) — scale jitter, for TISCL's views, as the random crops that
  CLIP-guided generators average over;
* ``noise`` (or ``noise:SIGMA``): i.i.d. Gaussian noise of standard deviation SIGMA (default 0.1, images in
  [-1, 1]) on every pixel — for TISCL's views: the DAMSM's loss averaged over noise is a smoothed loss whose
  gradient carries less of the pixel-scale directions a small encoder is fooled by (randomised smoothing).

No colour transforms: the captions name colours and D must see them as they are. Randomness comes from the
``torch.Generator`` the caller passes (the GAN stage's per-step generator), or from the global torch RNG when
it passes none (``damsm.augment``, whose RNG state is saved with the DAMSM's training state), so a resumed run
repeats it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

POLICIES = ("translation", "cutout", "lowpass", "zoom", "noise")
#: the policies that draw random numbers (``lowpass`` is deterministic)
RANDOM_POLICIES = ("translation", "cutout", "zoom", "noise")
#: ``noise``'s standard deviation when the policy does not name one (``noise:0.2``)
NOISE_STD = 0.1
#: ``zoom``'s smallest crop, as a fraction of the image side
ZOOM_MIN = 0.75


def parse_policy(text: str, key: str = "gan.augment") -> tuple[str, ...]:
    """``"translation,noise:0.2"`` -> ``("translation", "noise:0.2")``; unknown names are a clear error.

    Every returned name is a policy; only ``noise`` takes a parameter (``noise:SIGMA``, SIGMA ≥ 0)."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [n for n in names if policy_name(n) not in POLICIES]
    if bad:
        raise ValueError(f"{key}: unknown augmentation {', '.join(bad)}; choose from {', '.join(POLICIES)}")
    for n in names:
        if ":" in n:
            base, _, arg = n.partition(":")
            try:
                ok = base == "noise" and float(arg) >= 0
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"{key}: bad augmentation {n!r}; only noise takes a parameter, as noise:0.1 "
                                 "(the standard deviation, images in [-1, 1])")
    return names


def policy_name(token: str) -> str:
    """``"noise:0.2"`` -> ``"noise"``; a name without a parameter is returned as is."""
    return token.partition(":")[0]


def translate(x: Tensor, shifts: Tensor) -> Tensor:
    """Shift image k of ``x`` (B, C, H, W) by ``shifts[k] = (dy, dx)`` pixels (integers), zero padding.

    out[k, :, i, j] = x[k, :, i - dy, j - dx] where that pixel exists, else 0.
    """
    B, C, H, W = x.shape
    dy, dx = shifts[:, 0].view(B, 1, 1), shifts[:, 1].view(B, 1, 1)
    ii = torch.arange(H, device=x.device).view(1, H, 1) - dy
    jj = torch.arange(W, device=x.device).view(1, 1, W) - dx
    valid = ((ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)).unsqueeze(1)  # (B, 1, H, W)
    flat = (ii.clamp(0, H - 1) * W + jj.clamp(0, W - 1)).view(B, 1, H * W).expand(B, C, H * W)
    out = x.reshape(B, C, H * W).gather(2, flat).view(B, C, H, W)
    return out * valid.to(x.dtype)


def cutout(x: Tensor, centres: Tensor, side: int) -> Tensor:
    """Zero a ``side`` x ``side`` square of image k centred at ``centres[k] = (cy, cx)`` (clipped at borders)."""
    B, _, H, W = x.shape
    half = side // 2
    ii = torch.arange(H, device=x.device).view(1, H, 1)
    jj = torch.arange(W, device=x.device).view(1, 1, W)
    cy, cx = centres[:, 0].view(B, 1, 1), centres[:, 1].view(B, 1, 1)
    inside = (ii >= cy - half) & (ii < cy - half + side) & (jj >= cx - half) & (jj < cx - half + side)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def lowpass(x: Tensor) -> Tensor:
    """2x2 average pooling, bilinear upsampling back (half-pixel centres): ``(B, C, H, W)``, H and W even."""
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"lowpass needs an even image size, got {tuple(x.shape[-2:])}")
    return F.interpolate(F.avg_pool2d(x, 2), size=x.shape[-2:], mode="bilinear", align_corners=False)


def zoom(x: Tensor, sides: Tensor, corners: Tensor) -> Tensor:
    """Crop image k of ``x`` (B, C, H, W) to the ``sides[k] = (h, w)`` pixels (floats) whose top-left corner is
    ``corners[k] = (y0, x0)``, and resize it back to H x W bilinearly.

    Output pixel (i, j) samples the input at y = y0 + (i + ½)·h/H − ½, x = x0 + (j + ½)·w/W − ½ (half-pixel
    centres, as ``F.interpolate(align_corners=False)`` maps a crop), with positions outside the image clamped
    to its edge; differentiable in ``x``.
    """
    B, C, H, W = x.shape
    theta = torch.zeros(B, 2, 3, dtype=x.dtype, device=x.device)
    # affine_grid's normalised coordinates (align_corners=False): u in [-1, 1] covers the H pixels' outer edges
    theta[:, 0, 0] = sides[:, 1] / W
    theta[:, 0, 2] = (2 * corners[:, 1] + sides[:, 1]) / W - 1
    theta[:, 1, 1] = sides[:, 0] / H
    theta[:, 1, 2] = (2 * corners[:, 0] + sides[:, 0]) / H - 1
    grid = F.affine_grid(theta, [B, C, H, W], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment(x: Tensor, policy: tuple[str, ...], generator: torch.Generator | None = None) -> Tensor:
    """Apply ``policy`` to a batch (B, C, H, W) with fresh random parameters per image."""
    if not policy:
        return x
    B, _, H, W = x.shape
    for name in policy:
        if name == "translation":
            r = max(H, W) // 8
            shifts = torch.randint(-r, r + 1, (B, 2), generator=generator).to(x.device)
            x = translate(x, shifts)
        elif name == "cutout":
            side = max(1, min(H, W) // 2)
            centres = torch.stack([torch.randint(0, H, (B,), generator=generator),
                                   torch.randint(0, W, (B,), generator=generator)], 1).to(x.device)
            x = cutout(x, centres, side)
        elif name == "lowpass":
            x = lowpass(x)
        elif name == "zoom":
            f = ZOOM_MIN + (1 - ZOOM_MIN) * torch.rand(B, generator=generator)
            sides = torch.stack([f * H, f * W], 1)
            corners = torch.rand(B, 2, generator=generator) * (torch.tensor([H, W]) - sides)
            x = zoom(x, sides.to(x.device, x.dtype), corners.to(x.device, x.dtype))
        elif policy_name(name) == "noise":
            std = float(name.partition(":")[2] or NOISE_STD)  # parse_policy checked the number
            x = x + std * torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
    return x
