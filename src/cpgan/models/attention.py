"""Word/region attention of DAMSM (AttnGAN ``func_attention``; CPGAN suppl. eqs. (15)-(19)).

For one caption with word features ``e`` (d x T) and one image with region features ``v`` (d x R)::

    s        = e^T v                                       (T x R) word-region dot products
    s_bar    = softmax over the T words, per region        (AttnGAN eq. 8, first ``nn.Softmax``)
    alpha    = softmax over the R regions of gamma1*s_bar  (AttnGAN eq. 9, second ``nn.Softmax``)
    c_i      = sum_j alpha_ij v_j                          region context of word i

This is exactly the order of taoxugit/AttnGAN ``code/GlobalAttention.py::func_attention``: the first
softmax normalises each region's column over the words, the second (sharpened by gamma1) normalises
each word's row over the regions.

Masks (all ``bool``, ``True`` = valid):

* ``word_mask`` ``(B, T)``: padding words are removed from the softmax over words (AttnGAN slices
  each caption to its first ``cap_len`` words before calling ``func_attention``; masking gives the
  identical result without the per-sample loop). Their attention rows are returned as zeros.
* ``region_mask`` ``(B, R)``: invalid regions (e.g. missing detector boxes of the object-aware
  encoder) are removed from the softmax over regions. Masked regions must still hold finite values.

Two entry points share the same kernel:

* :func:`word_region_attention` pairs caption ``b`` with image ``b`` (the generator-side and
  visualisation use, AttnGAN ``func_attention``);
* :func:`pairwise_word_region_attention` evaluates every (image, caption) pair of a batch at once,
  as the DAMSM word loss needs, without materialising repeated copies of the inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "attention_from_scores",
    "lengths_to_mask",
    "word_region_attention",
    "pairwise_word_region_attention",
]


def lengths_to_mask(lengths: Tensor, max_len: int) -> Tensor:
    """Valid-word mask from caption lengths.

    Args:
        lengths: ``(B,)`` integer lengths, each in ``[1, max_len]``.
        max_len: padded length ``T``.

    Returns:
        ``(B, T)`` bool, ``True`` at the first ``lengths[b]`` positions of row ``b``.
    """
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be a 1-D tensor (B,), got shape {tuple(lengths.shape)}")
    steps = torch.arange(max_len, device=lengths.device)
    return steps.unsqueeze(0) < lengths.to(steps.device).unsqueeze(1)


def attention_from_scores(
    scores: Tensor,
    gamma1: float,
    word_mask: Tensor | None = None,
    region_mask: Tensor | None = None,
) -> Tensor:
    """Two-step DAMSM attention from word-region dot products.

    Args:
        scores: ``(..., T, R)`` dot products ``e_i . v_j``.
        gamma1: sharpening factor of the softmax over regions (AttnGAN ``GAMMA1``).
        word_mask: bool of shape ``(..., T, 1)`` (broadcast against ``scores``), ``True`` = real
            word. Every column must keep at least one real word (caption lengths >= 1).
        region_mask: bool of shape ``(..., 1, R)``, ``True`` = valid region. Every row must keep
            at least one valid region.

    Returns:
        ``alpha`` ``(..., T, R)``: rows sum to 1 over valid regions for valid words; rows of
        padding words are zero.
    """
    neg_inf = float("-inf")
    if word_mask is not None:
        scores = scores.masked_fill(~word_mask, neg_inf)
    # AttnGAN eq. (8): normalise each region's column over the words.
    # Padding words get exactly 0 (exp(-inf)); a fully masked column would be NaN, which
    # caption lengths >= 1 rule out.
    s_bar = torch.softmax(scores, dim=-2)
    # AttnGAN eq. (9): sharpen with gamma1 and normalise each word's row over the regions.
    logits = gamma1 * s_bar
    if region_mask is not None:
        logits = logits.masked_fill(~region_mask, neg_inf)
    alpha = torch.softmax(logits, dim=-1)
    if word_mask is not None:
        alpha = alpha.masked_fill(~word_mask, 0.0)
    return alpha


def _flatten_regions(regions: Tensor) -> Tensor:
    if regions.dim() == 4:  # (B, d, H, W) -> (B, d, H*W), row-major as AttnGAN's view()
        return regions.flatten(2)
    if regions.dim() != 3:
        raise ValueError(
            f"regions must be (B, d, R) or (B, d, H, W), got shape {tuple(regions.shape)}"
        )
    return regions


def _check_masks(
    words: Tensor, regions: Tensor, word_mask: Tensor | None, region_mask: Tensor | None
) -> None:
    if word_mask is not None and word_mask.shape != (words.shape[0], words.shape[2]):
        raise ValueError(
            f"word_mask must be (B, T) = {(words.shape[0], words.shape[2])}, "
            f"got {tuple(word_mask.shape)}"
        )
    if region_mask is not None and region_mask.shape != (regions.shape[0], regions.shape[2]):
        raise ValueError(
            f"region_mask must be (B, R) = {(regions.shape[0], regions.shape[2])}, "
            f"got {tuple(region_mask.shape)}"
        )


def word_region_attention(
    words: Tensor,
    regions: Tensor,
    gamma1: float,
    word_mask: Tensor | None = None,
    region_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """AttnGAN ``func_attention`` for matched pairs (caption b attends over image b).

    Args:
        words: ``(B, d, T)`` word features (the query).
        regions: ``(B, d, R)`` or ``(B, d, H, W)`` region features (the context).
        gamma1: sharpening of the softmax over regions.
        word_mask: ``(B, T)`` bool, ``True`` = real word (default: all real).
        region_mask: ``(B, R)`` bool, ``True`` = valid region (default: all valid).

    Returns:
        ``context`` ``(B, d, T)``: region context ``c_i`` of every word (zero for padding words);
        ``attn`` ``(B, T, R)``: attention of every word over the regions.
    """
    regions = _flatten_regions(regions)
    if words.dim() != 3 or words.shape[:2] != regions.shape[:2]:
        raise ValueError(
            f"words (B, d, T) and regions (B, d, R) must share B and d, got "
            f"{tuple(words.shape)} and {tuple(regions.shape)}"
        )
    _check_masks(words, regions, word_mask, region_mask)
    scores = torch.bmm(words.transpose(1, 2), regions)  # (B, T, R)
    alpha = attention_from_scores(
        scores,
        gamma1,
        None if word_mask is None else word_mask.unsqueeze(-1),
        None if region_mask is None else region_mask.unsqueeze(1),
    )
    context = torch.bmm(regions, alpha.transpose(1, 2))  # (B, d, T)
    return context, alpha


def pairwise_word_region_attention(
    words: Tensor,
    regions: Tensor,
    gamma1: float,
    word_mask: Tensor | None = None,
    region_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Word/region attention for every (image, caption) pair of two batches.

    Args:
        words: ``(Bc, d, T)`` word features of ``Bc`` captions.
        regions: ``(Bi, d, R)`` or ``(Bi, d, H, W)`` region features of ``Bi`` images.
        gamma1: sharpening of the softmax over regions.
        word_mask: ``(Bc, T)`` bool, ``True`` = real word.
        region_mask: ``(Bi, R)`` bool, ``True`` = valid region.

    Returns:
        ``context`` ``(Bi, Bc, T, d)``: ``context[i, c, t]`` = region context of word ``t`` of
        caption ``c`` in image ``i`` (zero for padding words);
        ``attn`` ``(Bi, Bc, T, R)``: the corresponding attention maps.
    """
    regions = _flatten_regions(regions)
    if words.dim() != 3 or words.shape[1] != regions.shape[1]:
        raise ValueError(
            f"words (Bc, d, T) and regions (Bi, d, R) must share d, got "
            f"{tuple(words.shape)} and {tuple(regions.shape)}"
        )
    _check_masks(words, regions, word_mask, region_mask)
    # einsum contracts d with one matmul and never materialises a (Bi, Bc, ...) copy of the inputs.
    scores = torch.einsum("cdt,idr->ictr", words, regions)  # (Bi, Bc, T, R)
    alpha = attention_from_scores(
        scores,
        gamma1,
        None if word_mask is None else word_mask[None, :, :, None],
        None if region_mask is None else region_mask[:, None, None, :],
    )
    context = torch.einsum("ictr,idr->ictd", alpha, regions)  # (Bi, Bc, T, d)
    return context, alpha
