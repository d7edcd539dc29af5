"""Word memory construction, CPGAN eq. (7) (paper §3.2; DESIGN.md §3.1; REFERENCE.md §5.4, §6).

For a vocabulary word r and a relevant image n with regions v_{i,n} and captioner attention
a_{i,n} (salience of region i when the captioner *emits* r)::

    q_n   = argmax_i a_{i,n}
    m_r   = Σ_{n ∈ TopK(r)} a_{q_n,n} v_{q_n,n}  /  Σ_{n ∈ TopK(r)} a_{q_n,n}

TopK(r) = the K images with the largest relevance a_{q_n,n}.

:class:`MemoryBuilder` computes this in **one streaming pass** over records
``(word_id, image_id, weight a_{q,n}, feature v_{q,n} (F,), region index q)`` fed in chunks, with
bounded memory, vectorised per chunk (sorts and scatters; no Python loop over records or words).

Decisions (each documented, configurable where it matters):

* **Several occurrences of r in one image** (5 captions per image, repeated words): the image's
  relevance is the **maximum** weight over its occurrences and the stored feature is that
  occurrence's region (REFERENCE §6 choice 6, "highest peak").
* **Ties** - a deterministic total order, independent of chunking: images rank by weight
  (descending) then image id (ascending: the smaller id wins); among occurrences of one image,
  by weight (desc), region index (asc), then stream position (the earlier record wins).
* **Words with fewer than K images** use all of them; **words never seen** get a zero vector and
  ``seen = False`` (REFERENCE §6 choice 9).  A seen word whose kept weights sum to 0 (only
  possible with synthetic zero weights) also gets a zero vector.
* **Counts**: ``occurrences (V,)`` = records seen per word (not distinct images: counting those
  exactly needs unbounded memory); ``num_images (V,)`` = images kept (≤ K).

Memory bound (``store_features=True``, the default): a feature pool of ``V·K`` rows of ``F`` values
in ``feature_dtype`` plus ``(V, K)`` tables (float32 weight, int64 image id, int64 region, int64
stream position, int64 pool pointer) = ``V·K·(F·bytes + 36)`` bytes, plus O(chunk·F) temporaries.
Each word owns pool rows ``r·K … r·K+K-1``; the ``(V, K)`` rank-ordered table points into them, so a
merge only *writes* the features of new winners into rows freed by evicted entries - no feature
is ever moved.  COCO with the release's captioner vocabulary (V = 9,487, F = 1024): 38.9 MB·K in
float32, 19.4 MB·K in float16.  Where that is too big (e.g. a 27k-word GAN vocabulary with large
K), use ``store_features=False``: only ``(V, K)`` pointers (image id, region index) are kept -
``V·K·36`` bytes - and :meth:`MemoryBuilder.finalize` gathers the winners' features from the
region store through a ``feature_lookup(image_ids, region_ids) -> (N, F)`` callable (a second,
random-access read of only V·K rows).

Resumable: :meth:`MemoryBuilder.state_dict` / :meth:`MemoryBuilder.load_state_dict` hold every
table plus ``records_consumed`` (tensors only; safetensors-compatible).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["MemoryBank", "MemoryBuilder", "word_region_attention", "attention_records"]


@dataclass
class MemoryBank:
    """Result of eq. (7): ``bank (V, F)`` float32, ``seen (V,)`` bool, ``occurrences (V,)`` int64
    (records per word), ``num_images (V,)`` int64 (images kept, ≤ K), ``image_ids (V, K)`` and
    ``weights (V, K)`` (kept images per word in rank order; -1 / 0 for empty slots)."""

    bank: torch.Tensor
    seen: torch.Tensor
    occurrences: torch.Tensor
    num_images: torch.Tensor
    image_ids: torch.Tensor
    weights: torch.Tensor


def _lexsort(keys: list[torch.Tensor]) -> torch.Tensor:
    """Permutation sorting by ``keys[0]`` first, ``keys[1]`` next, … (all ascending, stable)."""
    perm = torch.arange(keys[0].numel(), device=keys[0].device)
    for key in reversed(keys):
        order = torch.sort(key[perm], stable=True).indices
        perm = perm[order]
    return perm


def _group_rank(sorted_groups: torch.Tensor) -> torch.Tensor:
    """For a tensor sorted by group id, the 0-based position of each element within its group."""
    n = sorted_groups.numel()
    if n == 0:
        return sorted_groups.new_zeros(0)
    _, counts = torch.unique_consecutive(sorted_groups, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(n, device=sorted_groups.device) - torch.repeat_interleave(starts, counts)


class MemoryBuilder:
    """Streaming per-word top-K of (image, weight, region feature) -> memory bank (eq. 7).

    Args:
        num_words: V, vocabulary size (word ids in ``[0, V)``).
        top_k: K, images kept per word.
        feature_dim: F (1024 for the release's YOLOv3 features).
        store_features: keep the winners' features in a ``(V·K, F)`` pool (True) or only
            (image, region) pointers, gathered in :meth:`finalize` (False).
        feature_dtype: dtype of the pool (float32, or float16 to halve it); sums are float32.
    """

    def __init__(
        self,
        num_words: int,
        top_k: int,
        feature_dim: int = 1024,
        store_features: bool = True,
        feature_dtype: torch.dtype = torch.float32,
    ) -> None:
        if num_words <= 0 or top_k <= 0 or feature_dim <= 0:
            raise ValueError("num_words, top_k and feature_dim must be positive")
        if feature_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"feature_dtype must be a floating dtype, got {feature_dtype}")
        self.num_words, self.top_k, self.feature_dim = num_words, top_k, feature_dim
        self.store_features = store_features
        self.feature_dtype = feature_dtype
        v, k = num_words, top_k
        self.weights = torch.full((v, k), float("-inf"), dtype=torch.float32)
        self.image_ids = torch.full((v, k), -1, dtype=torch.int64)
        self.region_ids = torch.full((v, k), -1, dtype=torch.int64)
        self.seq = torch.full((v, k), -1, dtype=torch.int64)
        # pool row of each (word, rank) slot; word r owns rows r*K .. r*K+K-1
        self.pointers = (torch.arange(v).unsqueeze(1) * k + torch.arange(k).unsqueeze(0)).long()
        self.pool = torch.zeros((v * k, feature_dim) if store_features else (0, feature_dim), dtype=feature_dtype)
        self.occurrences = torch.zeros(v, dtype=torch.int64)
        self.records_consumed = 0

    # ---------------------------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes held by the state tensors (the documented bound, excluding chunk temporaries)."""
        ts = (self.weights, self.image_ids, self.region_ids, self.seq, self.pointers, self.pool, self.occurrences)
        return sum(t.numel() * t.element_size() for t in ts)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume (tensors only)."""
        return {
            "config": torch.tensor([self.num_words, self.top_k, self.feature_dim, int(self.store_features)]),
            "weights": self.weights.clone(),
            "image_ids": self.image_ids.clone(),
            "region_ids": self.region_ids.clone(),
            "seq": self.seq.clone(),
            "pointers": self.pointers.clone(),
            "pool": self.pool.clone(),
            "occurrences": self.occurrences.clone(),
            "records_consumed": torch.tensor(self.records_consumed, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a :meth:`state_dict`; the builder's configuration must match."""
        cfg = [int(x) for x in state["config"].tolist()]
        mine = [self.num_words, self.top_k, self.feature_dim, int(self.store_features)]
        if cfg != mine:
            raise ValueError(
                f"memory builder checkpoint has (V, K, F, store_features) = {cfg}, this builder {mine}"
            )
        self.weights = state["weights"].to(torch.float32).clone()
        self.image_ids = state["image_ids"].long().clone()
        self.region_ids = state["region_ids"].long().clone()
        self.seq = state["seq"].long().clone()
        self.pointers = state["pointers"].long().clone()
        self.pool = state["pool"].to(self.feature_dtype).clone()
        self.occurrences = state["occurrences"].long().clone()
        self.records_consumed = int(state["records_consumed"])

    # ---------------------------------------------------------------------------------------
    def update(
        self,
        word_ids: torch.Tensor,
        image_ids: torch.Tensor,
        weights: torch.Tensor,
        features: torch.Tensor | None = None,
        region_ids: torch.Tensor | None = None,
    ) -> None:
        """Consume one chunk of N records.

        ``word_ids (N,)``, ``image_ids (N,)`` (≥ 0), ``weights (N,)`` (finite, ≥ 0: a_{q_n,n}),
        ``features (N, F)`` (v_{q_n,n}; required when ``store_features``), ``region_ids (N,)``
        (q_n; required when not ``store_features``, else optional, default 0).
        """
        word_ids = torch.as_tensor(word_ids).reshape(-1).long().cpu()
        image_ids = torch.as_tensor(image_ids).reshape(-1).long().cpu()
        weights = torch.as_tensor(weights).reshape(-1).to(torch.float32).cpu()
        n = word_ids.numel()
        if image_ids.numel() != n or weights.numel() != n:
            raise ValueError("word_ids, image_ids and weights must have the same length")
        if region_ids is None:
            if not self.store_features:
                raise ValueError("region_ids are required when store_features=False")
            region_ids = torch.zeros(n, dtype=torch.int64)
        region_ids = torch.as_tensor(region_ids).reshape(-1).long().cpu()
        if region_ids.numel() != n:
            raise ValueError("region_ids must have one entry per record")
        if self.store_features:
            if features is None:
                raise ValueError("features (N, F) are required when store_features=True")
            if features.shape != (n, self.feature_dim):
                raise ValueError(f"features must be ({n}, {self.feature_dim}), got {tuple(features.shape)}")
        if n == 0:
            return
        if int(word_ids.min()) < 0 or int(word_ids.max()) >= self.num_words:
            raise ValueError(f"word ids must lie in [0, {self.num_words})")
        if int(image_ids.min()) < 0 or int(region_ids.min()) < 0:
            raise ValueError("image and region ids must be >= 0")
        if not bool(torch.isfinite(weights).all()) or float(weights.min()) < 0:
            raise ValueError("attention weights must be finite and >= 0")

        seq = self.records_consumed + torch.arange(n, dtype=torch.int64)
        self.occurrences += torch.bincount(word_ids, minlength=self.num_words)

        # 1. best occurrence per (word, image) inside the chunk
        perm = _lexsort([word_ids, image_ids, -weights, region_ids, seq])
        w_s, i_s = word_ids[perm], image_ids[perm]
        first = torch.ones(n, dtype=torch.bool)
        first[1:] = (w_s[1:] != w_s[:-1]) | (i_s[1:] != i_s[:-1])
        cand = perm[first]  # record indices of chunk candidates

        # 2. merge with the current top-K of the touched words
        words = torch.unique(word_ids[cand])
        k = self.top_k
        old_w = self.weights[words]  # (U, K)
        old_valid = torch.isfinite(old_w)
        old_row, old_col = old_valid.nonzero(as_tuple=True)
        old_word = words[old_row]

        all_word = torch.cat([old_word, word_ids[cand]])
        all_img = torch.cat([self.image_ids[old_word, old_col], image_ids[cand]])
        all_w = torch.cat([self.weights[old_word, old_col], weights[cand]])
        all_reg = torch.cat([self.region_ids[old_word, old_col], region_ids[cand]])
        all_seq = torch.cat([self.seq[old_word, old_col], seq[cand]])
        # source: >= 0 -> slot column of an existing entry (in row old_row); < 0 -> -(1 + chunk index)
        src = torch.cat([old_col, -1 - cand])
        src_row = torch.cat([old_row, torch.full((cand.numel(),), -1, dtype=torch.int64)])

        # 2a. the same image may be both kept and new: keep its best occurrence
        perm = _lexsort([all_word, all_img, -all_w, all_reg, all_seq])
        w_s, i_s = all_word[perm], all_img[perm]
        first = torch.ones(perm.numel(), dtype=torch.bool)
        first[1:] = (w_s[1:] != w_s[:-1]) | (i_s[1:] != i_s[:-1])
        keep = perm[first]
        # 2b. rank images per word by (weight desc, image asc)
        order = keep[_lexsort([all_word[keep], -all_w[keep], all_img[keep]])]
        rank = _group_rank(all_word[order])
        win = order[rank < k]
        win_rank = rank[rank < k]
        win_word = all_word[win]

        # 3. pool rows: surviving old entries keep theirs, new winners take freed rows of their word
        row_of_word = torch.searchsorted(words, win_word)  # row in (U, K) tables
        is_old = src[win] >= 0
        if self.store_features:
            new_ptr = torch.empty(win.numel(), dtype=torch.int64)
            old_ptr = self.pointers[words]  # (U, K)
            base = words.unsqueeze(1) * k
            used = torch.zeros(words.numel(), k, dtype=torch.bool)
            surv_rows, surv_cols = src_row[win[is_old]], src[win[is_old]]
            surv_ptr = old_ptr[surv_rows, surv_cols]
            used[surv_rows, surv_ptr - base[surv_rows, 0]] = True
            free_local = torch.sort(used.to(torch.int8), dim=1, stable=True).indices  # free rows first
            new_rows = row_of_word[~is_old]
            # j-th new winner of a word (in rank order) -> j-th free row of that word
            nw_order = torch.argsort(new_rows * k + win_rank[~is_old])
            j = torch.empty_like(new_rows)
            j[nw_order] = _group_rank(new_rows[nw_order])
            new_ptr_new = base[new_rows, 0] + free_local[new_rows, j]
            new_ptr[is_old] = surv_ptr
            new_ptr[~is_old] = new_ptr_new
            chunk_idx = -1 - src[win[~is_old]]
            self.pool[new_ptr_new] = features[chunk_idx.to(features.device)].to(device="cpu", dtype=self.pool.dtype)

        # 4. rewrite the touched rows
        self.weights[words] = float("-inf")
        self.image_ids[words] = -1
        self.region_ids[words] = -1
        self.seq[words] = -1
        self.weights[win_word, win_rank] = all_w[win]
        self.image_ids[win_word, win_rank] = all_img[win]
        self.region_ids[win_word, win_rank] = all_reg[win]
        self.seq[win_word, win_rank] = all_seq[win]
        if self.store_features:
            # slots beyond the kept count point at the word's remaining (unused) rows
            ptr_rows = self.pointers[words].clone()
            taken = torch.zeros(words.numel(), k, dtype=torch.bool)
            taken[row_of_word, new_ptr - words[row_of_word] * k] = True
            rest = torch.sort(taken.to(torch.int8), dim=1, stable=True).indices  # unused local rows first
            n_kept = torch.bincount(row_of_word, minlength=words.numel())
            col = torch.arange(k).unsqueeze(0)
            fill = words.unsqueeze(1) * k + rest.gather(1, (col - n_kept.unsqueeze(1)).clamp_min(0))
            ptr_rows = torch.where(col >= n_kept.unsqueeze(1), fill, ptr_rows)
            ptr_rows[row_of_word, win_rank] = new_ptr
            self.pointers[words] = ptr_rows
        self.records_consumed += n

    # ---------------------------------------------------------------------------------------
    def finalize(
        self,
        feature_lookup: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        block_words: int = 1024,
    ) -> MemoryBank:
        """Eq. (7) over the kept entries -> :class:`MemoryBank`.

        ``feature_lookup(image_ids (N,), region_ids (N,)) -> (N, F)`` is required when
        ``store_features=False`` (called once per block of ``block_words`` words).
        """
        v, k, f = self.num_words, self.top_k, self.feature_dim
        if not self.store_features and feature_lookup is None:
            raise ValueError("finalize needs feature_lookup(image_ids, region_ids) when store_features=False")
        valid = torch.isfinite(self.weights)
        w = torch.where(valid, self.weights, torch.zeros_like(self.weights))
        bank = torch.zeros(v, f, dtype=torch.float32)
        for lo in range(0, v, block_words):
            hi = min(v, lo + block_words)
            wb, vb = w[lo:hi], valid[lo:hi]
            if self.store_features:
                feats = self.pool[self.pointers[lo:hi].reshape(-1)].view(hi - lo, k, f).float()
                feats = torch.where(vb.unsqueeze(-1), feats, torch.zeros((), dtype=feats.dtype))
            else:
                feats = torch.zeros(hi - lo, k, f, dtype=torch.float32)
                if bool(vb.any()):
                    got = feature_lookup(self.image_ids[lo:hi][vb], self.region_ids[lo:hi][vb])  # type: ignore[misc]
                    got = torch.as_tensor(got)
                    if got.shape != (int(vb.sum()), f):
                        raise ValueError(f"feature_lookup returned {tuple(got.shape)}, expected ({int(vb.sum())}, {f})")
                    feats[vb] = got.float()
            num = torch.bmm(wb.unsqueeze(1), feats).squeeze(1)  # Σ_n a v
            den = wb.sum(1, keepdim=True)  # Σ_n a
            bank[lo:hi] = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
        return MemoryBank(
            bank=bank,
            seen=valid.any(1),
            occurrences=self.occurrences.clone(),
            num_images=valid.sum(1),
            image_ids=self.image_ids.clone(),
            weights=w,
        )


# --------------------------------------------------------------------------------------------
# Attention per emitted word
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def word_region_attention(
    captioner: nn.Module,
    region_feats: torch.Tensor,
    region_mask: torch.Tensor | None,
    captions: torch.Tensor,
    lengths: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention over regions at the step that EMITS each caption word (REFERENCE.md §5.4).

    ``captions (B, T)``: ground-truth words ``w_1..w_T`` in the captioner's vocabulary (no BOS),
    ``lengths (B,)``.  The captioner (eval mode, no gradients; its mode is restored afterwards) is
    fed ``[BOS, w_1, …, w_{T-1}]``; its step t consumes token t and predicts ``w_{t+1}``
    (1-based), so the attention used to emit ``captions[:, t]`` is α of step t (that of the
    *previous* word's input step).  Returns ``attn (B, T, R)`` (rows sum to 1 over valid regions;
    zero rows at padded positions), ``q (B, T)`` argmax region (-1 at padding) and ``a (B, T)``
    its weight (0 at padding).
    """
    if captions.dim() != 2 or lengths.shape != captions.shape[:1]:
        raise ValueError("captions must be (B, T) and lengths (B,)")
    b, t = captions.shape
    bos = getattr(captioner, "bos_id")
    pad = getattr(captioner, "pad_id", 0)
    valid = torch.arange(t, device=captions.device).unsqueeze(0) < lengths.to(captions.device).unsqueeze(1)
    words = torch.where(valid, captions, torch.full_like(captions, pad))
    inputs = torch.cat([words.new_full((b, 1), bos), words[:, :-1]], 1)
    was_training = captioner.training
    captioner.eval()
    try:
        _, attn = captioner(region_feats, region_mask, inputs)
    finally:
        captioner.train(was_training)
    attn = attn * valid.unsqueeze(-1).to(attn.dtype)
    a, q = attn.max(-1)
    q = torch.where(valid, q, torch.full_like(q, -1))
    a = torch.where(valid, a, torch.zeros_like(a))
    return attn, q, a


def attention_records(
    captions: torch.Tensor,
    lengths: torch.Tensor,
    image_ids: torch.Tensor,
    q: torch.Tensor,
    a: torch.Tensor,
    region_feats: torch.Tensor,
    ignore_ids: tuple[int, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten a batch into memory records for :meth:`MemoryBuilder.update`.

    ``captions (B, T)``, ``lengths (B,)``, ``image_ids (B,)``, ``q``/``a (B, T)`` from
    :func:`word_region_attention`, ``region_feats (B, R, F)``.  Padded positions and words in
    ``ignore_ids`` (e.g. UNK) are dropped.  Returns ``(word_ids (N,), image_ids (N,), weights (N,),
    features (N, F), region_ids (N,))``.
    """
    b, t = captions.shape
    valid = torch.arange(t, device=captions.device).unsqueeze(0) < lengths.to(captions.device).unsqueeze(1)
    valid = valid & (q >= 0)
    for wid in ignore_ids:
        valid = valid & (captions != wid)
    bi, ti = valid.nonzero(as_tuple=True)
    regions = q[bi, ti]
    return (
        captions[bi, ti],
        image_ids.to(captions.device)[bi],
        a[bi, ti],
        region_feats[bi, regions],
        regions,
    )
