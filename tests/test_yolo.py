"""YOLOv3 decoding, NMS, loss, mAP, region features and a small overfitting check (REFERENCE.md §3.4, §4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from cpgan.models.darknet import Darknet, YoloHead
from cpgan.models.yolo import (
    average_precision,
    decode,
    postprocess,
    region_features,
    roi_mean,
    select_regions,
    targets_from_boxes,
    yolo_loss,
)

torch.set_num_threads(1)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def blank(heads, sizes, batch=1, fill=-40.0):
    """Raw head tensors filled with ``fill`` (very negative logits: no objects, no classes)."""
    return [torch.full((batch, h.num_anchors * (5 + h.classes), ny, nx), fill) for h, (ny, nx) in zip(heads, sizes)]


def put(raw, head, b, a, j, i, values):
    """Write the 5+C raw values of prediction (image b, anchor slot a, row j, column i)."""
    c = 5 + head.classes
    raw[b, a * c : a * c + len(values), j, i] = torch.tensor(values, dtype=raw.dtype)


# --------------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------------
def test_decode_hand_computed():
    head = YoloHead(layer_index=0, mask=[0, 1], all_anchors=[(10.0, 20.0), (30.0, 40.0)], classes=2)
    raw = blank([head], [(2, 2)], fill=0.0)[0]
    # anchor 0, row 1, col 0: sigmoid(0)=.5, sigmoid(ln 3)=.75, exp(ln 2)=2
    put(raw, head, 0, 0, 1, 0, [0.0, math.log(3), math.log(2), 0.0, 0.0, math.log(4), -math.log(4)])
    # anchor 1, row 0, col 1
    put(raw, head, 0, 1, 0, 1, [0.0, 0.0, 0.0, 0.0, logit(0.9), 0.0, 0.0])
    dec = decode({"yolo": [raw], "heads": [head], "img_size": (64, 64)})
    assert dec.boxes.shape == (1, 8, 4) and dec.cls.shape == (1, 8, 2)
    # index = a*ny*nx + j*nx + i ; stride 32
    # bx = (0.5 + 0)*32 = 16, by = (0.75 + 1)*32 = 56, bw = 2*10 = 20, bh = 20
    torch.testing.assert_close(dec.boxes[0, 2], torch.tensor([6.0, 46.0, 26.0, 66.0]))
    torch.testing.assert_close(dec.cls[0, 2], torch.tensor([0.8, 0.2]))
    torch.testing.assert_close(dec.obj[0, 2], torch.tensor(0.5))
    # anchor 1, cell (0, 1): centre (48, 16), size 30 x 40
    torch.testing.assert_close(dec.boxes[0, 5], torch.tensor([33.0, -4.0, 63.0, 36.0]))
    torch.testing.assert_close(dec.obj[0, 5], torch.tensor(0.9))
    # non-square input: strides differ per axis (W/nx, H/ny)
    dec2 = decode({"yolo": [raw], "heads": [head], "img_size": (64, 128)})
    torch.testing.assert_close(dec2.boxes[0, 2], torch.tensor([32 - 10.0, 46.0, 32 + 10.0, 66.0]))


# --------------------------------------------------------------------------------------------------
# NMS
# --------------------------------------------------------------------------------------------------
def _nms_case():
    head = YoloHead(layer_index=0, mask=[0], all_anchors=[(20.0, 20.0)], classes=2)
    raw = blank([head], [(2, 2)], batch=2)[0]
    for b in range(2):
        # p0 cell (0,0): centre (30,30) -> [20,20,40,40], obj .9, cls0 .9 (score .81), cls1 .5
        put(raw, head, b, 0, 0, 0, [logit(30 / 32), logit(30 / 32), 0, 0, logit(0.9), logit(0.9), 0.0])
        # p1 cell (0,1): centre (34,30) -> IoU with p0 = 320/480; same class, score .8*.9 = .72 -> suppressed
        put(raw, head, b, 0, 0, 1, [logit(2 / 32), logit(30 / 32), 0, 0, logit(0.8), logit(0.9), -9.0])
        # p2 cell (1,0): centre (30,34): overlaps p0 as much but class 1 (score .8*.95 = .76) -> kept
        put(raw, head, b, 0, 1, 0, [logit(30 / 32), logit(2 / 32), 0, 0, logit(0.8), -9.0, logit(0.95)])
        # p3 cell (1,1): obj .1 -> below the threshold
        put(raw, head, b, 0, 1, 1, [0, 0, 0, 0, logit(0.1), logit(0.9), -9.0])
    return {"yolo": [raw], "heads": [head], "img_size": (64, 64)}


def test_postprocess_nms():
    dets = postprocess(_nms_case(), conf_thresh=0.25, nms_thresh=0.45)
    assert len(dets) == 2
    for d in dets:  # each image keeps its own boxes: no suppression across images
        assert d["labels"].tolist() == [0, 1]
        torch.testing.assert_close(d["scores"], torch.tensor([0.81, 0.76]))
        torch.testing.assert_close(d["boxes"], torch.tensor([[20.0, 20.0, 40.0, 40.0], [20.0, 24.0, 40.0, 44.0]]))
    # a looser IoU threshold keeps p1 as well
    d = postprocess(_nms_case(), conf_thresh=0.25, nms_thresh=0.7)[0]
    torch.testing.assert_close(d["scores"], torch.tensor([0.81, 0.76, 0.72]))
    # multi-label: p0 also counts as class 1 (score .45); suppressed by p2 (class 1, .76, IoU .667)
    d = postprocess(_nms_case(), conf_thresh=0.25, nms_thresh=0.45, multi_label=True)[0]
    assert d["labels"].tolist() == [0, 1]
    d = postprocess(_nms_case(), conf_thresh=0.25, nms_thresh=0.7, multi_label=True)[0]
    assert sorted(zip(d["labels"].tolist(), [round(s, 2) for s in d["scores"].tolist()])) == [(0, 0.72), (0, 0.81), (1, 0.45), (1, 0.76)]
    # max_det and normalisation
    d = postprocess(_nms_case(), conf_thresh=0.25, nms_thresh=0.45, max_det=1, normalize=True)[1]
    torch.testing.assert_close(d["boxes"], torch.tensor([[20.0, 20.0, 40.0, 40.0]]) / 64)
    # nothing above threshold
    assert all(len(x["scores"]) == 0 for x in postprocess(_nms_case(), conf_thresh=0.99))


# --------------------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------------------
ANCHORS = [(8.0, 8.0), (16.0, 16.0), (32.0, 32.0), (48.0, 48.0)]


def _loss_heads(ignore=0.7):
    return [
        YoloHead(layer_index=0, mask=[2, 3], all_anchors=ANCHORS, classes=3, ignore_thresh=ignore),  # 2x2, stride 32
        YoloHead(layer_index=1, mask=[0, 1], all_anchors=ANCHORS, classes=3, ignore_thresh=ignore),  # 4x4, stride 16
    ]


# GT A: image 0, class 1, centre (.3,.6), 16x16 px -> anchor 1 (head 1 slot 1), cell i=1, j=2, t=(.2,.4,0,0)
# GT B: image 1, class 2, centre (.7,.2), 44.8 x 38.4 px -> IoU .747 with 48x48 (vs .595 with 32x32)
#       -> anchor 3 (head 0 slot 1), cell i=1, j=0, t=(.4,.4,log(44.8/48),log(38.4/48))
TARGETS = torch.tensor([[0, 1, 0.3, 0.6, 0.25, 0.25], [1, 2, 0.7, 0.2, 0.7, 0.6]])


def _perfect():
    heads = _loss_heads()
    raws = blank(heads, [(2, 2), (4, 4)], batch=2)
    put(raws[1], heads[1], 0, 1, 2, 1, [logit(0.2), logit(0.4), 0.0, 0.0, 40.0, -40.0, 40.0, -40.0])
    put(raws[0], heads[0], 1, 1, 0, 1, [logit(0.4), logit(0.4), math.log(44.8 / 48), math.log(38.4 / 48), 40.0, -40.0, -40.0, 40.0])
    return {"yolo": raws, "heads": heads, "img_size": (64, 64)}


def test_loss_zero_for_perfect_and_positive_otherwise():
    out = _perfect()
    loss, parts = yolo_loss(out, TARGETS)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    assert parts["assigned"] == 2

    def perturbed(fn):
        o = _perfect()
        fn(o["yolo"])
        return yolo_loss(o, TARGETS)[0].item()

    # wh off by 0.3 for GT A: scale (2 - 1/16) * 0.5 * 0.09, divided by the batch (2)
    assert perturbed(lambda r: r[1][0, 1 * 8 + 2, 2, 1].add_(0.3)) == pytest.approx((2 - 1 / 16) * 0.5 * 0.09 / 2, rel=1e-4)
    # x logit off: positive
    assert perturbed(lambda r: r[1][0, 1 * 8 + 0, 2, 1].add_(1.0)) > 0.05
    # objectness 0 at the assigned prediction: BCE(0, 1) = ln 2
    assert perturbed(lambda r: r[1][0, 1 * 8 + 4, 2, 1].fill_(0.0)) == pytest.approx(math.log(2) / 2, rel=1e-4)
    # wrong class
    assert perturbed(lambda r: r[0][1, 1 * 8 + 5, 0, 1].fill_(40.0)) == pytest.approx(40.0 / 2, rel=1e-3)
    # an unassigned prediction (tiny box, IoU ~0 with GT A, below ignore .7) with obj logit 0: ln 2
    assert perturbed(lambda r: r[1][0, 0 * 8 + 4, 2, 1].fill_(0.0)) == pytest.approx(math.log(2) / 2, rel=1e-4)

    # ... but the same prediction reshaped to match GT A exactly (IoU 1 > .7) is ignored: no loss
    def ignored(r):
        put(r[1], out["heads"][1], 0, 0, 2, 1, [logit(0.2), logit(0.4), math.log(2.0), math.log(2.0), 0.0])

    assert perturbed(ignored) == pytest.approx(0.0, abs=1e-5)


def _loss_reference(out, targets):
    """Slow, loop-by-loop darknet YOLOv3 loss (REFERENCE §4.4), for cross-checking the vectorised one."""
    h_img, w_img = out["img_size"]
    total = 0.0
    bsz = out["yolo"][0].shape[0]
    for raw, head in zip(out["yolo"], out["heads"]):
        c = 5 + head.classes
        _, _, ny, nx = raw.shape
        r = raw.double()
        assigned = {}
        for t in targets.tolist():
            b, cls, x, y, w, h = int(t[0]), int(t[1]), *t[2:]
            ious = []
            for aw, ah in head.all_anchors:
                inter = min(w * w_img, aw) * min(h * h_img, ah)
                ious.append(inter / (w * w_img * h * h_img + aw * ah - inter))
            best = int(np.argmax(ious))
            if best not in head.mask:
                continue
            a = head.mask.index(best)
            i, j = int(x * nx), int(y * ny)
            assigned[(b, a, j, i)] = cls
            aw, ah = head.all_anchors[best]
            tgt = [x * nx - i, y * ny - j, math.log(w * w_img / aw), math.log(h * h_img / ah)]
            z = r[b, a * c : a * c + 4, j, i]
            scale = 2 - w * h
            for k in range(2):
                p = 1 / (1 + math.exp(-z[k]))
                bce = -(tgt[k] * math.log(p) + (1 - tgt[k]) * math.log(1 - p))
                ent = -(tgt[k] * math.log(tgt[k]) + (1 - tgt[k]) * math.log(1 - tgt[k]))
                total += scale * (bce - ent)
                total += scale * 0.5 * (float(z[2 + k]) - tgt[2 + k]) ** 2
        for b in range(bsz):
            gts = [t[2:] for t in targets.tolist() if int(t[0]) == b]
            for a in range(head.num_anchors):
                aw, ah = head.anchors[a]
                for j in range(ny):
                    for i in range(nx):
                        z = r[b, a * c : (a + 1) * c, j, i].tolist()
                        po = 1 / (1 + math.exp(-z[4]))
                        if (b, a, j, i) in assigned:
                            total += -math.log(po)
                            for k in range(head.classes):
                                pk = 1 / (1 + math.exp(-z[5 + k]))
                                tk = 1.0 if k == assigned[(b, a, j, i)] else 0.0
                                total += -(tk * math.log(pk) + (1 - tk) * math.log(1 - pk))
                            continue
                        px = (1 / (1 + math.exp(-z[0])) + i) / nx
                        py = (1 / (1 + math.exp(-z[1])) + j) / ny
                        pw, ph = math.exp(z[2]) * aw / w_img, math.exp(z[3]) * ah / h_img
                        best = 0.0
                        for gx, gy, gw, gh in gts:
                            iw = max(0.0, min(px + pw / 2, gx + gw / 2) - max(px - pw / 2, gx - gw / 2))
                            ih = max(0.0, min(py + ph / 2, gy + gh / 2) - max(py - ph / 2, gy - gh / 2))
                            inter = iw * ih
                            best = max(best, inter / (pw * ph + gw * gh - inter))
                        if best > head.ignore_thresh:
                            continue
                        total += -math.log(1 - po)
    return total / bsz


@pytest.mark.parametrize("ignore", [0.7, 0.05])
def test_loss_matches_loop_reference(ignore):
    g = torch.Generator().manual_seed(1)
    heads = _loss_heads(ignore)
    raws = [torch.randn(2, 16, 2, 2, generator=g), torch.randn(2, 16, 4, 4, generator=g)]
    targets = torch.tensor(
        [[0, 1, 0.3, 0.6, 0.25, 0.25], [1, 2, 0.7, 0.2, 0.7, 0.6], [0, 0, 0.8, 0.8, 0.1, 0.15], [1, 0, 0.2, 0.7, 0.5, 0.4]]
    )
    out = {"yolo": raws, "heads": heads, "img_size": (64, 64)}
    loss, parts = yolo_loss(out, targets)
    assert loss.item() == pytest.approx(_loss_reference(out, targets), rel=1e-4)
    assert parts["assigned"] == 4


def test_loss_bad_targets():
    with pytest.raises(ValueError, match="class id"):
        yolo_loss(_perfect(), torch.tensor([[0, 7, 0.5, 0.5, 0.1, 0.1]]))
    with pytest.raises(ValueError, match="image index"):
        yolo_loss(_perfect(), torch.tensor([[5, 0, 0.5, 0.5, 0.1, 0.1]]))
    # no objects: the two confident predictions (obj logit 40) become negatives: BCE(40, 0) = 40 each, / batch 2
    loss, parts = yolo_loss(_perfect(), torch.zeros(0, 6))
    assert loss.item() == pytest.approx(40.0, rel=1e-5) and parts["assigned"] == 0


def test_targets_from_boxes():
    t = targets_from_boxes([[[0.1, 0.2, 0.3, 0.6]], [], [[0.0, 0.0, 1.0, 0.5], [0.5, 0.5, 0.7, 0.9]]], [[3], [], [1, 2]])
    torch.testing.assert_close(
        t, torch.tensor([[0, 3, 0.2, 0.4, 0.2, 0.4], [2, 1, 0.5, 0.25, 1.0, 0.5], [2, 2, 0.6, 0.7, 0.2, 0.4]])
    )


# --------------------------------------------------------------------------------------------------
# mAP
# --------------------------------------------------------------------------------------------------
def test_average_precision_hand_cases():
    gt_boxes = [[[0, 0, 10, 10], [20, 20, 30, 30]], [[0, 0, 10, 10]]]
    gt_labels = [[0, 0], [1]]
    # perfect
    m, ap = average_precision(gt_boxes, [[0.9, 0.8], [0.7]], gt_labels, gt_boxes, gt_labels)
    assert m == 1.0 and ap == {0: 1.0, 1: 1.0}
    # class 0, ranked: .95 FP (image 1 has no class-0 truth), .9 TP, .8 FP (duplicate), .75 FP, .7 TP (IoU .909)
    # precision 0, 1/2, 1/3, 1/4, 2/5 at recall 0, .5, .5, .5, 1 -> envelope .5 up to recall .5, .4 up to 1
    # AP0 = .5*.5 + .5*.4 = .45 ; AP1 = 1 ; mAP = .725
    pred_boxes = [[[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 31]], [[0, 0, 10, 10], [0, 0, 10, 10]]]
    pred_scores = [[0.9, 0.8, 0.75, 0.7], [0.6, 0.95]]
    pred_labels = [[0, 0, 0, 0], [1, 0]]
    m, ap = average_precision(pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels)
    assert ap[0] == pytest.approx(0.45) and ap[1] == pytest.approx(1.0) and m == pytest.approx(0.725)
    # IoU exactly 0.5 is not a match (VOC: strictly greater); a class without detections scores 0
    m, ap = average_precision([[[0, 0, 10, 5]], []], [[0.9], []], [[0], []], gt_boxes, gt_labels)
    assert ap == {0: 0.0, 1: 0.0} and m == 0.0
    # one of two truths found at rank 1: AP .5
    m, ap = average_precision([[[20, 20, 30, 30]], []], [[0.9], []], [[0], []], gt_boxes, gt_labels, num_classes=1)
    assert ap == {0: 0.5} and m == 0.5


# --------------------------------------------------------------------------------------------------
# region features
# --------------------------------------------------------------------------------------------------
def test_select_regions_padding_and_validity():
    head = YoloHead(layer_index=0, mask=[0], all_anchors=[(20.0, 20.0)], classes=2)
    raw = blank([head], [(2, 2)], batch=1, fill=-10.0)[0]
    put(raw, head, 0, 0, 0, 0, [0, 0, 0, 0, logit(0.9), logit(0.9), -9])  # [6,6,26,26] score .81
    put(raw, head, 0, 0, 1, 1, [0, 0, 0, 0, logit(0.8), logit(0.5), -9])  # [38,38,58,58] score .4
    put(raw, head, 0, 0, 0, 1, [logit(0.1), 0, 0, 0, logit(0.7), logit(0.9), -9])  # [25.2,6,..] score .63
    put(raw, head, 0, 0, 1, 0, [0, 0, 0, 0, logit(0.001), logit(0.5), -9])  # [6,38,26,58] score .0005 < conf
    out = {"yolo": [raw], "heads": [head], "img_size": (64, 64)}
    # (0,1) is centred at x=35.2 -> [25.2, 6, 45.2, 26]: IoU with (0,0) is .8*20/(800-16) = .0204 < .45 -> kept
    boxes, scores, labels, valid = select_regions(out, top_k=6, conf_thresh=0.005, nms_thresh=0.45)
    assert valid.tolist() == [[True, True, True, False, False, False]]
    torch.testing.assert_close(scores[0, :3], torch.tensor([0.81, 0.63, 0.4]))
    # 4 predictions only: slot 3 is the last pre-NMS prediction, slots 4-5 whole-image boxes
    torch.testing.assert_close(boxes[0, 0], torch.tensor([6.0, 6.0, 26.0, 26.0]))
    torch.testing.assert_close(boxes[0, 3], torch.tensor([6.0, 38.0, 26.0, 58.0]))  # cell (1,0), pre-NMS
    torch.testing.assert_close(boxes[0, 4:], torch.tensor([[0.0, 0.0, 64.0, 64.0]] * 2))
    assert labels[0].tolist()[4:] == [-1, -1] and scores[0, 4:].tolist() == [0.0, 0.0]
    # a strict NMS (IoU .0204 > .01) suppresses (0,1): it moves behind the survivors as an invalid pre-NMS slot
    boxes, scores, labels, valid = select_regions(out, top_k=6, nms_thresh=0.01)
    assert valid.tolist() == [[True, True, False, False, False, False]]
    torch.testing.assert_close(scores[0, :3], torch.tensor([0.81, 0.4, 0.63]))
    # pad="image": every invalid slot is the whole image with score 0
    boxes, scores, labels, valid = select_regions(out, top_k=6, nms_thresh=0.01, pad="image")
    torch.testing.assert_close(boxes[0, 2:], torch.tensor([[0.0, 0.0, 64.0, 64.0]] * 4))
    assert scores[0, 2:].tolist() == [0.0] * 4 and labels[0, 2:].tolist() == [-1] * 4


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    m = Darknet.from_cfg("shapes-small").eval()
    with torch.no_grad():
        for _, blk in m.conv_layers:
            if blk.bn is not None:
                blk.bn.running_var.uniform_(0.5, 2.0)
                blk.bn.running_mean.normal_(0, 0.1)
    return m


def test_region_features_shapes_and_batch_consistency(small_model):
    m = small_model
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        r = region_features(m, x)
        fmap = m(x, keep=[17])["features"][17]
    assert r.boxes.shape == (3, 36, 4) and r.feats.shape == (3, 36, 1024)
    assert r.scores.shape == (3, 36) and r.valid.shape == (3, 36) and r.valid.dtype == torch.bool
    assert (r.boxes >= 0).all() and (r.boxes <= 1).all()
    for b in range(3):
        v = r.valid[b]
        nv = int(v.sum())
        assert v[:nv].all() and not v[nv:].any()  # survivors first
        assert (r.scores[b, :nv].diff() <= 0).all()
        for k in (0, 17, 35):  # box by box, one image at a time
            box = (r.boxes[b, k] * 64).view(1, 4)
            ref = roi_align(fmap[b : b + 1], [box], output_size=7, spatial_scale=8 / 64, sampling_ratio=2, aligned=True)
            torch.testing.assert_close(r.feats[b, k], ref.mean(dim=(2, 3))[0], rtol=1e-4, atol=1e-5)
    # value_range maps [-1, 1] inputs to [0, 1]
    with torch.no_grad():
        r2 = region_features(m, x * 2 - 1, value_range=(-1.0, 1.0))
    torch.testing.assert_close(r2.feats, r.feats, rtol=1e-4, atol=1e-5)


def test_region_features_few_detections(small_model):
    m = Darknet.from_cfg("shapes-small").eval()
    m.load_state_dict(small_model.state_dict())
    with torch.no_grad():
        for idx in (10, 18):  # the two prediction convs: constant outputs, obj -10 everywhere ...
            conv = m.layers[idx].conv
            conv.weight.zero_()
            conv.bias.fill_(-10.0)
            for a in range(3):
                conv.bias[a * 69 : a * 69 + 4] = 0.0
            conv.bias[5] = 5.0  # class 0 likely for anchor slot 0
        m.layers[10].conv.bias[4] = 5.0  # ... except anchor slot 0 (24x24 px) of the stride-16 head: 16 cells
    r = region_features(m, torch.rand(2, 3, 64, 64))
    # 16 boxes 24x24 at 16-px spacing overlap by IoU .2 < .45: all survive; 20 slots are invalid padding
    assert r.valid.sum(1).tolist() == [16, 16]
    assert r.valid[:, :16].all()
    assert (r.scores[:, 16:] < 0.005).all()


def test_region_features_gradient_reaches_image_not_box_choice(small_model):
    m = small_model
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    r = region_features(m, x)
    assert r.feats.requires_grad and not r.boxes.requires_grad and not r.scores.requires_grad
    w = torch.randn(1024)
    (r.feats * w).sum().backward()
    g = x.grad.clone()
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # the same gradient with the boxes fixed as constants: nothing flows through the box choice
    x2 = x.detach().clone().requires_grad_(True)
    fmap = m(x2, keep=[17])["features"][17]
    rois = [bx * 64 for bx in r.boxes.detach()]
    feats = roi_align(fmap, rois, output_size=7, spatial_scale=1 / 8, sampling_ratio=2, aligned=True).mean(dim=(2, 3))
    (feats * w).sum().backward()
    # float32 rounding differs between roi_mean and torchvision's roi_align (exact equality: float64 test below)
    torch.testing.assert_close(g, x2.grad, rtol=1e-3, atol=1e-4 * float(g.abs().max()))


# --------------------------------------------------------------------------------------------------
# overfitting sanity check
# --------------------------------------------------------------------------------------------------
def test_small_cfg_overfits_synthetic_boxes():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n, s = 6, 64
    colours = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], np.float32)
    imgs = np.full((n, s, s, 3), 0.5, np.float32)
    boxes, labels = [], []
    for i in range(n):
        bl, ll = [], []
        for _ in range(rng.integers(1, 3)):
            w, h = rng.integers(10, 30, 2)
            x0, y0 = rng.integers(0, s - w), rng.integers(0, s - h)
            c = int(rng.integers(0, 4))
            imgs[i, y0 : y0 + h, x0 : x0 + w] = colours[c]
            bl.append([x0 / s, y0 / s, (x0 + w) / s, (y0 + h) / s])
            ll.append(c)
        boxes.append(bl)
        labels.append(ll)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    targets = targets_from_boxes(boxes, labels)
    m = Darknet.from_cfg("shapes-small", bn_momentum=0.1)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss, _ = yolo_loss(m(x), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.02 * losses[0]
    m.eval()
    with torch.no_grad():
        dets = postprocess(m(x), conf_thresh=0.25, nms_thresh=0.45, normalize=True)
    mean_ap, _ = average_precision(
        [d["boxes"] for d in dets], [d["scores"] for d in dets], [d["labels"] for d in dets], boxes, labels
    )
    assert mean_ap > 0.9


@pytest.mark.parametrize("aligned,size,ratio", [(True, 7, 2), (False, 7, 2), (True, 3, 1), (False, 2, 3)])
def test_roi_mean_equals_roi_align_mean(aligned, size, ratio):
    g = torch.Generator().manual_seed(3)
    fmap = torch.randn(3, 5, 6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    # boxes in input pixels (stride 8: 48 x 72 image), some tiny, some partly or wholly outside the image
    xy = torch.rand(3, 11, 2, generator=g, dtype=torch.float64) * torch.tensor([90.0, 60.0]) - 10
    wh = torch.rand(3, 11, 2, generator=g, dtype=torch.float64) * 50
    wh[:, 0] = 0.3  # sub-pixel boxes
    boxes = torch.cat([xy, xy + wh], -1)
    got = roi_mean(fmap, boxes, 1 / 8, size, ratio, aligned)
    ref = roi_align(fmap, list(boxes), output_size=size, spatial_scale=1 / 8, sampling_ratio=ratio, aligned=aligned).mean(dim=(2, 3))
    torch.testing.assert_close(got, ref.view(3, 11, 5), rtol=1e-9, atol=1e-10)
    w = torch.randn(3, 11, 5, generator=g, dtype=torch.float64)
    (g1,) = torch.autograd.grad((got * w).sum(), fmap)
    (g2,) = torch.autograd.grad((ref.view(3, 11, 5) * w).sum(), fmap)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-10)
