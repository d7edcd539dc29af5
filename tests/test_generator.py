"""Tests of the CPGAN generator (cpgan.models.generator) and the CA KL term.

References are independent of the module under test: the released parameter table (keys.md, hard-coded
below), a functional re-implementation of the released G_NET forward written with torch.nn.functional
and explicit loops over attention rows, closed forms for KL and truncated-normal moments, scipy's
truncnorm CDF.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from cpgan.gan_losses import kl_loss
from cpgan.models.generator import (
    CA_NET,
    G_NET,
    WordAttention,
    init_weights_attngan,
    released_repeat_mask,
    scale_grad,
    truncated_noise,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# (name, shape) of the released G_NET state_dict at the eval_coco settings, in state_dict order
# (shared/fixtures/official/keys.md, "G_NET" table).
RELEASED_G_NET = [
    ("upsample.1.weight", (96, 48, 3, 3)),
    ("upsample.2.weight", (96,)),
    ("upsample.2.bias", (96,)),
    ("upsample.2.running_mean", (96,)),
    ("upsample.2.running_var", (96,)),
    ("upsample.2.num_batches_tracked", ()),
    ("conv.weight", (48, 48, 3, 3)),
    ("ca_net.fc.weight", (400, 256)),
    ("ca_net.fc.bias", (400,)),
    ("h_net1.fc.0.weight", (24576, 200)),
    ("h_net1.fc.1.weight", (24576,)),
    ("h_net1.fc.1.bias", (24576,)),
    ("h_net1.fc.1.running_mean", (24576,)),
    ("h_net1.fc.1.running_var", (24576,)),
    ("h_net1.fc.1.num_batches_tracked", ()),
    ("h_net1.upsample1.1.weight", (768, 768, 3, 3)),
    ("h_net1.upsample1.2.weight", (768,)),
    ("h_net1.upsample1.2.bias", (768,)),
    ("h_net1.upsample1.2.running_mean", (768,)),
    ("h_net1.upsample1.2.running_var", (768,)),
    ("h_net1.upsample1.2.num_batches_tracked", ()),
    ("h_net1.upsample2.1.weight", (384, 384, 3, 3)),
    ("h_net1.upsample2.2.weight", (384,)),
    ("h_net1.upsample2.2.bias", (384,)),
    ("h_net1.upsample2.2.running_mean", (384,)),
    ("h_net1.upsample2.2.running_var", (384,)),
    ("h_net1.upsample2.2.num_batches_tracked", ()),
    ("h_net1.upsample3.1.weight", (192, 192, 3, 3)),
    ("h_net1.upsample3.2.weight", (192,)),
    ("h_net1.upsample3.2.bias", (192,)),
    ("h_net1.upsample3.2.running_mean", (192,)),
    ("h_net1.upsample3.2.running_var", (192,)),
    ("h_net1.upsample3.2.num_batches_tracked", ()),
    ("h_net1.upsample4.1.weight", (96, 96, 3, 3)),
    ("h_net1.upsample4.2.weight", (96,)),
    ("h_net1.upsample4.2.bias", (96,)),
    ("h_net1.upsample4.2.running_mean", (96,)),
    ("h_net1.upsample4.2.running_var", (96,)),
    ("h_net1.upsample4.2.num_batches_tracked", ()),
    ("img_net1.img.0.weight", (3, 48, 3, 3)),
    ("h_net2.att.conv_context.weight", (48, 256, 1, 1)),
    ("h_net2.residual.0.block.0.weight", (192, 96, 3, 3)),
    ("h_net2.residual.0.block.1.weight", (192,)),
    ("h_net2.residual.0.block.1.bias", (192,)),
    ("h_net2.residual.0.block.1.running_mean", (192,)),
    ("h_net2.residual.0.block.1.running_var", (192,)),
    ("h_net2.residual.0.block.1.num_batches_tracked", ()),
    ("h_net2.residual.0.block.3.weight", (96, 96, 3, 3)),
    ("h_net2.residual.0.block.4.weight", (96,)),
    ("h_net2.residual.0.block.4.bias", (96,)),
    ("h_net2.residual.0.block.4.running_mean", (96,)),
    ("h_net2.residual.0.block.4.running_var", (96,)),
    ("h_net2.residual.0.block.4.num_batches_tracked", ()),
    ("h_net2.residual.1.block.0.weight", (192, 96, 3, 3)),
    ("h_net2.residual.1.block.1.weight", (192,)),
    ("h_net2.residual.1.block.1.bias", (192,)),
    ("h_net2.residual.1.block.1.running_mean", (192,)),
    ("h_net2.residual.1.block.1.running_var", (192,)),
    ("h_net2.residual.1.block.1.num_batches_tracked", ()),
    ("h_net2.residual.1.block.3.weight", (96, 96, 3, 3)),
    ("h_net2.residual.1.block.4.weight", (96,)),
    ("h_net2.residual.1.block.4.bias", (96,)),
    ("h_net2.residual.1.block.4.running_mean", (96,)),
    ("h_net2.residual.1.block.4.running_var", (96,)),
    ("h_net2.residual.1.block.4.num_batches_tracked", ()),
    ("h_net2.residual.2.block.0.weight", (192, 96, 3, 3)),
    ("h_net2.residual.2.block.1.weight", (192,)),
    ("h_net2.residual.2.block.1.bias", (192,)),
    ("h_net2.residual.2.block.1.running_mean", (192,)),
    ("h_net2.residual.2.block.1.running_var", (192,)),
    ("h_net2.residual.2.block.1.num_batches_tracked", ()),
    ("h_net2.residual.2.block.3.weight", (96, 96, 3, 3)),
    ("h_net2.residual.2.block.4.weight", (96,)),
    ("h_net2.residual.2.block.4.bias", (96,)),
    ("h_net2.residual.2.block.4.running_mean", (96,)),
    ("h_net2.residual.2.block.4.running_var", (96,)),
    ("h_net2.residual.2.block.4.num_batches_tracked", ()),
    ("h_net2.upsample.1.weight", (96, 96, 3, 3)),
    ("h_net2.upsample.2.weight", (96,)),
    ("h_net2.upsample.2.bias", (96,)),
    ("h_net2.upsample.2.running_mean", (96,)),
    ("h_net2.upsample.2.running_var", (96,)),
    ("h_net2.upsample.2.num_batches_tracked", ()),
    ("img_net2.img.0.weight", (3, 48, 3, 3)),
    ("h_net3.att.conv_context.weight", (48, 256, 1, 1)),
    ("h_net3.residual.0.block.0.weight", (192, 96, 3, 3)),
    ("h_net3.residual.0.block.1.weight", (192,)),
    ("h_net3.residual.0.block.1.bias", (192,)),
    ("h_net3.residual.0.block.1.running_mean", (192,)),
    ("h_net3.residual.0.block.1.running_var", (192,)),
    ("h_net3.residual.0.block.1.num_batches_tracked", ()),
    ("h_net3.residual.0.block.3.weight", (96, 96, 3, 3)),
    ("h_net3.residual.0.block.4.weight", (96,)),
    ("h_net3.residual.0.block.4.bias", (96,)),
    ("h_net3.residual.0.block.4.running_mean", (96,)),
    ("h_net3.residual.0.block.4.running_var", (96,)),
    ("h_net3.residual.0.block.4.num_batches_tracked", ()),
    ("h_net3.residual.1.block.0.weight", (192, 96, 3, 3)),
    ("h_net3.residual.1.block.1.weight", (192,)),
    ("h_net3.residual.1.block.1.bias", (192,)),
    ("h_net3.residual.1.block.1.running_mean", (192,)),
    ("h_net3.residual.1.block.1.running_var", (192,)),
    ("h_net3.residual.1.block.1.num_batches_tracked", ()),
    ("h_net3.residual.1.block.3.weight", (96, 96, 3, 3)),
    ("h_net3.residual.1.block.4.weight", (96,)),
    ("h_net3.residual.1.block.4.bias", (96,)),
    ("h_net3.residual.1.block.4.running_mean", (96,)),
    ("h_net3.residual.1.block.4.running_var", (96,)),
    ("h_net3.residual.1.block.4.num_batches_tracked", ()),
    ("h_net3.residual.2.block.0.weight", (192, 96, 3, 3)),
    ("h_net3.residual.2.block.1.weight", (192,)),
    ("h_net3.residual.2.block.1.bias", (192,)),
    ("h_net3.residual.2.block.1.running_mean", (192,)),
    ("h_net3.residual.2.block.1.running_var", (192,)),
    ("h_net3.residual.2.block.1.num_batches_tracked", ()),
    ("h_net3.residual.2.block.3.weight", (96, 96, 3, 3)),
    ("h_net3.residual.2.block.4.weight", (96,)),
    ("h_net3.residual.2.block.4.bias", (96,)),
    ("h_net3.residual.2.block.4.running_mean", (96,)),
    ("h_net3.residual.2.block.4.running_var", (96,)),
    ("h_net3.residual.2.block.4.num_batches_tracked", ()),
    ("h_net3.upsample.1.weight", (96, 96, 3, 3)),
    ("h_net3.upsample.2.weight", (96,)),
    ("h_net3.upsample.2.bias", (96,)),
    ("h_net3.upsample.2.running_mean", (96,)),
    ("h_net3.upsample.2.running_var", (96,)),
    ("h_net3.upsample.2.num_batches_tracked", ()),
    ("img_net3.img.0.weight", (3, 48, 3, 3)),
]
RELEASED_G_NET_PARAMS = 13873856  # learnable + BN-affine, keys.md summary table


def _text(batch: int, emb: int, lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    words = torch.randn(batch, emb, t, generator=g)
    mask = torch.arange(t)[None, :] >= torch.tensor(lengths)[:, None]  # True = padding
    words = words.masked_fill(mask[:, None, :], 0.0)  # padded steps are exactly zero (RNN_ENCODER)
    sentence = torch.randn(batch, emb, generator=g)
    return sentence, words, mask


# --------------------------------------------------------------------------------------------------
# released parameter names / shapes
# --------------------------------------------------------------------------------------------------
def test_state_dict_matches_released_table():
    g = G_NET(branch_num=3, ngf=48, z_dim=100, c_dim=100, emb_dim=256, r_num=3, base_size=64)
    got = [(k, tuple(v.shape)) for k, v in g.state_dict().items()]
    assert len(RELEASED_G_NET) == 128
    assert got == RELEASED_G_NET  # same names, shapes and registration order
    for k, v in g.state_dict().items():
        assert v.dtype == (torch.int64 if k.endswith("num_batches_tracked") else torch.float32), k
    n_params = sum(p.numel() for p in g.parameters())
    assert n_params == RELEASED_G_NET_PARAMS
    assert g.h_net1.init_ch == 768


def test_load_state_dict_by_name_roundtrip():
    """A state_dict with the released names loads strictly into a fresh model."""
    sd = {k: torch.randn(s) if s else torch.tensor(7) for k, s in RELEASED_G_NET}
    g = G_NET()
    g.load_state_dict(sd, strict=True)
    assert torch.equal(g.h_net2.att.conv_context.weight, sd["h_net2.att.conv_context.weight"])


# --------------------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------------------
def _record_shapes(g: G_NET, names: list[str]):
    shapes: dict[str, tuple] = {}
    hooks = []
    for n in names:
        mod = g.get_submodule(n)

        def hook(_m, _i, out, n=n):
            shapes[n] = tuple((out[0] if isinstance(out, tuple) else out).shape)

        hooks.append(mod.register_forward_hook(hook))
    return shapes, hooks


def test_paper_setting_shapes():
    g = G_NET().eval()  # ngf 48, 3 stages, 64/128/256
    sentence, words, mask = _text(1, 256, [20])
    z = torch.randn(1, 100)
    names = ["h_net1.fc", "h_net1.upsample1", "h_net1.upsample4", "h_net1", "h_net2.att", "h_net2.residual",
             "h_net2", "upsample", "conv", "h_net3"]
    shapes, hooks = _record_shapes(g, names)
    with torch.no_grad():
        images, atts, mu, logvar = g(z, sentence, words, mask)
    for h in hooks:
        h.remove()
    assert [tuple(i.shape) for i in images] == [(1, 3, 64, 64), (1, 3, 128, 128), (1, 3, 256, 256)]
    assert [tuple(a.shape) for a in atts] == [(1, 20, 64, 64), (1, 20, 128, 128)]
    assert tuple(mu.shape) == tuple(logvar.shape) == (1, 100)
    assert shapes["h_net1.fc"] == (1, 768 * 16)
    assert shapes["h_net1.upsample1"] == (1, 384, 8, 8)
    assert shapes["h_net1.upsample4"] == (1, 48, 64, 64)
    assert shapes["h_net1"] == (1, 48, 64, 64)
    assert shapes["h_net2.att"] == (1, 48, 64, 64)
    assert shapes["h_net2.residual"] == (1, 96, 64, 64)
    assert shapes["h_net2"] == (1, 48, 128, 128)
    assert shapes["upsample"] == (1, 48, 256, 256)  # last call: residual for stage 3
    assert shapes["conv"] == (1, 48, 256, 256)
    assert shapes["h_net3"] == (1, 48, 256, 256)
    for img in images:
        assert img.min() >= -1 and img.max() <= 1


@pytest.mark.parametrize(
    "branch_num,base,ngf,init_ch",
    [(3, 16, 8, 32), (2, 32, 8, 64), (1, 16, 4, 16), (3, 8, 4, 8), (2, 64, 4, 64)],
)
def test_small_setting_shapes(branch_num, base, ngf, init_ch):
    g = G_NET(branch_num=branch_num, ngf=ngf, z_dim=10, c_dim=6, emb_dim=12, r_num=1, base_size=base)
    assert g.h_net1.init_ch == init_ch  # ngf * 2**log2(base/4): C0 always has ngf channels
    assert g.h_net1.n_up == int(math.log2(base // 4))
    sentence, words, mask = _text(2, 12, [5, 3])
    images, atts, mu, logvar = g(torch.randn(2, 10), sentence, words, mask)  # train mode, batch 2
    sizes = [base * 2**i for i in range(branch_num)]
    assert [tuple(i.shape) for i in images] == [(2, 3, s, s) for s in sizes]
    assert [tuple(a.shape) for a in atts] == [(2, 5, s, s) for s in sizes[:-1]]
    assert g.image_sizes == sizes
    assert tuple(mu.shape) == (2, 6)
    has_res = any(k.startswith(("upsample.", "conv.")) for k in g.state_dict())
    assert has_res == (branch_num > 1)


def test_attngan_variant_without_residual_path():
    g = G_NET(branch_num=2, ngf=4, z_dim=5, c_dim=3, emb_dim=6, r_num=1, base_size=8, residual_path=False)
    assert not any(k.startswith(("upsample.", "conv.")) for k in g.state_dict())
    g.eval()
    sentence, words, mask = _text(2, 6, [3, 2])
    eps = torch.randn(2, 3)
    z = torch.randn(2, 5)
    with torch.no_grad():
        images, _, _, _ = g(z, sentence, words, mask, ca_eps=eps)
        c, _, _ = g.ca_net(sentence, eps)
        h2, _ = g.h_net2(g.h_net1(z, c), words, mask)  # AttnGAN: C1 = G1(C0), no residual path
        expected = g.img_net2(h2)
    assert images[1].shape == (2, 3, 16, 16)
    torch.testing.assert_close(images[1], expected)


def test_every_parameter_gets_a_gradient():
    g = G_NET(branch_num=3, ngf=4, z_dim=5, c_dim=3, emb_dim=6, r_num=2, base_size=8)
    sentence, words, mask = _text(3, 6, [4, 2, 3])
    images, atts, mu, logvar = g(torch.randn(3, 5), sentence, words, mask)
    loss = sum(i.square().mean() for i in images) + kl_loss(mu, logvar)
    loss.backward()
    missing = [n for n, p in g.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


# --------------------------------------------------------------------------------------------------
# functional re-implementation of the released forward (independent reference)
# --------------------------------------------------------------------------------------------------
def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                        training=False, eps=1e-5)


def _glu(x):
    n = x.shape[1] // 2
    return x[:, :n] * torch.sigmoid(x[:, n:])


def _up(x, sd, p):
    x = F.interpolate(x, scale_factor=2, mode="nearest")
    return _glu(_bn(F.conv2d(x, sd[p + ".1.weight"], padding=1), sd, p + ".2"))


def _slow_attention(h, words, mask, w_ctx, bug):
    """AttnGAN GlobalAttentionGeneral with explicit loops over rows; bug -> mask.repeat(queryL, 1)."""
    b_sz, c, hh, ww = h.shape
    q_len = hh * ww
    src = torch.einsum("cd,bdt->bct", w_ctx[:, :, 0, 0], words)  # conv_context, (B, idf, T)
    rep = mask.repeat(q_len, 1) if mask is not None else None  # (B*Q, T), literally as released
    ctx = torch.zeros(b_sz, c, q_len)
    att = torch.zeros(b_sz, words.shape[2], q_len)
    flat = h.reshape(b_sz, c, q_len)
    for b in range(b_sz):
        for q in range(q_len):
            scores = flat[b, :, q] @ src[b]  # (T,)
            if mask is not None:
                row_mask = rep[b * q_len + q] if bug else mask[b]
                scores = scores.masked_fill(row_mask, float("-inf"))
            a = torch.softmax(scores, dim=0)
            att[b, :, q] = a
            ctx[b, :, q] = src[b] @ a
    return ctx.view(b_sz, c, hh, ww), att.view(b_sz, -1, hh, ww)


def _reference_forward(sd, cfg, z, sentence, words, mask, eps, bug):
    ngf, c_dim, n_res = cfg["ngf"], cfg["c_dim"], cfg["r_num"]
    x = _glu(F.linear(sentence, sd["ca_net.fc.weight"], sd["ca_net.fc.bias"]))
    mu, logvar = x[:, :c_dim], x[:, c_dim:]
    c = mu + torch.exp(0.5 * logvar) * eps
    h = F.linear(torch.cat([c, z], 1), sd["h_net1.fc.0.weight"])  # c FIRST
    h = _glu(F.batch_norm(h, sd["h_net1.fc.1.running_mean"], sd["h_net1.fc.1.running_var"],
                          sd["h_net1.fc.1.weight"], sd["h_net1.fc.1.bias"], training=False, eps=1e-5))
    h = h.view(z.shape[0], -1, 4, 4)
    i = 1
    while f"h_net1.upsample{i}.1.weight" in sd:
        h = _up(h, sd, f"h_net1.upsample{i}")
        i += 1
    imgs = [torch.tanh(F.conv2d(h, sd["img_net1.img.0.weight"], padding=1))]
    atts = []
    res = h
    for st in range(2, cfg["branch_num"] + 1):
        p = f"h_net{st}"
        ctx, att = _slow_attention(h, words, mask, sd[p + ".att.conv_context.weight"], bug)
        out = torch.cat([h, ctx], 1)
        for r in range(n_res):
            q = f"{p}.residual.{r}.block"
            y = _glu(_bn(F.conv2d(out, sd[q + ".0.weight"], padding=1), sd, q + ".1"))
            y = _bn(F.conv2d(y, sd[q + ".3.weight"], padding=1), sd, q + ".4")
            out = out + y
        out = _up(out, sd, p + ".upsample")
        res = _up(res, sd, "upsample")  # stage 2: up(C0); stage 3: up(stage-2 residual)
        h = F.conv2d(out + res, sd["conv.weight"], padding=1)
        imgs.append(torch.tanh(F.conv2d(h, sd[f"img_net{st}.img.0.weight"], padding=1)))
        atts.append(att)
    return imgs, atts, mu, logvar


@pytest.mark.parametrize("bug", [False, True])
def test_forward_equals_functional_reference(bug):
    torch.manual_seed(0)
    cfg = dict(branch_num=3, ngf=4, z_dim=5, c_dim=3, emb_dim=6, r_num=2, base_size=8)
    g = G_NET(**cfg, released_mask_bug=bug)
    g.apply(init_weights_attngan)
    with torch.no_grad():  # non-trivial running statistics
        for name, buf in g.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn_like(buf) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand_like(buf) + 0.5)
    g.eval()
    sentence, words, mask = _text(3, 6, [4, 1, 2], seed=1)
    z, eps = torch.randn(3, 5), torch.randn(3, 3)
    with torch.no_grad():
        images, atts, mu, logvar = g(z, sentence, words, mask, ca_eps=eps)
        ref = _reference_forward(g.state_dict(), cfg, z, sentence, words, mask, eps, bug)
    for a, b in zip(images, ref[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for a, b in zip(atts, ref[1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mu, ref[2])
    torch.testing.assert_close(logvar, ref[3])


# --------------------------------------------------------------------------------------------------
# attention masking
# --------------------------------------------------------------------------------------------------
def test_padding_gets_exactly_zero_attention():
    att_mod = WordAttention(idf=5, cdf=7)
    sentence, words, mask = _text(3, 7, [6, 2, 4], seed=2)
    h = torch.randn(3, 5, 4, 4)
    _, att = att_mod(h, words, mask)  # (B, T, H, W)
    pad = mask[:, :, None, None].expand_as(att)
    assert torch.all(att[pad] == 0)
    torch.testing.assert_close(att.sum(dim=1), torch.ones(3, 4, 4))
    assert torch.all(att[~pad] > 0)


def test_released_mask_indexing_equals_repeat_loop():
    mask = torch.tensor([[False, False, False, True, True],
                         [False, True, True, True, True],
                         [False, False, False, False, False]])
    q_len = 7
    rep = mask.repeat(q_len, 1)  # the released call, (B*Q, T)
    got = released_repeat_mask(mask, q_len)
    for b in range(3):
        for q in range(q_len):
            assert torch.equal(got[b, q], rep[b * q_len + q])
            assert torch.equal(got[b, q], mask[(b * q_len + q) % 3])
    assert not torch.equal(got, mask[:, None, :].expand(3, q_len, 5))  # differs from the per-sample mask


def test_released_bug_changes_outputs_only_with_unequal_lengths():
    torch.manual_seed(3)
    g = G_NET(branch_num=2, ngf=4, z_dim=5, c_dim=3, emb_dim=6, r_num=1, base_size=8).eval()
    z, eps = torch.randn(3, 5), torch.randn(3, 3)
    sentence, words, mask = _text(3, 6, [5, 2, 3], seed=4)
    with torch.no_grad():
        ok = g(z, sentence, words, mask, ca_eps=eps)
        g.released_mask_bug = True
        assert g.released_mask_bug and g.h_net2.att.released_mask_bug
        bug = g(z, sentence, words, mask, ca_eps=eps)
        assert not torch.allclose(ok[0][1], bug[0][1])
        assert not torch.allclose(ok[1][0], bug[1][0])
        # equal caption lengths: identical results
        sentence2, words2, mask2 = _text(3, 6, [4, 4, 4], seed=5)
        a = g(z, sentence2, words2, mask2, ca_eps=eps)
        g.released_mask_bug = False
        b = g(z, sentence2, words2, mask2, ca_eps=eps)
    torch.testing.assert_close(a[0][1], b[0][1])
    torch.testing.assert_close(a[1][0], b[1][0])


def test_mask_longer_than_words_is_cut():
    g = G_NET(branch_num=2, ngf=4, z_dim=5, c_dim=3, emb_dim=6, r_num=1, base_size=8).eval()
    sentence, words, mask = _text(2, 6, [3, 2])
    long_mask = torch.cat([mask, torch.ones(2, 4, dtype=torch.bool)], 1)
    z, eps = torch.randn(2, 5), torch.randn(2, 3)
    with torch.no_grad():
        a = g(z, sentence, words, mask, ca_eps=eps)[0][1]
        b = g(z, sentence, words, long_mask, ca_eps=eps)[0][1]
    torch.testing.assert_close(a, b)


def test_bad_inputs_raise_clear_errors():
    g = G_NET(branch_num=2, ngf=4, z_dim=5, c_dim=3, emb_dim=6, r_num=1, base_size=8)
    sentence, words, mask = _text(2, 6, [3, 2])
    with pytest.raises(ValueError, match="z must have shape"):
        g(torch.randn(2, 4), sentence, words, mask)
    with pytest.raises(ValueError, match="sentence must have shape"):
        g(torch.randn(2, 5), torch.randn(2, 7), words, mask)
    with pytest.raises(ValueError, match="words must have shape"):
        g(torch.randn(2, 5), sentence, words[:, :5], mask)
    with pytest.raises(ValueError, match="bool"):
        g(torch.randn(2, 5), sentence, words, mask.long())
    with pytest.raises(ValueError, match="at least one non-padding word"):
        g(torch.randn(2, 5), sentence, words, torch.ones_like(mask))
    with pytest.raises(ValueError, match="ca_eps"):
        g(torch.randn(2, 5), sentence, words, mask, ca_eps=torch.randn(2, 4))
    with pytest.raises(ValueError, match="base_size"):
        G_NET(base_size=48)
    with pytest.raises(ValueError, match="branch_num"):
        G_NET(branch_num=0)


# --------------------------------------------------------------------------------------------------
# CA and KL
# --------------------------------------------------------------------------------------------------
def test_ca_net_reparametrisation_and_kl():
    ca = CA_NET(emb_dim=6, c_dim=3)
    s = torch.randn(4, 6)
    eps = torch.randn(4, 3)
    c, mu, logvar = ca(s, eps)
    x = ca.fc(s)
    glu = x[:, :6] * torch.sigmoid(x[:, 6:])
    torch.testing.assert_close(mu, glu[:, :3])
    torch.testing.assert_close(logvar, glu[:, 3:])
    torch.testing.assert_close(c, mu + torch.exp(0.5 * logvar) * eps)


def test_ca_noise_scale():
    torch.manual_seed(0)
    s, eps = torch.randn(4, 6), torch.randn(4, 3)
    half = CA_NET(emb_dim=6, c_dim=3, noise=0.5)
    c, mu, logvar = half(s, eps)
    torch.testing.assert_close(c, mu + 0.5 * torch.exp(0.5 * logvar) * eps)
    det = CA_NET(emb_dim=6, c_dim=3, noise=0.0)
    det.load_state_dict(half.state_dict())
    c0, mu0, _ = det(s, eps)
    torch.testing.assert_close(c0, mu)  # c = mu whatever eps is
    torch.testing.assert_close(det(s, 100 * eps)[0], mu0)
    with pytest.raises(ValueError, match="CA noise"):
        CA_NET(noise=-1.0)
    # through G: with ca_noise 0 the images do not depend on the CA sample
    g = G_NET(branch_num=2, ngf=4, z_dim=5, c_dim=3, emb_dim=6, r_num=1, base_size=8, ca_noise=0.0).eval()
    z, sent, words = torch.randn(2, 5), torch.randn(2, 6), torch.randn(2, 6, 4)
    a = g(z, sent, words, None, torch.randn(2, 3))[0]
    b = g(z, sent, words, None, torch.randn(2, 3))[0]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_kl_closed_form():
    mu = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)], [math.log(0.25), 0.0]])
    # KL(N(m, v) || N(0, 1)) = 0.5 (v + m^2 - 1 - ln v) per element; AttnGAN takes the mean
    per = [0.5 * (v + m * m - 1 - math.log(v)) for m, v in [(0, 1), (1, 4), (2, 0.25), (-1, 1)]]
    expected = sum(per) / 4
    assert abs(float(kl_loss(mu, logvar)) - expected) < 1e-6
    assert abs(float(CA_NET.kl_loss(mu, logvar)) - expected) < 1e-6
    assert float(kl_loss(torch.zeros(3, 5), torch.zeros(3, 5))) == 0.0


# --------------------------------------------------------------------------------------------------
# truncated noise
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["inverse_cdf", "resample"])
@pytest.mark.parametrize("t", [0.5, 1.0, 2.0])
def test_truncated_noise_bounds_and_moments(method, t):
    z = truncated_noise(400, 100, t, torch.Generator().manual_seed(7), method=method)
    assert z.shape == (400, 100) and z.dtype == torch.float32
    assert float(z.abs().max()) <= t
    phi = math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(t / math.sqrt(2))
    var = 1 - 2 * t * phi / mass  # variance of N(0,1) truncated to [-t, t]
    n = z.numel()
    assert abs(float(z.mean())) < 5 * math.sqrt(var / n)
    assert abs(float(z.var()) - var) < 0.02 * var + 5 * math.sqrt(2 / n) * var
    ks = stats.kstest(z.flatten().double().numpy()[:20000], stats.truncnorm(-t, t).cdf)
    assert ks.pvalue > 1e-3


def test_truncated_noise_misc():
    g1 = truncated_noise(3, 4, 0.7, torch.Generator().manual_seed(1))
    g2 = truncated_noise(3, 4, 0.7, torch.Generator().manual_seed(1))
    assert torch.equal(g1, g2)
    plain = truncated_noise(2000, 50, None, torch.Generator().manual_seed(2))
    assert float(plain.abs().max()) > 3.0  # untruncated
    tiny = truncated_noise(100, 10, 0.01, torch.Generator().manual_seed(3))
    assert float(tiny.abs().max()) <= 0.01
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="truncation"):
            truncated_noise(2, 3, bad)
    with pytest.raises(ValueError, match="method"):
        truncated_noise(2, 3, 1.0, method="nope")


def test_ema_warmup_forgets_the_initialisation():
    from cpgan.stages.gan import ema_decay_at

    assert ema_decay_at(0.999, 0) == 0.1
    assert ema_decay_at(0.999, 90) == 0.91
    assert ema_decay_at(0.999, 10**6) == 0.999
    # weight left on the initial weights after 200 steps: prod of decays, far below 0.999**200 = 0.82
    keep = 1.0
    for t in range(200):
        keep *= ema_decay_at(0.999, t)
    assert keep < 1e-3


def test_scale_grad_closed_form():
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4)
    for s in (0.0, 0.25, 1.0):
        y = scale_grad(x, s)
        torch.testing.assert_close(y, x)  # the forward pass is the identity
        if s == 0.0:
            assert not y.requires_grad
            continue
        (gx,) = torch.autograd.grad((y * w).sum(), x)
        torch.testing.assert_close(gx, s * w)


def test_stage_grad_scales_what_the_last_stage_sends_back():
    """Two stages: every path from the last image to the first stage's parameters crosses one stage boundary,
    so with stage_grad s their gradient is s times the release's (and none at 0); the images are unchanged."""
    torch.manual_seed(0)
    ref = G_NET(branch_num=2, ngf=4, z_dim=5, c_dim=3, emb_dim=6, r_num=1, base_size=8).eval()
    z, sent, words, eps = torch.randn(2, 5), torch.randn(2, 6), torch.randn(2, 6, 4), torch.randn(2, 3)
    w = torch.randn(2, 3, 16, 16)

    def grads(g):
        imgs = g(z, sent, words, None, eps)[0]
        first = [p for n, p in g.named_parameters() if n.startswith(("h_net1.", "ca_net."))]
        later = [p for n, p in g.named_parameters() if n.startswith(("h_net2.", "img_net2.", "conv."))]
        gs = torch.autograd.grad((imgs[-1] * w).sum(), first + later, allow_unused=True)
        return imgs, gs[:len(first)], gs[len(first):]

    imgs1, first1, later1 = grads(ref)
    for s in (0.0, 0.5):
        g = G_NET(branch_num=2, ngf=4, z_dim=5, c_dim=3, emb_dim=6, r_num=1, base_size=8, stage_grad=s).eval()
        g.load_state_dict(ref.state_dict())
        imgs, first, later = grads(g)
        for a, b in zip(imgs, imgs1):
            torch.testing.assert_close(a, b)
        for a, b in zip(later, later1):  # the last stage's own parameters: unchanged
            torch.testing.assert_close(a, b)
        for a, b in zip(first, first1):
            if s == 0.0:
                assert a is None
            else:
                torch.testing.assert_close(a, s * b)
    with pytest.raises(ValueError, match="stage_grad"):
        G_NET(branch_num=2, ngf=4, base_size=8, stage_grad=1.5)
