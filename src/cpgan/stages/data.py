"""Stage ``data``: materialise the data set and index it (DESIGN §2, §5).

* ``shapes``: generates the shapes world (``n_train``/``n_test``/``n_test_novel`` scenes at
  ``image_size``) into ``RUN_DIR/data`` — or into ``data.root`` when set, so several runs (e.g. the ablation
  rows) share one copy; an existing copy with the same parameters is reused.
* other sources: validates the layout and writes ``RUN_DIR/data/<split>/index.jsonl``.

``RUN_DIR/data/location.json`` says where the data lives.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..config import Config
from ..data import shapes
from ..data.sources import records_for
from ..utils.checkpoint import atomic_write_json, atomic_write_text
from .base import Stage, StageContext


def _shapes_params(cfg: Config) -> dict:
    d = cfg.data
    return {"size": d.image_size, "n_train": d.n_train, "n_test": d.n_test, "n_test_novel": d.n_test_novel,
            "seed": d.seed}


def _shapes_ready(out: Path, params: dict) -> bool:
    info = out / "info.json"
    if not info.exists():
        return False
    try:
        got = json.loads(info.read_text())
    except json.JSONDecodeError:
        return False
    return all(got.get(k) == v for k, v in params.items()) and all(
        (out / s / "images.npy").exists() and (out / s / "meta.jsonl").exists() for s in ("train", "test", "test_novel"))


def run(cfg: Config, ctx: StageContext) -> dict:
    d = cfg.data
    if d.source == "shapes":
        out = Path(d.root) if d.root else ctx.dir
        params = _shapes_params(cfg)
        if _shapes_ready(out, params):
            ctx.log(reused=str(out))
        else:
            shapes.write_dataset(out, size=d.image_size, n_train=d.n_train, n_test=d.n_test,
                                 n_test_novel=d.n_test_novel, seed=d.seed, progress=True)
        atomic_write_json(ctx.dir / "location.json", {"path": str(out.resolve()), "source": "shapes"})
        counts = {s: sum(1 for _ in open(out / s / "meta.jsonl")) for s in ("train", "test", "test_novel")}
        ctx.log(**{f"n_{k}": v for k, v in counts.items()})
        return {"source": "shapes", "path": str(out), **{f"n_{k}": v for k, v in counts.items()}}
    recs = records_for(d.source, d.root, d.manifest, d.test_fraction)
    counts = {}
    for split, rows in recs.items():
        if d.max_images:
            rows = rows[: d.max_images]
        (ctx.dir / split).mkdir(parents=True, exist_ok=True)
        atomic_write_text(ctx.dir / split / "index.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        counts[split] = len(rows)
    atomic_write_json(ctx.dir / "location.json", {"path": str(ctx.dir.resolve()), "source": d.source})
    ctx.log(**{f"n_{k}": v for k, v in counts.items()})
    return {"source": d.source, **{f"n_{k}": v for k, v in counts.items()}}


STAGE = Stage(name="data", run=run, upstream=(), config_keys=("data",),
              help="generate the shapes world or index a data set on disk")
