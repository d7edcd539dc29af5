"""Benchmark the CPGAN generator and discriminators on CPU (or any device).

Measures, for a small CPU setting and the coco-paper setting:

* generator throughput (images/s of the final stage; every stage is computed) in eval mode under
  ``torch.no_grad``, at batch 1 and batch 16;
* seconds per training step: one discriminator update (G forward without grad, every stage's D on real,
  generated and mismatched pairs, hinge loss eq. (5), backward, Adam step) plus one generator update
  (G forward, every D, hinge loss eq. (4) + KL, backward, Adam step).  Text features are random tensors
  (the frozen text encoder and the TISCL term are not part of this benchmark).

Usage::

    python benchmarks/bench_generator.py --out bench_generator.json [--threads 1] [--reps 3]
    python benchmarks/bench_generator.py --settings small --train-batch-small 16
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass

import torch

from cpgan.gan_losses import d_hinge_loss, g_hinge_loss, kl_loss
from cpgan.models.discriminator import D_NET
from cpgan.models.generator import G_NET, init_weights_attngan, truncated_noise


@dataclass
class Setting:
    name: str
    ngf: int
    ndf: int
    emb_dim: int
    r_num: int
    branch_num: int
    base_size: int
    words: int
    train_batch: int
    cond_head: str = "fgcd"
    fgcd_grid: int = 4
    z_dim: int = 100
    c_dim: int = 100


def _text(batch: int, s: Setting, gen: torch.Generator):
    words = torch.randn(batch, s.emb_dim, s.words, generator=gen)
    lengths = torch.randint(max(1, s.words // 2), s.words + 1, (batch,), generator=gen)
    mask = torch.arange(s.words)[None, :] >= lengths[:, None]
    words = words.masked_fill(mask[:, None, :], 0.0)
    return torch.randn(batch, s.emb_dim, generator=gen), words, mask


def _build(s: Setting):
    g = G_NET(s.branch_num, s.ngf, s.z_dim, s.c_dim, s.emb_dim, s.r_num, s.base_size)
    g.apply(init_weights_attngan)
    ds = [D_NET(size, s.ndf, s.emb_dim, s.cond_head, s.fgcd_grid) for size in g.image_sizes]
    for d in ds:
        d.apply(init_weights_attngan)
    return g, ds


def bench_sampling(g: G_NET, s: Setting, batch: int, reps: int, gen: torch.Generator) -> dict:
    g.eval()
    sentence, words, mask = _text(batch, s, gen)
    z = truncated_noise(batch, s.z_dim, 1.0, gen)
    times = []
    with torch.no_grad():
        g(z, sentence, words, mask)  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            g(z, sentence, words, mask)
            times.append(time.perf_counter() - t0)
    best, mean = min(times), sum(times) / len(times)
    return {"batch": batch, "sec_per_batch_mean": mean, "sec_per_batch_best": best,
            "images_per_s": batch / mean, "reps": reps}


def bench_train_step(g: G_NET, ds: list[D_NET], s: Setting, reps: int, gen: torch.Generator) -> dict:
    batch = s.train_batch
    g.train()
    for d in ds:
        d.train()
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = [torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999)) for d in ds]
    reals = [torch.rand(batch, 3, size, size, generator=gen) * 2 - 1 for size in g.image_sizes]
    sentence, words, mask = _text(batch, s, gen)

    def step() -> tuple[float, float]:
        z = torch.randn(batch, s.z_dim, generator=gen)
        t0 = time.perf_counter()
        with torch.no_grad():
            fakes, _, _, _ = g(z, sentence, words, mask)
        for d, opt, real, fake in zip(ds, opt_d, reals, fakes):
            opt.zero_grad(set_to_none=True)
            fr, ff = d(real), d(fake)
            wrong = d.cond(fr, sentence.roll(1, 0), words.roll(1, 0), mask.roll(1, 0))  # mismatched captions
            loss = d_hinge_loss(d.uncond(fr), d.uncond(ff), d.cond(fr, sentence, words, mask),
                                d.cond(ff, sentence, words, mask), wrong)["loss"]
            loss.backward()
            opt.step()
        t1 = time.perf_counter()
        opt_g.zero_grad(set_to_none=True)
        fakes, _, mu, logvar = g(z, sentence, words, mask)
        loss = kl_loss(mu, logvar)
        for d, fake in zip(ds, fakes):
            ff = d(fake)
            loss = loss + g_hinge_loss(d.uncond(ff), d.cond(ff, sentence, words, mask))["loss"]
        loss.backward()
        opt_g.step()
        return t1 - t0, time.perf_counter() - t1

    step()  # warm-up
    d_times, g_times = zip(*[step() for _ in range(reps)])
    d_mean, g_mean = sum(d_times) / reps, sum(g_times) / reps
    return {"batch": batch, "d_step_s": d_mean, "g_step_s": g_mean, "step_s": d_mean + g_mean, "reps": reps}


SETTINGS = {
    "small": Setting("small", ngf=32, ndf=32, emb_dim=256, r_num=2, branch_num=3, base_size=16, words=12,
                     train_batch=16),
    "paper": Setting("coco-paper", ngf=48, ndf=96, emb_dim=256, r_num=3, branch_num=3, base_size=64, words=20,
                     train_batch=2),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write results as JSON here")
    ap.add_argument("--settings", nargs="+", default=["small", "paper"], choices=sorted(SETTINGS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16], help="sampling batch sizes")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (after one warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--train-batch-small", type=int, default=None)
    ap.add_argument("--train-batch-paper", type=int, default=None)
    ap.add_argument("--no-train", action="store_true", help="skip the training-step benchmark")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--amp", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                    help="precisions to time: fp32 and/or bf16 autocast (the GAN stage's gan.amp)")
    args = ap.parse_args()
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    results = {"torch": torch.__version__, "device": "cpu", "threads": args.threads,
               "cpu": platform.processor() or platform.machine(), "settings": []}
    for key in args.settings:
        s = SETTINGS[key]
        if key == "small" and args.train_batch_small:
            s.train_batch = args.train_batch_small
        if key == "paper" and args.train_batch_paper:
            s.train_batch = args.train_batch_paper
        g, ds = _build(s)
        entry = {"setting": asdict(s), "image_sizes": g.image_sizes,
                 "g_params": sum(p.numel() for p in g.parameters()),
                 "d_params": [sum(p.numel() for p in d.parameters()) for d in ds],
                 "sampling": [], "train": None}
        entry["train_by_amp"] = {}
        for amp in args.amp:
            ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16")
            for b in args.batches:
                with ctx:
                    r = bench_sampling(g, s, b, args.reps, gen)
                r["amp"] = amp
                entry["sampling"].append(r)
                print(f"[{s.name}] {amp} sample batch {b:3d}: {r['images_per_s']:8.2f} images/s "
                      f"({r['sec_per_batch_mean']:.3f} s/batch)", flush=True)
            if not args.no_train:
                with ctx:
                    r = bench_train_step(g, ds, s, args.reps, gen)
                entry["train_by_amp"][amp] = r
                entry["train"] = entry["train"] or r
                print(f"[{s.name}] {amp} train step batch {r['batch']}: {r['step_s']:.3f} s "
                      f"(D {r['d_step_s']:.3f} s + G {r['g_step_s']:.3f} s)", flush=True)
        results["settings"].append(entry)
        del g, ds
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
