"""Advisory file locks (POSIX ``flock``): let several processes share one output folder safely.

Used by ``cpgan ablate`` so that two or more invocations on the same OUT (one per CPU core or GPU) split the
work: a shared stage is trained by whichever process takes its lock first while the others wait for it and then
reuse it; a row being trained by one process is skipped by the others. The lock is released when the process
dies, however it dies (the kernel drops ``flock`` locks with the file descriptor), so a killed worker never
leaves a stale lock behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def file_lock(path: str | Path, blocking: bool = True, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    Yields True when the lock is held. With ``blocking=False`` it yields False at once when another process
    holds the lock (the block then runs without it: check the value). With ``blocking=True`` and the lock
    busy, ``on_wait()`` is called once before waiting (e.g. to say so).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not blocking:
                yield False
                return
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
