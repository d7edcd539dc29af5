"""TISCL through the Object-Aware Image Encoder reaches the generator (DESIGN §3.2): the detector picks boxes
without gradient, its RoIAlign features keep the graph back to the generated pixels."""
import torch

from cpgan.losses import damsm_loss
from cpgan.models.darknet import Darknet
from cpgan.models.generator import G_NET
from cpgan.models.image_encoder import ImageEncoder
from cpgan.models.yolo import region_features


def test_tiscl_gradient_reaches_generator_through_detector_features():
    torch.manual_seed(0)
    B, T, d = 3, 5, 32
    G = G_NET(branch_num=3, ngf=8, emb_dim=d, r_num=1, base_size=16)
    det = Darknet("shapes-small").eval()
    for p in det.parameters():
        p.requires_grad_(False)
    enc = ImageEncoder(out_dim=d, backbone="small", small_width=8, grid_size=8, object_dim=1024).eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    words, sent = torch.randn(B, d, T), torch.randn(B, d)
    imgs, _, _, _ = G(torch.randn(B, 100), sent, words, torch.zeros(B, T, dtype=torch.bool))
    fake = imgs[-1]
    rf = region_features(det, fake, top_k=36, value_range=(-1.0, 1.0))
    assert rf.feats.requires_grad and not rf.boxes.requires_grad
    feats = enc(fake, objects=rf.feats, object_mask=rf.valid)
    assert feats.regions.shape == (B, d, 36 + 64)

    # gradient through the object path alone: zero the grid branch's contribution by using only object regions
    obj_only = feats.regions[:, :, :36]
    loss = damsm_loss(obj_only, feats.global_features, words, sent, torch.full((B,), T),
                      region_mask=rf.valid)["word_loss"]
    loss.backward()
    grads = [p.grad for p in G.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    # the final image head of G received gradient via the detector's features
    assert G.img_net3.img[0].weight.grad.abs().sum() > 0
