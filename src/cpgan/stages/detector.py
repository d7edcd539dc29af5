"""Stage ``detector``: the YOLOv3-style object detector and the region features of every image (DESIGN §3.1–3.2).

* With ``detector.weights`` (a Darknet ``.weights`` file, e.g. the official YOLOv3 COCO weights with
  ``detector.cfg=configs/darknet/yolov3.cfg``) the detector is loaded, not trained.
* Otherwise (shapes world) the cfg (``configs/darknet/shapes-small.cfg``: 64 colour×shape classes) is trained on
  the ground-truth boxes with the Darknet YOLOv3 loss, Adam, ``detector.steps`` / ``max_minutes``; resumable.
  mAP@0.5 on the test split is reported.

Then, for each split, the top-36 boxes per image (after NMS, padded with the next-best boxes, validity mask)
and a 1024-d feature per box (RoIAlign + mean on ``detector.feature_layer``) are written to the region store
``detector/regions_<split>/`` (fp16 shards, resumable after a kill). The memory and the OAIE read these;
generated images go through the same detector on the fly (:func:`cpgan.encode.detector_object_fn`).

Outputs: ``detector.weights`` (Darknet format), ``regions_<split>/``, ``state.safetensors`` while training.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..build import uses_detector
from ..config import Config, repo_root
from ..data import shapes
from ..data.dataset import load_records, load_split, resolve_data_dir, to_tensor
from ..interop.darknet_weights import read_weights, write_weights
from ..models.darknet import Darknet, config_path
from ..models.yolo import YoloLoss, average_precision, postprocess, region_features, targets_from_boxes
from ..utils.checkpoint import load_state, save_state
from ..utils.logging import echo, progress
from .base import Deadline, Stage, StageContext, StageError

WEIGHTS = "detector.weights"


def resolve_cfg(name: str) -> Path:
    p = Path(name)
    if p.is_file():
        return p
    if (repo_root() / p).is_file():
        return repo_root() / p
    return config_path(name)


def build_detector(cfg: Config) -> Darknet:
    return Darknet(str(resolve_cfg(cfg.detector.cfg)))


def load_detector(cfg: Config, run_dir: Path, device: torch.device | str = "cpu") -> Darknet:
    """The run's detector (eval mode, frozen)."""
    model = build_detector(cfg)
    path = Path(run_dir) / "detector" / WEIGHTS
    if not path.exists():
        raise StageError(f"no detector weights at '{path}'; run the detector stage first")
    read_weights(model, path)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _labels(records: list[dict]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Shapes-world records -> boxes (n,4) normalised xyxy and class ids colour*8 + shape."""
    ci = {c: i for i, c in enumerate(shapes.COLOURS)}
    si = {s: i for i, s in enumerate(shapes.SHAPES)}
    boxes = [np.asarray([o["box"] for o in r["objects"]], np.float32).reshape(-1, 4) for r in records]
    labels = [np.asarray([ci[o["colour"]] * len(shapes.SHAPES) + si[o["shape"]] for o in r["objects"]], np.int64)
              for r in records]
    return boxes, labels


def _images(arr: np.ndarray, idx: np.ndarray, size: int) -> torch.Tensor:
    x = torch.stack([to_tensor(arr[i]) for i in idx])  # [-1, 1]
    x = (x + 1) / 2
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                            antialias=True)
    return x


def train(cfg: Config, ctx: StageContext, model: Darknet) -> dict:
    d = cfg.detector
    data_dir = resolve_data_dir(ctx.run_dir)
    recs, arr = load_records(data_dir, "train")
    if arr is None:
        raise StageError("training a detector needs ground-truth boxes (the shapes world); for other data give "
                         "detector.weights=PATH to Darknet .weights and detector.cfg to its cfg")
    boxes, labels = _labels(recs)
    dev = ctx.device
    model.to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=d.lr)
    crit = YoloLoss()
    step, spent = 0, 0.0
    state_path = ctx.dir / "state.safetensors"
    if state_path.exists():
        st = load_state(state_path)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, spent = st["step"], st["seconds"]
        echo(f"[detector] resuming at step {step}")
    deadline = Deadline(d.max_minutes, spent)
    n = len(recs)
    bar = progress(total=d.steps, initial=step, desc="detector")
    running = 0.0

    def save() -> None:
        save_state(state_path, {"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                                "seconds": deadline.elapsed})

    while step < d.steps:
        if ctx.stop_requested or deadline.expired():
            break
        rng = np.random.default_rng([d.seed, step])  # batch of step t is a function of (seed, t)
        idx = rng.choice(n, size=d.batch_size, replace=False)
        x = _images(arr, idx, d.input_size).to(dev)
        if rng.random() < 0.5:  # horizontal flip: boxes mirrored (no relation words here)
            x = x.flip(-1)
            bx = [np.stack([1 - boxes[i][:, 2], boxes[i][:, 1], 1 - boxes[i][:, 0], boxes[i][:, 3]], 1) for i in idx]
        else:
            bx = [boxes[i] for i in idx]
        tgt = targets_from_boxes(bx, [labels[i] for i in idx]).to(dev)
        loss, parts = crit(model(x), tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        running += float(loss.detach())
        bar.update(1)
        if step % 50 == 0:
            ctx.log(step, loss=running / 50, **{k: v for k, v in parts.items()}, minutes=deadline.elapsed / 60)
            bar.set_postfix(loss=f"{running / 50:.3f}")
            running = 0.0
        if step % 500 == 0:
            save()
    bar.close()
    save()
    model.eval()
    return {"train_steps": step, "train_minutes": deadline.elapsed / 60, "stopped": ctx.stop_requested}


@torch.no_grad()
def evaluate_map(cfg: Config, ctx: StageContext, model: Darknet, split: str = "test", limit: int = 1000) -> float:
    recs, arr = load_records(resolve_data_dir(ctx.run_dir), split)
    recs = recs[:limit]
    gt_boxes, gt_labels = _labels(recs)
    pb, ps, pl = [], [], []
    size = cfg.detector.input_size
    for s in range(0, len(recs), 100):
        idx = np.arange(s, min(len(recs), s + 100))
        out = postprocess(model(_images(arr, idx, size).to(ctx.device)), conf_thresh=0.01,
                          nms_thresh=cfg.detector.nms_thresh, normalize=True)
        for o in out:
            pb.append(o["boxes"].cpu().numpy())
            ps.append(o["scores"].cpu().numpy())
            pl.append(o["labels"].cpu().numpy())
    m, _ = average_precision(pb, ps, pl, gt_boxes, gt_labels, 0.5)
    return float(m)


@torch.no_grad()
def write_regions(cfg: Config, ctx: StageContext, model: Darknet, split: str, batch_size: int = 64) -> dict:
    from ..data.dataset import decode_image
    from ..data.regions import RegionStoreWriter

    data = load_split(ctx.run_dir, split)
    writer = RegionStoreWriter(ctx.dir / f"regions_{split}", num_regions=cfg.model.num_regions)
    done = writer.done_keys()
    todo = [i for i, k in enumerate(data.keys) if k not in done]
    size = cfg.detector.input_size
    bar = progress(total=len(data.keys), initial=len(data.keys) - len(todo), desc=f"regions {split}")
    for s in range(0, len(todo), batch_size):
        if ctx.stop_requested:
            break
        idx = todo[s:s + batch_size]
        if isinstance(data.images, np.ndarray):
            rows = data._rows if getattr(data, "_rows", None) is not None else np.arange(len(data.keys))
            x = _images(data.images, rows[idx], size)
        else:
            ims = []
            for i in idx:
                im = decode_image(data.images[i])
                if im is None:  # unreadable image: a grey square (its features are flagged invalid below)
                    im = np.full((size, size, 3), 127, np.uint8)
                t = (to_tensor(im) + 1) / 2
                ims.append(torch.nn.functional.interpolate(t[None], size=(size, size), mode="bilinear",
                                                           align_corners=False, antialias=True)[0])
            x = torch.stack(ims)
        rf = region_features(model, x.to(ctx.device), top_k=cfg.model.num_regions,
                             feature_layer=cfg.detector.feature_layer if cfg.detector.feature_layer >= 0 else None,
                             conf_thresh=cfg.detector.conf_thresh, nms_thresh=cfg.detector.nms_thresh)
        writer.add([data.keys[i] for i in idx], rf.boxes.cpu(), rf.feats.cpu(), rf.scores.cpu(), rf.valid.cpu())
        bar.update(len(idx))
    bar.close()
    if ctx.stop_requested:
        return {}
    writer.close()
    return {f"regions_{split}": len(data.keys)}


def run(cfg: Config, ctx: StageContext) -> dict:
    torch.manual_seed(cfg.detector.seed)
    model = build_detector(cfg)
    summary: dict = {}
    wpath = ctx.dir / WEIGHTS
    if cfg.detector.weights:
        info = read_weights(model, cfg.detector.weights)
        summary["weights"] = str(cfg.detector.weights)
        summary["images_seen"] = info.get("seen") if isinstance(info, dict) else None
        model.to(ctx.device).eval()
    elif wpath.exists():
        read_weights(model, wpath)
        model.to(ctx.device).eval()
    else:
        summary.update(train(cfg, ctx, model))
        if ctx.stop_requested:
            return summary
        write_weights(model.cpu(), wpath)
        model.to(ctx.device).eval()
    if cfg.data.source == "shapes":
        summary["map50_test"] = evaluate_map(cfg, ctx, model, "test")
        echo(f"[detector] mAP@0.5 on test: {summary['map50_test']:.3f}")
    splits = ["train", "test", "test_novel"] if cfg.data.source == "shapes" else ["train", "test"]
    for split in splits:
        summary.update(write_regions(cfg, ctx, model, split))
        if ctx.stop_requested:
            break
    ctx.log(**{k: v for k, v in summary.items() if isinstance(v, (int, float))})
    return summary


STAGE = Stage(name="detector", run=run, upstream=("vocab",),
              config_keys=("detector", "model.num_regions"), needed=uses_detector,
              budget_keys=("detector.steps", "detector.max_minutes"),
              help="train/load the YOLOv3 detector and write region features")
