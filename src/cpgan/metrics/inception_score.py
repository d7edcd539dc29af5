"""Inception Score (REFERENCE §8.1).

IS = exp( E_x KL( p(y|x) || p(y) ) ), evaluated on each of ``splits`` consecutive splits of the
samples, with p(y) the split's marginal (mean of its rows); reported as mean and standard deviation
of the split scores.

Conventions (chosen to match the original improved-gan / DM-GAN code and CPGAN's
``evaluation/caculate_IS.py``, which all use ``np.std``):

* std is the population standard deviation (ddof 0). torchmetrics uses ddof 1; it is a constructor
  argument here (``ddof``).
* split ``k`` is ``probs[k*N//splits : (k+1)*N//splits]`` (improved-gan), which uses every sample.
  CPGAN's script uses ``N//splits`` rows per split and drops the remainder; both coincide when
  ``N`` is a multiple of ``splits``. No shuffling (the caller's order is kept; torch-fidelity and
  torchmetrics shuffle first).
* ``0 * log 0 = 0``: classes with zero probability contribute nothing to the KL term, and a class
  with zero marginal cannot have a positive conditional, so the result is finite.

The input is softmax probabilities ``(N, C)``; which network and which logits (with or without the
fc bias, 1000 or 1008 classes) decide the comparability of the number, see
:mod:`cpgan.interop.inception`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["inception_score", "InceptionScoreAccumulator", "softmax_float64"]


def _as_float64(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def softmax_float64(logits: Any) -> np.ndarray:
    """Row-wise softmax of ``(N, C)`` logits in float64."""
    z = _as_float64(logits)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _check_probs(p: np.ndarray, tol: float = 1e-3) -> None:
    if p.ndim != 2:
        raise ValueError(f"probabilities must be a (N, C) array, got shape {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("probabilities contain NaN or inf")
    if (p < 0).any():
        raise ValueError("probabilities must be non-negative; pass softmax outputs, not logits")
    row = p.sum(axis=1)
    bad = np.abs(row - 1.0) > tol
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} rows do not sum to 1 (e.g. {row[bad][0]:.4g}); pass softmax probabilities, not logits"
        )


def inception_score(probs: Any, splits: int = 10, ddof: int = 0) -> tuple[float, float]:
    """Inception Score of class probabilities.

    Args:
        probs: ``(N, C)`` softmax probabilities p(y|x), numpy array or torch tensor.
        splits: number of consecutive splits (10 in every published protocol).
        ddof: degrees of freedom of the std over splits (0 = ``np.std``, the original code).

    Returns:
        ``(mean, std)`` of the per-split scores.
    """
    p = _as_float64(probs)
    _check_probs(p)
    n = p.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"need at least one sample per split: got {n} samples for {splits} splits")
    scores = np.empty(splits)
    for k in range(splits):  # loop over the (few) splits only; each split is vectorised
        part = p[k * n // splits : (k + 1) * n // splits]
        py = part.mean(axis=0, keepdims=True)
        # 0 * log(0 / q) = 0; where p > 0 the marginal is > 0 as well.
        ratio = np.where(part > 0, part / np.where(py > 0, py, 1.0), 1.0)
        kl = (part * np.log(ratio)).sum(axis=1)
        scores[k] = np.exp(kl.mean())
    std = float(scores.std(ddof=ddof)) if splits > ddof else 0.0
    return float(scores.mean()), std


class InceptionScoreAccumulator:
    """Collects probabilities batch by batch (``N x C`` floats are small) and computes the IS."""

    def __init__(self, splits: int = 10, ddof: int = 0) -> None:
        self.splits = splits
        self.ddof = ddof
        self._parts: list[np.ndarray] = []

    @property
    def n(self) -> int:
        return sum(len(x) for x in self._parts)

    def update(self, probs: Any) -> "InceptionScoreAccumulator":
        """Add ``(B, C)`` softmax probabilities."""
        p = _as_float64(probs)
        _check_probs(p)
        if self._parts and p.shape[1] != self._parts[0].shape[1]:
            raise ValueError(f"class count changed: expected {self._parts[0].shape[1]}, got {p.shape[1]}")
        self._parts.append(p)
        return self

    def update_logits(self, logits: Any) -> "InceptionScoreAccumulator":
        """Add ``(B, C)`` logits; the softmax is taken in float64."""
        return self.update(softmax_float64(logits))

    def probs(self) -> np.ndarray:
        """All collected probabilities, ``(N, C)``."""
        if not self._parts:
            raise ValueError("no probabilities accumulated yet")
        return np.concatenate(self._parts, axis=0)

    def compute(self) -> tuple[float, float]:
        """``(mean, std)`` over ``splits`` splits."""
        return inception_score(self.probs(), splits=self.splits, ddof=self.ddof)
