"""The web demo's HTTP API (cpgan.serve.app) against a fake sampler: errors, images, attention, limits, load.

The fake sampler has the interface of ``cpgan.sampling.Sampler`` and its own tiny vocabulary; its images are
seeded random arrays, so every decoded PNG can be compared pixel for pixel with what the fake produced.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import re
import threading
import time

import numpy as np
import pytest
from PIL import Image

from cpgan.serve.app import Gate, ServeLimits, _resize, add_serve_command, attention_overlays, cmd_serve, make_server

VOCAB = {"a", "the", "red", "blue", "green", "circle", "square", "triangle", "small", "large", "above", "and"}
STAGES = [8, 16, 32]
ATT_SIZES = [16, 32]


class FakeSampler:
    """Sampler interface; records the largest number of overlapping ``generate`` calls."""

    max_words = 12
    stage_sizes = STAGES

    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.delay = delay
        self.fail = fail
        self.active = 0
        self.max_active = 0
        self.calls = 0
        self.last: dict | None = None
        self._lock = threading.Lock()

    def generate(self, caption: str, n: int = 4, seed: int = 0, truncation: float = 1.0) -> dict:
        tokens = re.findall(r"[a-z0-9_]+", caption.lower())
        words = [t for t in tokens if t in VOCAB]
        unknown = [t for t in tokens if t not in VOCAB]
        if not words:
            raise ValueError(f"the caption has no known word ({', '.join(unknown)}); use words of the vocabulary")
        words = words[: self.max_words]  # like cpgan.sampling.Sampler: known words cut to max_words
        with self._lock:
            self.active += 1
            self.calls += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(self.delay)
            if self.fail:
                raise RuntimeError("boom")
        finally:
            with self._lock:
                self.active -= 1
        rng = np.random.default_rng(seed)
        images = [rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8) for s in STAGES]
        attention = [rng.random((n, len(words), s, s)).astype(np.float32) for s in ATT_SIZES]
        out = {"images": images, "attention": attention, "words": words, "unknown": unknown}
        self.last = {"caption": caption, "n": n, "seed": seed, "truncation": truncation, **out}
        return out


def _start(sampler, limits=None):
    srv = make_server(sampler, "127.0.0.1", 0, limits=limits, run_name="fake-run", quiet=True)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    return srv, t


def _stop(srv, t):
    srv.shutdown()
    srv.server_close()
    t.join(timeout=5)


@pytest.fixture(scope="module")
def server():
    sampler = FakeSampler()
    srv, t = _start(sampler)
    yield srv, sampler
    _stop(srv, t)


def call(srv, method: str, path: str, body=None, headers=None, timeout: float = 20.0):
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def post(srv, body, **kw):
    status, headers, data = call(srv, "POST", "/api/generate", body, **kw)
    return status, headers, json.loads(data)


def decode_png(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    raw = base64.b64decode(url.split(",", 1)[1])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


# --------------------------------------------------------------------------------------------------
# good requests
# --------------------------------------------------------------------------------------------------
def test_info(server):
    srv, _ = server
    status, headers, data = call(srv, "GET", "/api/info")
    assert status == 200 and headers["content-type"].startswith("application/json")
    info = json.loads(data)
    assert info["run"] == "fake-run"
    assert info["stage_sizes"] == STAGES
    assert info["model_words"] == 12 and info["max_words"] == 80
    assert info["max_chars"] == 500 and info["max_images"] == 16


def test_generate_returns_exact_pngs_of_every_stage(server):
    srv, sampler = server
    status, _, r = post(srv, {"caption": "A red circle above zebra", "n": 3, "seed": 7, "truncation": 0.5})
    assert status == 200, r
    assert sampler.last["n"] == 3 and sampler.last["seed"] == 7 and sampler.last["truncation"] == 0.5
    assert r["words"] == ["a", "red", "circle", "above"] and r["unknown"] == ["zebra"]
    assert r["stage_sizes"] == STAGES
    assert len(r["images"]) == len(STAGES)
    for k, (urls, s) in enumerate(zip(r["images"], STAGES)):
        assert len(urls) == 3
        for i, u in enumerate(urls):
            img = decode_png(u)
            assert img.shape == (s, s, 3)
            np.testing.assert_array_equal(img, sampler.last["images"][k][i])  # lossless
    # default attention: the finest attention stage only, one tile per word and image, at the final size
    assert len(r["attention"]) == 1
    att = r["attention"][0]
    assert att["size"] == ATT_SIZES[-1] and att["tile"] == STAGES[-1]
    assert len(att["maps"]) == 3 and all(len(m) == 4 for m in att["maps"])
    assert decode_png(att["maps"][2][3]).shape == (STAGES[-1], STAGES[-1], 3)
    assert isinstance(r["seconds"], float) and r["seconds"] >= 0
    assert r["cut_words"] == 0


def test_words_beyond_the_model_limit_are_cut_and_counted(server):
    srv, _ = server
    caption = "a red circle above a blue square and a green triangle above the small large square zebra"
    status, _, r = post(srv, {"caption": caption, "n": 1})
    assert status == 200
    assert r["words"] == ["a", "red", "circle", "above", "a", "blue", "square", "and", "a", "green", "triangle",
                          "above"]
    assert r["unknown"] == ["zebra"] and r["cut_words"] == 4  # the, small, large, square


def test_attention_modes(server):
    srv, _ = server
    _, _, r_all = post(srv, {"caption": "blue square", "n": 1, "attention": "all"})
    assert [a["size"] for a in r_all["attention"]] == ATT_SIZES
    _, _, r_none = post(srv, {"caption": "blue square", "n": 1, "attention": "none"})
    assert r_none["attention"] == []


# --------------------------------------------------------------------------------------------------
# bad requests: clear JSON errors with the right 4xx
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, status, fragment", [
    ({"caption": ""}, 400, "empty"),
    ({"caption": "   \n\t "}, 400, "empty"),
    ({"caption": "red " * 2500}, 413, "10000 characters"),
    ({"caption": "日本語のキャプション"}, 422, "ascii"),
    ({"caption": "äöü ß"}, 422, "ascii"),
    ({"caption": "zebra giraffe"}, 422, "no known word"),
    ({"caption": " ".join(["red"] * 81)}, 413, "81 words"),
    ({"caption": "red circle", "n": 17}, 413, "too many images"),
    ({"caption": "red circle", "n": 0}, 400, "at least 1"),
    ({"caption": "red circle", "n": "4"}, 400, '"n"'),
    ({"caption": "red circle", "n": True}, 400, '"n"'),
    ({"caption": "red circle", "n": 2.0}, 400, '"n"'),
    ({"caption": 5}, 400, '"caption" must be a string'),
    ({"n": 2}, 400, "missing"),
    ({"caption": "red circle", "seed": -1}, 400, '"seed"'),
    ({"caption": "red circle", "seed": "x"}, 400, '"seed"'),
    ({"caption": "red circle", "truncation": 0}, 400, '"truncation"'),
    ({"caption": "red circle", "truncation": "high"}, 400, '"truncation"'),
    ({"caption": "red circle", "attention": "some"}, 400, '"attention"'),
    ({"caption": "red circle", "size": 64}, 400, "unknown field"),
    ([1, 2, 3], 400, "json object"),
])
def test_bad_requests(server, body, status, fragment):
    srv, _ = server
    got, headers, r = post(srv, body)
    assert got == status, r
    assert headers["content-type"].startswith("application/json")
    assert set(r) == {"error"} and "\n" not in r["error"]
    assert fragment.lower() in r["error"].lower()


@pytest.mark.parametrize("raw, fragment", [
    (b'{"caption": "red circle"', "not valid json"),
    (b"caption=red", "not valid json"),
    (b'{"caption": "red", "truncation": NaN}', '"truncation"'),
    (b"\xff\xfe\x00", "not utf-8"),
    (b"", "not valid json"),
])
def test_bad_json(server, raw, fragment):
    srv, _ = server
    status, _, data = call(srv, "POST", "/api/generate", raw, {"Content-Type": "application/json"})
    assert status == 400
    assert fragment in json.loads(data)["error"].lower()


def test_body_size_limits(server):
    srv, _ = server
    big = json.dumps({"caption": "red", "pad": "x" * 70000}).encode()
    status, _, data = call(srv, "POST", "/api/generate", big)
    assert status == 413 and "too large" in json.loads(data)["error"]
    # no Content-Length at all
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.putrequest("POST", "/api/generate")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 411 and "Content-Length" in json.loads(resp.read())["error"]
    conn.close()


def test_paths_and_methods(server):
    srv, _ = server
    status, _, data = call(srv, "GET", "/nope")
    assert status == 404 and "no such path" in json.loads(data)["error"]
    status, headers, data = call(srv, "GET", "/api/generate")
    assert status == 405 and headers["allow"] == "POST" and json.loads(data)["error"]
    status, headers, _ = call(srv, "POST", "/api/info", {"x": 1})
    assert status == 405 and "GET" in headers["allow"]
    status, _, _ = call(srv, "DELETE", "/")
    assert status == 405
    status, _, _ = call(srv, "POST", "/missing", {"caption": "red"})
    assert status == 404


def test_protocol_errors_are_json(server):
    import socket

    host, port = server[0].server_address[:2]
    for raw, code in ((b"GARBAGE\r\n\r\n", 400), (b"FROB /api/info HTTP/1.0\r\n\r\n", 501),
                      (b"GET /" + b"x" * 70000 + b" HTTP/1.0\r\n\r\n", 414)):
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(raw)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.split()[1] == str(code).encode(), head
        assert b"application/json" in head and json.loads(body)["error"]


def test_page_is_self_contained(server):
    srv, _ = server
    status, headers, data = call(srv, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in headers["content-security-policy"]
    html = data.decode()
    assert "<script>" in html and "/api/generate" in html
    refs = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)["']""", html)
    assert all(r.startswith("data:") or r.startswith("#") for r in refs), refs


def test_sampler_failure_is_a_json_500_and_server_survives(capsys):
    srv, t = _start(FakeSampler(fail=True))
    try:
        status, _, r = post(srv, {"caption": "red circle"})
        assert status == 500 and "RuntimeError: boom" in r["error"]
        assert srv.gate.snapshot() == {"running": 0, "waiting": 0}
        status, _, _ = call(srv, "GET", "/api/info")
        assert status == 200
    finally:
        _stop(srv, t)
    assert "RuntimeError: boom" in capsys.readouterr().err  # logged for the operator


# --------------------------------------------------------------------------------------------------
# load: bounded queue, 503 + Retry-After, never a hang
# --------------------------------------------------------------------------------------------------
def test_concurrent_requests_get_200_or_503():
    sampler = FakeSampler(delay=0.4)
    limits = ServeLimits(workers=2, queue=3, retry_after_s=3)
    srv, t = _start(sampler, limits)
    results: list = [None] * 20
    barrier = threading.Barrier(20)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            status, headers, r = post(srv, {"caption": "red circle", "n": 2, "seed": i}, timeout=30)
            results[i] = (status, headers, r)
        except Exception as e:  # recorded, then asserted below
            results[i] = e

    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=40)
        assert not any(th.is_alive() for th in threads), "a request hung"
        assert all(isinstance(r, tuple) for r in results), [r for r in results if not isinstance(r, tuple)]
        statuses = [r[0] for r in results]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) >= 2 and statuses.count(503) >= 1, statuses
        for status, headers, r in results:
            if status == 503:
                assert headers["retry-after"] == "3" and "busy" in r["error"]
            else:
                assert len(r["images"]) == 3 and len(r["images"][0]) == 2
        assert sampler.max_active <= 2  # never more than `workers` generations at once
        assert srv.gate.snapshot() == {"running": 0, "waiting": 0}
        # still serving afterwards
        status, _, r = post(srv, {"caption": "green triangle", "n": 1})
        assert status == 200 and r["words"] == ["green", "triangle"]
        assert call(srv, "GET", "/api/info")[0] == 200
    finally:
        _stop(srv, t)


def test_gate_semantics():
    gate = Gate(running=1, waiting=1, timeout_s=5)
    assert gate.acquire()
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(gate.acquire()))
    waiter.start()
    deadline = time.time() + 5
    while gate.snapshot()["waiting"] != 1 and time.time() < deadline:
        time.sleep(0.01)
    assert gate.snapshot() == {"running": 1, "waiting": 1}
    assert gate.acquire() is False  # queue full: refused at once
    gate.release()
    waiter.join(timeout=5)
    assert got == [True] and gate.snapshot() == {"running": 1, "waiting": 0}
    gate.release()
    short = Gate(running=1, waiting=1, timeout_s=0.05)
    assert short.acquire() and short.acquire() is False  # waited past the timeout
    with pytest.raises(RuntimeError):
        Gate(1, 0).release()


# --------------------------------------------------------------------------------------------------
# attention overlay maths against independent references
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("src, dst, flt", [(8, 32, Image.BILINEAR), (5, 13, Image.BILINEAR), (32, 8, Image.BOX)])
def test_resize_matches_pillow(src, dst, flt):
    x = np.random.default_rng(0).random((2, 3, src, src)).astype(np.float32)
    ref = np.empty((2, 3, dst, dst))
    for i in range(2):
        for j in range(3):
            ref[i, j] = np.asarray(Image.fromarray(x[i, j], mode="F").resize((dst, dst), flt))
    np.testing.assert_allclose(_resize(x, dst), ref, atol=1e-4)


def _area_1d(v: np.ndarray, dst: int) -> np.ndarray:
    """Slow exact area average of a 1-D signal (pixel k covers [k, k+1))."""
    src = len(v)
    out = np.zeros(dst)
    for i in range(dst):
        a, b = i * src / dst, (i + 1) * src / dst
        for k in range(src):
            out[i] += v[k] * max(0.0, min(b, k + 1) - max(a, k))
        out[i] /= b - a
    return out


def test_resize_non_integer_downsampling_is_area_average():
    x = np.random.default_rng(1).random((12, 12))
    rows = np.stack([_area_1d(r, 5) for r in x])               # (12, 5)
    ref = np.stack([_area_1d(c, 5) for c in rows.T]).T          # (5, 5)
    np.testing.assert_allclose(_resize(x[None], 5)[0], ref, atol=1e-12)


def test_overlay_values_by_hand():
    # Grey 4x4 images; word 0 attends only to pixel (1, 2), word 1 is uniform (no information).
    final = np.full((1, 4, 4, 3), 128, np.uint8)
    att = np.zeros((1, 2, 4, 4))
    att[0, 0, 1, 2] = 0.9
    att[0, 1] = 0.25
    out = attention_overlays(final, att, tile=4)
    assert out.shape == (1, 2, 4, 4, 3) and out.dtype == np.uint8
    # alpha = 0.15 + 0.6 a; ramp ends (0, 0, 4) at a=0 and (252, 255, 164) at a=1
    peak = np.rint(128 * 0.25 + 0.75 * np.array([252, 255, 164]))
    low = np.rint(128 * 0.85 + 0.15 * np.array([0, 0, 4]))
    np.testing.assert_array_equal(out[0, 0, 1, 2], peak)
    mask = np.ones((4, 4), bool)
    mask[1, 2] = False
    assert (out[0, 0][mask] == low).all()
    assert (out[0, 1] == low).all()  # a constant map highlights nothing


def test_flat_attention_maps_are_accepted():
    from cpgan.serve.app import encode_result

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (2, s, s, 3), dtype=np.uint8) for s in (8, 16)]
    att = rng.random((2, 3, 8, 8))
    words = ["a", "red", "circle"]
    square = encode_result({"images": images, "attention": [att], "words": words}, 2, "last", 128)
    flat = encode_result({"images": images, "attention": [att.reshape(2, 3, 64)], "words": words}, 2, "last", 128)
    assert flat["attention"] == square["attention"]
    with pytest.raises(RuntimeError, match="attention of shape"):
        encode_result({"images": images, "attention": [att.reshape(2, 3, 4, 16)], "words": words}, 2, "last", 128)
    with pytest.raises(RuntimeError, match="stage 1 images"):
        encode_result({"images": [images[0], images[1][:1]], "attention": [], "words": words}, 2, "last", 128)


def test_overlay_peak_follows_attention_when_upsampled():
    final = np.full((2, 32, 32, 3), 90, np.uint8)
    att = np.zeros((2, 3, 8, 8))
    spots = [(0, 0), (4, 6), (7, 3)]
    for t, (r, c) in enumerate(spots):
        att[:, t, r, c] = 1.0
    out = attention_overlays(final, att, tile=32).astype(float).sum(-1)  # brightness
    for t, (r, c) in enumerate(spots):
        rr, cc = np.unravel_index(np.argmax(out[0, t]), (32, 32))
        assert (rr // 4, cc // 4) == (r, c)


# --------------------------------------------------------------------------------------------------
# binding and the command line
# --------------------------------------------------------------------------------------------------
def test_warns_when_not_loopback(capsys):
    srv = make_server(FakeSampler(), "0.0.0.0", 0, quiet=True)
    srv.server_close()
    assert "warning" in capsys.readouterr().err
    srv = make_server(FakeSampler(), "127.0.0.1", 0, quiet=True)
    srv.server_close()
    assert "warning" not in capsys.readouterr().err


def test_serve_command(tmp_path):
    import argparse

    p = argparse.ArgumentParser(prog="cpgan")
    add_serve_command(p.add_subparsers(dest="command"))
    args = p.parse_args(["serve", "--run", str(tmp_path / "missing")])
    assert args.func is cmd_serve and args.host == "127.0.0.1" and args.port == 8000
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cmd_serve(args)
    with pytest.raises(ValueError, match="workers"):
        ServeLimits(workers=0)


def test_serve_reports_a_busy_port():
    import socket

    from cpgan.serve.app import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{port}.*choose another --port"):
            serve(FakeSampler(), "127.0.0.1", port, quiet=True)
