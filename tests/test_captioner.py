"""Bottom-Up/Top-Down captioner: equations, masking, training signal, decoding, word attention."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from cpgan.models.captioner import UpDownCaptioner, caption_loss, teacher_forcing_batch
from cpgan.models.memory import word_region_attention

torch.set_num_threads(1)

PAD, BOS, EOS = 0, 1, 2


def small(vocab=9, feat=6, **kw):
    torch.manual_seed(0)
    args = dict(embed_dim=5, hidden_dim=7, att_hidden_dim=4, dropout=0.0, init_std=0.3)
    args.update(kw)
    return UpDownCaptioner(vocab, feat_dim=feat, bos_id=BOS, eos_id=EOS, pad_id=PAD, **args)


def lstm_ref(x, h, c, w_ih, w_hh, b_ih, b_hh):
    gates = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh
    i, f, g, o = gates.chunk(4)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def reference_forward(m: UpDownCaptioner, feats, mask, inputs):
    """Per-sample, per-step transcription of REFERENCE.md §5.1 (no batching, explicit sums)."""
    logits_all, attn_all = [], []
    for b in range(feats.shape[0]):
        v = feats[b][mask[b]]
        vbar = v.mean(0)
        hdim = m.hidden_dim
        h1 = c1 = h2 = c2 = torch.zeros(hdim)
        lg_b, at_b = [], []
        for t in range(inputs.shape[1]):
            x1 = torch.cat([h2, vbar, m.embed.weight[inputs[b, t]]])
            h1, c1 = lstm_ref(x1, h1, c1, m.att_lstm.weight_ih, m.att_lstm.weight_hh, m.att_lstm.bias_ih, m.att_lstm.bias_hh)
            a = torch.stack([m.att_out.weight[0] @ torch.tanh(m.att_feat.weight @ vi + m.att_hid.weight @ h1) for vi in v])
            alpha = torch.exp(a - a.max()) / torch.exp(a - a.max()).sum()
            vhat = (alpha[:, None] * v).sum(0)
            h2, c2 = lstm_ref(torch.cat([vhat, h1]), h2, c2, m.lang_lstm.weight_ih, m.lang_lstm.weight_hh, m.lang_lstm.bias_ih, m.lang_lstm.bias_hh)
            lg_b.append(m.out.weight @ h2 + m.out.bias)
            full = torch.zeros(feats.shape[1])
            full[mask[b]] = alpha
            at_b.append(full)
        logits_all.append(torch.stack(lg_b))
        attn_all.append(torch.stack(at_b))
    return torch.stack(logits_all), torch.stack(attn_all)


def test_forward_matches_equations_and_shapes():
    m = small().eval()
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(3, 5, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    inputs = torch.randint(9, (3, 4), generator=g)
    logits, attn = m(feats, mask, inputs)
    assert logits.shape == (3, 4, 9) and attn.shape == (3, 4, 5)
    with torch.no_grad():
        ref_logits, ref_attn = reference_forward(m, feats, mask, inputs)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert torch.allclose(attn, ref_attn, atol=1e-6)


def test_attention_sums_to_one_on_valid_regions_and_zero_elsewhere():
    m = small()
    feats = torch.randn(4, 6, 6) * 3
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool
    )
    # garbage in the padded regions must not matter
    feats2 = feats.clone()
    feats2[~mask] = 1e4
    _, attn = m(feats, mask, torch.randint(9, (4, 5)))
    _, attn2 = m(feats2, mask, attn.new_zeros(4, 5).long() + 3)
    assert torch.all(attn[:, :, :][~mask.unsqueeze(1).expand_as(attn)] == 0)
    assert torch.allclose(attn[:3].sum(-1), torch.ones(3, 5), atol=1e-6)
    assert torch.all(attn[3] == 0) and torch.isfinite(attn).all()  # no valid region: zeros, no NaN
    assert torch.isfinite(attn2).all()
    _, attn3 = m(feats2, mask, attn.new_zeros(4, 5).long() + 3)
    _, attn4 = m(feats, mask, attn.new_zeros(4, 5).long() + 3)
    assert torch.allclose(attn3, attn4, atol=1e-6)


def test_teacher_forcing_batch_and_masked_loss():
    caps = torch.tensor([[5, 6, 7], [8, 0, 0]])
    inputs, targets, lengths = teacher_forcing_batch(caps, torch.tensor([3, 1]), BOS, EOS, PAD)
    assert inputs.tolist() == [[BOS, 5, 6, 7], [BOS, 8, PAD, PAD]]
    assert targets.tolist() == [[5, 6, 7, EOS], [8, EOS, PAD, PAD]]
    assert lengths.tolist() == [4, 2]
    logits = torch.randn(2, 4, 9)
    loss = caption_loss(logits, targets, lengths)
    lp = torch.log_softmax(logits, -1)
    manual = -(
        sum(lp[0, t, targets[0, t]] for t in range(4)) + sum(lp[1, t, targets[1, t]] for t in range(2))
    ) / 6
    assert torch.allclose(loss, manual, atol=1e-6)


# ------------------------------------------------------------------------------------------
# A tiny world where word t of a caption lives in region t: feature = prototype(word) + slot code
# ------------------------------------------------------------------------------------------

N_WORDS, R, T_CAP = 8, 4, 3
VOCAB = 3 + N_WORDS  # pad, bos, eos + content words 3..10


def tiny_world(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    proto = torch.randn(N_WORDS, 12, generator=torch.Generator().manual_seed(99))
    slot = torch.eye(R) * 3
    words = torch.stack([torch.randperm(N_WORDS, generator=g)[:T_CAP] for _ in range(n)])  # (n, 3)
    feats = torch.zeros(n, R, 12 + R)
    feats[:, :T_CAP, :12] = proto[words]
    feats[:, T_CAP, :12] = torch.randn(n, 12, generator=g) * 0.5  # distractor region
    feats[:, :, 12:] = slot
    mask = torch.ones(n, R, dtype=torch.bool)
    mask[: n // 4, T_CAP] = False  # some images without the distractor
    # shuffle region order so that the slot code (not the index) tells the position
    perm = torch.stack([torch.randperm(R, generator=g) for _ in range(n)])
    feats = feats.gather(1, perm.unsqueeze(-1).expand_as(feats))
    mask = mask.gather(1, perm)
    where = perm.argsort(1)[:, :T_CAP]  # tensor index of the region holding word t
    return feats, mask, words + 3, where


@pytest.fixture(scope="module")
def trained():
    feats, mask, caps, where = tiny_world(96, 0)
    torch.manual_seed(0)
    m = UpDownCaptioner(VOCAB, feat_dim=16, embed_dim=16, hidden_dim=48, att_hidden_dim=24, dropout=0.0,
                        bos_id=BOS, eos_id=EOS, pad_id=PAD, init_std=0.1)
    inputs, targets, lengths = teacher_forcing_batch(caps, torch.full((96,), T_CAP), BOS, EOS, PAD)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(120):
        logits, _ = m(feats, mask, inputs)
        loss = caption_loss(logits, targets, lengths)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return m, losses, (feats, mask, caps, where)


def test_overfitting_reduces_loss(trained):
    _, losses, _ = trained
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
    assert losses[-1] < 0.25


def test_word_region_attention_points_at_the_word_region(trained):
    m, _, (feats, mask, caps, where) = trained
    m.train()
    attn, q, a = word_region_attention(m, feats, mask, caps, torch.full((96,), T_CAP))
    assert m.training  # mode restored
    assert attn.shape == (96, T_CAP, R)
    assert torch.allclose(attn.sum(-1), torch.ones(96, T_CAP), atol=1e-5)
    assert torch.equal(a, attn.max(-1).values)
    acc = (q == where).float().mean().item()
    assert acc > 0.8, acc
    # the off-by-one alignment (attention of the step that *consumes* the word) is wrong
    _, attn_all = m(feats, mask, teacher_forcing_batch(caps, torch.full((96,), T_CAP), BOS, EOS, PAD)[0])
    shifted = attn_all[:, 1 : T_CAP + 1].argmax(-1)
    assert (shifted == where).float().mean().item() < 0.5
    # padded positions: zero attention, q = -1
    attn, q, a = word_region_attention(m, feats[:2], mask[:2], caps[:2], torch.tensor([3, 1]))
    assert q[1, 1:].tolist() == [-1, -1] and torch.all(attn[1, 1:] == 0) and torch.all(a[1, 1:] == 0)
    assert torch.allclose(attn[0], word_region_attention(m, feats[:1], mask[:1], caps[:1], torch.tensor([3]))[0][0], atol=1e-6)


def test_trained_model_decodes_captions(trained):
    m, _, (feats, mask, caps, _) = trained
    m.eval()
    tokens, _ = m.greedy_decode(feats[:16], mask[:16], max_len=6)
    expected = torch.cat([caps[:16], torch.full((16, 1), EOS), torch.full((16, 2), PAD)], 1)
    assert (tokens == expected).all(1).float().mean() > 0.8


@pytest.mark.parametrize("which", ["random", "trained"])
def test_beam_one_equals_greedy(which, trained):
    if which == "random":
        m = small(vocab=12).eval()
        feats, mask = torch.randn(5, 4, 6), torch.ones(5, 4, dtype=torch.bool)
    else:
        m = trained[0].eval()
        feats, mask = trained[2][0][:10], trained[2][1][:10]
    g_tok, g_score = m.greedy_decode(feats, mask, max_len=7)
    b_tok, b_score = m.beam_search(feats, mask, beam_size=1, max_len=7)
    assert torch.equal(g_tok, b_tok)
    assert torch.allclose(g_score, b_score, atol=1e-5)


def sequence_logprob(m, feats, mask, seq):
    """Sum of log p over the tokens of ``seq`` up to and including the first EOS (teacher forcing)."""
    b, t = seq.shape
    inputs = torch.cat([torch.full((b, 1), BOS), seq[:, :-1]], 1)
    with torch.no_grad():
        logits, _ = m(feats, mask, inputs)
    lp = torch.log_softmax(logits.masked_fill(m._banned, float("-inf")), -1).gather(2, seq.unsqueeze(-1)).squeeze(-1)
    is_eos = seq == EOS
    before = torch.cumsum(is_eos.long(), 1) - is_eos.long() == 0  # up to and including first EOS
    return (lp * before).sum(1)


def test_wide_beam_finds_the_exhaustive_optimum():
    m = small(vocab=6, init_std=0.8).eval()  # generated tokens: 2 (EOS), 3, 4, 5
    torch.manual_seed(5)
    feats, mask = torch.randn(3, 4, 6), torch.ones(3, 4, dtype=torch.bool)
    max_len = 3
    allowed = [2, 3, 4, 5]
    seqs = torch.tensor(list(itertools.product(allowed, repeat=max_len)))
    for b in range(3):
        n = seqs.shape[0]
        scores = sequence_logprob(m, feats[b : b + 1].expand(n, -1, -1), mask[b : b + 1].expand(n, -1), seqs)
        best = float(scores.max())
        tok, score = m.beam_search(feats[b : b + 1], mask[b : b + 1], beam_size=16, max_len=max_len)
        assert abs(float(score[0]) - best) < 1e-5
        # the returned tokens really have that score
        assert abs(float(sequence_logprob(m, feats[b : b + 1], mask[b : b + 1], tok.clamp_min(2))[0]) - best) < 1e-5
    # batched beam search equals per-sample
    tok_b, score_b = m.beam_search(feats, mask, beam_size=4, max_len=max_len)
    for b in range(3):
        tok_1, score_1 = m.beam_search(feats[b : b + 1], mask[b : b + 1], beam_size=4, max_len=max_len)
        assert torch.equal(tok_b[b], tok_1[0]) and torch.allclose(score_b[b], score_1[0], atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    m = small()
    with pytest.raises(ValueError, match="region features"):
        m(torch.randn(2, 3, 5), None, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="region mask"):
        m(torch.randn(2, 3, 6), torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        UpDownCaptioner(5, feat_dim=4, bos_id=7)


class SpyCaptioner(torch.nn.Module):
    """Records its teacher-forcing inputs; attends to region ``input token % R`` at each step."""

    bos_id, pad_id = BOS, PAD

    def forward(self, feats, mask, inputs):
        self.seen_inputs = inputs.clone()
        self.seen_training = self.training
        attn = F.one_hot(inputs % feats.shape[1], feats.shape[1]).float()
        return torch.zeros(*inputs.shape, 5), attn


def test_word_region_attention_feeds_bos_and_previous_words():
    """REFERENCE.md §5.4: input [BOS, w_1..w_{T-1}]; the attention for w_t is that of step t-1."""
    spy = SpyCaptioner().train()
    caps = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    attn, q, a = word_region_attention(spy, torch.zeros(2, 16, 3), None, caps, torch.tensor([4, 2]))
    assert spy.seen_inputs.tolist() == [[BOS, 5, 6, 7], [BOS, 9, 10, PAD]]
    assert spy.seen_training is False and spy.training is True
    assert q.tolist() == [[BOS, 5, 6, 7], [BOS, 9, -1, -1]]
    assert a.tolist() == [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]]


def test_feature_centre_and_mean_feature_options():
    """feature_center: the model on v equals the plain model on v - centre (same weights);
    mean_feature=False: the attention LSTM sees zeros instead of v̄, i.e. the plain model whose v̄ term is 0."""
    torch.manual_seed(0)
    kw = dict(vocab_size=12, feat_dim=6, embed_dim=5, hidden_dim=7, att_hidden_dim=4, dropout=0.0,
              bos_id=11, eos_id=0, pad_id=0, init_std=0.3)
    plain = UpDownCaptioner(**kw).eval()
    centred = UpDownCaptioner(**kw, feature_center=True).eval()
    centred.load_state_dict({**plain.state_dict(), "feat_center": torch.randn(6)})
    feats, mask = torch.randn(3, 4, 6), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    inputs = torch.randint(1, 11, (3, 5))
    with torch.no_grad():
        a = centred(feats, mask, inputs)
        b = plain(feats - centred.feat_center, mask, inputs)
    assert torch.allclose(a[0], b[0], atol=1e-6) and torch.allclose(a[1], b[1], atol=1e-6)

    no_mean = UpDownCaptioner(**kw, mean_feature=False).eval()
    no_mean.load_state_dict(plain.state_dict())
    zeroed = UpDownCaptioner(**kw).eval()
    sd = plain.state_dict()
    w = sd["att_lstm.weight_ih"].clone()
    w[:, 7:13] = 0  # input layout [h2 (7); v̄ (6); embedding (5)]: the v̄ columns
    zeroed.load_state_dict({**sd, "att_lstm.weight_ih": w})
    with torch.no_grad():
        c = no_mean(feats, mask, inputs)
        d = zeroed(feats, mask, inputs)
        e = plain(feats, mask, inputs)
    assert torch.allclose(c[0], d[0], atol=1e-6) and not torch.allclose(c[0], e[0], atol=1e-3)


def test_dot_product_attention_option():
    """attention='dot': α = softmax over valid regions of (W_va v_i)·(W_ha h1)/√H, checked by a per-region loop."""
    torch.manual_seed(1)
    m = UpDownCaptioner(vocab_size=9, feat_dim=5, embed_dim=4, hidden_dim=6, att_hidden_dim=3, dropout=0.0,
                        bos_id=8, eos_id=0, pad_id=0, init_std=0.5, attention="dot").eval()
    feats = torch.randn(2, 4, 5)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    h1 = torch.randn(2, 6)
    with torch.no_grad():
        alpha, ctx = m._attend(h1, feats, mask, m.att_feat(feats))
    for b in range(2):
        q = m.att_hid.weight @ h1[b]
        s = [float(m.att_feat.weight @ feats[b, i] @ q) / 3 ** 0.5 if mask[b, i] else -math.inf for i in range(4)]
        ref = torch.softmax(torch.tensor(s), 0)
        assert torch.allclose(alpha[b], ref.float(), atol=1e-6)
        assert torch.allclose(ctx[b], (ref.float()[:, None] * feats[b]).sum(0), atol=1e-5)
    with pytest.raises(ValueError, match="attention"):
        UpDownCaptioner(vocab_size=9, attention="bilinear")
