"""Fréchet distance between Gaussian feature statistics (FID; REFERENCE §8.2).

FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

computed in float64 with ``scipy.linalg.sqrtm`` and the handling popularised by pytorch-fid
(``fid_score.calculate_frechet_distance``):

* if the square root of ``S1 S2`` is not finite (singular product), retry with ``eps * I`` added to
  both covariances;
* if the result is complex, raise when the largest ``|imag|`` on its diagonal exceeds ``imag_tol``
  (default 1e-3), otherwise keep the real part.

``scipy.linalg.sqrtm`` is called without the ``disp`` argument (deprecated in scipy 1.16, removed in
1.18), so the module works across those versions.

Real-data statistics are usually computed once and cached: :class:`FeatureStats` accumulates a
stream of ``(N, D)`` feature batches (sum and sum of outer products in float64) and saves / loads
them as ``.npz`` with the pytorch-fid keys ``mu`` and ``sigma`` (plus the raw sums, so a loaded
accumulator can keep accumulating). The features themselves come from any network (Inception-v3 pool
features for COCO, the shapes evaluator's features for the shapes world); this module never sees
images.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy import linalg

__all__ = ["frechet_distance", "FeatureStats", "fid_from_features", "fid_from_stats"]


def _as_float64(x: Any) -> np.ndarray:
    """Convert a numpy array or torch tensor to a float64 numpy array (no copy where possible)."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def frechet_distance(
    mu1: Any,
    sigma1: Any,
    mu2: Any,
    sigma2: Any,
    eps: float = 1e-6,
    imag_tol: float = 1e-3,
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
        mu1, mu2: means, shape ``(D,)``.
        sigma1, sigma2: covariances, shape ``(D, D)``.
        eps: offset added to both diagonals when ``sqrtm(sigma1 @ sigma2)`` is not finite.
        imag_tol: largest tolerated ``|imag|`` on the diagonal of the complex square root.

    Returns:
        The distance as a Python float (computed in float64).

    Raises:
        ValueError: on mismatched shapes, non-finite inputs, or a square root whose diagonal has an
            imaginary part above ``imag_tol`` (the covariances are not valid PSD matrices or are
            numerically broken; check the features).
    """
    mu1 = np.atleast_1d(_as_float64(mu1))
    mu2 = np.atleast_1d(_as_float64(mu2))
    sigma1 = np.atleast_2d(_as_float64(sigma1))
    sigma2 = np.atleast_2d(_as_float64(sigma2))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be two vectors of equal length, got shapes {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"covariances must be ({d}, {d}) to match the means, got {sigma1.shape} and {sigma2.shape}"
        )
    for name, arr in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN or inf; check the features the statistics came from")

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        max_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if max_imag > imag_tol:
            raise ValueError(
                f"sqrtm(sigma1 @ sigma2) has an imaginary diagonal component of {max_imag:.3g} "
                f"(> {imag_tol:g}); the covariances are not valid PSD matrices"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


class FeatureStats:
    """Streaming mean / covariance of feature vectors, accumulated in float64.

    ``update`` takes ``(N, D)`` batches (numpy or torch). Internally it keeps the count, the sum and
    the sum of outer products of ``x - shift``, where ``shift`` is the mean of the first batch; the
    shift avoids the cancellation of ``E[x x^T] - mu mu^T`` when features have a large mean and is
    exact algebra otherwise.

    ``cov()`` is the unbiased sample covariance (``ddof=1``, as ``np.cov``), the convention of all
    FID implementations (REFERENCE §8.2).
    """

    def __init__(self, dim: int | None = None) -> None:
        self.dim: int | None = dim
        self.n: int = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._sum_outer: np.ndarray | None = None
        # Set only for statistics loaded from a file that has mu/sigma but no count (pytorch-fid).
        self._frozen: tuple[np.ndarray, np.ndarray] | None = None

    def update(self, features: Any) -> "FeatureStats":
        """Add a batch of features, shape ``(N, D)``. Returns ``self``."""
        if self._frozen is not None:
            raise ValueError("these statistics were loaded without sample counts (mu/sigma only); they cannot be updated")
        x = _as_float64(features)
        if x.ndim != 2:
            raise ValueError(f"features must be a (N, D) batch, got shape {x.shape}")
        if self.dim is None:
            self.dim = x.shape[1]
        if x.shape[1] != self.dim:
            raise ValueError(f"feature dimension changed: expected {self.dim}, got {x.shape[1]}")
        if x.shape[0] == 0:
            return self
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf")
        if self._shift is None:
            self._shift = x.mean(axis=0)
            self._sum = np.zeros(self.dim)
            self._sum_outer = np.zeros((self.dim, self.dim))
        xc = x - self._shift
        self._sum += xc.sum(axis=0)
        self._sum_outer += xc.T @ xc
        self.n += x.shape[0]
        return self

    def mean(self) -> np.ndarray:
        """Mean of all features seen, shape ``(D,)``."""
        if self._frozen is not None:
            return self._frozen[0].copy()
        if self.n == 0:
            raise ValueError("no features accumulated yet")
        return self._shift + self._sum / self.n

    def cov(self) -> np.ndarray:
        """Unbiased covariance (ddof 1), shape ``(D, D)``."""
        if self._frozen is not None:
            return self._frozen[1].copy()
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.n}")
        m = self._sum / self.n
        c = (self._sum_outer - self.n * np.outer(m, m)) / (self.n - 1)
        return 0.5 * (c + c.T)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``.npz`` with ``mu``, ``sigma`` (pytorch-fid keys), ``n`` and the raw sums."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {"mu": self.mean(), "sigma": self.cov()}
        if self._frozen is None:
            arrays.update(n=np.array(self.n), shift=self._shift, sum=self._sum, sum_outer=self._sum_outer)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        """Read statistics written by :meth:`save` or by pytorch-fid ``--save-stats`` (``mu``/``sigma``).

        A pytorch-fid file has no sample count: the result gives ``mean()``/``cov()`` but refuses
        ``update``.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature statistics file not found: {path}")
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            if not {"mu", "sigma"} <= keys:
                raise ValueError(f"{path} is not a statistics file: expected arrays 'mu' and 'sigma', found {sorted(keys)}")
            mu = np.asarray(f["mu"], dtype=np.float64)
            sigma = np.asarray(f["sigma"], dtype=np.float64)
            stats = cls(dim=mu.shape[0])
            if {"n", "shift", "sum", "sum_outer"} <= keys:
                stats.n = int(f["n"])
                stats._shift = np.asarray(f["shift"], dtype=np.float64)
                stats._sum = np.asarray(f["sum"], dtype=np.float64)
                stats._sum_outer = np.asarray(f["sum_outer"], dtype=np.float64)
            else:
                stats._frozen = (mu, sigma)
                stats.n = int(f["n"]) if "n" in keys else -1
        return stats


def fid_from_stats(a: FeatureStats, b: FeatureStats, eps: float = 1e-6) -> float:
    """FID between two accumulated statistics."""
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov(), eps=eps)


def fid_from_features(a: Any, b: Any, eps: float = 1e-6) -> float:
    """FID between two feature matrices ``a`` ``(N1, D)`` and ``b`` ``(N2, D)``."""
    return fid_from_stats(FeatureStats().update(a), FeatureStats().update(b), eps=eps)
