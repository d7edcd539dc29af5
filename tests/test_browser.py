"""The demo page in a real headless Chromium (Playwright driving the system browser; nothing is downloaded).

A fake sampler paints the caption's coloured shapes (so the pictures are colourful and non-blank); the test
types a caption, clicks Generate, waits for every stage and every attention tile, and reads the rendered
pixels back (canvas read-back of each <img> and a screenshot of the page) to check they are not blank.

Set ``CPGAN_SERVE_SCREENSHOT=/path.png`` to keep the screenshot. The browser is ``$CPGAN_CHROMIUM`` or the
first of /usr/bin/chromium, chromium, chromium-browser, google-chrome found; the test is skipped (with the
reason) when there is none: CI installs Debian's ``chromium``.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from cpgan.serve.app import make_server

COLOURS = {"red": (220, 50, 47), "green": (46, 160, 67), "blue": (38, 110, 210), "yellow": (240, 200, 40),
           "purple": (140, 70, 190), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
VOCAB = set(COLOURS) | set(SHAPES) | {"a", "an", "the", "and", "above", "below", "left", "right", "of", "small",
                                      "large", "big"}
STAGES = [16, 32, 64]


def _find_chromium() -> str | None:
    env = os.environ.get("CPGAN_CHROMIUM")
    if env:
        return env if os.path.exists(env) else None
    if os.path.exists("/usr/bin/chromium"):
        return "/usr/bin/chromium"
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class ShapesSampler:
    """Sampler interface: paints each (colour, shape) of the caption on a soft gradient, at seeded places."""

    max_words = 16
    stage_sizes = STAGES
    examples = ["a red circle and a blue square", "a yellow triangle above a green circle"]

    def generate(self, caption: str, n: int = 4, seed: int = 0, truncation: float = 1.0) -> dict:
        tokens = re.findall(r"[a-z0-9_]+", caption.lower())
        words = [t for t in tokens if t in VOCAB]
        unknown = [t for t in tokens if t not in VOCAB]
        if not words:
            raise ValueError("the caption has no known word; try 'a red circle'")
        objects, colour = [], None
        for w in words:
            if w in COLOURS:
                colour = w
            elif w in SHAPES:
                objects.append((colour or "white", w))
                colour = None
        rng = np.random.default_rng(seed)
        S = STAGES[-1]
        yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
        imgs = np.empty((n, S, S, 3))
        att = np.empty((n, len(words), S // 2, S // 2))
        ay, ax = np.mgrid[0:S // 2, 0:S // 2] * 2.0
        for i in range(n):
            c0, c1 = rng.uniform(60, 200, 3), rng.uniform(60, 200, 3)
            t = (xx + yy)[..., None] / (2 * S)
            img = c0 * (1 - t) + c1 * t
            centres = []
            for col, shape in objects:
                cx, cy, r = rng.uniform(14, S - 14), rng.uniform(14, S - 14), rng.uniform(8, 13) * truncation ** 0.2
                if shape == "circle":
                    mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
                elif shape == "square":
                    mask = (abs(xx - cx) < r) & (abs(yy - cy) < r)
                else:
                    mask = (yy > cy - r) & (yy < cy + r) & (abs(xx - cx) < (yy - (cy - r)) / 2)
                img[mask] = COLOURS[col]
                centres.append((cx, cy))
            imgs[i] = img
            k = 0
            for t_i, w in enumerate(words):
                if w in SHAPES and k < len(centres):
                    cx, cy = centres[k]
                    k += 1
                    sigma = 6.0
                elif w in COLOURS and k < len(centres):
                    cx, cy = centres[k]
                    sigma = 8.0
                else:
                    cx, cy, sigma = rng.uniform(0, S), rng.uniform(0, S), 18.0
                att[i, t_i] = np.exp(-((ax - cx) ** 2 + (ay - cy) ** 2) / (2 * sigma ** 2))
        images = []
        for s in STAGES:  # coarse stages: box-averaged versions of the final picture
            f = S // s
            images.append(imgs.reshape(n, s, f, s, f, 3).mean(axis=(2, 4)).round().astype(np.uint8))
        return {"images": images, "attention": [att.astype(np.float32)], "words": words, "unknown": unknown}


# JS run in the page: draw every <img> of a selector on a canvas and return its size and colour variance.
PIXEL_STATS = """
(selector) => Array.from(document.querySelectorAll(selector)).map((img) => {
  const c = document.createElement("canvas");
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  const s = [0, 0, 0], s2 = [0, 0, 0];
  const m = d.length / 4;
  for (let i = 0; i < d.length; i += 4) {
    for (let c = 0; c < 3; c++) { s[c] += d[i + c]; s2[c] += d[i + c] * d[i + c]; }
  }
  let variance = 0;  // summed over R, G, B: 0 for a single flat colour
  for (let c = 0; c < 3; c++) variance += s2[c] / m - (s[c] / m) ** 2;
  return { w: img.naturalWidth, h: img.naturalHeight, variance, shownW: img.getBoundingClientRect().width };
})
"""

ALL_LOADED = """
(count) => {
  const imgs = document.querySelectorAll('.grid img');
  return imgs.length === count && Array.from(imgs).every((i) => i.complete && i.naturalWidth > 0);
}
"""


@pytest.fixture(scope="module")
def browser_page():
    chromium = _find_chromium()
    if chromium is None:
        pytest.skip("no Chromium browser installed (looked for $CPGAN_CHROMIUM, /usr/bin/chromium, chromium, "
                    "chromium-browser, google-chrome); install it with `apt-get install -y chromium`")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                   "(pip install playwright; no `playwright install` is needed)")
    srv = make_server(ShapesSampler(), "127.0.0.1", 0, run_name="shapes-demo", quiet=True)
    th = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    th.start()
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=chromium, headless=True, timeout=60_000,
                args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                      "--disable-background-networking", "--disable-extensions", "--no-first-run",
                      "--disable-component-update", "--disable-sync"])
            try:
                page = browser.new_page(viewport={"width": 1180, "height": 1000})
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.goto(srv.url, wait_until="load")
                yield page, errors
            finally:
                browser.close()
    finally:
        srv.shutdown()
        srv.server_close()
        th.join(timeout=5)


def test_page_generates_and_renders(browser_page):
    page, errors = browser_page
    page.wait_for_selector("#n option", state="attached", timeout=15_000)  # /api/info answered
    assert "shapes-demo" in page.inner_text("#run")
    assert "16 → 32 → 64" in page.inner_text("#run")

    page.fill("#caption", "a red circle and a blue square zebra")
    page.select_option("#n", "4")
    page.fill("#seed", "3")
    page.click("#generate")
    page.wait_for_function(ALL_LOADED, arg=4 * len(STAGES), timeout=20_000)
    page.wait_for_function("() => document.querySelectorAll('#tiles img').length === 7 && "
                           "Array.from(document.querySelectorAll('#tiles img')).every(i => i.complete)",
                           timeout=20_000)

    for k, size in enumerate(STAGES):
        stats = page.evaluate(PIXEL_STATS, f'.grid[data-stage="{k}"] img')
        assert len(stats) == 4
        for st in stats:
            assert (st["w"], st["h"]) == (size, size)
            assert st["variance"] > 100, st  # colourful, not blank
            assert st["shownW"] >= 100       # displayed, not collapsed
    tiles = page.evaluate(PIXEL_STATS, "#tiles img")
    assert len(tiles) == 7 and all(t["variance"] > 50 and t["w"] == 64 for t in tiles)
    labels = page.locator("#tiles figcaption").all_inner_texts()
    assert labels == ["a", "red", "circle", "and", "a", "blue", "square"]

    # the unknown word is flagged
    assert page.is_visible("#unknown") and "zebra" in page.inner_text("#unknown")
    assert page.locator(".chip.unknown").all_inner_texts() == ["zebra"]
    assert "seed 3" in page.inner_text("#meta")

    shot = page.screenshot(full_page=True)
    path = os.environ.get("CPGAN_SERVE_SCREENSHOT")
    if path:
        with open(path, "wb") as f:
            f.write(shot)
    arr = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(float)
    box = page.locator('.grid[data-stage="2"]').bounding_box()
    region = arr[int(box["y"]):int(box["y"] + box["height"]), int(box["x"]):int(box["x"] + box["width"])]
    assert region.size and region.std() > 20  # the final images are really painted on screen

    # choosing another final image switches the attention tiles to it
    first = page.locator("#tiles img").first.get_attribute("src")
    page.locator('.grid[data-stage="2"] img').nth(1).click()
    page.wait_for_function("() => document.querySelector('#attention-sub').textContent.includes('image 2 of 4')")
    assert page.locator("#tiles img").first.get_attribute("src") != first
    assert errors == []


def test_page_shows_errors(browser_page):
    page, _ = browser_page
    page.wait_for_selector("#n option", state="attached", timeout=15_000)
    page.fill("#caption", "日本語のキャプション")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])", timeout=10_000)
    assert "ASCII" in page.inner_text("#error")
    page.fill("#caption", "zebra giraffe")
    page.click("#generate")
    page.wait_for_function("() => document.querySelector('#error').textContent.includes('no known word')",
                           timeout=10_000)
    page.fill("#caption", "   ")
    page.click("#generate")
    page.wait_for_function("() => document.querySelector('#error').textContent.includes('empty')", timeout=10_000)
    # a good request clears the error
    page.fill("#caption", "a green triangle")
    page.click("#generate")
    page.wait_for_selector("#error", state="hidden", timeout=20_000)
    page.wait_for_function("() => document.querySelectorAll('#tiles img').length === 3", timeout=20_000)
