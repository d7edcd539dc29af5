"""DAMSM loss: vectorised implementation vs an independent per-sample, per-word loop.

The reference below is written from the equations (CPGAN suppl. eqs. (15)-(25) / AttnGAN
``words_loss`` + ``sent_loss`` as summarised in REFERENCE.md §7.1): for each caption it uses only
the caption's first ``len`` words and only the valid regions, exactly like AttnGAN's slicing.
"""

from __future__ import annotations

import math

import pytest
import torch

from cpgan.losses import cosine_similarity_matrix, damsm_loss, paired_cosine, word_level_scores
from cpgan.models.attention import word_region_attention

EPS = 1e-8


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / torch.clamp(a.norm() * b.norm(), min=EPS)


def _loop_word_score(v, e, n_words, valid_regions, g1, g2):
    """Score of one image (v: d x R) and one caption (e: d x T), python loops over words/regions.

    Returns the score and the attention rows (list over words of lists over valid regions).
    """
    regions = [v[:, j] for j in valid_regions]
    words = [e[:, t] for t in range(n_words)]
    # s_{t,j} = e_t . v_j
    s = [[torch.dot(w, r) for r in regions] for w in words]
    # softmax over the words, for each region j
    s_bar = [[None] * len(regions) for _ in words]
    for j in range(len(regions)):
        denom = sum(torch.exp(s[k][j]) for k in range(n_words))
        for t in range(n_words):
            s_bar[t][j] = torch.exp(s[t][j]) / denom
    total = 0.0
    alphas = []
    for t in range(n_words):
        # gamma1-sharpened softmax over the regions, for word t
        denom = sum(torch.exp(g1 * s_bar[t][k]) for k in range(len(regions)))
        alpha = [torch.exp(g1 * s_bar[t][j]) / denom for j in range(len(regions))]
        alphas.append(alpha)
        c = sum(a * r for a, r in zip(alpha, regions))
        total = total + torch.exp(g2 * _cos(c, words[t]))
    return torch.log(total), alphas


def _loop_ce(logits_rows):
    """Mean over i of -log softmax(row_i)[i]; rows are python lists of scalars (None = excluded)."""
    losses = []
    for i, row in enumerate(logits_rows):
        denom = sum(torch.exp(x) for x in row if x is not None)
        losses.append(-(row[i] - torch.log(denom)))
    return sum(losses) / len(losses)


def _loop_damsm(regions, glob, words, sent, lengths, class_ids, region_mask, g1, g2, g3):
    B = words.shape[0]
    word_s = [[None] * B for _ in range(B)]  # [image][caption]
    sent_s = [[None] * B for _ in range(B)]
    attn_diag = {}
    for i in range(B):  # image
        valid = [j for j in range(regions.shape[2]) if region_mask is None or bool(region_mask[i, j])]
        for c in range(B):  # caption
            score, alphas = _loop_word_score(regions[i], words[c], int(lengths[c]), valid, g1, g2)
            word_s[i][c] = score
            if i == c:
                attn_diag[i] = (valid, alphas)
            sent_s[i][c] = _cos(glob[i], sent[c])

    def rows(scores):
        out = []
        for i in range(B):
            row = []
            for c in range(B):
                excluded = class_ids is not None and c != i and class_ids[c] == class_ids[i]
                row.append(None if excluded else g3 * scores[i][c])
            out.append(row)
        return out

    def transpose(m):
        return [[m[c][i] for c in range(B)] for i in range(B)]

    w0, w1 = _loop_ce(rows(word_s)), _loop_ce(rows(transpose(word_s)))
    s0, s1 = _loop_ce(rows(sent_s)), _loop_ce(rows(transpose(sent_s)))
    return {"w_loss0": w0, "w_loss1": w1, "s_loss0": s0, "s_loss1": s1,
            "loss": w0 + w1 + s0 + s1, "attn": attn_diag, "word_s": word_s}


def _inputs(seed=0, B=5, d=6, T=7, R=9):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(B, d, R, generator=g, dtype=torch.float64)
    glob = torch.randn(B, d, generator=g, dtype=torch.float64)
    words = torch.randn(B, d, T, generator=g, dtype=torch.float64)
    sent = torch.randn(B, d, generator=g, dtype=torch.float64)
    lengths = torch.tensor([3, 7, 1, 5, 4])[:B]
    # garbage in the padding steps: must never influence anything
    pad = torch.arange(T)[None, :] >= lengths[:, None]
    words = torch.where(pad[:, None, :], 1e3 * torch.randn(B, d, T, generator=g, dtype=torch.float64), words)
    region_mask = torch.ones(B, R, dtype=torch.bool)
    region_mask[0, :3] = False
    region_mask[3, [1, 4, 8]] = False
    garbage = 50 * torch.randn(B, d, R, generator=g, dtype=torch.float64)
    regions = torch.where(~region_mask[:, None, :], garbage, regions)
    class_ids = [7, 2, 7, 3, 2]
    return regions, glob, words, sent, lengths, class_ids, region_mask


@pytest.mark.parametrize("use_class_ids", [True, False])
def test_vectorised_equals_loop_values_and_gradients(use_class_ids):
    regions, glob, words, sent, lengths, class_ids, region_mask = _inputs()
    g1, g2, g3 = 4.0, 5.0, 10.0
    cid = class_ids if use_class_ids else None

    leaves_v = [t.clone().requires_grad_(True) for t in (regions, glob, words, sent)]
    out = damsm_loss(
        *leaves_v, lengths, class_ids=cid, region_mask=region_mask, gamma1=g1, gamma2=g2, gamma3=g3
    )
    leaves_r = [t.clone().requires_grad_(True) for t in (regions, glob, words, sent)]
    ref = _loop_damsm(*leaves_r, lengths, cid, region_mask, g1, g2, g3)

    for key in ("w_loss0", "w_loss1", "s_loss0", "s_loss1", "loss"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=0)
    torch.testing.assert_close(out["word_loss"], ref["w_loss0"] + ref["w_loss1"], rtol=1e-5, atol=0)
    torch.testing.assert_close(out["sent_loss"], ref["s_loss0"] + ref["s_loss1"], rtol=1e-5, atol=0)
    for i in range(5):
        for c in range(5):
            torch.testing.assert_close(out["word_scores"][i, c], ref["word_s"][i][c], rtol=1e-5, atol=0)

    # attention maps (B, T, R) of each caption on its own image
    attn = out["attention"]
    assert attn.shape == (5, 7, 9)
    for i, (valid, alphas) in ref["attn"].items():
        n = int(lengths[i])
        for t in range(n):
            expected = torch.zeros(9, dtype=torch.float64)
            expected[valid] = torch.stack(alphas[t]).detach()
            torch.testing.assert_close(attn[i, t].detach(), expected, rtol=1e-5, atol=1e-12)
        assert torch.all(attn[i, n:] == 0)

    grads_v = torch.autograd.grad(out["loss"], leaves_v)
    grads_r = torch.autograd.grad(ref["loss"], leaves_r, allow_unused=True)
    for gv, gr, t in zip(grads_v, grads_r, leaves_r):
        gr = torch.zeros_like(t) if gr is None else gr
        assert torch.isfinite(gv).all()
        torch.testing.assert_close(gv, gr, rtol=1e-5, atol=1e-10)
    # padding words and masked regions get exactly zero gradient
    pad = torch.arange(7)[None, :] >= lengths[:, None]
    assert torch.all(grads_v[2].permute(0, 2, 1)[pad] == 0)
    assert torch.all(grads_v[0].permute(0, 2, 1)[~region_mask] == 0)


def test_garbage_in_padding_and_masked_regions_is_ignored():
    regions, glob, words, sent, lengths, class_ids, region_mask = _inputs(seed=3)
    a = damsm_loss(regions, glob, words, sent, lengths, class_ids, region_mask)
    pad = torch.arange(7)[None, :] >= lengths[:, None]
    words2 = words.masked_fill(pad[:, None, :], float("nan"))
    regions2 = regions.masked_fill(~region_mask[:, None, :], -123.0)
    words2.requires_grad_(True)
    regions2.requires_grad_(True)
    b = damsm_loss(regions2, glob, words2, sent, lengths, class_ids, region_mask)
    for key in ("loss", "word_loss", "sent_loss"):
        assert torch.equal(a[key], b[key])
    # even NaN padding cannot poison the gradients
    gw, gr = torch.autograd.grad(b["loss"], (words2, regions2))
    assert torch.isfinite(gw).all() and torch.isfinite(gr).all()
    assert torch.all(gw.permute(0, 2, 1)[pad] == 0)


def test_paper_word_score_divides_by_gamma2():
    regions, glob, words, sent, lengths, _, region_mask = _inputs(seed=1)
    ref_code, _ = word_level_scores(regions, words, lengths, region_mask, 4.0, 5.0)
    paper, _ = word_level_scores(regions, words, lengths, region_mask, 4.0, 5.0, paper_word_score=True)
    # independent check on one pair: (1/g2) * log sum exp(g2 R)
    valid = [j for j in range(9) if region_mask[2, j]]
    s, _ = _loop_word_score(regions[2], words[1], int(lengths[1]), valid, 4.0, 5.0)
    torch.testing.assert_close(paper[2, 1], s / 5.0, rtol=1e-6, atol=0)
    torch.testing.assert_close(ref_code[2, 1], s, rtol=1e-6, atol=0)


def test_word_level_scores_rectangular_for_r_precision():
    # one image against several captions (R-precision use): same numbers as the square case rows
    regions, _, words, _, lengths, _, region_mask = _inputs(seed=2)
    full, _ = word_level_scores(regions, words, lengths, region_mask)
    one, attn = word_level_scores(regions[3:4], words, lengths, region_mask[3:4])
    assert one.shape == (1, 5) and attn.shape == (1, 5, 7, 9)
    torch.testing.assert_close(one[0], full[3], rtol=1e-12, atol=0)


def test_sentence_loss_hand_computed():
    glob = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    sent = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    r = 1.0 / math.sqrt(2.0)
    # cos matrix (rows images): [[1, r], [0, r]]; logits = 10 * cos
    s0 = 0.5 * (math.log1p(math.exp(10 * r - 10)) + math.log1p(math.exp(0 - 10 * r)))
    s1 = 0.5 * (math.log1p(math.exp(0 - 10)) + math.log(2.0))
    cos = cosine_similarity_matrix(glob, sent)
    torch.testing.assert_close(cos, torch.tensor([[1.0, r], [0.0, r]], dtype=torch.float64))
    # word part irrelevant here: use a 1-word, 1-region setup
    words = torch.ones(2, 2, 1, dtype=torch.float64)
    regions = torch.ones(2, 2, 1, dtype=torch.float64)
    out = damsm_loss(regions, glob, words, sent, torch.tensor([1, 1]))
    assert out["s_loss0"].item() == pytest.approx(s0, rel=1e-12)
    assert out["s_loss1"].item() == pytest.approx(s1, rel=1e-12)
    assert out["sent_loss"].item() == pytest.approx(s0 + s1, rel=1e-12)
    # same class: the only negative is masked out -> both losses are exactly 0
    masked = damsm_loss(regions, glob, words, sent, torch.tensor([1, 1]), class_ids=[4, 4])
    assert masked["s_loss0"].item() == pytest.approx(0.0, abs=1e-15)
    assert masked["s_loss1"].item() == pytest.approx(0.0, abs=1e-15)
    # zero vectors: denominator clamped at eps -> cosine 0, no NaN
    z = cosine_similarity_matrix(torch.zeros(1, 2), torch.ones(1, 2))
    assert z.item() == 0.0


def test_paired_cosine_hand_values_and_eps_rule():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[4.0, 3.0], [-2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    # (12 + 12) / 25; opposite vectors; zero vector -> product of norms clamped at eps -> 0, no NaN
    torch.testing.assert_close(paired_cosine(a, b), torch.tensor([24 / 25, -1.0, 0.0], dtype=torch.float64))
    # AttnGAN clamps the product |a||b|, not each norm: 1e-5 * 1e-5 = 1e-10 < eps=1e-8 -> dot / 1e-8
    tiny = torch.tensor([[1e-5, 0.0]], dtype=torch.float64)
    assert paired_cosine(tiny, tiny).item() == pytest.approx(1e-10 / 1e-8, rel=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        paired_cosine(a, b[:2])


def test_word_region_attention_matched_pairs_and_shapes():
    regions, _, words, _, lengths, _, region_mask = _inputs(seed=4)
    word_mask = torch.arange(7)[None, :] < lengths[:, None]
    ctx, attn = word_region_attention(words, regions, 4.0, word_mask, region_mask)
    assert ctx.shape == (5, 6, 7) and attn.shape == (5, 7, 9)
    for b in range(5):
        valid = [j for j in range(9) if region_mask[b, j]]
        _, alphas = _loop_word_score(regions[b], words[b], int(lengths[b]), valid, 4.0, 5.0)
        for t in range(int(lengths[b])):
            expected_ctx = sum(a * regions[b][:, j] for a, j in zip(alphas[t], valid))
            torch.testing.assert_close(ctx[b, :, t], expected_ctx, rtol=1e-6, atol=1e-9)
        assert torch.all(ctx[b, :, int(lengths[b]):] == 0)
    # 4-D regions (B, d, H, W) are flattened row-major
    ctx4, attn4 = word_region_attention(words, regions[:, :, :8].reshape(5, 6, 2, 4), 4.0, word_mask)
    ctx3, attn3 = word_region_attention(words, regions[:, :, :8], 4.0, word_mask)
    torch.testing.assert_close(attn4, attn3)


def test_bad_inputs_raise_clear_errors():
    regions, glob, words, sent, lengths, _, _ = _inputs()
    with pytest.raises(ValueError, match="lengths"):
        damsm_loss(regions, glob, words, sent, torch.tensor([3, 8, 1, 5, 4]))
    with pytest.raises(ValueError, match="lengths"):
        damsm_loss(regions, glob, words, sent, torch.tensor([3, 0, 1, 5, 4]))
    with pytest.raises(ValueError, match="same d"):
        damsm_loss(regions[:, :5], glob, words, sent, lengths)
    with pytest.raises(ValueError, match="class_ids"):
        damsm_loss(regions, glob, words, sent, lengths, class_ids=[1, 2])
    with pytest.raises(ValueError, match="batch size"):
        damsm_loss(regions[:4], glob, words, sent, lengths)


def test_hard_negatives_extend_the_image_to_caption_softmax():
    """Loop reference: row i of the image->caption softmax gets image i's own K hard-negative captions."""
    from cpgan.losses import HardNegatives

    regions, glob, words, sent, lengths, class_ids, region_mask = _inputs()
    B, d, T = words.shape
    K = 2
    g = torch.Generator().manual_seed(5)
    h_words = torch.randn(K, B, d, T, generator=g, dtype=torch.float64)
    h_sent = torch.randn(K, B, d, generator=g, dtype=torch.float64)
    h_len = torch.tensor([[2, 7, 1, 4, 3], [3, 5, 1, 5, 4]])
    h_valid = torch.tensor([[True, False, True, True, True], [True, True, True, False, True]])
    g1, g2, g3 = 4.0, 5.0, 10.0
    leaves_v = [t.clone().requires_grad_(True) for t in (regions, glob, words, sent, h_words, h_sent)]
    out = damsm_loss(*leaves_v[:4], lengths, class_ids=class_ids, region_mask=region_mask,
                     gamma1=g1, gamma2=g2, gamma3=g3,
                     hard=HardNegatives(leaves_v[4], leaves_v[5], h_len, h_valid))
    plain = damsm_loss(*leaves_v[:4], lengths, class_ids=class_ids, region_mask=region_mask,
                       gamma1=g1, gamma2=g2, gamma3=g3)

    leaves_r = [t.clone().requires_grad_(True) for t in (regions, glob, words, sent, h_words, h_sent)]
    ref = _loop_damsm(*leaves_r[:4], lengths, class_ids, region_mask, g1, g2, g3)
    w_rows, s_rows = [], []
    for i in range(B):
        valid = [j for j in range(regions.shape[2]) if bool(region_mask[i, j])]
        w_row = [None if (c != i and class_ids[c] == class_ids[i]) else g3 * ref["word_s"][i][c] for c in range(B)]
        s_row = [None if (c != i and class_ids[c] == class_ids[i]) else g3 * _cos(leaves_r[1][i], leaves_r[3][c])
                 for c in range(B)]
        for k in range(K):
            if bool(h_valid[k, i]):
                score, _ = _loop_word_score(leaves_r[0][i], leaves_r[4][k, i], int(h_len[k, i]), valid, g1, g2)
                w_row.append(g3 * score)
                s_row.append(g3 * _cos(leaves_r[1][i], leaves_r[5][k, i]))
        w_rows.append(w_row)
        s_rows.append(s_row)
    w0, s0 = _loop_ce(w_rows), _loop_ce(s_rows)
    torch.testing.assert_close(out["w_loss0"], w0, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["s_loss0"], s0, rtol=1e-5, atol=0)
    # the caption->image direction is untouched, and hard negatives only add to the image->caption loss
    torch.testing.assert_close(out["w_loss1"], ref["w_loss1"], rtol=1e-5, atol=0)
    torch.testing.assert_close(out["s_loss1"], ref["s_loss1"], rtol=1e-5, atol=0)
    assert out["w_loss0"] > plain["w_loss0"] and out["s_loss0"] > plain["s_loss0"]
    total_ref = w0 + s0 + ref["w_loss1"] + ref["s_loss1"]
    grads_v = torch.autograd.grad(out["loss"], leaves_v)
    grads_r = torch.autograd.grad(total_ref, leaves_r, allow_unused=True)
    for gv, gr, t in zip(grads_v, grads_r, leaves_r):
        gr = torch.zeros_like(t) if gr is None else gr
        torch.testing.assert_close(gv, gr, rtol=1e-5, atol=1e-10)
    # an invalid hard negative gets no gradient at all
    assert torch.all(grads_v[4][0, 1] == 0) and torch.all(grads_v[5][1, 3] == 0)


def test_hard_negatives_bad_shapes_raise():
    from cpgan.losses import HardNegatives

    regions, glob, words, sent, lengths, _, _ = _inputs()
    bad = HardNegatives(words[None, :3], sent[None, :3], lengths[None, :3], torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="hard negatives must be"):
        damsm_loss(regions, glob, words, sent, lengths, hard=bad)
