"""Region-feature throughput (images/s) of the detector: top-36 boxes + 1024-d RoIAlign features per image.

Cases (random weights, eval mode):
  * shapes-small.cfg at 64 px, inference (``torch.no_grad``) and the differentiable path used by TISCL
    (forward with gradients + backward of the features to the input images);
  * yolov3.cfg at 416 px, inference.

Usage::

    python benchmarks/bench_regions.py --out results/bench_regions.json [--threads 1] [--seconds 3]

Writes a JSON object ``{"env": {...}, "results": [{"case", "cfg", "size", "batch", "images_per_s",
"ms_per_image", "iters"}, ...]}`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cpgan.models.darknet import Darknet  # noqa: E402
from cpgan.models.yolo import region_features  # noqa: E402


def _time(fn, min_seconds: float, min_iters: int = 3) -> tuple[float, int]:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < min_seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n, n


def bench(cfg: str, size: int, batch: int, grad: bool, seconds: float) -> dict:
    torch.manual_seed(0)
    model = Darknet.from_cfg(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(grad)
    x = torch.rand(batch, 3, size, size)

    if grad:
        def step() -> None:
            xi = x.clone().requires_grad_(True)
            r = region_features(model, xi)
            r.feats.sum().backward()
    else:
        def step() -> None:
            with torch.no_grad():
                region_features(model, x)

    per_batch, iters = _time(step, seconds)
    return {
        "case": f"{cfg}@{size}" + ("+backward" if grad else ""),
        "cfg": cfg,
        "size": size,
        "batch": batch,
        "grad": grad,
        "images_per_s": round(batch / per_batch, 2),
        "ms_per_image": round(1000 * per_batch / batch, 2),
        "iters": iters,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="path of the JSON file to write")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum timing duration per case")
    ap.add_argument("--small-batch", type=int, default=8)
    ap.add_argument("--yolo-batch", type=int, default=2)
    ap.add_argument("--skip-yolov3", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [
        bench("shapes-small", 64, args.small_batch, grad=False, seconds=args.seconds),
        bench("shapes-small", 64, args.small_batch, grad=True, seconds=args.seconds),
    ]
    if not args.skip_yolov3:
        results.append(bench("yolov3", 416, args.yolo_batch, grad=False, seconds=args.seconds))
    report = {
        "env": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
