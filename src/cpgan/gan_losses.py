"""GAN losses of CPGAN: hinge adversarial losses (paper eqs. (4)-(5), DESIGN §3.5) and the CA KL term.

Per stage i, with D^uc the unconditional and D^c the conditional discriminator logits:

    L_D = ½[1 − D^uc(I)]₊ + ⅓[1 + D^uc(Ĩ)]₊ + ½[1 − D^c(I, X)]₊ + ⅓[1 + D^c(Ĩ, X)]₊ + ⅓[1 + D^c(I, X̄)]₊
    L_G = −½ D^uc(Ĩ) − ½ D^c(Ĩ, X)

I real, Ĩ generated, X the matching caption, X̄ a mismatched one; every bracket is a mean over its
batch.  The ½ / ⅓ weights are AttnGAN's (REFERENCE §7.7: ½ real, ⅓ fake and mismatched) carried over to
the hinge form; they are module-level defaults and function arguments.  The total generator loss adds
λ·TISCL on the last stage and :func:`kl_loss` (weight 1, AttnGAN) — the training stage sums those.

Logit tensors may have any shape (normally (B,)); each term is the mean over all its elements.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "D_FAKE_WEIGHT",
    "D_REAL_WEIGHT",
    "D_WRONG_WEIGHT",
    "G_COND_WEIGHT",
    "G_UNCOND_WEIGHT",
    "KL_WEIGHT",
    "d_hinge_loss",
    "g_hinge_loss",
    "kl_loss",
]

D_REAL_WEIGHT: float = 1.0 / 2.0
"""Weight of the real-image hinge terms ½[1 − D(I)]₊ (unconditional and conditional), eq. (5)."""
D_FAKE_WEIGHT: float = 1.0 / 3.0
"""Weight of the generated-image hinge terms ⅓[1 + D(Ĩ)]₊, eq. (5)."""
D_WRONG_WEIGHT: float = 1.0 / 3.0
"""Weight of the mismatched-caption term ⅓[1 + D^c(I, X̄)]₊, eq. (5)."""
G_UNCOND_WEIGHT: float = 1.0 / 2.0
"""Weight of −D^uc(Ĩ) in the generator loss, eq. (4)."""
G_COND_WEIGHT: float = 1.0 / 2.0
"""Weight of −D^c(Ĩ, X) in the generator loss, eq. (4)."""
KL_WEIGHT: float = 1.0
"""Weight of the conditioning-augmentation KL term in the total G loss (AttnGAN)."""


def _check(name: str, x: Tensor | None, required: bool) -> None:
    if x is None:
        if required:
            raise ValueError(f"{name} is required (got None)")
        return
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor of discriminator logits, got {type(x).__name__}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: pass at least one logit")


def d_hinge_loss(
    real_uc: Tensor | None,
    fake_uc: Tensor | None,
    real_c: Tensor,
    fake_c: Tensor,
    wrong_c: Tensor | None,
    *,
    real_weight: float = D_REAL_WEIGHT,
    fake_weight: float = D_FAKE_WEIGHT,
    wrong_weight: float = D_WRONG_WEIGHT,
) -> dict[str, Tensor]:
    """Discriminator hinge loss of one stage, eq. (5).

    Args:
        real_uc, fake_uc: D^uc logits on real / generated images, (B,) each, or both None to drop the
            unconditional terms (a discriminator without an unconditional head).
        real_c, fake_c: D^c logits on (real, matching caption) / (generated, matching caption), (B,).
        wrong_c: D^c logits on (real, mismatched caption), (B',), or None to drop that term.

    Returns a dict of scalar tensors: ``loss`` (the weighted sum) and the unweighted terms
    ``real_uncond``, ``fake_uncond``, ``real_cond``, ``fake_cond``, ``wrong_cond`` (means of the hinge
    brackets; the uncond / wrong entries are present only when given).
    """
    if (real_uc is None) != (fake_uc is None):
        raise ValueError("give both real_uc and fake_uc (unconditional logits) or neither")
    _check("real_uc", real_uc, False)
    _check("fake_uc", fake_uc, False)
    _check("real_c", real_c, True)
    _check("fake_c", fake_c, True)
    _check("wrong_c", wrong_c, False)
    out: dict[str, Tensor] = {}
    out["real_cond"] = torch.relu(1.0 - real_c).mean()
    out["fake_cond"] = torch.relu(1.0 + fake_c).mean()
    loss = real_weight * out["real_cond"] + fake_weight * out["fake_cond"]
    if real_uc is not None and fake_uc is not None:
        out["real_uncond"] = torch.relu(1.0 - real_uc).mean()
        out["fake_uncond"] = torch.relu(1.0 + fake_uc).mean()
        loss = loss + real_weight * out["real_uncond"] + fake_weight * out["fake_uncond"]
    if wrong_c is not None:
        out["wrong_cond"] = torch.relu(1.0 + wrong_c).mean()
        loss = loss + wrong_weight * out["wrong_cond"]
    out["loss"] = loss
    return out


def g_hinge_loss(
    fake_uc: Tensor | None,
    fake_c: Tensor,
    *,
    uncond_weight: float = G_UNCOND_WEIGHT,
    cond_weight: float = G_COND_WEIGHT,
) -> dict[str, Tensor]:
    """Generator hinge loss of one stage, eq. (4): −½ mean D^uc(Ĩ) − ½ mean D^c(Ĩ, X).

    ``fake_uc`` may be None (no unconditional head).  Returns ``loss`` and the unweighted
    ``fake_uncond`` (= −mean D^uc(Ĩ), when given) and ``fake_cond`` (= −mean D^c(Ĩ, X)).
    """
    _check("fake_uc", fake_uc, False)
    _check("fake_c", fake_c, True)
    out: dict[str, Tensor] = {"fake_cond": -fake_c.mean()}
    loss = cond_weight * out["fake_cond"]
    if fake_uc is not None:
        out["fake_uncond"] = -fake_uc.mean()
        loss = loss + uncond_weight * out["fake_uncond"]
    out["loss"] = loss
    return out


def kl_loss(mu: Tensor, logvar: Tensor) -> Tensor:
    """Conditioning-augmentation KL(N(mu, exp(logvar)) || N(0, I)) as AttnGAN codes it (``KL_loss``):
    ``mean(-0.5 * (1 + logvar - mu^2 - exp(logvar)))`` over all elements (not summed over c_dim).

    mu, logvar: (B, c_dim) -> scalar.
    """
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar must have the same shape, got {tuple(mu.shape)} and {tuple(logvar.shape)}")
    return torch.mean(-0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()))
