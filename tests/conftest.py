"""Test-suite settings: one intra-op thread (tiny tensors; robust when the cores are shared)."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
