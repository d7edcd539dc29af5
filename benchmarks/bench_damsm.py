"""Benchmark one DAMSM training step (text encoder + image encoder + DAMSM loss, forward and backward).

Usage: ``python benchmarks/bench_damsm.py --out bench_damsm.json [--threads 2]``. Settings: the shapes-quick
encoders (small CNN, 64 px, batch 48, 15 words) and the paper's (frozen Inception-v3 at 299 px, batch 48).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from cpgan.losses import damsm_loss
from cpgan.models.image_encoder import ImageEncoder
from cpgan.models.text_encoder import TextEncoder

SETTINGS = {
    "shapes-quick": {"backbone": "small", "width": 32, "size": 64, "batch": 48, "words": 15, "vocab": 80},
    "paper": {"backbone": "inception", "width": 32, "size": 299, "batch": 48, "words": 15, "vocab": 27297},
}


def bench(name: str, reps: int) -> dict:
    s = SETTINGS[name]
    torch.manual_seed(0)
    te = TextEncoder(s["vocab"])
    ie = ImageEncoder(backbone=s["backbone"], small_width=s["width"], grid_size=8)
    params = [p for p in list(te.parameters()) + list(ie.parameters()) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-3, betas=(0.5, 0.999))
    B, T = s["batch"], s["words"]
    caps = torch.randint(1, s["vocab"], (B, T))
    lens = torch.randint(T // 2, T + 1, (B,))
    x = torch.rand(B, 3, s["size"], s["size"]) * 2 - 1

    def step() -> None:
        w, sent = te(caps, lens)
        f = ie(x)
        out = damsm_loss(f.regions, f.global_features, w, sent, lens)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    sec = (time.perf_counter() - t0) / reps
    return {"setting": name, **s, "seconds_per_step": sec, "pairs_per_second": B / sec}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--settings", nargs="+", default=["shapes-quick"], choices=sorted(SETTINGS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
           "torch": torch.__version__, "results": [bench(n, args.reps) for n in args.settings]}
    print(json.dumps(res, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
