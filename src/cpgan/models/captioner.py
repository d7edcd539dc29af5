"""Bottom-Up and Top-Down (BUTD) captioner (Anderson et al., CVPR 2018) over detector regions.

CPGAN (paper §3.2) builds its word memory from the attention of a BUTD captioner trained on the
36 region features (1024-d, YOLOv3) of every training image.  Equations (REFERENCE.md §5.1,
paper §3.2; peteanderson80/Up-Down-Captioner ``create_caption_lstm.py``), per step t::

    x1_t = [h2_{t-1}; v̄; W_e Π_t]                 v̄ = mean of the valid region features
    h1_t = LSTM_att(x1_t, h1_{t-1})
    a_{i,t} = w_aᵀ tanh(W_va v_i + W_ha h1_t)      additive attention, invalid regions masked
    α_t = softmax_i(a_t);  v̂_t = Σ_i α_{i,t} v_i
    h2_t = LSTM_lang([v̂_t; h1_t], h2_{t-1})
    p(y_t | y_<t) = softmax(W_p h2_t + b_p)

Choices (constructor arguments; paper values as defaults, REFERENCE.md §5.2):

* sizes: ``embed_dim=1000``, ``hidden_dim=1000`` (both LSTMs), ``att_hidden_dim=512``,
  ``feat_dim=1024`` (YOLOv3 region width used by CPGAN; the paper's Faster R-CNN had 2048);
* ``att_bias=False``: the three attention projections have no bias (official Caffe builder);
* ``dropout=0.5`` on the language-LSTM output before ``W_p`` (as in the common reimplementations;
  the word embedding is the paper's plain linear ``W_e Π_t``, no ReLU);
* ``init_std=0.01``: weights N(0, 0.01), biases 0, LSTM forget-gate bias 1 (paper);
* ``feature_center=False``: with True the region features are centred (a ``feat_center`` buffer, the mean
  training region feature, is subtracted) before everything else. YOLOv3 region features share a large common
  component (mean cosine 0.78 between the regions of one shapes image), which left the attention uniform;
  centring makes the differences between regions what the attention sees. Not in BUTD (our option);
* ``mean_feature=True``: the attention LSTM is fed v̄ (BUTD). False feeds zeros instead (same parameter
  shapes), so that the attended feature is the captioner's only view of the image (our option);
* ``attention="additive"`` (BUTD: w_aᵀ tanh(W_va v_i + W_ha h1)) or ``"dot"``: (W_va v_i)·(W_ha h1)/√H, a
  multiplicative match that selects a region by content more easily (our option; w_a is then unused);
* special tokens ``bos_id`` (input of step 0), ``eos_id`` (ends a caption), ``pad_id`` (after
  EOS in decoded outputs); ``bos_id`` and ``pad_id`` (if distinct from EOS) are never generated.

Teacher forcing: ``forward(feats, mask, inputs)`` with ``inputs = [BOS, w_1, …, w_{T-1}]`` returns
the logits of ``[w_1, …, w_T]`` and, for every step t, the attention α_t that was used to emit
word ``w_{t+1}`` (1-based) — i.e. ``attn[:, t]`` is aligned with ``targets[:, t]``
(REFERENCE.md §5.4).  A step loop over time is unavoidable for an LSTM; nothing loops over the
batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UpDownCaptioner", "caption_loss", "teacher_forcing_batch"]


def teacher_forcing_batch(
    captions: torch.Tensor, lengths: torch.Tensor, bos_id: int, eos_id: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build teacher-forcing inputs/targets from ground-truth words.

    ``captions (B, T)`` word ids ``w_1..w_L`` (padded after ``lengths (B,)``).  Returns
    ``inputs (B, T+1) = [BOS, w_1..w_L, pad…]``, ``targets (B, T+1) = [w_1..w_L, EOS, pad…]`` and
    ``target_lengths (B,) = lengths + 1``.
    """
    if captions.dim() != 2 or lengths.shape != captions.shape[:1]:
        raise ValueError("captions must be (B, T) and lengths (B,)")
    b, t = captions.shape
    pos = torch.arange(t + 1, device=captions.device).unsqueeze(0)
    lengths = lengths.to(captions.device).long()
    padded = torch.cat([captions, captions.new_full((b, 1), pad_id)], 1)
    valid = pos < lengths.unsqueeze(1)
    targets = torch.where(valid, padded, torch.full_like(padded, pad_id))
    targets = torch.where(pos == lengths.unsqueeze(1), torch.full_like(padded, eos_id), targets)
    inputs = torch.cat([captions.new_full((b, 1), bos_id), targets[:, :-1]], 1)
    inputs = torch.where(pos <= lengths.unsqueeze(1), inputs, torch.full_like(inputs, pad_id))
    return inputs, targets, lengths + 1


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Masked cross-entropy, mean over valid tokens (REFERENCE.md §5.1 L_XE, per-token mean).

    ``logits (B, T, V)``, ``targets (B, T)``, ``lengths (B,)``: positions ``t >= lengths[b]`` are
    ignored.  Returns a scalar.
    """
    b, t, v = logits.shape
    if targets.shape != (b, t) or lengths.shape != (b,):
        raise ValueError(f"targets must be {(b, t)} and lengths {(b,)}")
    mask = torch.arange(t, device=logits.device).unsqueeze(0) < lengths.to(logits.device).unsqueeze(1)
    nll = F.cross_entropy(logits.reshape(-1, v), targets.reshape(-1), reduction="none").view(b, t)
    n = mask.sum()
    if n == 0:
        raise ValueError("caption_loss: no valid token (all lengths are 0)")
    return (nll * mask).sum() / n


class UpDownCaptioner(nn.Module):
    """Bottom-Up/Top-Down captioner (see module docstring for equations and choices).

    Args:
        vocab_size: V, output classes (including special tokens).
        feat_dim: D, region feature width.
        embed_dim: E, word embedding width.
        hidden_dim: M, hidden size of both LSTMs.
        att_hidden_dim: H, attention hidden width.
        dropout: dropout on h2 before the output layer.
        att_bias: bias in ``W_va``, ``W_ha``, ``w_a``.
        bos_id, eos_id, pad_id: special token ids.
        init_std: std of the N(0, σ) weight init; forget-gate bias set to 1.
    """

    def __init__(
        self,
        vocab_size: int,
        feat_dim: int = 1024,
        embed_dim: int = 1000,
        hidden_dim: int = 1000,
        att_hidden_dim: int = 512,
        dropout: float = 0.5,
        att_bias: bool = False,
        bos_id: int = 1,
        eos_id: int = 2,
        pad_id: int = 0,
        init_std: float = 0.01,
        feature_center: bool = False,
        mean_feature: bool = True,
        attention: str = "additive",
    ) -> None:
        super().__init__()
        for name, val in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if not 0 <= val < vocab_size:
                raise ValueError(f"{name}={val} outside the vocabulary of {vocab_size}")
        self.vocab_size = vocab_size
        self.feat_dim = feat_dim
        self.hidden_dim = hidden_dim
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.mean_feature = mean_feature
        if attention not in ("additive", "dot"):
            raise ValueError(f"attention must be 'additive' or 'dot', got {attention!r}")
        self.attention = attention
        self.att_lstm = nn.LSTMCell(hidden_dim + feat_dim + embed_dim, hidden_dim)
        self.lang_lstm = nn.LSTMCell(feat_dim + hidden_dim, hidden_dim)
        self.att_feat = nn.Linear(feat_dim, att_hidden_dim, bias=att_bias)  # W_va
        self.att_hid = nn.Linear(hidden_dim, att_hidden_dim, bias=att_bias)  # W_ha
        self.att_out = nn.Linear(att_hidden_dim, 1, bias=att_bias)  # w_a
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim, vocab_size)  # W_p, b_p
        self._init(init_std)
        banned = torch.zeros(vocab_size, dtype=torch.bool)
        banned[bos_id] = True
        if pad_id != eos_id:
            banned[pad_id] = True
        self.register_buffer("_banned", banned, persistent=False)
        if feature_center:  # set by the stage to the mean training region feature; saved with the weights
            self.register_buffer("feat_center", torch.zeros(feat_dim))
        else:
            self.feat_center = None

    def _init(self, std: float) -> None:
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, std)
        m = self.hidden_dim
        with torch.no_grad():
            for cell in (self.att_lstm, self.lang_lstm):
                cell.bias_ih[m : 2 * m].fill_(1.0)  # gate order i, f, g, o

    # ---------------------------------------------------------------------------------------
    def _prepare(self, feats: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validate inputs; return (feats, mask, mean feature v̄ (B, D), W_va v (B, R, H))."""
        if feats.dim() != 3 or feats.shape[2] != self.feat_dim:
            raise ValueError(f"region features must be (B, R, {self.feat_dim}), got {tuple(feats.shape)}")
        if mask is None:
            mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        if mask.shape != feats.shape[:2]:
            raise ValueError(f"region mask must be {tuple(feats.shape[:2])}, got {tuple(mask.shape)}")
        mask = mask.bool()
        if self.feat_center is not None:
            feats = feats - self.feat_center
        m = mask.unsqueeze(-1).to(feats.dtype)
        mean = (feats * m).sum(1) / m.sum(1).clamp_min(1.0)
        if not self.mean_feature:  # once per sequence, not per step: the attention LSTM sees zeros instead of v̄
            mean = torch.zeros_like(mean)
        return feats, mask, mean, self.att_feat(feats)

    def _attend(self, h1: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor, proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """α (B, R): softmax over valid regions (exact zeros elsewhere; all zero if none valid)."""
        if self.attention == "dot":  # scaled dot product of W_va v_i and W_ha h1 (w_a unused)
            q = self.att_hid(h1).unsqueeze(2)  # (B, H, 1)
            scores = torch.bmm(proj, q).squeeze(-1) / proj.shape[-1] ** 0.5
        else:
            scores = self.att_out(torch.tanh(proj + self.att_hid(h1).unsqueeze(1))).squeeze(-1)
        any_valid = mask.any(1, keepdim=True)
        scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~any_valid, 0.0)
        alpha = torch.softmax(scores, dim=1) * mask.to(scores.dtype)
        ctx = torch.bmm(alpha.unsqueeze(1), feats).squeeze(1)
        return alpha, ctx

    def _init_state(self, b: int, ref: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z = ref.new_zeros(b, self.hidden_dim)
        return z, z.clone(), z.clone(), z.clone()

    def _step(
        self,
        tokens: torch.Tensor,
        state: tuple[torch.Tensor, ...],
        feats: torch.Tensor,
        mask: torch.Tensor,
        mean: torch.Tensor,
        proj: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        h1, c1, h2, c2 = state
        x1 = torch.cat([h2, mean, self.embed(tokens)], 1)
        h1, c1 = self.att_lstm(x1, (h1, c1))
        alpha, ctx = self._attend(h1, feats, mask, proj)
        h2, c2 = self.lang_lstm(torch.cat([ctx, h1], 1), (h2, c2))
        logits = self.out(self.drop(h2))
        return logits, alpha, (h1, c1, h2, c2)

    # ---------------------------------------------------------------------------------------
    def forward(
        self, region_feats: torch.Tensor, region_mask: torch.Tensor | None, inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing.

        ``region_feats (B, R, D)``, ``region_mask (B, R)`` bool (None: all valid),
        ``inputs (B, T)`` = ``[BOS, w_1..w_{T-1}]``.  Returns ``logits (B, T, V)`` (step t predicts
        ``w_{t+1}``) and ``attn (B, T, R)`` (α of step t, the attention used to emit ``w_{t+1}``).
        """
        feats, mask, mean, proj = self._prepare(region_feats, region_mask)
        if inputs.dim() != 2 or inputs.shape[0] != feats.shape[0]:
            raise ValueError(f"inputs must be (B, T) with B={feats.shape[0]}, got {tuple(inputs.shape)}")
        state = self._init_state(feats.shape[0], feats)
        logits, attn = [], []
        for t in range(inputs.shape[1]):
            lg, alpha, state = self._step(inputs[:, t], state, feats, mask, mean, proj)
            logits.append(lg)
            attn.append(alpha)
        return torch.stack(logits, 1), torch.stack(attn, 1)

    def _logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.float().masked_fill(self._banned, float("-inf")), dim=-1)

    @torch.no_grad()
    def greedy_decode(
        self, region_feats: torch.Tensor, region_mask: torch.Tensor | None, max_len: int = 20
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding.  Returns ``tokens (B, max_len)`` (EOS included, ``pad_id`` after it) and
        ``scores (B,)`` = sum of log-probabilities of the emitted tokens up to EOS."""
        feats, mask, mean, proj = self._prepare(region_feats, region_mask)
        b = feats.shape[0]
        state = self._init_state(b, feats)
        tok = torch.full((b,), self.bos_id, dtype=torch.long, device=feats.device)
        done = torch.zeros(b, dtype=torch.bool, device=feats.device)
        scores = feats.new_zeros(b, dtype=torch.float32)
        out = torch.full((b, max_len), self.pad_id, dtype=torch.long, device=feats.device)
        for t in range(max_len):
            logits, _, state = self._step(tok, state, feats, mask, mean, proj)
            lp = self._logprobs(logits)
            best_lp, best = lp.max(-1)
            best = torch.where(done, torch.full_like(best, self.pad_id), best)
            scores = scores + torch.where(done, torch.zeros_like(best_lp), best_lp)
            out[:, t] = best
            done = done | (best == self.eos_id)
            tok = best
            if bool(done.all()):
                break
        return out, scores

    @torch.no_grad()
    def beam_search(
        self,
        region_feats: torch.Tensor,
        region_mask: torch.Tensor | None,
        beam_size: int = 3,
        max_len: int = 20,
        length_penalty: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Beam search, vectorised over ``B × beam``.

        A finished hypothesis (EOS emitted) keeps its score and is extended only by ``pad_id`` at
        zero cost.  Final ranking: ``score / len**length_penalty`` (0 = plain sum of
        log-probabilities; ``len`` counts tokens up to and including EOS).  Returns the best
        ``tokens (B, max_len)`` and its raw ``scores (B,)``.  ``beam_size=1`` equals
        :meth:`greedy_decode`.
        """
        if beam_size < 1:
            raise ValueError("beam_size must be >= 1")
        feats, mask, mean, proj = self._prepare(region_feats, region_mask)
        b, r, d = feats.shape
        k, v = beam_size, self.vocab_size
        dev = feats.device

        def expand(x: torch.Tensor) -> torch.Tensor:
            return x.unsqueeze(1).expand(b, k, *x.shape[1:]).reshape(b * k, *x.shape[1:])

        feats_k, mask_k, mean_k, proj_k = expand(feats), expand(mask), expand(mean), expand(proj)
        state = self._init_state(b * k, feats)
        tok = torch.full((b * k,), self.bos_id, dtype=torch.long, device=dev)
        scores = torch.full((b, k), float("-inf"), device=dev)
        scores[:, 0] = 0.0  # only one live hypothesis at the start
        done = torch.zeros(b, k, dtype=torch.bool, device=dev)
        lengths = torch.zeros(b, k, dtype=torch.long, device=dev)
        seqs = torch.full((b, k, max_len), self.pad_id, dtype=torch.long, device=dev)
        for t in range(max_len):
            logits, _, state = self._step(tok, state, feats_k, mask_k, mean_k, proj_k)
            lp = self._logprobs(logits).view(b, k, v)
            # finished beams: only pad, at zero cost
            frozen = torch.full_like(lp, float("-inf"))
            frozen[..., self.pad_id] = 0.0
            lp = torch.where(done.unsqueeze(-1), frozen, lp)
            cand = (scores.unsqueeze(-1) + lp).view(b, k * v)
            top_scores, top_idx = cand.topk(k, dim=1)
            src_beam = torch.div(top_idx, v, rounding_mode="floor")
            new_tok = top_idx % v
            flat_src = (src_beam + torch.arange(b, device=dev).unsqueeze(1) * k).view(-1)
            state = tuple(s[flat_src] for s in state)
            seqs = seqs.gather(1, src_beam.unsqueeze(-1).expand(b, k, max_len))
            seqs[:, :, t] = new_tok
            was_done = done.gather(1, src_beam)
            lengths = lengths.gather(1, src_beam) + (~was_done).long()
            done = was_done | (new_tok == self.eos_id)
            scores = top_scores
            tok = new_tok.view(-1)
            if bool(done.all()):
                break
        rank = scores / lengths.clamp_min(1).float().pow(length_penalty) if length_penalty else scores
        best = rank.argmax(1)
        idx = torch.arange(b, device=dev)
        return seqs[idx, best], scores[idx, best]
