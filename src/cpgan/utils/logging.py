"""Run logging: one JSON line per event in ``metrics.jsonl``, progress bars on a TTY, messages on stderr.

TensorBoard event files are written too when the ``tensorboard`` package happens to be installed (it is
not a dependency); the JSON lines are the source of truth.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm


def is_tty() -> bool:
    return sys.stderr.isatty()


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", **kw) -> tqdm:
    """A tqdm bar that shows only on a terminal (logs stay clean under nohup/CI)."""
    return tqdm(iterable, total=total, desc=desc, disable=not is_tty(), dynamic_ncols=True, leave=False, **kw)


def echo(msg: str) -> None:
    """One human-readable line on stderr (not swallowed by progress bars)."""
    tqdm.write(msg, file=sys.stderr)


def _clean(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        try:
            v = v.item()
        except (ValueError, RuntimeError):
            return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class JsonlLogger:
    """Append-only JSON-lines log (flushed per line so a crash loses nothing already logged)."""

    def __init__(self, path: str | Path, stage: str = "", tensorboard_dir: str | Path | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self._f = open(self.path, "a")
        self._tb = None
        if tensorboard_dir is not None:
            try:  # optional
                from torch.utils.tensorboard import SummaryWriter  # noqa: WPS433

                self._tb = SummaryWriter(str(tensorboard_dir))
            except Exception:  # tensorboard not installed
                self._tb = None

    def log(self, step: int | None = None, **values: Any) -> dict:
        rec = {"time": round(time.time(), 3), "stage": self.stage}
        if step is not None:
            rec["step"] = int(step)
        rec.update({k: _clean(v) for k, v in values.items()})
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._tb is not None and step is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("time", "step"):
                    self._tb.add_scalar(f"{self.stage}/{k}", v, step)
        return rec

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "JsonlLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSON-lines log, ignoring a torn last line."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
