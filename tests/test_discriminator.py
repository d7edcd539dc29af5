"""Tests of the per-stage discriminators (cpgan.models.discriminator) and the hinge losses (cpgan.gan_losses).

References: AttnGAN's D_NET64/128/256 layer shapes (hard-coded), slow per-patch loops for the FGCD head,
a functional re-computation of the global head, hand-computed hinge values.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cpgan.gan_losses import D_FAKE_WEIGHT, D_REAL_WEIGHT, D_WRONG_WEIGHT, d_hinge_loss, g_hinge_loss
from cpgan.models.discriminator import D_NET, DFeatures
from cpgan.models.generator import init_weights_attngan


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _text(batch: int, emb: int, lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    words = torch.randn(batch, emb, t, generator=g)
    mask = torch.arange(t)[None, :] >= torch.tensor(lengths)[:, None]
    words = words.masked_fill(mask[:, None, :], 0.0)
    return torch.randn(batch, emb, generator=g), words, mask


def _conv_shapes(d: D_NET) -> list[tuple]:
    return [tuple(m.weight.shape) for blk in list(d.down) + list(d.squeeze) for m in blk if isinstance(m, torch.nn.Conv2d)]


# --------------------------------------------------------------------------------------------------
# structure / shapes
# --------------------------------------------------------------------------------------------------
# AttnGAN D_NET64/128/256 image encoders at DF_DIM 96 (encode_image_by_16times + downBlock + Block3x3_leakRelu)
ATTNGAN_ENCODER_96 = {
    64: [(96, 3, 4, 4), (192, 96, 4, 4), (384, 192, 4, 4), (768, 384, 4, 4)],
    128: [(96, 3, 4, 4), (192, 96, 4, 4), (384, 192, 4, 4), (768, 384, 4, 4), (1536, 768, 4, 4),
          (768, 1536, 3, 3)],
    256: [(96, 3, 4, 4), (192, 96, 4, 4), (384, 192, 4, 4), (768, 384, 4, 4), (1536, 768, 4, 4),
          (3072, 1536, 4, 4), (1536, 3072, 3, 3), (768, 1536, 3, 3)],
}


@pytest.mark.parametrize("size", [64, 128, 256])
@pytest.mark.parametrize("head", ["fgcd", "global"])
def test_paper_setting_structure_and_shapes(size, head):
    with torch.device("meta"):  # shape-only: D_NET256 at DF_DIM 96 has ~155M parameters
        d = D_NET(size, ndf=96, emb_dim=256, cond_head=head)
        images = torch.empty(2, 3, size, size)
        sentence, words = torch.empty(2, 256), torch.empty(2, 256, 20)
    assert _conv_shapes(d) == ATTNGAN_ENCODER_96[size]
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for blk in list(d.down) + list(d.squeeze) for m in blk)
    assert n_bn == len(ATTNGAN_ENCODER_96[size]) - 1  # no BN after the first conv
    feats = d(images)
    assert tuple(feats.code.shape) == (2, 768, 4, 4)
    assert tuple(d.uncond(feats).shape) == (2,)
    assert tuple(d.cond(feats, sentence, words).shape) == (2,)  # (mask checks need values: not on meta)
    assert tuple(d.uncond_fc.weight.shape) == (1, 768 * 16)


@pytest.mark.parametrize(
    "size,convs",
    [
        (16, [(8, 3, 4, 4), (16, 8, 4, 4), (64, 16, 3, 3)]),
        (32, [(8, 3, 4, 4), (16, 8, 4, 4), (32, 16, 4, 4), (64, 32, 3, 3)]),
        (64, [(8, 3, 4, 4), (16, 8, 4, 4), (32, 16, 4, 4), (64, 32, 4, 4)]),
    ],
)
def test_small_setting_shapes(size, convs):
    d = D_NET(size, ndf=8, emb_dim=12)
    assert _conv_shapes(d) == convs
    sizes = []
    hooks = [blk.register_forward_hook(lambda _m, _i, o: sizes.append(tuple(o.shape))) for blk in d.down]
    sentence, words, mask = _text(3, 12, [4, 2, 3])
    feats = d(torch.randn(3, 3, size, size))
    for h in hooks:
        h.remove()
    n = int(math.log2(size // 4))
    assert sizes == [(3, 8 * 2**j, size // 2 ** (j + 1), size // 2 ** (j + 1)) for j in range(n)]
    assert tuple(feats.code.shape) == (3, 64, 4, 4)
    assert tuple(d.uncond(feats).shape) == (3,)
    score, pmap = d.cond(feats, sentence, words, mask, return_map=True)
    assert tuple(score.shape) == (3,) and tuple(pmap.shape) == (3, 4, 4)
    dg = D_NET(size, ndf=8, emb_dim=12, cond_head="global")
    fg = dg(torch.randn(3, 3, size, size))
    assert fg.patches is None
    assert tuple(dg.cond(fg, sentence).shape) == (3,)


@pytest.mark.parametrize("size,n,patch_shape", [(64, 8, (2, 32, 8, 8)), (64, 16, (2, 16, 16, 16)),
                                                 (32, 8, (2, 16, 8, 8)), (32, 2, (2, 64, 4, 4)),
                                                 (32, 6, (2, 16, 8, 8))])
def test_fgcd_patch_source(size, n, patch_shape):
    d = D_NET(size, ndf=8, emb_dim=12, fgcd_grid=n)
    sentence, words, mask = _text(2, 12, [3, 5])
    feats = d(torch.randn(2, 3, size, size))
    assert tuple(feats.patches.shape) == patch_shape  # smallest encoder map with resolution >= N
    _, pmap = d.cond(feats, sentence, words, mask, return_map=True)
    assert tuple(pmap.shape) == (2, n, n)


def test_uncond_fc_equals_attngan_4x4_conv():
    d = D_NET(16, ndf=4, emb_dim=6).eval()
    feats = d(torch.randn(3, 3, 16, 16))
    w = d.uncond_fc.weight.view(1, 32, 4, 4)
    expected = F.conv2d(feats.code, w, d.uncond_fc.bias, stride=4).view(-1)
    torch.testing.assert_close(d.uncond(feats), expected)


def test_global_head_functional():
    d = D_NET(16, ndf=4, emb_dim=6, cond_head="global").eval()
    d.apply(init_weights_attngan)
    feats = d(torch.randn(2, 3, 16, 16))
    s = torch.randn(2, 6)
    head = d.cond_head
    conv, bn = head.joint_conv[0], head.joint_conv[1]
    x = torch.cat([feats.code, s[:, :, None, None].repeat(1, 1, 4, 4)], 1)
    y = F.conv2d(x, conv.weight, padding=1)
    y = (y - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var[None, :, None, None] + bn.eps)
    y = F.leaky_relu(y * bn.weight[None, :, None, None] + bn.bias[None, :, None, None], 0.2)
    logit = (y * head.out_logits.weight[0]).sum(dim=(1, 2, 3)) + head.out_logits.bias[0]
    torch.testing.assert_close(d.cond(feats, s), logit, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# FGCD
# --------------------------------------------------------------------------------------------------
def _slow_fgcd(head, v, sentence, words, lengths):
    """Per-patch loop; only the real words of each caption enter (no masking needed)."""
    b_sz, _, r, _ = v.shape
    n = head.grid
    k = r // n
    w_proj = head.proj.weight[:, :, 0, 0]
    c1, c2 = head.joint[0], head.joint[2]
    scores = torch.zeros(b_sz)
    pmap = torch.zeros(b_sz, n, n)
    for b in range(b_sz):
        w = words[b, :, : lengths[b]]  # (d, L)
        for i in range(n):
            for j in range(n):
                vij = v[b, :, i * k:(i + 1) * k, j * k:(j + 1) * k].mean(dim=(1, 2))
                a = torch.softmax((w_proj @ vij) @ w, dim=0)
                assert abs(float(a.sum()) - 1.0) < 1e-5
                p = w @ a
                x = torch.cat([vij, p, sentence[b]])
                h = F.leaky_relu(c1.weight[:, :, 0, 0] @ x + c1.bias, 0.2)
                pmap[b, i, j] = (c2.weight[0, :, 0, 0] @ h + c2.bias[0])
        scores[b] = pmap[b].mean()
    return scores, pmap


@pytest.mark.parametrize("size,n", [(16, 4), (16, 2), (32, 8), (32, 1)])
def test_fgcd_equals_slow_patch_loop(size, n):
    torch.manual_seed(0)
    d = D_NET(size, ndf=4, emb_dim=6, fgcd_grid=n, fgcd_hidden=5)
    lengths = [5, 2, 3]
    sentence, words, mask = _text(3, 6, lengths, seed=1)
    feats = d(torch.randn(3, 3, size, size))
    score, pmap = d.cond(feats, sentence, words, mask, return_map=True)
    with torch.no_grad():
        ref_score, ref_map = _slow_fgcd(d.cond_head, feats.patches, sentence, words, lengths)
    torch.testing.assert_close(pmap, ref_map, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(score, ref_score, rtol=1e-4, atol=1e-5)


def test_fgcd_attention_normalised_and_ignores_padding():
    torch.manual_seed(1)
    d = D_NET(16, ndf=4, emb_dim=6, fgcd_grid=4).eval()
    sentence, words, mask = _text(3, 6, [6, 2, 4], seed=2)
    feats = d(torch.randn(3, 3, 16, 16))
    attn = d.cond_head.attention(feats.patches, words, mask)  # (B, P, T)
    assert tuple(attn.shape) == (3, 16, 6)
    torch.testing.assert_close(attn.sum(dim=2), torch.ones(3, 16))
    assert torch.all(attn.masked_select(mask[:, None, :].expand_as(attn)) == 0)
    base = d.cond(feats, sentence, words, mask)
    noisy = words + 50.0 * torch.randn_like(words) * mask[:, None, :]  # change only padded steps
    torch.testing.assert_close(d.cond(feats, sentence, noisy, mask), base, rtol=0, atol=0)
    # changing a real word does change the score
    real = words.clone()
    real[0, :, 0] += 3.0
    assert not torch.allclose(d.cond(feats, sentence, real, mask), base)


def test_every_parameter_gets_a_gradient():
    for head, n in (("fgcd", 8), ("fgcd", 4), ("global", 4)):
        d = D_NET(32, ndf=4, emb_dim=6, cond_head=head, fgcd_grid=n)
        sentence, words, mask = _text(2, 6, [3, 2])
        feats = d(torch.randn(2, 3, 32, 32))
        loss = d.uncond(feats).sum() + d.cond(feats, sentence, words, mask).sum()
        loss.backward()
        missing = [k for k, p in d.named_parameters() if p.grad is None]
        assert missing == [], (head, n)


def test_spectral_norm_and_no_batch_norm():
    torch.manual_seed(2)
    d = D_NET(16, ndf=4, emb_dim=6, spectral_norm=True, batch_norm=False)  # default (non-orthogonal) init
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules())
    x = torch.randn(2, 3, 16, 16)
    sentence, words, mask = _text(2, 6, [3, 2])
    for _ in range(30):  # power iteration runs once per training forward of each layer
        f = d(x)
        d.uncond(f)
        d.cond(f, sentence, words, mask)
    layers = [m for m in d.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 2 + 1 + 1 + 3  # down convs, squeeze, uncond fc, fgcd proj + 2 joint convs
    for m in layers:
        assert hasattr(m, "parametrizations")
        d.eval()
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert abs(float(sigma) - 1.0) < 0.05, float(sigma)
        d.train()
    # AttnGAN init through the parametrisation: the raw weight is orthogonal, normalised sigma is 1
    d2 = D_NET(16, ndf=4, emb_dim=6, spectral_norm=True)
    d2.apply(init_weights_attngan)
    d2.eval()
    for m in d2.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            raw = m.parametrizations.weight.original.detach().flatten(1)
            gram = raw @ raw.T if raw.shape[0] <= raw.shape[1] else raw.T @ raw
            torch.testing.assert_close(gram, torch.eye(gram.shape[0]), atol=1e-4, rtol=0)
            sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
            assert abs(float(sigma) - 1.0) < 1e-3


def test_bad_inputs_raise_clear_errors():
    d = D_NET(16, ndf=4, emb_dim=6)
    sentence, words, mask = _text(2, 6, [3, 2])
    with pytest.raises(ValueError, match="images must have shape"):
        d(torch.randn(2, 3, 32, 32))
    feats = d(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="needs word features"):
        d.cond(feats, sentence)
    with pytest.raises(ValueError, match="sentence must have shape"):
        d.cond(feats, torch.randn(2, 5), words, mask)
    with pytest.raises(ValueError, match="non-padding"):
        d.cond(feats, sentence, words, torch.ones_like(mask))
    with pytest.raises(ValueError, match="image_size"):
        D_NET(48)
    with pytest.raises(ValueError, match="fgcd_grid"):
        D_NET(16, fgcd_grid=9)
    with pytest.raises(ValueError, match="cond_head"):
        D_NET(16, cond_head="patch")
    no_uc = D_NET(16, ndf=4, emb_dim=6, uncond=False)
    with pytest.raises(ValueError, match="uncond=False"):
        no_uc.uncond(no_uc(torch.randn(2, 3, 16, 16)))
    with pytest.raises(ValueError, match="no patch grid"):
        d.cond(DFeatures(feats.code, None), sentence, words, mask)


# --------------------------------------------------------------------------------------------------
# hinge losses
# --------------------------------------------------------------------------------------------------
def test_d_hinge_hand_computed():
    t = torch.tensor
    out = d_hinge_loss(t([2.0, 0.5]), t([-2.0, 0.0]), t([0.0, -1.0]), t([1.0, -0.5]), t([3.0]))
    # [1-x]+ : [0, .5] -> .25 ; [1+x]+ : [0, 1] -> .5 ; [1-x]+ : [1, 2] -> 1.5 ; [1+x]+ : [2, .5] -> 1.25 ; [4] -> 4
    assert float(out["real_uncond"]) == pytest.approx(0.25)
    assert float(out["fake_uncond"]) == pytest.approx(0.5)
    assert float(out["real_cond"]) == pytest.approx(1.5)
    assert float(out["fake_cond"]) == pytest.approx(1.25)
    assert float(out["wrong_cond"]) == pytest.approx(4.0)
    expected = 0.5 * 0.25 + 0.5 / 3 + 0.5 * 1.5 + 1.25 / 3 + 4.0 / 3
    assert float(out["loss"]) == pytest.approx(expected)
    assert (D_REAL_WEIGHT, D_FAKE_WEIGHT, D_WRONG_WEIGHT) == pytest.approx((0.5, 1 / 3, 1 / 3))
    custom = d_hinge_loss(t([2.0, 0.5]), t([-2.0, 0.0]), t([0.0, -1.0]), t([1.0, -0.5]), t([3.0]),
                          real_weight=1.0, fake_weight=1.0, wrong_weight=0.0)
    assert float(custom["loss"]) == pytest.approx(0.25 + 0.5 + 1.5 + 1.25)
    no_uc = d_hinge_loss(None, None, t([0.0, -1.0]), t([1.0, -0.5]), None)
    assert float(no_uc["loss"]) == pytest.approx(0.5 * 1.5 + 1.25 / 3)
    assert "real_uncond" not in no_uc and "wrong_cond" not in no_uc


def test_g_hinge_hand_computed_and_gradients():
    fake_uc = torch.tensor([-2.0, 0.0], requires_grad=True)
    fake_c = torch.tensor([1.0, -0.5], requires_grad=True)
    out = g_hinge_loss(fake_uc, fake_c)
    assert float(out["loss"].detach()) == pytest.approx(-0.5 * -1.0 - 0.5 * 0.25)
    assert float(out["fake_uncond"].detach()) == pytest.approx(1.0)
    assert float(out["fake_cond"].detach()) == pytest.approx(-0.25)
    out["loss"].backward()
    torch.testing.assert_close(fake_uc.grad, torch.tensor([-0.25, -0.25]))
    torch.testing.assert_close(fake_c.grad, torch.tensor([-0.25, -0.25]))
    assert float(g_hinge_loss(None, torch.tensor([2.0]))["loss"]) == pytest.approx(-1.0)


def test_hinge_bad_inputs():
    t = torch.tensor
    with pytest.raises(ValueError, match="both real_uc and fake_uc"):
        d_hinge_loss(t([1.0]), None, t([1.0]), t([1.0]), None)
    with pytest.raises(ValueError, match="empty"):
        d_hinge_loss(None, None, t([]), t([1.0]), None)
    with pytest.raises(ValueError, match="required"):
        g_hinge_loss(None, None)


def test_config_switch_removes_batch_norm_from_every_discriminator():
    from cpgan.config import load_config
    from cpgan.stages.gan import build_discriminators

    for flag, expect in (("true", True), ("false", False)):
        Ds = build_discriminators(load_config("shapes-quick", [f"model.d_batch_norm={flag}"]))
        has_bn = [any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules()) for d in Ds]
        assert has_bn == [expect] * len(Ds)
