"""GAN stage options: DiffAugment transforms against per-pixel loop references, the amp switch."""
import pytest
import torch

from cpgan.diffaug import NOISE_STD, ZOOM_MIN, augment, cutout, lowpass, parse_policy, translate, zoom


def _translate_loop(x, shifts):
    B, C, H, W = x.shape
    out = torch.zeros_like(x)
    for k in range(B):
        dy, dx = int(shifts[k, 0]), int(shifts[k, 1])
        for i in range(H):
            for j in range(W):
                si, sj = i - dy, j - dx
                if 0 <= si < H and 0 <= sj < W:
                    out[k, :, i, j] = x[k, :, si, sj]
    return out


def _cutout_loop(x, centres, side):
    out = x.clone()
    B, _, H, W = x.shape
    for k in range(B):
        top, left = int(centres[k, 0]) - side // 2, int(centres[k, 1]) - side // 2
        for i in range(max(top, 0), min(top + side, H)):
            for j in range(max(left, 0), min(left + side, W)):
                out[k, :, i, j] = 0
    return out


def test_translate_matches_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 8, 6, generator=g)
    shifts = torch.tensor([[0, 0], [1, -2], [-3, 2], [7, 0], [0, -6]])
    assert torch.equal(translate(x, shifts), _translate_loop(x, shifts))


def test_cutout_matches_loop():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g)
    centres = torch.tensor([[0, 0], [4, 4], [7, 2], [3, 7]])
    assert torch.equal(cutout(x, centres, 4), _cutout_loop(x, centres, 4))


def _lowpass_loop(x):
    """2x2 block means, then bilinear interpolation with half-pixel centres and edge clamping, by hand."""
    B, C, H, W = x.shape
    m = [[[[float(x[b, c, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean()) for j in range(W // 2)] for i in range(H // 2)]
          for c in range(C)] for b in range(B)]
    out = torch.zeros_like(x)

    def coord(o, n):  # output pixel o of 2n -> source position, clamped to [0, n - 1]
        src = min(max((o + 0.5) / 2 - 0.5, 0.0), n - 1)
        lo = int(src)
        return lo, min(lo + 1, n - 1), src - lo

    for b in range(B):
        for c in range(C):
            for i in range(H):
                i0, i1, fy = coord(i, H // 2)
                for j in range(W):
                    j0, j1, fx = coord(j, W // 2)
                    g = m[b][c]
                    out[b, c, i, j] = ((1 - fy) * ((1 - fx) * g[i0][j0] + fx * g[i0][j1])
                                       + fy * ((1 - fx) * g[i1][j0] + fx * g[i1][j1]))
    return out


def test_lowpass_matches_loop_and_removes_the_finest_pattern():
    x = torch.randn(2, 3, 8, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(lowpass(x), _lowpass_loop(x), rtol=1e-12, atol=1e-12)
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1.0  # +-1 checkerboard
    assert torch.allclose(lowpass(checker.expand(1, 3, 8, 8)), torch.zeros(1, 3, 8, 8), atol=1e-7)
    assert torch.equal(augment(x, parse_policy("lowpass")), lowpass(x))
    with pytest.raises(ValueError, match="even image size"):
        lowpass(torch.zeros(1, 3, 7, 8))


def _zoom_loop(x, sides, corners):
    """Bilinear sampling by hand at y = y0 + (i + 1/2) h / H - 1/2 (and x alike), clamped to the image."""
    B, C, H, W = x.shape
    out = torch.zeros_like(x)

    def coord(o, n, start, side):
        src = min(max(start + (o + 0.5) * side / n - 0.5, 0.0), n - 1)
        lo = min(int(src), n - 1)
        return lo, min(lo + 1, n - 1), src - lo

    for b in range(B):
        h, w = float(sides[b, 0]), float(sides[b, 1])
        y0, x0 = float(corners[b, 0]), float(corners[b, 1])
        for i in range(H):
            i0, i1, fy = coord(i, H, y0, h)
            for j in range(W):
                j0, j1, fx = coord(j, W, x0, w)
                g = x[b]
                out[b, :, i, j] = ((1 - fy) * ((1 - fx) * g[:, i0, j0] + fx * g[:, i0, j1])
                                   + fy * ((1 - fx) * g[:, i1, j0] + fx * g[:, i1, j1]))
    return out


def test_zoom_matches_loop():
    x = torch.randn(4, 3, 8, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sides = torch.tensor([[8.0, 6.0], [6.0, 4.5], [4.0, 3.0], [7.2, 5.1]], dtype=torch.float64)
    corners = torch.tensor([[0.0, 0.0], [2.0, 1.5], [1.0, 0.0], [0.3, 0.9]], dtype=torch.float64)
    out = zoom(x, sides, corners)
    torch.testing.assert_close(out, _zoom_loop(x, sides, corners), rtol=1e-10, atol=1e-10)
    assert torch.allclose(out[0], x[0], atol=1e-12)  # the whole image: identity
    # an integer half-size crop resized back equals F.interpolate of the crop (the same half-pixel convention)
    crop = x[2:3, :, 1:5, 0:3]
    ref = torch.nn.functional.interpolate(crop, size=(8, 6), mode="bilinear", align_corners=False)
    interior = (slice(None), slice(None), slice(1, 7), slice(1, 5))  # the edges differ: clamped to crop vs image
    torch.testing.assert_close(out[2:3][interior], ref[interior], rtol=1e-10, atol=1e-10)


def test_zoom_and_noise_policies_draw_their_parameters():
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    # noise: x + std * N(0, 1), the normal draw being the generator's next one
    y = augment(x, parse_policy("noise:0.3"), torch.Generator().manual_seed(6))
    expected = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).double()
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-7)
    y = augment(x, parse_policy("noise"), torch.Generator().manual_seed(6))
    torch.testing.assert_close(y, x + NOISE_STD * (expected - x) / 0.3, rtol=0, atol=1e-7)
    # zoom: the crop side f * 16 with f ~ U[ZOOM_MIN, 1] drawn first, then the corner inside the image
    g = torch.Generator().manual_seed(7)
    f = ZOOM_MIN + (1 - ZOOM_MIN) * torch.rand(64, generator=g)
    corner = torch.rand(64, 2, generator=g) * (16 - 16 * f[:, None])
    y = augment(x, parse_policy("zoom"), torch.Generator().manual_seed(7))
    sides = (16 * f[:, None]).expand(64, 2).double()
    torch.testing.assert_close(y[:3], _zoom_loop(x[:3], sides[:3], corner[:3].double()), rtol=1e-6, atol=1e-6)
    assert float(f.min()) >= ZOOM_MIN and float((corner + 16 * f[:, None]).max()) <= 16
    for bad in ("noise:x", "noise:-1", "zoom:2", "translation:1"):
        with pytest.raises(ValueError, match="only noise takes a parameter"):
            parse_policy(bad)


def test_translation_then_noise_as_in_the_preset():
    """``shapes-quick``'s TISCL views (``translation,noise:0.1``): the shift drawn first, translated (zero padded),
    then noise of std 0.1 from the generator's next normal draws, added to the shifted image (padding included)."""
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    y = augment(x, parse_policy("translation,noise:0.1"), torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    shifts = torch.randint(-2, 3, (5, 2), generator=g)  # |shift| <= 16 // 8
    shifted = _translate_loop(x, shifts)
    torch.testing.assert_close(y, shifted + 0.1 * torch.randn(x.shape, generator=g).double(), rtol=0, atol=1e-7)
    assert float((y - shifted).std()) == pytest.approx(0.1, rel=0.1)  # the noise the output carries


def test_augment_is_differentiable_and_reproducible():
    x = torch.randn(3, 3, 16, 16, requires_grad=True)
    y1 = augment(x, parse_policy("translation,cutout"), torch.Generator().manual_seed(5))
    y2 = augment(x, parse_policy("translation,cutout"), torch.Generator().manual_seed(5))
    assert torch.equal(y1, y2)
    y1.sum().backward()
    # every gradient entry is 0 or 1: each output pixel copies at most one input pixel, or is zero
    assert set(x.grad.unique().tolist()) <= {0.0, 1.0}
    assert augment(x, (), None) is x


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown augmentation colour"):
        parse_policy("translation, colour")


def test_amp_switch_is_validated_and_resolved():
    from cpgan.stages.gan import native_bf16, resolve_amp

    cpu = torch.device("cpu")
    assert resolve_amp("", cpu) is False and resolve_amp("bf16", cpu) is True
    assert resolve_amp("auto", cpu) is native_bf16(cpu)
    with pytest.raises(ValueError, match="gan.amp"):
        resolve_amp("fp16", cpu)


def test_tiscl_warmup_ramps_linearly():
    from cpgan.stages.gan import tiscl_weight

    assert [tiscl_weight(10.0, 4, t) for t in range(6)] == [0.0, 2.5, 5.0, 7.5, 10.0, 10.0]
    assert tiscl_weight(10.0, 0, 0) == 10.0


def test_tiscl_anneal_falls_linearly_then_holds():
    from cpgan.stages.gan import parse_anneal, tiscl_weight

    a = parse_anneal("2:6:2")
    assert a == (2, 6, 2.0) and parse_anneal("") is None
    # hand-computed: 10 until step 2, then 10 - 8 * (t - 2) / 4, then 2
    assert [tiscl_weight(10.0, 0, t, a) for t in range(9)] == [10.0, 10.0, 10.0, 8.0, 6.0, 4.0, 2.0, 2.0, 2.0]
    # after a warm-up 0 -> 10 over 4 steps, the anneal starts from the warmed-up value
    assert [tiscl_weight(10.0, 4, t, parse_anneal("4:5:0")) for t in range(7)] == [0.0, 2.5, 5.0, 7.5, 10.0, 0.0, 0.0]
    assert tiscl_weight(10.0, 0, 7, parse_anneal("3:3:1.5")) == 1.5
    for bad in ("1:2", "a:b:c", "5:2:1", "1:2:-1"):
        with pytest.raises(ValueError, match="gan.tiscl_anneal"):
            parse_anneal(bad)
