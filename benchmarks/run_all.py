"""Run every benchmark and write one JSON file each into --out (``make bench``)."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        ["bench_generator.py", "--out", str(out / "generator.json"), "--threads", str(args.threads),
         "--amp", "fp32", "bf16"],
        ["bench_regions.py", "--out", str(out / "regions.json"), "--threads", str(args.threads)],
        ["bench_damsm.py", "--out", str(out / "damsm.json"), "--threads", str(args.threads)],
    ]
    rc = 0
    for job in jobs:
        print(f"== {job[0]}", flush=True)
        rc |= subprocess.call([sys.executable, str(HERE / job[0]), *job[1:]])
    return rc


if __name__ == "__main__":
    sys.exit(main())
