"""Tests for cpgan.interop.inception: offline building, both key layouts, the FID block variants.

The weights are random (nothing is downloaded); the files are written by the tests. To make the
comparisons meaningful the random network is re-initialised so activations neither vanish nor explode
(He-normal convolutions, randomised batch-norm statistics), and every check compares against an
independent path: torchvision's own ``Inception3.forward`` for torchvision semantics, and a reference
written here (pool branch recomputed as sum/count and as an unfold max) for the FID semantics.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.models.inception import Inception3

from cpgan.interop.inception import (
    FIDInceptionA,
    FIDInceptionC,
    FIDInceptionE1,
    FIDInceptionE2,
    InceptionFeatures,
    build_inception,
)



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Keep CPU use modest (shared machine); restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

_FID_NAMES = {
    "Mixed_5b": "avg",
    "Mixed_5c": "avg",
    "Mixed_5d": "avg",
    "Mixed_6b": "avg",
    "Mixed_6c": "avg",
    "Mixed_6d": "avg",
    "Mixed_6e": "avg",
    "Mixed_7b": "avg",
    "Mixed_7c": "max",
}

_WRAPPER = {  # pytorch-fid InceptionV3 wrapper: torchvision name -> blocks.<i>.<j>
    "Conv2d_1a_3x3": "blocks.0.0",
    "Conv2d_2a_3x3": "blocks.0.1",
    "Conv2d_2b_3x3": "blocks.0.2",
    "Conv2d_3b_1x1": "blocks.1.0",
    "Conv2d_4a_3x3": "blocks.1.1",
    "Mixed_5b": "blocks.2.0",
    "Mixed_5c": "blocks.2.1",
    "Mixed_5d": "blocks.2.2",
    "Mixed_6a": "blocks.2.3",
    "Mixed_6b": "blocks.2.4",
    "Mixed_6c": "blocks.2.5",
    "Mixed_6d": "blocks.2.6",
    "Mixed_6e": "blocks.2.7",
    "Mixed_7a": "blocks.3.0",
    "Mixed_7b": "blocks.3.1",
    "Mixed_7c": "blocks.3.2",
}


def _lively_init(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.data = torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = 0.5 + torch.rand(c, generator=g)
            m.bias.data = 0.1 * torch.randn(c, generator=g)
            m.running_mean.data = 0.1 * torch.randn(c, generator=g)
            m.running_var.data = 0.5 + torch.rand(c, generator=g)
        elif isinstance(m, torch.nn.Linear):
            m.weight.data = torch.randn(m.weight.shape, generator=g) * 0.05
            m.bias.data = torch.randn(m.bias.shape, generator=g)


@pytest.fixture(scope="module")
def tv_state() -> dict[str, torch.Tensor]:
    """A torchvision-layout ImageNet-style state dict (1000 classes, with AuxLogits)."""
    model = Inception3(num_classes=1000, aux_logits=True, transform_input=False, init_weights=False)
    _lively_init(model, 0)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def pt_state(tv_state) -> dict[str, torch.Tensor]:
    """The pt_inception-2015-12-05 layout: no AuxLogits, 1008-way fc."""
    g = torch.Generator().manual_seed(1)
    sd = {k: v for k, v in tv_state.items() if not k.startswith("AuxLogits.")}
    sd["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.05
    sd["fc.bias"] = torch.randn(1008, generator=g)
    return sd


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 107, 107, generator=torch.Generator().manual_seed(2)) * 2 - 1


def _reference_tv(state: dict, num_classes: int, aux: bool) -> Inception3:
    ref = Inception3(num_classes=num_classes, aux_logits=aux, transform_input=False, init_weights=False)
    ref.load_state_dict(state)
    return ref.eval()


def _sum_count_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3/1 average over the valid pixels only, as window sum / window count."""
    ones = torch.ones_like(x[:, :1])
    s = F.conv2d(F.pad(x, (1, 1, 1, 1)), torch.ones(x.shape[1], 1, 3, 3), groups=x.shape[1])
    c = F.conv2d(F.pad(ones, (1, 1, 1, 1)), torch.ones(1, 1, 3, 3))
    return s / c


def _unfold_max_pool(x: torch.Tensor) -> torch.Tensor:
    b, ch, h, w = x.shape
    xp = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    cols = xp.unfold(2, 3, 1).unfold(3, 3, 1)  # (b, ch, h, w, 3, 3)
    return cols.reshape(b, ch, h, w, 9).max(dim=-1).values


def _reference_fid_pool(tv: Inception3, x: torch.Tensor) -> torch.Tensor:
    """Pool features with TF/FID semantics, built from torchvision blocks and reference pools."""

    def block(name, x):
        blk = getattr(tv, name)
        if name not in _FID_NAMES:
            return blk(x)
        branches = blk._forward(x)[:-1]  # the non-pool branches are computed identically
        pooled = _sum_count_avg_pool(x) if _FID_NAMES[name] == "avg" else _unfold_max_pool(x)
        return torch.cat(branches + [blk.branch_pool(pooled)], 1)

    x = tv.maxpool1(tv.Conv2d_2b_3x3(tv.Conv2d_2a_3x3(tv.Conv2d_1a_3x3(x))))
    x = tv.maxpool2(tv.Conv2d_4a_3x3(tv.Conv2d_3b_1x1(x)))
    for name in ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                 "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]:
        x = block(name, x)
    return torch.flatten(tv.avgpool(x), 1)


def test_missing_weights_fail_with_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        build_inception(None)
    msg = str(e.value)
    assert "--inception-weights" in msg and "pt_inception-2015-12-05-6726825d.pth" in msg
    assert "inception_v3_google-" in msg and "\n" not in msg
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        build_inception(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        build_inception(bad)
    wrong = tmp_path / "wrong.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(5, 3, 3, 3)}, wrong)
    with pytest.raises(ValueError, match="does not fit Inception-v3"):
        build_inception(wrong)
    with pytest.raises(ValueError, match="layout"):
        build_inception(None, layout="tf", allow_random_init=True)


def test_random_init_forward_at_299():
    net = build_inception(None, allow_random_init=True)
    assert "RANDOM INIT" in net.weights_description
    _lively_init(net, 3)
    feats = InceptionFeatures(net)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        out = feats(x)
        # independent path: resize, then torchvision's own forward (eval: dropout off, fc with bias)
        ref_logits = net(F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False))
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1000)
    assert torch.isfinite(out["pool"]).all() and out["pool"].std() > 1e-3
    torch.testing.assert_close(out["logits"], ref_logits, rtol=1e-4, atol=1e-4)
    # [0,1] input convention: 2x-1 is applied
    feats01 = InceptionFeatures(net, input_range="[0,1]", resize=None)
    feats11 = InceptionFeatures(net, resize=None)
    xb = torch.rand(2, 3, 80, 80, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(feats01(xb)["pool"], feats11(xb * 2 - 1)["pool"])
    feats.train()
    assert not feats.training and not net.training


def test_torchvision_file_matches_torchvision_forward(tmp_path, tv_state, images):
    path = tmp_path / "inception_v3_google-0cc3c7bd.pth"
    torch.save(tv_state, path)
    net = build_inception(path)
    assert net.layout == "torchvision" and not net.fid_blocks and net.fc.out_features == 1000
    assert "inception_v3_google-0cc3c7bd.pth" in net.weights_description
    assert "torchvision" in net.weights_description
    feats = InceptionFeatures(net, resize=None)
    assert feats.logits_bias and feats.weights_description == net.weights_description
    ref = _reference_tv(tv_state, 1000, aux=True)
    with torch.no_grad():
        out = feats(images)
        torch.testing.assert_close(out["logits"], ref(images), rtol=1e-5, atol=1e-5)
    # the same weights as safetensors load identically
    st_path = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in tv_state.items()}, str(st_path))
    with torch.no_grad():
        out_st = InceptionFeatures(build_inception(st_path), resize=None)(images)
    torch.testing.assert_close(out_st["pool"], out["pool"], rtol=0, atol=0)


def test_pt_inception_layout_loads_with_fid_blocks(tmp_path, pt_state, images):
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(pt_state, path)
    net = build_inception(path)  # auto -> pt_inception (1008-way fc)
    assert net.layout == "pt_inception" and net.fid_blocks and net.fc.out_features == 1008
    assert "pt_inception-2015-12-05-6726825d.pth" in net.weights_description
    assert "FID blocks" in net.weights_description
    for name in ["Mixed_5b", "Mixed_5c", "Mixed_5d"]:
        assert type(getattr(net, name)) is FIDInceptionA
    for name in ["Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"]:
        assert type(getattr(net, name)) is FIDInceptionC
    assert type(net.Mixed_7b) is FIDInceptionE1 and type(net.Mixed_7c) is FIDInceptionE2
    feats = InceptionFeatures(net, resize=None)
    assert not feats.logits_bias  # TF IS: pool3 . W, bias omitted

    # (1) key mapping: with torchvision semantics forced, identical to torchvision's Inception3
    #     loaded directly with the same state dict.
    tv_sem = InceptionFeatures(build_inception(path, fid_blocks=False), resize=None)
    assert not tv_sem.net.fid_blocks
    ref_tv = _reference_tv(pt_state, 1008, aux=False)
    with torch.no_grad():
        out_tv = tv_sem(images)
        ref_logits = ref_tv(images)
    torch.testing.assert_close(out_tv["pool"] @ pt_state["fc.weight"].t(), ref_logits - pt_state["fc.bias"],
                               rtol=1e-4, atol=1e-4)

    # (2) FID semantics: equal to the reference built from torchvision blocks with the pool branch
    #     recomputed independently (valid-pixel average; max in Mixed_7c) ...
    with torch.no_grad():
        out = feats(images)
        ref_pool = _reference_fid_pool(ref_tv, images)
    torch.testing.assert_close(out["pool"], ref_pool, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["logits"], out["pool"] @ pt_state["fc.weight"].t(), rtol=1e-5, atol=1e-5)
    # ... and measurably different from torchvision semantics (the variants really are in use).
    rel = (out["pool"] - out_tv["pool"]).norm() / out_tv["pool"].norm()
    assert rel > 1e-3


def test_pytorch_fid_wrapper_key_layout(tmp_path, pt_state, images):
    """A state dict of pytorch-fid's InceptionV3 wrapper (blocks.<i>.<j>.*, no fc) is renamed."""
    renamed = {}
    for k, v in pt_state.items():
        if k.startswith("fc."):
            continue
        top, rest = k.split(".", 1)
        renamed[f"{_WRAPPER[top]}.{rest}"] = v
    path = tmp_path / "fid_wrapper.pth"
    torch.save({"state_dict": renamed}, path)
    net = build_inception(path)
    assert net.layout == "pt_inception" and net.fid_blocks and not net.has_logits
    assert "logits unavailable" in net.weights_description
    direct = InceptionFeatures(build_inception(_save(tmp_path / "pt.pth", pt_state)), resize=None)
    with torch.no_grad():
        out = InceptionFeatures(net, resize=None)(images)
        ref = direct(images)
    assert set(out) == {"pool"}
    torch.testing.assert_close(out["pool"], ref["pool"], rtol=0, atol=0)


def _save(path, sd):
    torch.save(sd, path)
    return path
