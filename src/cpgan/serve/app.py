"""The web demo: a page where you type a caption and see every generator stage and the word attention.

``cpgan serve --run RUN_DIR`` loads the trained run through :class:`cpgan.sampling.Sampler` and serves

* ``GET /`` — a single self-contained page (``page.html``: vanilla JS, inline CSS, no CDN);
* ``POST /api/generate`` — ``{"caption": str, "n": int, "seed": int, "truncation": float,
  "attention": "last" | "all" | "none"}`` (only ``caption`` is required) ->
  ``{"images": [[data-URL PNG per image] per stage], "attention": [{"size": s, "tile": px,
  "maps": [[data-URL PNG per word] per image]} per attention stage], "words": [...], "unknown": [...],
  "cut_words": int, "stage_sizes": [...], "seconds": float, ...}``;
* ``GET /api/info`` — the run name, the stage sizes and every limit the API enforces.

The server uses the standard library only (:class:`http.server.ThreadingHTTPServer`) plus numpy and PIL to
encode PNGs; it never imports torch itself, so it runs against any object with the ``Sampler`` interface
(``max_words``, ``stage_sizes``, ``generate(caption, n, seed, truncation) -> dict``; see
:class:`SamplerLike`). Tests drive it with a fake sampler.

Choices (documented, adjustable through :class:`ServeLimits`):

* Status codes: 400 for a malformed request (bad JSON, wrong types, unknown fields, empty caption, values out
  of range), 411 when ``Content-Length`` is missing, 413 for anything over a size limit (body bytes, caption
  characters or words, images per request), 422 when the caption is well formed but unusable (no ASCII word,
  no word the vocabulary knows: the sampler's ``ValueError``), 404 / 405 for unknown paths / wrong methods,
  503 + ``Retry-After`` when the bounded queue is full, 500 (JSON, logged) when the sampler fails otherwise.
  Every error body is ``{"error": "one line saying what is wrong and what to do"}``.
* Concurrency: at most ``workers`` generations run at once and at most ``queue`` requests wait for a slot
  (:class:`Gate`); the next one gets 503 at once. A waiting request gives up with 503 after
  ``queue_timeout_s``. Encoding the PNGs happens inside the slot, so CPU use stays bounded.
* Attention overlays (the AttnGAN/CPGAN figure style: one tile per word over the final image): each map is
  min-max normalised on its own, upsampled bilinearly to the tile size, coloured with an inferno-like ramp
  and alpha-blended over the final image (alpha grows with attention). Tiles are the final image size capped
  at ``attention_tile_px``. By default only the finest attention stage is returned (``"attention": "last"``).
* Words are counted with the project tokenizer (:func:`cpgan.data.text.tokenize`, AttnGAN's rule), so
  "no ASCII word" is detected before the model is called. A caption may have up to ``ServeLimits.max_words``
  words (413 beyond); the model itself reads at most ``sampler.max_words`` known words and cuts the rest, as
  ``cpgan generate`` does: the answer says how many known words were cut (``"cut_words"``) and the page
  shows it.
* The server binds to 127.0.0.1 by default and warns when asked to bind elsewhere (there is no
  authentication and every request costs compute).
"""
from __future__ import annotations

import argparse
import base64
import io
import ipaddress
import json
import math
import socket
import socketserver
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol, Sequence
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from .. import __version__
from ..data.text import tokenize

__all__ = [
    "SamplerLike",
    "ServeLimits",
    "Gate",
    "CpganServer",
    "make_server",
    "serve",
    "add_serve_command",
    "attention_overlays",
    "png_data_url",
]

PAGE_PATH = Path(__file__).with_name("page.html")
ATTENTION_MODES = ("last", "all", "none")
TRUNCATION_MAX = 4.0
SEED_MAX = 2**32 - 1
_FIELDS = ("caption", "n", "seed", "truncation", "attention")
_DRAIN_CAP = 1 << 20  # bytes of an unread body read and discarded before an error answer


class SamplerLike(Protocol):
    """What the server needs from :class:`cpgan.sampling.Sampler` (any object with these members works)."""

    max_words: int
    stage_sizes: list[int]

    def generate(self, caption: str, n: int = 4, seed: int = 0, truncation: float = 1.0) -> dict:
        """``{"images": [uint8 (n, s, s, 3) per stage], "attention": [float (n, T, s_i, s_i) per attention
        stage], "words": [T known words], "unknown": [dropped words]}``; ``ValueError`` if no word is known."""
        ...


@dataclass(frozen=True)
class ServeLimits:
    """Every limit the server enforces (all reported by ``GET /api/info``).

    ``max_words`` bounds the words of a request's caption; the model reads at most ``sampler.max_words`` of
    the known ones (the sampler cuts the rest).
    """

    max_chars: int = 500
    max_words: int = 80
    max_images: int = 16
    max_body_bytes: int = 64 * 1024
    workers: int = 1
    queue: int = 8
    queue_timeout_s: float = 60.0
    retry_after_s: int = 5
    attention_tile_px: int = 128
    socket_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_chars", "max_words", "max_images", "max_body_bytes", "workers", "attention_tile_px"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeLimits.{name} must be at least 1, got {getattr(self, name)}")
        if self.queue < 0:
            raise ValueError(f"ServeLimits.queue must be 0 or more, got {self.queue}")


class ApiError(Exception):
    """An HTTP error answered as JSON ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.headers = headers or {}


class Gate:
    """Bounded admission: at most ``running`` holders at once and at most ``waiting`` queued for a slot.

    ``acquire()`` returns False at once when the queue is full, or after ``timeout_s`` of waiting; True means
    the caller holds a slot and must ``release()`` it.
    """

    def __init__(self, running: int, waiting: int, timeout_s: float = 60.0):
        self.max_running = int(running)
        self.max_waiting = int(waiting)
        self.timeout_s = float(timeout_s)
        self._cv = threading.Condition()
        self._running = 0
        self._waiting = 0

    def acquire(self) -> bool:
        with self._cv:
            if self._running < self.max_running and self._waiting == 0:
                self._running += 1
                return True
            if self._waiting >= self.max_waiting:
                return False
            self._waiting += 1
            try:
                if not self._cv.wait_for(lambda: self._running < self.max_running, timeout=self.timeout_s):
                    return False
                self._running += 1
                return True
            finally:
                self._waiting -= 1

    def release(self) -> None:
        with self._cv:
            if self._running <= 0:
                raise RuntimeError("Gate.release() called without a matching acquire()")
            self._running -= 1
            self._cv.notify()

    def snapshot(self) -> dict[str, int]:
        with self._cv:
            return {"running": self._running, "waiting": self._waiting}


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------
def png_data_url(img: np.ndarray) -> str:
    """``(H, W, 3)`` uint8 -> ``data:image/png;base64,...`` (lossless)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG", compress_level=3)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _resize_matrix(src: int, dst: int) -> np.ndarray:
    """``(dst, src)`` linear map resizing one axis: bilinear (half-pixel centres) up, box average down."""
    if dst >= src:
        x = (np.arange(dst) + 0.5) * (src / dst) - 0.5
        x = np.clip(x, 0, src - 1)
        lo = np.floor(x).astype(int)
        hi = np.minimum(lo + 1, src - 1)
        w = x - lo
        m = np.zeros((dst, src))
        m[np.arange(dst), lo] += 1 - w
        m[np.arange(dst), hi] += w
        return m
    # Downsampling: each output pixel averages the source interval it covers (exact area weights).
    edges = np.arange(dst + 1) * (src / dst)
    left, right = edges[:-1, None], edges[1:, None]
    px = np.arange(src)[None, :]
    overlap = np.clip(np.minimum(right, px + 1) - np.maximum(left, px), 0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """Resize the last two axes ``(..., h, w)`` to ``(..., size, size)`` (float64)."""
    mh = _resize_matrix(x.shape[-2], size)
    mw = _resize_matrix(x.shape[-1], size)
    return mh @ x.astype(np.float64) @ mw.T  # two batched matmuls: (size, h) @ (..., h, w) @ (w, size)


# Inferno-like ramp (dark purple -> red -> orange -> pale yellow): position, RGB.
_RAMP = np.array([
    [0.00, 0, 0, 4], [0.25, 87, 16, 110], [0.50, 188, 55, 84], [0.75, 249, 142, 9], [1.00, 252, 255, 164],
], dtype=np.float64)
_LUT = np.stack([np.interp(np.linspace(0, 1, 256), _RAMP[:, 0], _RAMP[:, c]) for c in (1, 2, 3)], axis=1)


def attention_overlays(final: np.ndarray, attention: np.ndarray, tile: int) -> np.ndarray:
    """Per-word attention tiles over the final images.

    final: ``(n, S, S, 3)`` uint8; attention: ``(n, T, s, s)`` float (any scale); returns
    ``(n, T, tile, tile, 3)`` uint8 where each map is min-max normalised on its own, resized to ``tile``,
    coloured with the inferno-like ramp and blended with alpha ``0.15 + 0.6 * a`` over the final image.
    """
    att = np.asarray(attention, dtype=np.float64)
    lo = att.min(axis=(-2, -1), keepdims=True)
    span = att.max(axis=(-2, -1), keepdims=True) - lo
    a = np.where(span > 1e-12, (att - lo) / np.where(span > 1e-12, span, 1.0), 0.0)
    a = np.clip(_resize(a, tile), 0.0, 1.0)                                      # (n, T, tile, tile)
    base = _resize(np.moveaxis(np.asarray(final), -1, 1), tile)                  # (n, 3, tile, tile)
    base = np.moveaxis(base, 1, -1)[:, None]                                     # (n, 1, tile, tile, 3)
    heat = _LUT[np.rint(a * 255).astype(np.int64)]                               # (n, T, tile, tile, 3)
    alpha = (0.15 + 0.6 * a)[..., None]
    out = base * (1 - alpha) + heat * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _check_images(images: Any, n: int) -> list[np.ndarray]:
    if not isinstance(images, (list, tuple)) or not images:
        raise RuntimeError("the sampler returned no images (expected a list of (n, s, s, 3) uint8 arrays)")
    out = []
    for k, im in enumerate(images):
        im = np.asarray(im)
        if im.dtype != np.uint8 or im.ndim != 4 or im.shape[0] != n or im.shape[-1] != 3 \
                or im.shape[1] != im.shape[2]:
            raise RuntimeError(f"the sampler returned stage {k} images of shape {im.shape} and dtype {im.dtype}; "
                               f"expected ({n}, s, s, 3) uint8")
        out.append(im)
    return out


def encode_result(result: dict, n: int, attention_mode: str, tile_px: int) -> dict:
    """The sampler's arrays -> the JSON-ready parts of the ``/api/generate`` answer (PNG data URLs)."""
    images = _check_images(result.get("images"), n)
    words = [str(w) for w in result.get("words", [])]
    unknown = [str(w) for w in result.get("unknown", [])]
    final = images[-1]
    tile = min(final.shape[1], tile_px)
    att_stages = list(result.get("attention") or [])
    if attention_mode == "last":
        att_stages = att_stages[-1:]
    elif attention_mode == "none":
        att_stages = []
    attention = []
    for att in att_stages:
        att = np.asarray(att)
        if att.ndim == 3 and math.isqrt(att.shape[-1]) ** 2 == att.shape[-1]:  # (n, T, s*s) -> (n, T, s, s)
            side = math.isqrt(att.shape[-1])
            att = att.reshape(*att.shape[:2], side, side)
        if att.ndim != 4 or att.shape[0] != n or att.shape[2] != att.shape[3]:
            raise RuntimeError(f"the sampler returned attention of shape {att.shape}; expected ({n}, T, s, s)")
        att = att[:, : len(words)]  # drop padding positions beyond the known words
        tiles = attention_overlays(final, att, tile)
        attention.append({"size": int(att.shape[-1]), "tile": int(tile),
                          "maps": [[png_data_url(t) for t in per_image] for per_image in tiles]})
    return {
        "images": [[png_data_url(im) for im in stage] for stage in images],
        "stage_sizes": [int(im.shape[1]) for im in images],
        "attention": attention,
        "words": words,
        "unknown": unknown,
    }


# --------------------------------------------------------------------------------------------------
# Request validation
# --------------------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_generate_request(body: bytes, limits: ServeLimits) -> dict:
    """Validate a ``POST /api/generate`` body; returns the clean fields or raises :class:`ApiError`."""
    try:
        req = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 text; send JSON such as "
                            '{"caption": "a red circle", "n": 4}') from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                            'send e.g. {"caption": "a red circle", "n": 4}') from None
    if not isinstance(req, dict):
        raise ApiError(400, f"the request body must be a JSON object, got a JSON {type(req).__name__}; "
                            'send e.g. {"caption": "a red circle"}')
    extra = sorted(set(req) - set(_FIELDS))
    if extra:
        raise ApiError(400, f"unknown field(s) {', '.join(map(repr, extra))}; the fields are {', '.join(_FIELDS)}")
    if "caption" not in req:
        raise ApiError(400, 'the field "caption" is missing; send e.g. {"caption": "a red circle"}')
    caption = req["caption"]
    if not isinstance(caption, str):
        raise ApiError(400, f'"caption" must be a string, got {type(caption).__name__}')
    n = req.get("n", 4)
    if not _is_int(n):
        raise ApiError(400, f'"n" (images per request) must be an integer, got {json.dumps(n)}')
    if n < 1:
        raise ApiError(400, f'"n" (images per request) must be at least 1, got {n}')
    if n > limits.max_images:
        raise ApiError(413, f"too many images: n={n}, at most {limits.max_images} per request")
    seed = req.get("seed", 0)
    if not _is_int(seed):
        raise ApiError(400, f'"seed" must be an integer, got {json.dumps(seed)}')
    if not 0 <= seed <= SEED_MAX:
        raise ApiError(400, f'"seed" must be between 0 and {SEED_MAX}, got {seed}')
    trunc = req.get("truncation", 1.0)
    if not _is_number(trunc):
        raise ApiError(400, f'"truncation" must be a number, got {json.dumps(trunc)}')
    trunc = float(trunc)
    if not (math.isfinite(trunc) and 0.0 < trunc <= TRUNCATION_MAX):
        raise ApiError(400, f'"truncation" must be in (0, {TRUNCATION_MAX:g}], got {trunc:g}')
    mode = req.get("attention", "last")
    if mode not in ATTENTION_MODES:
        raise ApiError(400, f'"attention" must be one of {", ".join(ATTENTION_MODES)}, got {json.dumps(mode)}')

    text = caption.strip()
    if not text:
        raise ApiError(400, "the caption is empty; type a description such as 'a red circle above a blue square'")
    if len(caption) > limits.max_chars:
        raise ApiError(413, f"the caption is too long: {len(caption)} characters, at most {limits.max_chars}; "
                            "shorten it")
    tokens = tokenize(text)
    if not tokens:
        raise ApiError(422, "the caption has no usable word: the vocabulary is ASCII-only (letters, digits, _); "
                            "write the caption in plain English letters")
    if len(tokens) > limits.max_words:
        raise ApiError(413, f"the caption is too long: {len(tokens)} words, at most {limits.max_words}; shorten it")
    return {"caption": text, "n": n, "seed": seed, "truncation": trunc, "attention": mode, "n_words": len(tokens)}


# --------------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    server: "CpganServer"
    server_version = f"cpgan/{__version__}"
    sys_version = ""
    # route -> allowed methods
    ROUTES = {"/": ("GET", "HEAD"), "/index.html": ("GET", "HEAD"), "/api/info": ("GET", "HEAD"),
              "/api/generate": ("POST",)}

    def setup(self) -> None:
        self.timeout = self.server.limits.socket_timeout_s  # StreamRequestHandler applies it to the socket
        super().setup()

    # ---- plumbing -----------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (BaseHTTPRequestHandler's name)
        if not self.server.quiet:
            sys.stderr.write(f"[cpgan serve] {self.address_string()} {format % args}\n")

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None,
              head_only: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head_only:
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client went away; nothing to do
                pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors raised by ``http.server`` itself (malformed request line, unsupported method): JSON too."""
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # an unparsable request line: still answer with a status line
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        text = message or phrase
        if explain:
            text = f"{text}: {explain}"
        self._send_json(code, {"error": text}, head_only=getattr(self, "command", "") == "HEAD")

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None,
                   head_only: bool = False) -> None:
        self._send(status, json.dumps(obj).encode("utf-8"), "application/json; charset=utf-8", headers, head_only)

    def _drain_body(self) -> None:
        """Read and discard an unread request body (up to ``_DRAIN_CAP`` bytes) before answering an error.

        Closing a socket with unread input makes the kernel send RST, and the client may then lose the
        error response; draining first gives it a clean close.
        """
        if self._body_consumed:
            return
        self._body_consumed = True
        try:
            left = min(max(int(self.headers.get("Content-Length") or 0), 0), _DRAIN_CAP)
        except ValueError:
            return
        try:
            while left > 0:
                chunk = self.rfile.read(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _send_error_json(self, err: ApiError) -> None:
        if self.command not in ("GET", "HEAD"):
            self._drain_body()
            self.close_connection = True
        self._send_json(err.status, {"error": err.message}, err.headers, head_only=self.command == "HEAD")

    def _route(self) -> tuple[str, tuple[str, ...]]:
        path = urlsplit(self.path).path
        allowed = self.ROUTES.get(path)
        if allowed is None:
            raise ApiError(404, f"no such path {path!r}; the page is at / and the API at /api/generate, /api/info")
        if self.command not in allowed:
            raise ApiError(405, f"{self.command} is not allowed on {path}; use {' or '.join(allowed)}",
                           {"Allow": ", ".join(allowed)})
        return path, allowed

    def _dispatch(self) -> None:
        self._body_consumed = False
        try:
            path, _ = self._route()
            if path in ("/", "/index.html"):
                self._send(200, self.server.page, "text/html; charset=utf-8", {
                    "Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
                                               "script-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; "
                                               "form-action 'none'; frame-ancestors 'none'"},
                           head_only=self.command == "HEAD")
            elif path == "/api/info":
                self._send_json(200, self.server.info(), head_only=self.command == "HEAD")
            else:
                self._generate()
        except ApiError as e:
            self._send_error_json(e)
        except socket.timeout:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # never let one request take the server down
            traceback.print_exc(file=sys.stderr)
            self._send_error_json(ApiError(500, f"internal error while generating: {type(e).__name__}: {e}"))

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    # ---- /api/generate ------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "chunked request bodies are not supported; send a Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "the request has no Content-Length; send a JSON body with its length")
        try:
            size = int(length)
        except ValueError:
            raise ApiError(400, f"bad Content-Length {length!r}") from None
        if size < 0:
            raise ApiError(400, f"bad Content-Length {length!r}")
        limit = self.server.limits.max_body_bytes
        if size > limit:
            raise ApiError(413, f"the request body is too large: {size} bytes, at most {limit}")
        self._body_consumed = True
        body = self.rfile.read(size)
        if len(body) != size:
            raise ApiError(400, f"the request body ended early: {len(body)} of {size} bytes")
        return body

    def _generate(self) -> None:
        srv = self.server
        req = parse_generate_request(self._read_body(), srv.limits)
        if not srv.gate.acquire():
            retry = str(srv.limits.retry_after_s)
            raise ApiError(503, f"the server is busy ({srv.limits.workers} running, {srv.limits.queue} waiting); "
                                f"try again in {retry} s", {"Retry-After": retry})
        try:
            t0 = time.perf_counter()
            try:
                result = srv.sampler.generate(req["caption"], n=req["n"], seed=req["seed"],
                                              truncation=req["truncation"])
            except ValueError as e:  # e.g. "...no known word..."
                raise ApiError(422, str(e)) from None
            out = encode_result(result, req["n"], req["attention"], srv.limits.attention_tile_px)
            seconds = time.perf_counter() - t0
        finally:
            srv.gate.release()
        # known words the model did not read because of its own word limit (the sampler cuts them)
        cut = max(0, req["n_words"] - len(out["unknown"]) - len(out["words"]))
        payload = {"caption": req["caption"], "n": req["n"], "seed": req["seed"],
                   "truncation": req["truncation"], **out, "cut_words": cut, "seconds": round(seconds, 4)}
        self._send_json(200, payload)


class CpganServer(ThreadingHTTPServer):
    """The demo's HTTP server (one thread per connection; generation bounded by :class:`Gate`)."""

    daemon_threads = True
    request_queue_size = 64
    allow_reuse_address = True

    def __init__(self, sampler: SamplerLike, host: str = "127.0.0.1", port: int = 8000, *,
                 limits: ServeLimits | None = None, run_name: str = "", quiet: bool = False,
                 examples: Sequence[str] | None = None):
        self.sampler = sampler
        self.limits = limits or ServeLimits()
        self.run_name = run_name
        self.quiet = quiet
        self.model_words = int(getattr(sampler, "max_words"))
        self.stage_sizes = [int(s) for s in getattr(sampler, "stage_sizes")]
        self.examples = list(examples if examples is not None else getattr(sampler, "examples", []) or [])
        self.gate = Gate(self.limits.workers, self.limits.queue, self.limits.queue_timeout_s)
        try:
            self.page = PAGE_PATH.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"the demo page {PAGE_PATH} is missing from the installed package; "
                                    "reinstall cpgan") from None
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a DNS lookup that can stall offline; skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/"

    def info(self) -> dict:
        lim = self.limits
        return {
            "run": self.run_name,
            "version": __version__,
            "stage_sizes": self.stage_sizes,
            "max_words": lim.max_words,
            "model_words": self.model_words,
            "max_chars": lim.max_chars,
            "max_images": lim.max_images,
            "max_body_bytes": lim.max_body_bytes,
            "workers": lim.workers,
            "queue": lim.queue,
            "busy": self.gate.snapshot(),
            "defaults": {"n": min(4, lim.max_images), "seed": 0, "truncation": 1.0, "attention": "last"},
            "truncation_range": [0.0, TRUNCATION_MAX],
            "attention_modes": list(ATTENTION_MODES),
            "examples": self.examples,
        }


def make_server(sampler: SamplerLike, host: str = "127.0.0.1", port: int = 8000, *,
                limits: ServeLimits | None = None, run_name: str = "", quiet: bool = False,
                examples: Sequence[str] | None = None) -> CpganServer:
    """Bind (``port=0`` picks a free port) and return the server without serving; see :func:`serve`."""
    if not _is_loopback(host):
        print(f"warning: binding to {host}:{port} makes the demo reachable from other machines; it has no "
              "authentication and every request costs compute (use --host 127.0.0.1 to keep it local)",
              file=sys.stderr)
    return CpganServer(sampler, host, port, limits=limits, run_name=run_name, quiet=quiet, examples=examples)


def serve(sampler: SamplerLike, host: str = "127.0.0.1", port: int = 8000, *, limits: ServeLimits | None = None,
          run_name: str = "", quiet: bool = False) -> int:
    """Serve the page and the API until Ctrl+C (blocking). Returns 0."""
    try:
        server = make_server(sampler, host, port, limits=limits, run_name=run_name, quiet=quiet)
    except OSError as e:
        raise SystemExit(f"error: cannot listen on {host}:{port}: {e.strerror or e}; choose another --port") from None
    print(f"[cpgan] serving {run_name or 'the demo'} at {server.url}  (Ctrl+C to stop)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("[cpgan] stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    """``cpgan serve --run RUN_DIR``: load the run's sampler and serve it."""
    run = Path(args.run)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist; train one first, e.g. "
                                f"`cpgan run shapes-quick --out {run}`")
    from ..sampling import Sampler  # torch is imported only here, not by the server itself

    try:
        limits = ServeLimits(max_chars=args.max_chars, max_words=args.max_words, max_images=args.max_images,
                             workers=args.workers, queue=args.queue)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    sampler = Sampler.from_run(run, device=args.device)
    return serve(sampler, args.host, args.port, limits=limits, run_name=run.resolve().name)


def add_serve_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``cpgan serve`` on an ``argparse`` sub-parsers object; sets ``func=cmd_serve``."""
    d = ServeLimits()
    sp = subparsers.add_parser(
        "serve", help="web demo: type a caption, see every stage and the per-word attention",
        description="Serve a page (and a JSON API: POST /api/generate, GET /api/info) that generates images "
                    "from a caption with a trained run.")
    sp.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory with a trained gan stage")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sp.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    sp.add_argument("--workers", type=int, default=d.workers, help=f"generations at once (default {d.workers})")
    sp.add_argument("--queue", type=int, default=d.queue,
                    help=f"requests waiting beyond those before answering 503 (default {d.queue})")
    sp.add_argument("--max-images", type=int, default=d.max_images,
                    help=f"images per request (default {d.max_images})")
    sp.add_argument("--max-chars", type=int, default=d.max_chars,
                    help=f"caption length in characters (default {d.max_chars})")
    sp.add_argument("--max-words", type=int, default=d.max_words,
                    help=f"caption length in words (default {d.max_words}; the model reads its own maximum of "
                         "known words and cuts the rest)")
    sp.set_defaults(func=cmd_serve)
    return sp
