"""Multi-GPU training with ``torchrun`` + DistributedDataParallel (DESIGN §1).

``torchrun --nproc_per_node=8 -m cpgan.cli run coco-paper --out runs/coco`` starts one process per GPU;
:func:`init` reads the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), joins the NCCL
(or Gloo on CPU) process group and pins the process to its GPU. Without torchrun everything is a no-op
(world size 1), so the same code runs on a laptop.

Conventions: the global batch of a step is split evenly across ranks (``ResumableBatchSampler`` takes
``rank``/``world``), only rank 0 writes files (checkpoints, samples, logs), and every rank resumes from
the same checkpoint, so a resumed multi-GPU run sees the same batches as an uninterrupted one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun; returns the info and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    return DistInfo(rank, world, local), device


def wrap(module: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """DDP-wrap a module that has trainable parameters (identity when not distributed)."""
    if not info.enabled or not any(p.requires_grad for p in module.parameters()):
        return module
    module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module) if device.type == "cuda" else module
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if hasattr(module, "module") and isinstance(
        module, torch.nn.parallel.DistributedDataParallel) else module


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / info.world


def broadcast_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Any rank's stop flag (SIGTERM, deadline) stops every rank at the same step."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def average_gradients(module: torch.nn.Module, info: DistInfo) -> None:
    """All-reduce (mean) the gradients of ``module`` across ranks, coalesced into one flat buffer.

    Used instead of the DDP wrapper by the GAN stage, whose discriminators are called several times per
    step, through methods other than ``forward``, and with frozen parameters during the generator update —
    patterns DDP's reducer does not support. The arithmetic is the same as DDP's (mean of rank gradients).
    """
    if not info.enabled:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= info.world
    for g, r in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(r)


def broadcast_module(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank (identical start)."""
    if not info.enabled:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)
