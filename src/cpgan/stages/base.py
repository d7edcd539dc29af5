"""The stage runner (DESIGN §2).

Every stage is a module in ``cpgan.stages`` exposing a :class:`Stage` object:

* ``name``: the sub-command and the folder ``RUN_DIR/<name>/`` it owns;
* ``upstream``: stages whose outputs it reads (their hashes feed its own);
* ``config_keys``: config sections / dotted keys its result depends on;
* ``needed(cfg)``: whether the configured model uses it (e.g. the captioner only for ``mate``);
* ``run(cfg, ctx) -> dict``: does the work, resumes from its own checkpoints, returns a summary.

A finished stage writes ``done.json`` holding its hash (its config keys + upstream hashes). ``cpgan run``
skips a stage whose marker matches and re-runs it when the hash changed. A stage folder whose partial
work was produced under another hash is cleared before the stage starts again, so stale checkpoints are
never resumed.
"""
from __future__ import annotations

import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import json

import torch

from ..config import Config, dump_yaml, get_key, hash_dict, hash_of, section_hash
from ..utils.checkpoint import atomic_write_json, atomic_write_text
from ..utils.logging import JsonlLogger, echo


class StageError(RuntimeError):
    """A stage cannot run (missing upstream output, bad data); the message says what to do."""


@dataclass
class Stage:
    name: str
    run: Callable[["Config", "StageContext"], dict]
    upstream: tuple[str, ...] = ()
    config_keys: tuple[str, ...] = ()
    needed: Callable[[Config], bool] = lambda cfg: True
    help: str = ""
    distributed: bool = False
    """Runs on every rank under torchrun (DDP-aware). Other stages run on rank 0 while the others wait."""
    budget_keys: tuple[str, ...] = ()
    """Dotted keys that only set how long the stage trains or how often it logs (``gan.steps``,
    ``gan.max_minutes``...). Changing them re-runs the stage but keeps its checkpoint, so training continues
    where it stopped instead of starting over."""


class Interrupted(Exception):
    """Raised inside a stage loop after SIGTERM/SIGINT once its state has been saved."""


@dataclass
class StageContext:
    """What a stage gets besides the config: its folder, a logger, the device and a stop flag."""

    run_dir: Path
    stage: str
    device: torch.device
    logger: JsonlLogger
    hashes: dict[str, str] = field(default_factory=dict)
    _stop: list[bool] = field(default_factory=lambda: [False])

    @property
    def dir(self) -> Path:
        return self.run_dir / self.stage

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def require(self, name: str) -> Path:
        """Folder of a finished upstream stage, or a clear error naming the command to produce it."""
        d = self.run_dir / name
        if not (d / "done.json").exists():
            raise StageError(
                f"stage '{self.stage}' needs the output of stage '{name}', which has not finished in {self.run_dir}; "
                f"run `cpgan run CONFIG --out {self.run_dir} --stages {name}` first"
            )
        return d

    @property
    def stop_requested(self) -> bool:
        return self._stop[0]

    def log(self, step: int | None = None, **values) -> dict:
        return self.logger.log(step, **values)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise StageError(f"device '{spec}' is not valid; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StageError(f"device '{spec}' requested but CUDA is not available; use device=cpu")
    return dev


class Deadline:
    """Wall-clock budget of a training loop (``max_minutes``; 0 or less = unlimited)."""

    def __init__(self, minutes: float, already_spent_s: float = 0.0):
        self.budget = minutes * 60.0 if minutes and minutes > 0 else float("inf")
        self.start = time.monotonic() - already_spent_s

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def expired(self) -> bool:
        return self.elapsed >= self.budget


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
PIPELINE = ("data", "vocab", "evaluator", "detector", "captioner", "memory", "damsm", "gan", "evaluate")


def registry(include_missing: bool = False) -> dict[str, Stage]:
    """The implemented stages in pipeline order (DESIGN §2).

    With ``include_missing`` the stages not implemented yet map to None (``cpgan demo`` reports them).
    """
    import importlib

    out: dict = {}
    for name in PIPELINE:
        try:
            mod = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{name}":
                raise
            if include_missing:
                out[name] = None
            continue
        out[name] = mod.STAGE
    return out


def stage_hash(cfg: Config, name: str, stages: dict[str, Stage], cache: dict[str, str] | None = None) -> str:
    cache = {} if cache is None else cache
    if name in cache:
        return cache[name]
    st = stages[name]
    ups = {u: stage_hash(cfg, u, stages, cache) for u in st.upstream if u in stages and stages[u].needed(cfg)}
    h = hash_of({"stage": name, "config": section_hash(cfg, list(st.config_keys)), "upstream": ups})
    cache[name] = h
    return h


def identity_hash(cfg: Config, name: str, stages: dict[str, Stage], cache: dict[str, str] | None = None) -> str:
    """Like :func:`stage_hash` but blind to the stage's budget keys: partial work with the same identity
    hash is resumed; a different identity hash means the folder is stale and is cleared."""
    st = stages[name]
    cache = {} if cache is None else cache
    ups = {u: stage_hash(cfg, u, stages, cache) for u in st.upstream if u in stages and stages[u].needed(cfg)}
    conf = {}
    for k in st.config_keys:
        v = hash_dict(get_key(cfg, k))
        if isinstance(v, dict):
            prefix = k + "."
            v = {kk: vv for kk, vv in v.items() if prefix + kk not in st.budget_keys}
        elif k in st.budget_keys:
            continue
        conf[k] = v
    return hash_of({"stage": name, "identity": conf, "upstream": ups})


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it is missing or torn."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def stage_status(run_dir: Path, name: str) -> dict | None:
    return read_json(Path(run_dir) / name / "done.json")


def _install_signal_handlers(flag: list[bool]):
    previous = {}

    def handler(signum, frame):  # noqa: ARG001
        if flag[0]:  # second signal: stop now
            raise KeyboardInterrupt
        flag[0] = True
        echo(f"[cpgan] received signal {signum}: saving a checkpoint and stopping (send again to abort now)")

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not in the main thread
            pass
    return previous


def run_stages(cfg: Config, run_dir: str | Path, only: list[str] | None = None, force: bool = False,
               check_upstream: bool = True) -> dict[str, dict]:
    """Run the chain (or ``only`` these stages, in pipeline order). Returns each stage's summary.

    ``check_upstream``: refuse to run a stage whose needed upstream stage is missing or out of date (other hash)
    in ``run_dir`` and not among the stages being run. False skips that check; the stage then fails on a
    missing input by itself (tests that replace an upstream output in place use it).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    stages = registry()
    if only:
        unknown = [s for s in only if s not in stages]
        if unknown:
            raise StageError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(stages)}")
    device = resolve_device(cfg.device)
    from ..utils import distributed as dist

    info, device = dist.init(device)
    hashes: dict[str, str] = {}
    results: dict[str, dict] = {}
    flag = [False]
    previous = _install_signal_handlers(flag)
    try:
        for name, st in stages.items():
            if only and name not in only:
                continue
            if not st.needed(cfg):
                echo(f"[cpgan] {name:10s} not used by this configuration")
                results[name] = {"status": "not needed"}
                continue
            h = stage_hash(cfg, name, stages, hashes)
            sdir = run_dir / name
            done = stage_status(run_dir, name)
            if info.enabled and not st.distributed:
                # single-process stage under torchrun: rank 0 works, the others wait for it
                if not info.is_main:
                    dist.barrier(info)
                    results[name] = {"status": "rank 0"}
                    continue
            if done and done.get("hash") == h and not force:
                echo(f"[cpgan] {name:10s} up to date (finished {done.get('finished', '?')}, {done.get('seconds', 0):.0f} s)")
                results[name] = {"status": "skipped", **done.get("summary", {})}
                if info.enabled and not st.distributed:
                    dist.barrier(info)
                continue
            if check_upstream:
                for u in st.upstream:
                    if u in stages and stages[u].needed(cfg):
                        ud = stage_status(run_dir, u)
                        if not ud or ud.get("hash") != stage_hash(cfg, u, stages, hashes):
                            if only and u not in only:
                                raise StageError(
                                    f"stage '{name}' needs '{u}', which is missing or out of date in {run_dir}; "
                                    f"add it to --stages or run `cpgan run CONFIG --out {run_dir}`")
            # Partial work from another configuration must not be resumed (a budget change keeps it).
            ident = identity_hash(cfg, name, stages, hashes)
            marker = sdir / "config_hash"
            if info.is_main:
                if sdir.exists() and (force or not marker.exists() or marker.read_text().strip() != ident):
                    shutil.rmtree(sdir)
                sdir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(marker, ident)
                (sdir / "done.json").unlink(missing_ok=True)
            dist.barrier(info) if st.distributed else None
            echo(f"[cpgan] {name:10s} running -> {sdir}")
            t0 = time.time()
            log_path = sdir / ("metrics.jsonl" if info.is_main else f"metrics.rank{info.rank}.jsonl")
            with JsonlLogger(log_path, stage=name) as logger:
                ctx = StageContext(run_dir=run_dir, stage=name, device=device, logger=logger, hashes=hashes,
                                   _stop=flag)
                summary = st.run(cfg, ctx) or {}
            seconds = time.time() - t0
            if flag[0]:
                echo(f"[cpgan] {name:10s} interrupted after {seconds:.0f} s; its checkpoint is saved — run again to resume")
                results[name] = {"status": "interrupted", **summary}
                break
            if info.is_main:
                atomic_write_json(sdir / "done.json", {
                    "hash": h, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": seconds,
                    "summary": summary})
            echo(f"[cpgan] {name:10s} done in {seconds:.0f} s")
            results[name] = {"status": "done", "seconds": seconds, **summary}
            if info.enabled and not st.distributed:
                dist.barrier(info)
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)
    return results
