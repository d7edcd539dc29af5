"""Darknet cfg parser, network builder and .weights reader/writer (REFERENCE.md §1-§3)."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cpgan.interop.darknet_weights import count_weights, read_header, read_weights, write_weights
from cpgan.models.darknet import Darknet, config_path, parse_cfg
from cpgan.models.yolo import decode

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------------
QUIRKY = """
# a comment
[net]
 width = 8
height=8
channels  =  3
   ; indented comment
[conv]
filters = 4 # not a comment
filters=16
size=3
pad=1
trailing=
novalue
anchors = 10,13,  16,30
[max]
size=2
stride=2
"""


def test_parse_cfg_lexical_rules():
    blocks = parse_cfg(QUIRKY)
    assert [b["type"] for b in blocks] == ["net", "convolutional", "maxpool"]
    assert blocks[0] == {"type": "net", "width": "8", "height": "8", "channels": "3"}
    # all whitespace removed, no inline comments, first duplicate wins, value-less lines dropped
    assert blocks[1] == {
        "type": "convolutional",
        "filters": "4#notacomment",
        "size": "3",
        "pad": "1",
        "anchors": "10,13,16,30",
    }
    assert blocks[2] == {"type": "maxpool", "size": "2", "stride": "2"}


def test_parse_cfg_errors():
    with pytest.raises(ValueError, match="first section"):
        parse_cfg("[convolutional]\nfilters=2\n")
    with pytest.raises(ValueError, match="unknown section"):
        parse_cfg("[net]\n[bogus]\n")
    with pytest.raises(ValueError, match="before the first section"):
        parse_cfg("width=3\n[net]\n")


def test_atoi_values_first_duplicate_and_default_logistic():
    # filters "4#notacomment" -> atoi 4; no activation key -> logistic; no batch_normalize -> conv bias
    m = Darknet(parse_cfg(QUIRKY))
    conv = m.layers[0]
    assert conv.conv.out_channels == 4 and conv.bn is None and conv.conv.bias is not None
    x = torch.rand(2, 3, 8, 8)
    out = m(x, keep=[0, 1])
    ref0 = torch.sigmoid(F.conv2d(x, conv.conv.weight, conv.conv.bias, padding=1))
    torch.testing.assert_close(out["features"][0], ref0)
    assert out["features"][1].shape == (2, 4, 4, 4)


def _maxpool_ref(x: np.ndarray, size: int, stride: int, padding: int) -> np.ndarray:
    """darknet forward_maxpool_layer, literally (src/maxpool_layer.c)."""
    b, c, h, w = x.shape
    oh, ow = (h + padding - size) // stride + 1, (w + padding - size) // stride + 1
    off = -(padding // 2)
    out = np.empty((b, c, oh, ow), x.dtype)
    for i in range(oh):
        for j in range(ow):
            best = np.full((b, c), -np.finfo(np.float32).max, x.dtype)
            for n in range(size):
                for m in range(size):
                    r, q = off + i * stride + n, off + j * stride + m
                    if 0 <= r < h and 0 <= q < w:
                        best = np.maximum(best, x[:, :, r, q])
            out[:, :, i, j] = best
    return out


@pytest.mark.parametrize(
    "opts,hw",
    [("size=2\nstride=1", 13), ("size=2\nstride=2", 5), ("size=2\nstride=2", 6), ("size=3\nstride=2", 7), ("size=3\nstride=1\npadding=0", 6)],
)
def test_maxpool_matches_darknet(opts, hw):
    cfg = f"[net]\nwidth={hw}\nheight={hw}\nchannels=2\n[maxpool]\n{opts}\n"
    m = Darknet(parse_cfg(cfg))
    x = torch.randn(1, 2, hw, hw) - 1.0  # mostly negative: zero padding would be wrong
    blk = parse_cfg(cfg)[1]
    stride = int(blk["stride"])
    size = int(blk.get("size", stride))
    padding = int(blk.get("padding", size - 1))
    ref = _maxpool_ref(x.numpy(), size, stride, padding)
    m.max_stride = 1  # the test feeds odd sizes on purpose
    got = m(x, keep=[0])["features"][0]
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got.numpy(), ref)


def test_conv_padding_rules():
    cfg = (
        "[net]\nwidth=9\nheight=9\nchannels=1\n"
        "[convolutional]\nfilters=1\nsize=3\npad=1\nactivation=linear\n"        # padding = size/2 = 1
        "[convolutional]\nfilters=1\nsize=3\nactivation=linear\n"               # pad=0, padding=0
        "[convolutional]\nfilters=1\nsize=3\npadding=2\nactivation=linear\n"     # explicit padding
        "[convolutional]\nfilters=1\nsize=3\nstride=2\npad=1\nactivation=linear\n"
    )
    m = Darknet(parse_cfg(cfg))
    m.max_stride = 1
    f = m(torch.rand(1, 1, 9, 9), keep=[0, 1, 2, 3])["features"]
    assert [tuple(f[i].shape[-2:]) for i in range(4)] == [(9, 9), (7, 7), (9, 9), (5, 5)]


def test_route_shortcut_upsample_against_manual_graph():
    cfg = """[net]
width=8
height=8
channels=3
[convolutional]
filters=4
size=3
pad=1
activation=linear
[convolutional]
filters=4
size=3
pad=1
activation=leaky
[shortcut]
from=-2
activation=linear
[route]
layers=-1,0
[route]
layers=1
[upsample]
stride=2
[convolutional]
filters=2
size=1
pad=1
[convolutional]
batch_normalize=1
filters=2
size=1
activation=mish
[avgpool]
"""
    m = Darknet(parse_cfg(cfg)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
        bn = m.layers[7].bn
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        out = m(x, keep=range(9))["features"]
        c = [m.layers[i].conv for i in (0, 1, 6, 7)]
        y0 = F.conv2d(x, c[0].weight, c[0].bias, padding=1)
        y1 = F.leaky_relu(F.conv2d(y0, c[1].weight, c[1].bias, padding=1), 0.1)
        y2 = y1 + y0
        y3 = torch.cat([y2, y0], 1)
        y4 = y1
        y5 = y4.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        y6 = torch.sigmoid(F.conv2d(y5, c[2].weight, c[2].bias))
        z = F.conv2d(y6, c[3].weight)
        z = (z - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
        z = z * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
        y7 = z * torch.tanh(F.softplus(z))
        y8 = y7.mean(dim=(2, 3), keepdim=True)
    for i, ref in enumerate([y0, y1, y2, y3, y4, y5, y6, y7, y8]):
        torch.testing.assert_close(out[i], ref, msg=f"layer {i}")
    assert m.out_channels == [4, 4, 4, 8, 4, 4, 2, 2, 2]


def test_build_errors_are_clear():
    with pytest.raises(ValueError, match="needed"):
        Darknet(parse_cfg("[net]\nwidth=32\nheight=32\nchannels=3\n[convolutional]\nfilters=10\n[yolo]\nmask=0\nanchors=1,1\nnum=1\nclasses=2\n"))
    with pytest.raises(ValueError, match="not an earlier layer"):
        Darknet(parse_cfg("[net]\nchannels=3\n[route]\nlayers=3\n"))
    with pytest.raises(ValueError, match="not supported"):
        Darknet(parse_cfg("[net]\nchannels=3\n[connected]\noutput=2\n"))
    with pytest.raises(ValueError, match="unknown Darknet activation"):
        Darknet(parse_cfg("[net]\nchannels=3\n[convolutional]\nactivation=wiggle\n"))
    m = Darknet.from_cfg("yolov3-tiny")
    with pytest.raises(ValueError, match="multiple of the network stride 32"):
        m(torch.zeros(1, 3, 100, 100))


# --------------------------------------------------------------------------------------------------
# the shipped cfgs
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def yolov3() -> Darknet:
    return Darknet.from_cfg(config_path("yolov3")).eval()


def test_yolov3_structure_and_forward(yolov3):
    m = yolov3
    types = m.layer_types
    assert len(types) == 107
    assert {t: types.count(t) for t in set(types)} == {"convolutional": 75, "shortcut": 23, "route": 4, "upsample": 2, "yolo": 3}
    # REFERENCE §3.1: the 1024-channel maps of yolov3.cfg (all at stride 32)
    ch1024 = [i for i, c in enumerate(m.out_channels) if c == 1024]
    assert ch1024 == [62, 64, 65, 67, 68, 70, 71, 73, 74, 76, 78, 80]
    assert all(m.strides[i] == 32 for i in ch1024)
    assert m.default_feature_layer == 80
    assert [h.mask for h in m.heads] == [[6, 7, 8], [3, 4, 5], [0, 1, 2]]
    assert m.heads[0].anchors == [(116.0, 90.0), (156.0, 198.0), (373.0, 326.0)]
    assert m.heads[0].ignore_thresh == pytest.approx(0.7) and m.heads[0].classes == 80
    with torch.no_grad():
        out = m(torch.rand(1, 3, 416, 416), keep=[36, 61, 74])
    assert [tuple(y.shape) for y in out["yolo"]] == [(1, 255, 13, 13), (1, 255, 26, 26), (1, 255, 52, 52)]
    assert sum(h.num_anchors * y.shape[2] * y.shape[3] for h, y in zip(out["heads"], out["yolo"])) == 10647
    assert decode(out).boxes.shape == (1, 10647, 4)
    assert tuple(out["features"][74].shape) == (1, 1024, 13, 13)
    assert tuple(out["features"][61].shape) == (1, 512, 26, 26)
    assert tuple(out["features"][36].shape) == (1, 256, 52, 52)


def test_yolov3_weight_counts_and_full_file_roundtrip(yolov3, tmp_path):
    t0 = time.time()
    assert count_weights(yolov3) == 62_001_757
    assert count_weights(yolov3, cutoff=74) == 40_620_640  # darknet53.conv.74
    path = tmp_path / "yolov3.weights"
    n = write_weights(yolov3, path, seen=32013312)
    assert n == path.stat().st_size == 248_007_048
    fresh = Darknet.from_cfg(config_path("yolov3"))
    info = read_weights(fresh, path)
    assert info["floats"] == 62_001_757 and info["convs_loaded"] == 75 and info["seen"] == 32013312
    for (i, a), (_, b) in zip(yolov3.conv_layers, fresh.conv_layers):
        assert torch.equal(a.conv.weight, b.conv.weight), i
        if a.bn is not None:
            assert torch.equal(a.bn.running_var, b.bn.running_var), i
    assert time.time() - t0 < 60


def test_tiny_counts_file_and_forward(tmp_path):
    m = Darknet.from_cfg("yolov3-tiny").eval()
    assert len(m.layers) == 24 and m.layer_types.count("convolutional") == 13
    assert [i for i, c in enumerate(m.out_channels) if c == 1024] == [12] and m.default_feature_layer == 12
    assert count_weights(m) == 8_858_734
    with torch.no_grad():
        for _, blk in m.conv_layers:
            if blk.bn is not None:
                blk.bn.running_mean.normal_()
                blk.bn.running_var.uniform_(0.5, 1.5)
                blk.bn.bias.normal_()
    path = tmp_path / "yolov3-tiny.weights"
    write_weights(m, path)
    assert path.stat().st_size == 35_434_956
    assert read_header(path) == {"major": 0, "minor": 2, "revision": 0, "seen": 0, "header_bytes": 20}
    m2 = Darknet.from_cfg("yolov3-tiny").eval()
    read_weights(m2, path)
    sd1, sd2 = m.state_dict(), m2.state_dict()
    for k in sd1:
        if sd1[k].dtype.is_floating_point:
            assert torch.equal(sd1[k], sd2[k]), k
    x = torch.rand(1, 3, 416, 416)
    with torch.no_grad():
        o1, o2 = m(x), m2(x)
    assert [tuple(y.shape) for y in o1["yolo"]] == [(1, 255, 13, 13), (1, 255, 26, 26)]
    assert sum(3 * y.shape[2] * y.shape[3] for y in o1["yolo"]) == 2535
    for a, b in zip(o1["yolo"], o2["yolo"]):
        assert torch.equal(a, b)


def test_shapes_small_cfg():
    m = Darknet.from_cfg("shapes-small").eval()
    assert m.width == m.height == 64 and m.num_classes == 64
    assert m.default_feature_layer == 17 and m.out_channels[17] == 1024
    with torch.no_grad():
        out = m(torch.rand(2, 3, 64, 64))
    assert [tuple(y.shape) for y in out["yolo"]] == [(2, 207, 4, 4), (2, 207, 8, 8)]
    m2 = Darknet.from_cfg("shapes-small", anchor_scale=2.0)
    assert m2.heads[0].all_anchors[0] == (2 * m.heads[0].all_anchors[0][0], 2 * m.heads[0].all_anchors[0][1])


# --------------------------------------------------------------------------------------------------
# .weights layout, errors, prefixes
# --------------------------------------------------------------------------------------------------
TWO_CONVS = """[net]
width=4
height=4
channels=3
[convolutional]
batch_normalize=1
filters=2
size=1
activation=leaky
[convolutional]
filters=1
size=1
activation=linear
"""


@pytest.mark.parametrize("version,seen_fmt,hbytes", [((0, 2, 0), "<Q", 20), ((0, 1, 0), "<i", 16), ((1000, 2, 0), "<i", 16)])
def test_weights_layout_hand_built(tmp_path, version, seen_fmt, hbytes):
    floats = np.arange(17, dtype="<f4")  # conv0: beta 2, gamma 2, mean 2, var 2, w 6 ; conv1: bias 1, w 2
    path = tmp_path / "hand.weights"
    path.write_bytes(struct.pack("<3i", *version) + struct.pack(seen_fmt, 77) + floats.tobytes())
    m = Darknet(parse_cfg(TWO_CONVS))
    info = read_weights(m, path)
    assert info["header_bytes"] == hbytes and info["seen"] == 77 and info["floats"] == 17
    c0, c1 = m.layers[0], m.layers[1]
    assert c0.bn.bias.tolist() == [0, 1] and c0.bn.weight.tolist() == [2, 3]
    assert c0.bn.running_mean.tolist() == [4, 5] and c0.bn.running_var.tolist() == [6, 7]
    assert c0.conv.weight.flatten().tolist() == list(range(8, 14)) and c0.conv.weight.shape == (2, 3, 1, 1)
    assert c1.conv.bias.tolist() == [14] and c1.conv.weight.flatten().tolist() == [15, 16]
    # the writer produces the same bytes
    out = tmp_path / "again.weights"
    write_weights(m, out, header=version, seen=77)
    assert out.read_bytes() == path.read_bytes()


@pytest.fixture()
def tiny_file(tmp_path):
    m = Darknet.from_cfg("yolov3-tiny")
    path = tmp_path / "t.weights"
    write_weights(m, path)
    return m, path


def test_weights_size_errors(tiny_file, tmp_path):
    _, path = tiny_file
    data = path.read_bytes()
    short = tmp_path / "short.weights"
    short.write_bytes(data[:-4])
    with pytest.raises(ValueError, match=r"expected 8858734 float32 values for the cfg, found 8858733; the file is truncated"):
        read_weights(Darknet.from_cfg("yolov3-tiny"), short)
    long = tmp_path / "long.weights"
    long.write_bytes(data + b"\0" * 8)
    with pytest.raises(ValueError, match=r"expected 8858734 .* found 8858736; the file belongs to a bigger network"):
        read_weights(Darknet.from_cfg("yolov3-tiny"), long)
    odd = tmp_path / "odd.weights"
    odd.write_bytes(data[:-1])
    with pytest.raises(ValueError, match="not a whole number of float32"):
        read_weights(Darknet.from_cfg("yolov3-tiny"), odd)
    # a file for another cfg (80-class tiny weights into the 64-class shapes cfg)
    with pytest.raises(ValueError, match="expected .* found 8858734"):
        read_weights(Darknet.from_cfg("shapes-small"), path)
    with pytest.raises(FileNotFoundError):
        read_weights(Darknet.from_cfg("yolov3-tiny"), tmp_path / "missing.weights")


def test_backbone_prefix_load(tiny_file, tmp_path):
    src, full = tiny_file
    prefix = tmp_path / "tiny.conv.9"
    write_weights(src, prefix, cutoff=9)  # convs at layers 0, 2, 4, 6, 8
    # closed form: BN conv with c_in -> f, k x k: 4f + f*c_in*k*k
    expected = sum(4 * f + f * c * 9 for c, f in [(3, 16), (16, 32), (32, 64), (64, 128), (128, 256)])
    assert expected == 394_096
    assert prefix.stat().st_size == 20 + 4 * expected

    def check(dst, before):
        for (i, a), (_, b) in zip(src.conv_layers, dst.conv_layers):
            if i < 9:
                assert torch.equal(a.conv.weight, b.conv.weight) and torch.equal(a.bn.bias, b.bn.bias), i
            else:
                assert torch.equal(before[i], b.conv.weight), i  # untouched

    for kwargs in ({}, {"cutoff": 9}):  # inferred prefix, explicit cutoff
        dst = Darknet.from_cfg("yolov3-tiny")
        before = {i: b.conv.weight.clone() for i, b in dst.conv_layers}
        info = read_weights(dst, prefix, **kwargs)
        assert info["convs_loaded"] == 5 and info["last_layer"] == 8 and info["floats"] == expected
        check(dst, before)
    # full file with a cutoff: strict refuses, strict=False loads the first layers
    dst = Darknet.from_cfg("yolov3-tiny")
    with pytest.raises(ValueError, match="more layers than the cutoff"):
        read_weights(dst, full, cutoff=9)
    before = {i: b.conv.weight.clone() for i, b in dst.conv_layers}
    info = read_weights(dst, full, cutoff=9, strict=False)
    assert info["convs_loaded"] == 5
    check(dst, before)
    # a prefix that does not end at a conv boundary is an error
    cut = tmp_path / "cut.weights"
    cut.write_bytes(prefix.read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated"):
        read_weights(Darknet.from_cfg("yolov3-tiny"), cut)
