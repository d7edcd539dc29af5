"""Stage ``evaluator``: train the shapes-world judge (DESIGN §6).

A per-cell grid detector of objectness, colour, shape (and a background head) trained on real shapes images
with their boxes (:mod:`cpgan.evaluator_train`). It is another architecture with another seed than the
project's YOLO detector, which also trains the generator, so it judges generated images independently: its
detections give semantic object accuracy, its pooled features FID and its dominant-object posterior IS.

Outputs: ``evaluator/evaluator.safetensors`` (+ sidecar with the constructor arguments and its own test
scores), ``state.safetensors`` while training (resumable).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..data.dataset import load_records, resolve_data_dir
from ..evaluator_train import evaluate_evaluator, train_evaluator
from ..models.evaluator import ShapesEvaluator
from ..utils.checkpoint import load_state, load_weights, save_state, save_weights
from ..utils.logging import echo
from .base import Stage, StageContext

WEIGHTS = "evaluator.safetensors"


def load_evaluator(run_dir: Path, device: torch.device | str = "cpu") -> ShapesEvaluator:
    """The trained judge of a run (eval mode, frozen)."""
    sd, meta = load_weights(Path(run_dir) / "evaluator" / WEIGHTS, device=device)
    kw = meta["model_kwargs"]
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    model = ShapesEvaluator(**kw)
    model.load_state_dict(sd)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def run(cfg: Config, ctx: StageContext) -> dict:
    e = cfg.evaluator
    data_dir = resolve_data_dir(ctx.run_dir)
    train_recs, train_imgs = load_records(data_dir, "train")
    test_recs, test_imgs = load_records(data_dir, "test")
    state_path = ctx.dir / "state.safetensors"
    resume = load_state(state_path) if state_path.exists() else None
    if resume:
        echo(f"[evaluator] resuming at step {resume['step']}")
    kwargs = {"widths": (e.width, 2 * e.width, 4 * e.width), "native_size": 64}

    def log_fn(rec: dict) -> None:
        ctx.log(rec.get("step"), **{k: v for k, v in rec.items() if k != "step"})

    def ckpt_fn(state: dict) -> None:
        save_state(state_path, state)

    class _Stop(Exception):
        pass

    def log_and_stop(rec: dict) -> None:
        log_fn(rec)
        if ctx.stop_requested:
            raise _Stop

    try:
        model, hist = train_evaluator(
            train_imgs, train_recs, None, None, steps=e.steps, minutes=e.max_minutes or None,
            batch_size=e.batch_size, lr=e.lr, seed=e.seed, device=ctx.device, model_kwargs=kwargs,
            log_fn=log_and_stop, checkpoint_fn=ckpt_fn, resume_state=resume,
            log_every=10, checkpoint_every=100)  # a stop request is seen within 10 steps, loses <= 100
    except _Stop:
        return {"stopped": True}
    scores = {}
    for split in ("test", "test_novel"):
        recs, imgs = load_records(data_dir, split)
        scores[split] = evaluate_evaluator(model, imgs, recs, device=ctx.device)
    meta = {"model_kwargs": {**kwargs, "widths": list(kwargs["widths"])}, "steps": hist["steps"],
            "train_seconds": hist["elapsed_s"], "scores": scores}
    save_weights(ctx.dir / WEIGHTS, model.state_dict(), meta)
    summary = {"steps": hist["steps"], "minutes": hist["elapsed_s"] / 60,
               **{f"{s}_{k}": v for s, sc in scores.items() for k, v in sc.items()
                  if k in ("soa_i", "soa_c", "colour_acc", "shape_acc", "background_acc")}}
    ctx.log(**summary)
    echo(f"[evaluator] SOA-I on real test images {scores['test']['soa_i']:.3f} "
         f"(test_novel {scores['test_novel']['soa_i']:.3f})")
    return summary


STAGE = Stage(name="evaluator", run=run, upstream=("data",), config_keys=("evaluator",),
              needed=lambda cfg: cfg.data.source == "shapes",
              budget_keys=("evaluator.steps", "evaluator.max_minutes"),
              help="train the shapes-world judge")
