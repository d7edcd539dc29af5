"""R-precision, both published protocols (REFERENCE §8.3; DESIGN §6).

R-precision (AttnGAN §5) ranks candidate captions by cosine similarity to a generated image in a
joint image-text space (the DAMSM global image code and sentence code); with one relevant caption it
is the top-1 hit rate. Two protocols are in use and give very different numbers, so every result
names its protocol:

``dmgan`` (:func:`r_precision_dmgan`) — the field's reference, DM-GAN ``code/trainer.py::sampling``
and ``code/datasets.py::get_mis_caption``: each image is ranked against its own caption plus 99
captions drawn at random (with replacement, uniformly) from dataset entries of *other* classes
(COCO: every image is its own class); images are split into 10 folds and the mean ± std of the fold
hit rates is reported. Differences from the released code, all deliberate:

* the hits are shuffled with the seeded generator and split into ``folds`` folds with
  ``numpy.array_split`` semantics (sizes differ by at most one); DM-GAN averages
  ``R[i*3000:(i+1)*3000-1]``, silently dropping one item per fold (off-by-one), which is not copied;
* ties count as misses: the true caption must score *strictly* higher than every negative. DM-GAN and
  the CPGAN script use ``torch.sort`` whose order among equal scores is unspecified; a tie only happens
  for identical caption codes (duplicate captions) and the strict rule makes the result deterministic.

``cpgan-batch`` (:func:`r_precision_batch`) — the CPGAN authors' ``evaluation/caculate_R_precison.py``:
images in consecutive batches of 100, each ranked against the 100 captions of its own batch (no class
filter). Their loader uses ``drop_last=True``, so a last partial batch is **dropped** here too
(``n`` in the result counts the images actually used). Their loader is shuffled (seed 100); here the
caller's order is kept unless ``seed`` is given. They report only the mean of the per-batch hit counts;
the std over batches is added here (ddof 0).

Both use ``cos(a, b) = a·b / max(|a||b|, eps)`` with ``eps = 1e-8`` (the helper in both codebases).
All rates are fractions in [0, 1] (multiply by 100 for the papers' percentages). The functions work on
code tensors only; encoders and generation are the caller's business.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "cosine_scores",
    "sample_negatives",
    "retrieval_hits",
    "fold_mean_std",
    "r_precision_dmgan",
    "r_precision_batch",
]


def _as_codes(x: Any, name: str) -> Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be a (N, d) matrix of codes, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.float()
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    return t


def _as_ids(x: Any, n: int, name: str) -> Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be a vector of {n} class ids, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class ids, got dtype {t.dtype}")
    return t.long().cpu()


def cosine_scores(queries: Tensor, candidates: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine similarity of each query with its own candidates.

    Args:
        queries: ``(n, d)``.
        candidates: ``(n, k, d)`` (may be an expanded view).
        eps: clamp on the product of norms.

    Returns:
        ``(n, k)`` scores. Every candidate goes through the same elementwise-product-and-sum, so
        identical candidate vectors get bitwise identical scores (which makes tie handling exact).
    """
    dots = (queries.unsqueeze(1) * candidates).sum(-1)
    norms = queries.norm(dim=-1, keepdim=True) * candidates.norm(dim=-1)
    return dots / norms.clamp_min(eps)


def _strict_top1(scores: Tensor, true_idx: Tensor) -> Tensor:
    """``(n,)`` bool: the true column scores strictly higher than every other column of ``(n, k)``."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    true = scores[rows, true_idx]
    others = scores.clone()
    others[rows, true_idx] = float("-inf")
    return true > others.max(dim=1).values


def sample_negatives(
    class_ids: Any,
    pool_class_ids: Any,
    n_negatives: int = 99,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw negative caption indices for each image, DM-GAN style.

    For image ``i`` draws ``n_negatives`` indices into the pool, independently and uniformly (with
    replacement) among pool entries whose class differs from ``class_ids[i]`` — the distribution of
    DM-GAN's ``get_mis_caption`` rejection loop, computed exactly without rejection: the pool is
    sorted by class, a uniform rank among the eligible entries is drawn and the image's own class
    block is skipped.

    Args:
        class_ids: ``(N,)`` integer class of each image.
        pool_class_ids: ``(M,)`` integer class of each pool caption.
        n_negatives: negatives per image (99 in the protocol).
        generator: CPU ``torch.Generator`` for reproducibility.

    Returns:
        ``(N, n_negatives)`` int64 indices into the pool (on CPU).
    """
    cls = torch.as_tensor(class_ids).long().cpu()
    pool = torch.as_tensor(pool_class_ids).long().cpu()
    if cls.ndim != 1 or pool.ndim != 1:
        raise ValueError("class ids must be 1-D vectors")
    if n_negatives < 1:
        raise ValueError(f"n_negatives must be >= 1, got {n_negatives}")
    sorted_cls, order = torch.sort(pool, stable=True)
    start = torch.searchsorted(sorted_cls, cls, right=False)
    end = torch.searchsorted(sorted_cls, cls, right=True)
    count = end - start
    eligible = pool.shape[0] - count  # (N,)
    if (eligible <= 0).any():
        i = int(torch.nonzero(eligible <= 0)[0])
        raise ValueError(f"image {i} (class {int(cls[i])}) has no caption of another class to draw negatives from")
    u = torch.rand((cls.shape[0], n_negatives), generator=generator, dtype=torch.float64)
    rank = torch.minimum((u * eligible.unsqueeze(1)).long(), (eligible - 1).unsqueeze(1))
    pos = rank + (rank >= start.unsqueeze(1)).long() * count.unsqueeze(1)
    return order[pos]


def retrieval_hits(
    image_codes: Any,
    sentence_codes: Any,
    pool_codes: Any,
    negatives: Tensor,
    eps: float = 1e-8,
    chunk: int = 512,
) -> Tensor:
    """Top-1 hits of each image against its own caption plus gathered negatives.

    Args:
        image_codes: ``(N, d)`` image codes.
        sentence_codes: ``(N, d)`` code of each image's own (generating) caption.
        pool_codes: ``(M, d)`` codes the negative indices refer to.
        negatives: ``(N, k)`` int64 indices into ``pool_codes``.
        eps: cosine clamp.
        chunk: images per vectorised block (bounds memory to ``chunk * (k+1) * d``).

    Returns:
        ``(N,)`` bool tensor, True where the own caption scores strictly highest (ties are misses).
    """
    img = _as_codes(image_codes, "image_codes")
    sent = _as_codes(sentence_codes, "sentence_codes").to(img)
    pool = _as_codes(pool_codes, "pool_codes").to(img)
    if sent.shape != img.shape or pool.shape[1] != img.shape[1]:
        raise ValueError(
            f"code shapes do not match: images {tuple(img.shape)}, sentences {tuple(sent.shape)}, pool {tuple(pool.shape)}"
        )
    neg = torch.as_tensor(negatives).long()
    if neg.ndim != 2 or neg.shape[0] != img.shape[0]:
        raise ValueError(f"negatives must be (N, k) with N = {img.shape[0]}, got {tuple(neg.shape)}")
    if neg.numel() and (neg.min() < 0 or neg.max() >= pool.shape[0]):
        raise ValueError(f"negative indices must lie in [0, {pool.shape[0]})")
    neg = neg.to(img.device)
    out = []
    for s in range(0, img.shape[0], chunk):  # loop over memory-bounded blocks, not items
        q = img[s : s + chunk]
        cand = torch.cat([sent[s : s + chunk].unsqueeze(1), pool[neg[s : s + chunk]]], dim=1)  # (n, 1+k, d)
        scores = cosine_scores(q, cand, eps)
        out.append(_strict_top1(scores, torch.zeros(q.shape[0], dtype=torch.long, device=q.device)))
    return torch.cat(out).cpu()


def fold_mean_std(hits: Any, folds: int = 10, generator: torch.Generator | None = None) -> tuple[float, float]:
    """Mean and std (ddof 0) of per-fold hit rates.

    ``hits`` ``(N,)`` are permuted with ``generator`` when one is given (DM-GAN shuffles before
    folding), then split into ``folds`` contiguous folds of ``numpy.array_split`` sizes.
    """
    h = torch.as_tensor(hits).double().cpu().flatten()
    if folds < 1 or h.shape[0] < folds:
        raise ValueError(f"need at least one image per fold: {h.shape[0]} images for {folds} folds")
    if generator is not None:
        h = h[torch.randperm(h.shape[0], generator=generator)]
    fold_means = np.array([f.mean() for f in np.array_split(h.numpy(), folds)])
    return float(fold_means.mean()), float(fold_means.std())


def r_precision_dmgan(
    image_codes: Any,
    sentence_codes: Any,
    class_ids: Any | None = None,
    pool_sentence_codes: Any | None = None,
    pool_class_ids: Any | None = None,
    n_negatives: int = 99,
    folds: int = 10,
    seed: int = 0,
    generator: torch.Generator | None = None,
    negatives: Tensor | None = None,
    eps: float = 1e-8,
) -> dict:
    """R-precision, DM-GAN protocol (see the module docstring).

    Args:
        image_codes: ``(N, d)`` global image codes of the generated images.
        sentence_codes: ``(N, d)`` sentence codes of their generating captions.
        class_ids: ``(N,)`` class of each image; ``None`` = every image is its own class (COCO).
        pool_sentence_codes: ``(M, d)`` candidate negative captions (e.g. one encoded caption per
            dataset entry); ``None`` = the other images' own captions (``sentence_codes``).
        pool_class_ids: ``(M,)`` class of each pool caption; required with a pool when ``class_ids``
            is given. With a pool and ``class_ids=None`` every pool caption is eligible (the caller
            makes sure the pool does not contain the images' own captions).
        n_negatives: 99 (100 candidates).
        folds: 10.
        seed: seeds a fresh CPU generator when ``generator`` is None.
        generator: CPU generator; drawn first for the negatives, then for the fold permutation.
        negatives: precomputed ``(N, n_negatives)`` pool indices (e.g. to use identical negatives for
            several models); skips the sampling.
        eps: cosine clamp.

    Returns:
        ``dict(protocol="dmgan", mean, std, n, folds, n_negatives)``; mean/std are fractions.
    """
    img = _as_codes(image_codes, "image_codes")
    n = img.shape[0]
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    if pool_sentence_codes is None:
        if pool_class_ids is not None:
            raise ValueError("pool_class_ids given without pool_sentence_codes")
        pool = sentence_codes
        img_cls = torch.arange(n) if class_ids is None else _as_ids(class_ids, n, "class_ids")
        pool_cls = img_cls
    else:
        pool = _as_codes(pool_sentence_codes, "pool_sentence_codes")
        m = pool.shape[0]
        if class_ids is None:
            if pool_class_ids is not None:
                raise ValueError("pool_class_ids needs class_ids for the images (or pass neither)")
            img_cls = torch.zeros(n, dtype=torch.long)
            pool_cls = torch.ones(m, dtype=torch.long)
        else:
            if pool_class_ids is None:
                raise ValueError("with class_ids and a caption pool, pass pool_class_ids too")
            img_cls = _as_ids(class_ids, n, "class_ids")
            pool_cls = _as_ids(pool_class_ids, m, "pool_class_ids")
    if negatives is None:
        negatives = sample_negatives(img_cls, pool_cls, n_negatives, generator)
    elif tuple(torch.as_tensor(negatives).shape) != (n, n_negatives):
        raise ValueError(f"negatives must have shape ({n}, {n_negatives}), got {tuple(torch.as_tensor(negatives).shape)}")
    hits = retrieval_hits(img, sentence_codes, pool, negatives, eps=eps)
    mean, std = fold_mean_std(hits, folds, generator)
    return dict(protocol="dmgan", mean=mean, std=std, n=n, folds=folds, n_negatives=n_negatives)


def r_precision_batch(
    image_codes: Any,
    sentence_codes: Any,
    batch: int = 100,
    seed: int | None = None,
    eps: float = 1e-8,
    chunk: int = 512,
) -> dict:
    """R-precision, CPGAN in-batch protocol (see the module docstring).

    Args:
        image_codes: ``(N, d)`` image codes.
        sentence_codes: ``(N, d)`` codes of their own captions.
        batch: batch size (100); a last partial batch is dropped (authors' ``drop_last=True``).
        seed: if given, images are permuted with this seed before batching (the authors' loader is
            shuffled); ``None`` keeps the given order.
        eps: cosine clamp.
        chunk: images per vectorised block.

    Returns:
        ``dict(protocol="cpgan-batch", mean, std, n, batches, batch)``: mean/std (ddof 0) over batches
        of the per-batch hit rate, ``n`` the number of images used.
    """
    img = _as_codes(image_codes, "image_codes")
    sent = _as_codes(sentence_codes, "sentence_codes").to(img)
    if sent.shape != img.shape:
        raise ValueError(f"code shapes do not match: images {tuple(img.shape)}, sentences {tuple(sent.shape)}")
    if batch < 2:
        raise ValueError(f"batch must be >= 2, got {batch}")
    n_batches = img.shape[0] // batch
    if n_batches == 0:
        raise ValueError(f"need at least one full batch of {batch} images, got {img.shape[0]}")
    if seed is not None:
        perm = torch.randperm(img.shape[0], generator=torch.Generator().manual_seed(seed)).to(img.device)
        img, sent = img[perm], sent[perm]
    n = n_batches * batch
    img, sent = img[:n], sent[:n]
    sent_b = sent.view(n_batches, batch, -1)
    own = torch.arange(n, device=img.device) % batch  # position of the own caption within its batch
    hits = []
    for s in range(0, n, chunk):  # memory-bounded blocks of images
        idx = torch.arange(s, min(s + chunk, n), device=img.device)
        cand = sent_b[idx // batch]  # (n_chunk, batch, d): the captions of each image's batch
        hits.append(_strict_top1(cosine_scores(img[idx], cand, eps), own[idx]))
    per_batch = torch.cat(hits).double().view(n_batches, batch).mean(dim=1).cpu().numpy()
    return dict(
        protocol="cpgan-batch",
        mean=float(per_batch.mean()),
        std=float(per_batch.std()),
        n=n,
        batches=n_batches,
        batch=batch,
    )
