"""File locks that let several `cpgan ablate` workers share one output folder."""
import subprocess
import sys

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
