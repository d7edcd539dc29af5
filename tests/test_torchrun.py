"""The chain under ``torchrun`` with 2 CPU processes (gloo): rank 0 runs the single-process stages, both ranks
train the GAN with averaged gradients, and the run finishes with one set of outputs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from test_pipeline import PLAIN, TINY


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed/gloo missing")
def test_two_process_run(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    args = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "cpgan.cli", "run", "shapes-quick",
            "--out", str(tmp_path / "run")]
    for kv in TINY + PLAIN:
        args += ["--set", kv]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "run"
    for stage in ("data", "vocab", "evaluator", "damsm", "gan", "evaluate"):
        assert (run / stage / "done.json").exists(), stage
    gan = json.loads((run / "gan" / "done.json").read_text())["summary"]
    assert gan["steps"] == 4
    assert (run / "gan" / "metrics.rank1.jsonl").exists()  # rank 1 trained too
    assert (run / "gan" / "generator.safetensors").exists()
