"""Text and image encoders of DAMSM: shapes, padding, release layout, manual re-computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cpgan.losses import damsm_loss
from cpgan.models.image_encoder import ImageEncoder
from cpgan.models.text_encoder import MemoryProjection, TextEncoder, gather_memory

# ---------------------------------------------------------------- expected release layouts
# Copied from shared/fixtures/official/keys.md (RNN_ENCODER and MEM_TRANS at the eval_coco config,
# vocabulary 27297); hard-coded because CI runs on a clean clone without ../shared.
RNN_ENCODER_KEYS = [
    ("word_encoder.weight", (27297, 300)),
    ("encoder.weight", (300, 556, 1)),
    ("rnn.weight_ih_l0", (512, 300)),
    ("rnn.weight_hh_l0", (512, 128)),
    ("rnn.bias_ih_l0", (512,)),
    ("rnn.bias_hh_l0", (512,)),
    ("rnn.weight_ih_l0_reverse", (512, 300)),
    ("rnn.weight_hh_l0_reverse", (512, 128)),
    ("rnn.bias_ih_l0_reverse", (512,)),
    ("rnn.bias_hh_l0_reverse", (512,)),
]
MEM_TRANS_KEYS = [
    ("memory_emb_1.weight", (512, 1024, 1)),
    ("memory_emb_1.bias", (512,)),
    ("memory_emb_2.weight", (256, 512, 1)),
]
# keys.md, CNN_ENCODER (evaluation/model.py): 567 keys with these prefix counts.
CNN_ENCODER_PREFIX_COUNTS = {
    "Conv2d_1a_3x3": 6, "Conv2d_2a_3x3": 6, "Conv2d_2b_3x3": 6, "Conv2d_3b_1x1": 6,
    "Conv2d_4a_3x3": 6, "Mixed_5b": 42, "Mixed_5c": 42, "Mixed_5d": 42, "Mixed_6a": 24,
    "Mixed_6b": 60, "Mixed_6c": 60, "Mixed_6d": 60, "Mixed_6e": 60, "Mixed_7a": 36,
    "Mixed_7b": 54, "Mixed_7c": 54, "emb_features": 1, "emb_cnn_code": 2,
}


def _manual_lstm_dir(x, w_ih, w_hh, b_ih, b_hh, reverse):
    """One LSTM direction over x (L, E), PyTorch gate order i, f, g, o. Returns (L, h) outputs."""
    h_dim = w_hh.shape[1]
    h = x.new_zeros(h_dim)
    c = x.new_zeros(h_dim)
    outs = [None] * x.shape[0]
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    for t in steps:
        gates = w_ih @ x[t] + b_ih + w_hh @ h + b_hh
        i, f, g, o = gates.chunk(4)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs[t] = h
    return torch.stack(outs)


def _manual_bilstm(x, rnn):
    p = dict(rnn.named_parameters())
    fwd = _manual_lstm_dir(x, p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"], p["bias_hh_l0"], False)
    bwd = _manual_lstm_dir(
        x, p["weight_ih_l0_reverse"], p["weight_hh_l0_reverse"], p["bias_ih_l0_reverse"],
        p["bias_hh_l0_reverse"], True,
    )
    words = torch.cat([fwd, bwd], dim=1).t()  # (d, L)
    sentence = torch.cat([fwd[-1], bwd[0]])  # final forward state, final backward state
    return words, sentence


def _captions(B=4, T=7, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    caps = torch.randint(1, vocab, (B, T), generator=g)
    lengths = torch.tensor([3, 7, 1, 5])[:B]  # deliberately unsorted
    return caps, lengths


# ------------------------------------------------------------------------- text encoder
def test_plain_text_encoder_shapes_padding_and_independence():
    torch.manual_seed(0)
    enc = TextEncoder(50, embed_dim=16, hidden_dim=10).double().eval()
    caps, lengths = _captions()
    words, sent = enc(caps, lengths)
    assert words.shape == (4, 10, 7) and sent.shape == (4, 10)
    pad = torch.arange(7)[None, :] >= lengths[:, None]
    assert torch.all(words.permute(0, 2, 1)[pad] == 0)
    # padding token ids do not matter
    caps2 = torch.where(pad, torch.randint(0, 50, caps.shape), caps)
    words2, sent2 = enc(caps2, lengths)
    assert torch.equal(words, words2) and torch.equal(sent, sent2)
    # each caption alone (no padding, no companions) gives the same features
    for b in range(4):
        n = int(lengths[b])
        w1, s1 = enc(caps[b : b + 1, :n], lengths[b : b + 1])
        torch.testing.assert_close(words[b, :, :n], w1[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sent[b], s1[0], rtol=1e-10, atol=1e-12)
        # and an independent LSTM written out step by step
        x = enc.word_encoder.weight[caps[b, :n]]
        mw, ms = _manual_bilstm(x, enc.rnn)
        torch.testing.assert_close(words[b, :, :n], mw, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sent[b], ms, rtol=1e-10, atol=1e-12)


def test_mate_equals_manual_computation():
    torch.manual_seed(1)
    enc = TextEncoder(
        50, embed_dim=16, hidden_dim=10, memory_dim=24, memory_proj_dim=6, memory_hidden_dim=12
    ).double().eval()
    caps, lengths = _captions(seed=1)
    memory = torch.randn(4, 7, 24, dtype=torch.float64)
    words, sent = enc(caps, lengths, memory=memory)
    assert words.shape == (4, 10, 7) and sent.shape == (4, 10)
    pad = torch.arange(7)[None, :] >= lengths[:, None]
    assert torch.all(words.permute(0, 2, 1)[pad] == 0)

    mp = enc.memory_projection
    p_m = F.conv1d(
        F.leaky_relu(F.conv1d(memory.transpose(1, 2), mp.memory_emb_1.weight, mp.memory_emb_1.bias), 0.01),
        mp.memory_emb_2.weight,
    )  # (B, 6, T)
    emb = enc.word_encoder.weight[caps].transpose(1, 2)  # (B, 16, T)
    x = F.conv1d(torch.tanh(torch.cat([emb, p_m], dim=1)), enc.encoder.weight)  # (B, 16, T)
    for b in range(4):
        n = int(lengths[b])
        mw, ms = _manual_bilstm(x[b, :, :n].t(), enc.rnn)
        torch.testing.assert_close(words[b, :, :n], mw, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sent[b], ms, rtol=1e-10, atol=1e-12)
    # pre-projected memories (the release's memory_emb argument) give the same result
    w2, s2 = enc(caps, lengths, memory_emb=p_m)
    torch.testing.assert_close(w2, words, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(s2, sent, rtol=1e-12, atol=1e-14)


def test_shared_memory_projection_and_errors():
    proj = MemoryProjection(24, 12, 6)
    enc = TextEncoder(
        50, embed_dim=16, hidden_dim=10, memory_dim=24, memory_proj_dim=6, memory_projection=proj
    )
    assert enc.memory_projection is proj
    caps, lengths = _captions()
    with pytest.raises(ValueError, match="memory"):
        enc(caps, lengths)  # MATE without memory
    with pytest.raises(ValueError, match=r"\(B, T, 24\)"):
        enc(caps, lengths, memory=torch.randn(4, 24, 7))
    plain = TextEncoder(50, embed_dim=16, hidden_dim=10)
    with pytest.raises(ValueError, match="plain"):
        plain(caps, lengths, memory=torch.randn(4, 7, 24))
    with pytest.raises(ValueError, match="lengths"):
        plain(caps, torch.tensor([3, 8, 1, 5]))
    with pytest.raises(ValueError, match="vocabulary"):
        plain(caps + 50, lengths)
    with pytest.raises(ValueError, match="transpose"):
        proj(torch.randn(2, 7, 24))


def test_release_parameter_names_and_shapes():
    enc = TextEncoder(27297, memory_dim=1024)
    rnn, mem = enc.release_state_dicts()
    assert [(k, tuple(v.shape)) for k, v in rnn.items()] == RNN_ENCODER_KEYS
    assert [(k, tuple(v.shape)) for k, v in mem.items()] == MEM_TRANS_KEYS
    assert [(k, tuple(v.shape)) for k, v in MemoryProjection().state_dict().items()] == MEM_TRANS_KEYS
    assert sum(v.numel() for v in rnn.values()) == 8796220  # keys.md summary
    assert sum(v.numel() for v in mem.values()) == 655872
    plain = TextEncoder(27297)
    expected_plain = [kv for kv in RNN_ENCODER_KEYS if kv[0] != "encoder.weight"]
    assert [(k, tuple(v.shape)) for k, v in plain.state_dict().items()] == expected_plain
    assert plain.release_state_dicts()[1] is None


def test_load_release_state_dicts_round_trip_and_attngan_names():
    src = TextEncoder(40, embed_dim=8, hidden_dim=6, memory_dim=12, memory_proj_dim=4, memory_hidden_dim=5)
    dst = TextEncoder(40, embed_dim=8, hidden_dim=6, memory_dim=12, memory_proj_dim=4, memory_hidden_dim=5)
    rnn, mem = src.release_state_dicts()
    dst.load_release_state_dicts(rnn, mem)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    # AttnGAN text_encoder*.pth: the embedding is called "encoder"
    plain_src = TextEncoder(40, embed_dim=8, hidden_dim=6)
    attngan = {
        ("encoder.weight" if k == "word_encoder.weight" else k): v
        for k, v in plain_src.state_dict().items()
    }
    plain_dst = TextEncoder(40, embed_dim=8, hidden_dim=6)
    plain_dst.load_release_state_dicts(attngan)
    assert torch.equal(plain_dst.word_encoder.weight, plain_src.word_encoder.weight)
    with pytest.raises(ValueError, match="vocab_size"):
        TextEncoder(41, embed_dim=8, hidden_dim=6).load_release_state_dicts(attngan)


def test_gather_memory():
    bank = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    token_to_memory = torch.tensor([6, 2, 0, 5, 6, 1, 3])  # 6 = "no memory" (like transvob's 9487)
    caps = torch.tensor([[1, 2, 3, 0], [6, 4, 5, 0]])
    out = gather_memory(bank, caps, token_to_memory, missing_id=6)
    assert out.shape == (2, 4, 4)
    for b in range(2):
        for t in range(4):
            m = int(token_to_memory[caps[b, t]])
            expected = torch.zeros(4) if m == 6 else bank[m]
            assert torch.equal(out[b, t], expected)
    direct = gather_memory(bank, torch.tensor([[5, -1]]))
    assert torch.equal(direct[0, 0], bank[5]) and torch.equal(direct[0, 1], torch.zeros(4))
    with pytest.raises(ValueError, match="memory ids"):
        gather_memory(bank, torch.tensor([[6]]))


# ------------------------------------------------------------------------ image encoder
def test_small_image_encoder_shapes_and_training():
    torch.manual_seed(0)
    enc = ImageEncoder(out_dim=32, backbone="small", small_width=8)
    images = (torch.rand(3, 3, 64, 64) * 2 - 1).requires_grad_(True)
    regions, glob, mask = enc(images)
    assert regions.shape == (3, 32, 64) and glob.shape == (3, 32) and mask is None
    assert enc.num_regions() == 64
    (regions.square().mean() + glob.square().mean()).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.requires_grad and p.grad is not None for p in enc.parameters())  # trained whole
    # other input sizes pool to the same 8x8 grid
    assert enc(torch.zeros(2, 3, 128, 128)).regions.shape == (2, 32, 64)


def test_oaie_regions_mask_and_object_gradients():
    torch.manual_seed(0)
    enc = ImageEncoder(out_dim=32, backbone="small", small_width=8, object_dim=1024)
    assert enc.emb_features.bias is not None  # M_e V_e + b_e
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    objects = torch.randn(4, 36, 1024, requires_grad=True)
    obj_mask = torch.ones(4, 36, dtype=torch.bool)
    obj_mask[1, 30:] = False
    obj_mask[3, ::2] = False
    regions, glob, region_mask = enc(images, objects, obj_mask)
    assert regions.shape == (4, 32, 36 + 64) and glob.shape == (4, 32)
    assert region_mask.shape == (4, 100)
    assert torch.equal(region_mask[:, :36], obj_mask) and region_mask[:, 36:].all()
    expected_obj = (objects @ enc.emb_objects.weight.t() + enc.emb_objects.bias).transpose(1, 2)
    torch.testing.assert_close(regions[:, :, :36], expected_obj)
    grid_only = ImageEncoder(out_dim=32, backbone="small", small_width=8)
    oaie_only = ("emb_objects.weight", "emb_objects.bias", "emb_features.bias")
    grid_only.load_state_dict({k: v for k, v in enc.state_dict().items() if k not in oaie_only})
    torch.testing.assert_close(
        regions[:, :, 36:], grid_only(images).regions + enc.emb_features.bias[None, :, None]
    )
    # TISCL-style backprop reaches the detector features; masked boxes get none
    words = torch.randn(4, 32, 5)
    lengths = torch.tensor([5, 2, 4, 3])
    out = damsm_loss(regions, glob, words, torch.randn(4, 32), lengths, region_mask=region_mask)
    out["loss"].backward()
    grad = objects.grad
    assert torch.isfinite(grad).all()
    assert torch.all(grad[~obj_mask] == 0)
    assert torch.all(grad[obj_mask].abs().sum(-1) > 0)


def test_image_encoder_errors(tmp_path):
    grid = ImageEncoder(out_dim=8, backbone="small", small_width=4)
    oaie = ImageEncoder(out_dim=8, backbone="small", small_width=4, object_dim=16)
    x = torch.zeros(2, 3, 64, 64)
    with pytest.raises(ValueError, match="object_dim"):
        grid(x, torch.zeros(2, 36, 16))
    with pytest.raises(ValueError, match="objects"):
        oaie(x)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        grid(torch.zeros(2, 1, 64, 64))
    with pytest.raises(FileNotFoundError):
        ImageEncoder(out_dim=8, backbone="small", small_width=4, weights=tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"foo.weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="do not fit"):
        ImageEncoder(out_dim=8, backbone="small", small_width=4, weights=bad)
    with pytest.raises(ValueError, match="grid_size=8"):
        ImageEncoder(backbone="inception", grid_size=5, grid_pool="max3s2")


def test_inception_encoder_forward_layout_and_weights(tmp_path):
    torch.manual_seed(0)
    enc = ImageEncoder(out_dim=256, backbone="inception")  # built without any download
    sd = enc.state_dict()
    assert len(sd) == 567  # = released CNN_ENCODER (keys.md)
    counts: dict[str, int] = {}
    for k in sd:
        counts[k.split(".")[0]] = counts.get(k.split(".")[0], 0) + 1
    assert counts == CNN_ENCODER_PREFIX_COUNTS
    assert tuple(sd["emb_features.weight"].shape) == (256, 768, 1, 1)
    assert tuple(sd["emb_cnn_code.weight"].shape) == (256, 2048)
    assert all(not p.requires_grad for p in enc.trunk_parameters())
    assert enc.emb_features.weight.requires_grad and enc.emb_cnn_code.weight.requires_grad

    enc.train()
    assert not enc.Mixed_6e.training and enc.emb_features.training
    running = enc.Conv2d_1a_3x3.bn.running_mean.clone()
    captured = {}
    enc.Mixed_6e.register_forward_hook(lambda m, i, o: captured.__setitem__("6e", o))
    enc.Mixed_7c.register_forward_hook(lambda m, i, o: captured.__setitem__("7c", o))
    enc.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, i: captured.__setitem__("in", i[0]))
    images = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)
    regions, glob, mask = enc(images)
    assert regions.shape == (2, 256, 64) and glob.shape == (2, 256) and mask is None
    assert torch.equal(enc.Conv2d_1a_3x3.bn.running_mean, running)  # frozen trunk stays in eval
    # released CNN_ENCODER: max_pool(3, 2) on Mixed_6e (17 -> 8), 1x1 conv; avg-pooled Mixed_7c -> Linear
    # input resized to 299 inside, bilinear, align_corners=False (default), no transform_input
    resized = F.interpolate(images.detach(), size=(299, 299), mode="bilinear", align_corners=False)
    torch.testing.assert_close(captured["in"].detach(), resized)
    assert captured["6e"].shape == (2, 768, 17, 17) and captured["7c"].shape == (2, 2048, 8, 8)
    exp_regions = F.conv2d(F.max_pool2d(captured["6e"], 3, 2), enc.emb_features.weight).flatten(2)
    exp_glob = captured["7c"].mean(dim=(2, 3)) @ enc.emb_cnn_code.weight.t() + enc.emb_cnn_code.bias
    # (a randomly initialised trunk has tiny activations: compare relative to their scale)
    for got, exp in ((regions, exp_regions), (glob, exp_glob)):
        scale = exp.abs().max()
        assert scale > 0
        torch.testing.assert_close(got / scale, exp / scale, rtol=1e-4, atol=1e-5)
    # TISCL: gradients reach the (generated) images through the frozen trunk
    glob.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0

    # AttnGAN/CPGAN CNN_ENCODER state dict round trip (file in tmp_path, weights_only load)
    path = tmp_path / "image_encoder100.pth"
    torch.save(sd, path)
    enc2 = ImageEncoder(out_dim=256, backbone="inception", weights=path)
    for k, v in enc2.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # torchvision inception state dict: trunk only (AuxLogits / fc ignored), heads kept
    from torchvision.models import inception_v3

    tv = inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()
    tv_path = tmp_path / "inception_v3.pth"
    torch.save(tv, tv_path)
    enc3 = ImageEncoder(out_dim=256, backbone="inception", object_dim=1024, weights=tv_path)
    assert torch.equal(enc3.Mixed_7c.branch1x1.conv.weight, tv["Mixed_7c.branch1x1.conv.weight"])
    # a bias-free CNN_ENCODER file into an OAIE encoder: grid bias set to zero
    enc3.emb_features.bias.data.fill_(1.0)
    report = enc3.load_pretrained(sd)
    assert "emb_objects.weight" in report["kept"]
    assert torch.equal(enc3.emb_features.bias, torch.zeros(256))
    assert torch.equal(enc3.emb_features.weight, sd["emb_features.weight"])
