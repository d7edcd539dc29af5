"""File locks that let several `cpgan ablate` workers share one output folder."""
import subprocess
import sys
import threading

from cpgan.utils.locks import file_lock

PROBE = """
import sys
from cpgan.utils.locks import file_lock
with file_lock(sys.argv[1], blocking=False) as free:
    print("free" if free else "busy")
"""


def _probe(path):
    return subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_lock_excludes_other_processes_and_is_released(tmp_path):
    path = tmp_path / "x.lock"
    with file_lock(path) as held:
        assert held
        assert _probe(path) == "busy"
    assert _probe(path) == "free"


def test_lock_of_a_dead_process_is_gone(tmp_path):
    path = tmp_path / "y.lock"
    code = f"import os; from cpgan.utils.locks import file_lock\nwith file_lock({str(path)!r}): os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert _probe(path) == "free"


def test_blocking_lock_calls_on_wait_only_when_busy_and_then_gets_it(tmp_path):
    path, calls, got = tmp_path / "z.lock", [], []
    with file_lock(path, on_wait=lambda: calls.append("free")):
        pass
    assert calls == []  # free: no wait announced
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom cpgan.utils.locks import file_lock\n"
                               f"with file_lock({str(path)!r}):\n    print('held', flush=True); sys.stdin.readline()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        waited = threading.Event()

        def take():
            with file_lock(path, on_wait=waited.set) as held:
                got.append(held)

        t = threading.Thread(target=take)
        t.start()
        assert waited.wait(10)  # the lock is busy: on_wait ran, the thread now blocks
        assert got == []
        holder.stdin.write("\n")
        holder.stdin.flush()
        t.join(10)
        assert got == [True]
    finally:
        holder.kill()
        holder.wait()
