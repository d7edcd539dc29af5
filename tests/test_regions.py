"""Region store: streamed sharded writing, memory-mapped reading, resuming after a crash or SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

import cpgan
from cpgan.data import regions as regions_mod
from cpgan.data.regions import RegionStore, RegionStoreWriter

R, D = 36, 64  # small feature size for the logic tests


def item(i: int, d: int = D):
    """Deterministic content of image i: boxes (R,4), feats (R,d), scores (R,), valid (R,)."""
    rng = np.random.default_rng(1000 + i)
    boxes = rng.random((R, 4), dtype=np.float32)
    feats = rng.standard_normal((R, d), dtype=np.float32)
    scores = rng.random(R, dtype=np.float32)
    valid = np.arange(R) < (i % (R + 1))
    return boxes, feats, scores, valid


def batch(ids, d: int = D):
    parts = [item(i, d) for i in ids]
    return [f"img_{i:06d}" for i in ids], *(np.stack(p) for p in zip(*parts))


def write_range(writer, ids, bs):
    for s in range(0, len(ids), bs):
        writer.add(*batch(ids[s : s + bs]))


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def single_pass(root: Path, n: int, shard: int = 16, bs: int = 7) -> Path:
    w = RegionStoreWriter(root, num_regions=R, feat_dim=D, shard_size=shard)
    write_range(w, list(range(n)), bs)
    w.close()
    return root


def test_roundtrip_and_reader_api(tmp_path):
    n = 50
    root = single_pass(tmp_path / "s", n)
    m = json.loads((root / "manifest.json").read_text())
    assert [s["rows"] for s in m["shards"]] == [16, 16, 16, 2] and m["complete"]
    store = RegionStore(root)
    assert len(store) == n and store.keys == [f"img_{i:06d}" for i in range(n)]
    assert store.index_of("img_000033") == 33 and "img_000033" in store and "nope" not in store
    with pytest.raises(KeyError, match="not in the region store"):
        store.index_of("nope")
    got = store.get("img_000017")
    b, f, s, v = item(17)
    np.testing.assert_array_equal(got["boxes"], b)
    np.testing.assert_array_equal(got["feats"], f.astype(np.float16))
    assert got["feats"].dtype == np.float16 and got["valid"].dtype == np.bool_
    np.testing.assert_array_equal(got["scores"], s)
    np.testing.assert_array_equal(got["valid"], v)
    idx = [49, 0, 16, 15, 33, 0, -1]  # across shards, repeats, negative
    out = store.get_batch(idx)
    for k, i in enumerate([49, 0, 16, 15, 33, 0, 49]):
        bb, ff, ss, vv = item(i)
        np.testing.assert_array_equal(out["boxes"][k], bb)
        np.testing.assert_array_equal(out["feats"][k], ff.astype(np.float16))
        np.testing.assert_array_equal(out["valid"][k], vv)
    with pytest.raises(IndexError):
        store.get_batch([50])
    # boundaries do not depend on the caller's batch size
    other = single_pass(tmp_path / "t", n, bs=16)
    assert files_of(other) == files_of(root)


def test_torch_inputs_and_input_errors(tmp_path):
    w = RegionStoreWriter(tmp_path / "s", num_regions=R, feat_dim=D, shard_size=4)
    keys, b, f, s, v = batch(range(3))
    w.add(keys, torch.from_numpy(b), torch.from_numpy(f), torch.from_numpy(s), torch.from_numpy(v))
    with pytest.raises(ValueError, match="already stored"):
        w.add(keys[:1], b[:1], f[:1], s[:1], v[:1])
    with pytest.raises(ValueError, match="feats has shape"):
        w.add(["x"], b[:1], f[:1, :, :3], s[:1], v[:1])
    with pytest.raises(ValueError, match="float16 range"):
        w.add(["z"], b[:1], f[:1] * 1e5, s[:1], v[:1])
    with pytest.raises(ValueError, match="duplicate keys"):
        w.add(["y", "y"], b[:2], f[:2], s[:2], v[:2])
    with pytest.raises(ValueError, match="incomplete"):
        RegionStore(tmp_path / "s")
    assert len(RegionStore(tmp_path / "s", allow_incomplete=True)) == 0  # nothing committed yet
    w.close()
    np.testing.assert_array_equal(RegionStore(tmp_path / "s").get("img_000002")["scores"], s[2])
    with pytest.raises(ValueError, match="complete"):
        RegionStoreWriter(tmp_path / "s", num_regions=R, feat_dim=D, shard_size=4).add(*batch([9]))
    with pytest.raises(ValueError, match="other settings"):
        RegionStoreWriter(tmp_path / "s", num_regions=R, feat_dim=D, shard_size=8)
    with pytest.raises(FileNotFoundError, match="no region store"):
        RegionStore(tmp_path / "missing")


def test_streaming_memory_bound(tmp_path):
    """~29 MB of fp16 features written and read back with < 4 MB of Python allocations at any time."""
    n, d, bs = 400, 1024, 4
    total = n * R * d * 2
    root = tmp_path / "big"
    tracemalloc.start()
    try:
        w = RegionStoreWriter(root, num_regions=R, feat_dim=d, shard_size=64)
        for s in range(0, n, bs):
            ids = list(range(s, min(s + bs, n)))
            w.add(*batch(ids, d))
        w.close()
        store = RegionStore(root)
        checksum = 0.0
        for s in range(0, n, bs):
            checksum += float(store.get_batch(range(s, min(s + bs, n)))["feats"].sum(dtype=np.float64))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total > 29e6
    print(f"peak Python allocation {peak / 1e6:.2f} MB for {total / 1e6:.1f} MB of features")
    assert peak < 4e6, f"peak Python allocation {peak / 1e6:.1f} MB"
    expect = sum(float(item(i, d)[1].astype(np.float16).astype(np.float64).sum()) for i in range(n))
    assert checksum == pytest.approx(expect, rel=1e-9, abs=1e-6)


class Boom(RuntimeError):
    pass


def test_resume_after_exception(tmp_path):
    n = 61
    ref = files_of(single_pass(tmp_path / "ref", n))
    root = tmp_path / "crash"
    ids = list(range(n))
    with pytest.raises(Boom):
        with RegionStoreWriter(root, num_regions=R, feat_dim=D, shard_size=16) as w:
            for s in range(0, n, 7):
                if s >= 42:  # 2 shards committed, the third half written
                    raise Boom("killed")
                w.add(*batch(ids[s : s + 7]))
    w2 = RegionStoreWriter(root, num_regions=R, feat_dim=D, shard_size=16)
    done = w2.done_keys()
    assert w2.num_done == 32 and done == {f"img_{i:06d}" for i in range(32)}
    assert not (root / ".partial_00002").exists()  # the half-written shard was discarded
    write_range(w2, [i for i in ids if f"img_{i:06d}" not in done], 5)  # another batch size on purpose
    w2.close()
    assert files_of(root) == ref


def test_resume_after_crash_between_rename_and_manifest(tmp_path, monkeypatch):
    n = 40
    ref = files_of(single_pass(tmp_path / "ref", n))
    root = tmp_path / "crash"
    real = regions_mod._atomic_write_json

    def flaky(path, obj):
        if len(obj.get("shards", [])) == 2:
            raise Boom("power cut")
        real(path, obj)

    monkeypatch.setattr(regions_mod, "_atomic_write_json", flaky)
    w = RegionStoreWriter(root, num_regions=R, feat_dim=D, shard_size=16)
    with pytest.raises(Boom):
        write_range(w, list(range(n)), 8)
    assert (root / "shard_00001").is_dir()  # renamed, but never published
    monkeypatch.setattr(regions_mod, "_atomic_write_json", real)
    w2 = RegionStoreWriter(root, num_regions=R, feat_dim=D, shard_size=16)
    assert w2.num_done == 16 and not (root / "shard_00001").exists()
    write_range(w2, list(range(16, n)), 8)
    w2.close()
    assert files_of(root) == ref


CHILD = """
import sys, time
import numpy as np
sys.path.insert(0, {src!r})
sys.path.insert(0, {tests!r})
from test_regions import batch, R, D
from cpgan.data.regions import RegionStoreWriter
w = RegionStoreWriter({root!r}, num_regions=R, feat_dim=D, shard_size=16)
done = w.done_keys()
ids = [i for i in range({n}) if "img_%06d" % i not in done]
for s in range(0, len(ids), 5):
    w.add(*batch(ids[s:s + 5]))
    if s + 5 >= {pause_at}:
        print("READY", flush=True)
        time.sleep(120)
w.close()
print("DONE", flush=True)
"""


def test_resume_after_sigkill(tmp_path):
    n = 57
    ref = files_of(single_pass(tmp_path / "ref", n))
    root = tmp_path / "killed"
    src = str(Path(cpgan.__file__).resolve().parents[1])
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD.format(src=src, tests=str(Path(__file__).parent), root=str(root), n=n, pause_at=40)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "READY", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (root / ".partial_00002").is_dir()  # killed in the middle of the third shard
    assert not json.loads((root / "manifest.json").read_text())["complete"]
    # resume (as a re-run of the stage would) and finish
    w = RegionStoreWriter(root, num_regions=R, feat_dim=D, shard_size=16)
    assert w.num_done == 32
    done = w.done_keys()
    write_range(w, [i for i in range(n) if f"img_{i:06d}" not in done], 5)
    w.close()
    assert files_of(root) == ref
    assert len(RegionStore(root)) == n
