"""DAMSM loss (AttnGAN) = CPGAN's TISCL when applied to generated images (suppl. eqs. (14)-(25)).

Follows taoxugit/AttnGAN ``code/miscc/losses.py`` (``words_loss``, ``sent_loss``,
``cosine_similarity``) and ``code/GlobalAttention.py::func_attention`` (REFERENCE.md §7.1-7.2):

Word level, for image ``i`` (regions ``v``, d x R) and caption ``c`` (words ``e``, d x T_c)::

    s       = e^T v                                  word-region dot products         (eq. 15)
    s_bar   = softmax over the caption's words       (per region; padding words excluded)
    alpha   = softmax over regions of gamma1*s_bar   (per word; invalid regions excluded)
    c_t     = sum_j alpha_tj v_j                     region context of word t
    R_t     = cos(c_t, e_t) = c.e / max(|c||e|, eps)               (AttnGAN eps = 1e-8)
    S(i, c) = log sum_t exp(gamma2 R_t)              AttnGAN code (no 1/gamma2 factor)
            = (1/gamma2) log sum_t exp(gamma2 R_t)   the papers' eq., with ``paper_word_score=True``

Sentence level: ``S_s(i, c) = cos(global_i, sentence_c)`` with the same eps rule.

Batch losses, both directions, matching pairs on the diagonal, mean cross-entropy over the batch::

    logits = gamma3 * S                              (Bi x Bc), rows = images
    same-class off-diagonal pairs -> -inf            (AttnGAN ``masked_fill_(masks, -inf)``)
    loss0 = CE(logits, arange(B))                    image -> caption  (-log P(D_i | Q_i))
    loss1 = CE(logits^T, arange(B))                  caption -> image  (-log P(Q_i | D_i))
    word_loss = w_loss0 + w_loss1;  sent_loss = s_loss0 + s_loss1;  loss = word_loss + sent_loss

AttnGAN loops over captions and slices each to its first ``cap_len`` words; here all pairs are
computed at once with masks, which gives the same numbers (tests/test_damsm_loss.py checks it
against a per-sample, per-word loop). Everything is differentiable, so TISCL can backpropagate
through the image encoder into the generator.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cpgan.models.attention import attention_from_scores, lengths_to_mask

__all__ = [
    "cosine_similarity_matrix",
    "paired_cosine",
    "word_level_scores",
    "class_negative_mask",
    "batch_matching_losses",
    "damsm_loss",
    "HardNegatives",
]

ClassIds = Tensor | Sequence[int] | None


def cosine_similarity_matrix(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine similarity of every row of ``a`` with every row of ``b``.

    AttnGAN ``sent_loss``: ``(a b^T) / clamp(|a| |b|^T, min=eps)``.

    Args:
        a: ``(Bi, d)`` e.g. global image codes.
        b: ``(Bc, d)`` e.g. sentence codes.

    Returns:
        ``(Bi, Bc)``.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"expected (Bi, d) and (Bc, d) with the same d, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    dots = a @ b.t()
    norms = a.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True).t()
    return dots / norms.clamp(min=eps)


def paired_cosine(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine similarity of row ``i`` of ``a`` with row ``i`` of ``b``: ``(N, d), (N, d) -> (N,)``.

    The diagonal of :func:`cosine_similarity_matrix`, with the same AttnGAN eps rule (the product of the norms
    is clamped, not each norm), without computing the off-diagonal pairs.
    """
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"expected two (N, d) tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=eps)


def _check_lengths(lengths: Tensor, batch: int, max_len: int) -> Tensor:
    if not torch.is_tensor(lengths):
        lengths = torch.as_tensor(lengths)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 1 or hi > max_len:
        raise ValueError(
            f"caption lengths must lie in [1, T={max_len}], got min {lo} and max {hi}; "
            "drop empty captions and pad words to at least the longest caption"
        )
    return lengths


def word_level_scores(
    regions: Tensor,
    words: Tensor,
    lengths: Tensor,
    region_mask: Tensor | None = None,
    gamma1: float = 4.0,
    gamma2: float = 5.0,
    paper_word_score: bool = False,
    eps: float = 1e-8,
    paired: bool = False,
) -> tuple[Tensor, Tensor]:
    """DAMSM image-caption word-level score for every (image, caption) pair.

    Also usable on its own, e.g. for R-precision (1 image against 100 captions).

    Args:
        regions: ``(Bi, d, R)`` (or ``(Bi, d, H, W)``) region features of ``Bi`` images.
        words: ``(Bc, d, T)`` word features of ``Bc`` captions; values at padding steps are ignored.
        lengths: ``(Bc,)`` caption lengths in ``[1, T]``.
        region_mask: ``(Bi, R)`` bool, ``True`` = valid region (default: all valid).
        gamma1: sharpening of the attention over regions.
        gamma2: word-to-caption aggregation factor.
        paper_word_score: ``False`` (default) = AttnGAN code ``log sum exp(gamma2 R)``; ``True`` =
            the paper's ``(1/gamma2) log sum exp(gamma2 R)``.
        eps: lower clamp of the cosine denominators (AttnGAN 1e-8).
        paired: score only image ``b`` with caption ``b`` (``Bi == Bc``), e.g. hard negatives.

    Returns:
        ``scores`` ``(Bi, Bc)`` and ``attn`` ``(Bi, Bc, T, R)`` (zero rows at padding words); with ``paired``
        ``(B, 1)`` and ``(B, 1, T, R)``.
    """
    if regions.dim() == 4:
        regions = regions.flatten(2)
    if words.dim() != 3 or regions.dim() != 3 or words.shape[1] != regions.shape[1]:
        raise ValueError(
            f"expected words (Bc, d, T) and regions (Bi, d, R) with the same d, got "
            f"{tuple(words.shape)} and {tuple(regions.shape)}"
        )
    lengths = _check_lengths(lengths, words.shape[0], words.shape[2])
    if paired and regions.shape[0] != words.shape[0]:
        raise ValueError(f"paired scores need as many images as captions, got {regions.shape[0]} and {words.shape[0]}")
    if region_mask is not None:
        region_mask = region_mask.to(device=regions.device, dtype=torch.bool)
        if region_mask.shape == (regions.shape[0], regions.shape[2]) and not bool(region_mask.any(1).all()):
            raise ValueError(
                "region_mask leaves an image without any valid region; keep the grid regions valid"
            )
    word_mask = lengths_to_mask(lengths.to(words.device), words.shape[2])  # (Bc, T)
    # Padding values are never used: zero them so garbage (even inf/NaN) cannot leak into the
    # forward pass or the gradients (their gradient is exactly zero).
    words = words.masked_fill(~word_mask.unsqueeze(1), 0.0)
    regions = regions.flatten(2) if regions.dim() == 4 else regions
    # Word-region similarities s[i, c, t, r] = e_ct . v_ir (one GEMM) and the attention alpha over regions.
    if paired:  # pair b = (image b, caption b): a (B, 1, ...) layout, masks broadcast per pair
        sim = torch.einsum("bdt,bdr->btr", words, regions).unsqueeze(1)  # (B, 1, T, R)
        pair_words = word_mask[:, None, :]  # (Bi, Bc', T) view of the word mask
        word_norms = words.norm(dim=1).unsqueeze(1)
    else:
        sim = torch.einsum("cdt,idr->ictr", words, regions)  # (Bi, Bc, T, R)
        pair_words = word_mask.unsqueeze(0)
        word_norms = words.norm(dim=1).unsqueeze(0)
    attn = attention_from_scores(
        sim, gamma1, pair_words[..., None],
        None if region_mask is None else region_mask[:, None, None, :])
    # R(c_t, e_t) = cos(c_t, e_t) with the region context c_t = sum_r alpha_r v_r (AttnGAN ``cosine_similarity``,
    # product of norms clamped at eps), computed without materialising c (Bi x Bc x T x d):
    #   c_t . e_t = sum_r alpha_r s_r   and   |c_t|^2 = alpha^T G alpha  with the Gram matrix G = V^T V (R x R).
    dots = (attn * sim).sum(-1)  # (Bi, Bc, T)
    gram = regions.transpose(1, 2) @ regions  # (Bi, R, R)
    bi, bc, t, r = attn.shape
    ctx_sq = ((attn.reshape(bi, bc * t, r) @ gram).reshape(bi, bc, t, r) * attn).sum(-1)
    ctx_norm = ctx_sq.clamp(min=1e-30).sqrt()  # padding rows (alpha = 0) get a zero gradient, never NaN
    norms = ctx_norm * word_norms  # (Bi, Bc, T)
    rel = dots / norms.clamp(min=eps)
    # log sum_t exp(gamma2 R_t) over the caption's real words (AttnGAN eq. (10) as coded).
    rel = (gamma2 * rel).masked_fill(~pair_words, float("-inf"))
    scores = torch.logsumexp(rel, dim=-1)
    if paper_word_score:
        scores = scores / gamma2
    return scores, attn


def class_negative_mask(class_ids: ClassIds, batch: int, device: torch.device) -> Tensor | None:
    """``(B, B)`` bool: ``True`` where a pair shares the class id but is off the diagonal.

    These pairs are excluded as negatives (AttnGAN sets them to ``-inf`` before the softmax).
    Returns ``None`` when ``class_ids`` is ``None``.
    """
    if class_ids is None:
        return None
    ids = torch.as_tensor(class_ids, device=device)
    if ids.shape != (batch,):
        raise ValueError(f"class_ids must have shape ({batch},), got {tuple(ids.shape)}")
    same = ids.unsqueeze(0) == ids.unsqueeze(1)
    return same & ~torch.eye(batch, dtype=torch.bool, device=device)


def batch_matching_losses(
    scores: Tensor, gamma3: float, negative_mask: Tensor | None = None,
    hard_scores: Tensor | None = None, hard_valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Both-direction batch softmax losses of a square (image x caption) score matrix.

    Args:
        scores: ``(B, B)``, ``scores[i, c]`` = similarity of image ``i`` and caption ``c``;
            matching pairs on the diagonal.
        gamma3: scale applied before the softmax.
        negative_mask: ``(B, B)`` bool, ``True`` = exclude that pair (set to ``-inf``).
        hard_scores: optional ``(B, K)`` similarities of image ``i`` with its own K hard-negative
            captions (:mod:`cpgan.negatives`), appended to row ``i`` of the image->caption softmax.
        hard_valid: ``(B, K)`` bool, ``False`` = leave that hard negative out.

    Returns:
        ``(loss0, loss1)``: mean cross-entropy image->caption (rows) and caption->image (columns).
    """
    logits = gamma3 * scores
    if negative_mask is not None:
        logits = logits.masked_fill(negative_mask, float("-inf"))
    labels = torch.arange(scores.shape[0], device=scores.device)
    loss1 = F.cross_entropy(logits.t(), labels)
    if hard_scores is not None:
        extra = gamma3 * hard_scores
        if hard_valid is not None:
            extra = extra.masked_fill(~hard_valid, float("-inf"))
        logits = torch.cat((logits, extra), dim=1)
    return F.cross_entropy(logits, labels), loss1


class HardNegatives(NamedTuple):
    """K hard-negative captions per image (:mod:`cpgan.negatives`), already encoded.

    ``words (K, B, d, T)``, ``sentence (K, B, d)``, ``lengths (K, B)``, ``valid (K, B)`` bool
    (``False`` = that image has no such negative).
    """

    words: Tensor
    sentence: Tensor
    lengths: Tensor
    valid: Tensor


def _hard_scores(hard: HardNegatives, regions: Tensor, global_features: Tensor, region_mask: Tensor | None,
                 gamma1: float, gamma2: float, paper_word_score: bool, eps: float
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Word and sentence scores ``(B, K)`` of each image with its own K hard negatives, and ``(B, K)`` validity."""
    k, b = hard.words.shape[:2]
    if hard.words.dim() != 4 or hard.sentence.shape[:2] != (k, b) or hard.lengths.shape != (k, b) \
            or hard.valid.shape != (k, b) or b != regions.shape[0]:
        raise ValueError(
            f"hard negatives must be words (K, B={regions.shape[0]}, d, T), sentence (K, B, d), lengths and "
            f"valid (K, B); got {tuple(hard.words.shape)}, {tuple(hard.sentence.shape)}, "
            f"{tuple(hard.lengths.shape)}, {tuple(hard.valid.shape)}"
        )
    flat = regions.flatten(2)
    rep_regions = flat.repeat(k, 1, 1)  # row k*B + i = image i
    rep_mask = None if region_mask is None else region_mask.repeat(k, 1)
    w, _ = word_level_scores(rep_regions, hard.words.flatten(0, 1), hard.lengths.flatten(), rep_mask,
                             gamma1, gamma2, paper_word_score, eps, paired=True)
    sent = paired_cosine(global_features.repeat(k, 1), hard.sentence.flatten(0, 1), eps)
    return w.reshape(k, b).t(), sent.reshape(k, b).t(), hard.valid.t().to(torch.bool)


def damsm_loss(
    regions: Tensor,
    global_features: Tensor,
    words: Tensor,
    sentence: Tensor,
    lengths: Tensor,
    class_ids: ClassIds = None,
    region_mask: Tensor | None = None,
    gamma1: float = 4.0,
    gamma2: float = 5.0,
    gamma3: float = 10.0,
    *,
    paper_word_score: bool = False,
    eps: float = 1e-8,
    hard: HardNegatives | None = None,
) -> dict[str, Tensor]:
    """DAMSM loss of a batch of matching (image, caption) pairs (TISCL on generated images).

    Args:
        regions: ``(B, d, R)`` (or ``(B, d, H, W)``) local image features (e.g. ``ImageEncoder``).
        global_features: ``(B, d)`` global image codes.
        words: ``(B, d, T)`` word features (``TextEncoder``); padding steps are ignored.
        sentence: ``(B, d)`` sentence codes.
        lengths: ``(B,)`` caption lengths in ``[1, T]``.
        class_ids: ``(B,)`` ids; off-diagonal pairs with equal ids are not used as negatives
            (CUB classes; for COCO AttnGAN uses one id per image, i.e. nothing extra is masked).
        region_mask: ``(B, R)`` bool, ``True`` = valid region (object-aware encoder's box mask).
        gamma1, gamma2, gamma3: AttnGAN ``TRAIN.SMOOTH.GAMMA1/2/3`` (DAMSM configs: 4, 5, 10).
        paper_word_score: see :func:`word_level_scores` (default: AttnGAN code).
        eps: cosine denominator clamp (AttnGAN 1e-8).
        hard: optional :class:`HardNegatives` (not in the paper; :mod:`cpgan.negatives`): K captions per
            image, each scored against its own image only and added to that image's image->caption
            softmax at both levels (``w_loss0``, ``s_loss0``); the caption->image terms are unchanged.

    Returns:
        dict with scalar ``loss`` (= ``word_loss + sent_loss``), ``word_loss``
        (= ``w_loss0 + w_loss1``), ``sent_loss`` (= ``s_loss0 + s_loss1``), the four directional
        terms (``*0`` image->caption, ``*1`` caption->image), ``attention`` ``(B, T, R)`` (each
        caption's words over its own image's regions; zero rows at padding, for visualisation),
        ``word_scores`` and ``sent_scores`` ``(B, B)`` (rows = images, before gamma3 / masking).
    """
    batch = words.shape[0]
    for name, t, dims in (
        ("regions", regions, (3, 4)),
        ("global_features", global_features, (2,)),
        ("words", words, (3,)),
        ("sentence", sentence, (2,)),
    ):
        if t.dim() not in dims or t.shape[0] != batch:
            raise ValueError(
                f"{name} must have {dims[0]} dims and batch size {batch} (the words' batch), "
                f"got shape {tuple(t.shape)}"
            )
    word_scores, attn = word_level_scores(
        regions, words, lengths, region_mask, gamma1, gamma2, paper_word_score, eps
    )
    sent_scores = cosine_similarity_matrix(global_features, sentence, eps)
    negatives = class_negative_mask(class_ids, batch, words.device)
    hard_w = hard_s = hard_valid = None
    if hard is not None:
        hard_w, hard_s, hard_valid = _hard_scores(hard, regions, global_features, region_mask,
                                                  gamma1, gamma2, paper_word_score, eps)
    w0, w1 = batch_matching_losses(word_scores, gamma3, negatives, hard_w, hard_valid)
    s0, s1 = batch_matching_losses(sent_scores, gamma3, negatives, hard_s, hard_valid)
    idx = torch.arange(batch, device=words.device)
    return {
        "loss": w0 + w1 + s0 + s1,
        "word_loss": w0 + w1,
        "sent_loss": s0 + s1,
        "w_loss0": w0,
        "w_loss1": w1,
        "s_loss0": s0,
        "s_loss1": s1,
        "attention": attn[idx, idx],
        "word_scores": word_scores,
        "sent_scores": sent_scores,
    }
