"""The HTML run report (cpgan.report) on a fake run directory and on an empty one."""
from __future__ import annotations

import base64
import io
import json
import os
import platform
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpgan.report import _fmt, curve_keys, gradient_keys, metric_tables, plot_curves, write_report
from cpgan.stages.base import PIPELINE


class _Doc(HTMLParser):
    """Collects tables (rows of cell texts, with the title of the last <h3> before them) and <img> tags."""

    def __init__(self):
        super().__init__()
        self.tables: list[dict] = []
        self.imgs: list[dict] = []
        self._h3 = ""
        self._in_h3 = False
        self._cell: list[str] | None = None
        self._row: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "h3":
            self._in_h3, self._h3 = True, ""
        elif tag == "table":
            self.tables.append({"title": self._h3, "rows": []})
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.imgs.append(a)

    def handle_endtag(self, tag):
        if tag == "h3":
            self._in_h3 = False
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1]["rows"].append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._in_h3:
            self._h3 += data
        if self._cell is not None:
            self._cell.append(data)


def _parse(text: str) -> _Doc:
    d = _Doc()
    d.feed(text)
    return d


def _png(path: Path, colour, size=(24, 16)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:] = colour
    arr[::2, ::3] = 255
    Image.fromarray(arr).save(path)
    return path.read_bytes()


def _jsonl(path: Path, records: list[dict], torn: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + ('{"step": 9, "loss"' if torn else ""))


def _done(path: Path, seconds: float, summary: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"hash": "abc", "finished": "2030-01-02 03:04:05", "seconds": seconds,
                                "summary": summary}))


METRICS = {
    "generator": "trained", "n_images": 200, "features": "shapes-world evaluator",
    "splits": {
        "test": {"generated": {"n_images": 200, "r_precision_dmgan": 0.5, "r_precision_dmgan_std": 0.02,
                               "soa_i": 0.4321, "fid": 12.3, "inception_score": 3.5, "inception_score_std": 0.25},
                 "real": {"n_images": 200, "r_precision_dmgan": 0.8, "r_precision_dmgan_std": 0.01,
                          "soa_i": 0.97, "fid": 0.0}},
        "test_novel": {"generated": {"fid": 20.25}, "real": {"fid": 0.0}},
    },
    "seconds": 4.5,
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("runs") / "myrun"
    run.mkdir()
    (run / "config.yaml").write_text("name: shapes-quick\ngan:\n  batch_size: 8  # <b>not html</b>\n")
    _done(run / "vocab" / "done.json", 0.5, {"words": 40})
    _jsonl(run / "vocab" / "metrics.jsonl", [{"time": 1.0, "stage": "vocab", "words": 40}])
    damsm = [{"time": 1.0 + i, "stage": "damsm", "step": 50 * (i + 1), "epoch": i // 4, "loss": 5.0 - 0.1 * i,
              "word_loss": 2.5 - 0.05 * i, "sent_loss": 2.5 - 0.05 * i, "lr": 2e-4} for i in range(12)]
    damsm += [{"time": 20.0 + e, "stage": "damsm", "step": 200 * (e + 1), "epoch": e, "minutes": 0.5 * e,
               "train_loss": 4.0 - e, "val_loss": 4.2 - e, "r_precision": 0.3 + 0.1 * e,
               "r_precision_std": 0.02} for e in range(3)]
    damsm += [{"time": 30.0, "stage": "damsm", "best_r_precision": 0.5, "note": "nan"}]
    _jsonl(run / "damsm" / "metrics.jsonl", damsm, torn=True)
    _done(run / "damsm" / "done.json", 61.0, {"epochs": 3, "best_r_precision": 0.5, "curve": [[0, 0.3]]})
    attn = _png(run / "damsm" / "attention" / "caption_0.png", (10, 120, 200))
    gan = [{"time": 40.0 + i, "stage": "gan", "step": 10 * (i + 1), "d_loss": 1.0 + 0.01 * i, "g_adv": 0.7,
            "g_loss": 3.0 - 0.02 * i, "minutes": 0.1 * i} for i in range(60)]
    gan += [{"time": 120.0 + i, "stage": "gan", "step": 200 * (i + 1), "eval_soa_i": 0.2 + 0.1 * i,
             "eval_colour_acc": 0.5, "eval_minutes": 1.0 * i} for i in range(3)]
    _jsonl(run / "gan" / "metrics.jsonl", gan)
    _done(run / "gan" / "done.json", 125.0, {"steps": 600, "stopped_early": False})
    old = _png(run / "gan" / "samples" / "step_000100.png", (200, 30, 30))
    new = _png(run / "gan" / "samples" / "step_000200.png", (30, 200, 30))
    os.utime(run / "gan" / "samples" / "step_000100.png", (1_000_000, 1_000_000))
    os.utime(run / "gan" / "samples" / "step_000200.png", (2_000_000, 2_000_000))
    (run / "gan" / "samples" / "captions.txt").write_text("0: a red circle\n1: a blue square\n")
    (run / "evaluate").mkdir()
    (run / "evaluate" / "metrics.json").write_text(json.dumps(METRICS))
    ev = _png(run / "evaluate" / "samples_test.png", (90, 90, 10))
    _jsonl(run / "captioner" / "metrics.jsonl", [{"time": 1.0, "stage": "captioner", "step": 1, "xe_loss": 3.0}])
    path = write_report(run)  # written once; each test reads it
    return run, {"attn": attn, "old": old, "new": new, "eval": ev, "path": path, "text": path.read_text()}


def _b64(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode("ascii")


def test_report_is_written_and_self_contained(run_dir):
    run, pngs = run_dir
    path = pngs["path"]
    assert path == run / "report.html" and path.exists()
    text = pngs["text"]
    refs = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)["']""", text)
    assert refs and all(r.startswith("data:") or r.startswith("#") for r in refs), \
        [r[:40] for r in refs if not r.startswith(("data:", "#"))]
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert "<link" not in text and "@import" not in text


def test_report_metrics_table(run_dir):
    run, res = run_dir
    doc = _parse(res["text"])
    tables = {t["title"]: t["rows"] for t in doc.tables}
    test = tables["test"]
    assert test[0] == ["metric", "generated", "real"]
    rows = {r[0]: r[1:] for r in test[1:]}
    assert rows["r_precision_dmgan"] == ["0.5 ± 0.02", "0.8 ± 0.01"]
    assert rows["soa_i"] == ["0.4321", "0.97"]
    assert rows["fid"] == ["12.3", "0"]
    assert rows["inception_score"] == ["3.5 ± 0.25", "—"]
    assert "r_precision_dmgan_std" not in rows
    assert {r[0]: r[1:] for r in tables["test_novel"][1:]} == {"fid": ["20.25", "0"]}
    details = {r[0]: r[1] for r in tables["details"]}
    assert details["generator"] == "trained" and details["features"] == "shapes-world evaluator"


def test_report_images_and_curves(run_dir):
    run, pngs = run_dir
    text = pngs["text"]
    doc = _parse(text)
    srcs = [i["src"] for i in doc.imgs]
    # latest sample grid first, then the older one; evaluation and attention images inlined byte for byte
    assert srcs.index(_b64(pngs["new"])) < srcs.index(_b64(pngs["old"]))
    assert _b64(pngs["eval"]) in srcs and _b64(pngs["attn"]) in srcs
    assert "0: a red circle" in text
    curves = {i["alt"]: i["src"] for i in doc.imgs if i.get("class") == "curve"}
    assert set(curves) == {"damsm: losses", "damsm: evaluation", "gan: losses", "gan: evaluation"}
    for src in curves.values():
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert img.format == "PNG" and img.width >= 300 and img.height >= 200
        assert np.asarray(img.convert("L")).std() > 5  # something is drawn
    # captioner logged one point only: incomplete stage, nothing to draw, but no crash
    assert "1 log records, no loss or evaluation curve to draw" in text


def test_report_stage_table_config_versions(run_dir):
    run, res = run_dir
    text = res["text"]
    doc = _parse(text)
    stage_table = next(t["rows"] for t in doc.tables if t["rows"] and t["rows"][0][:2] == ["stage", "status"])
    rows = {r[0]: r for r in stage_table[1:]}
    assert rows["gan"][1] == "done" and rows["gan"][2] == "2030-01-02 03:04:05" and rows["gan"][3] == "2:05"
    assert "steps=600" in rows["gan"][4] and "curve" not in rows["damsm"][4]
    assert rows["damsm"][3] == "1:01" and rows["vocab"][3] == "0.5 s"
    assert rows["captioner"][1].startswith("incomplete")
    assert rows["detector"][1] == "not run yet"
    assert rows["evaluate"][1].startswith("incomplete")  # metrics.json written, done.json not yet
    assert rows["total"][3] == "3:07"  # 0.5 + 61 + 125 s = 186.5 s, rounded half up
    assert "batch_size: 8  # &lt;b&gt;not html&lt;/b&gt;" in text
    versions = {r[0]: r[1] for r in next(t["rows"] for t in doc.tables if t["rows"] and t["rows"][0][0] == "python")}
    assert versions["python"] == platform.python_version()
    assert versions["numpy"] == np.__version__
    assert {"torch", "torchvision", "cpgan"} <= set(versions)


def test_empty_run_dir(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    text = write_report(empty).read_text()
    assert "evaluate: not run yet" in text and "gan: not run yet (no sample grids)" in text
    doc = _parse(text)
    stage_table = next(t["rows"] for t in doc.tables if t["rows"] and t["rows"][0][:2] == ["stage", "status"])
    assert [r[0] for r in stage_table[1:-1]] == list(PIPELINE)
    assert all(r[1] == "not run yet" for r in stage_table[1:-1])
    assert text.count("not run yet.") >= len(PIPELINE)  # one per stage in the curves section
    assert "not run yet (no config.yaml)" in text
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "missing")


def test_unreadable_metrics_json(tmp_path):
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "metrics.json").write_text("{not json")
    assert "metrics.json is unreadable" in write_report(tmp_path).read_text()


def test_curve_keys_and_plot():
    recs = [{"time": 1.0, "step": i, "epoch": 0, "lr": 1e-3, "minutes": 0.1, "d_loss": 1.0, "g_loss": 2.0,
             "r_precision": 0.5, "r_precision_std": 0.1, "fid": 30.0, "soa_c": 0.2, "eval_colour_acc": 0.3,
             "eval_minutes": 2.0, "words": 40, "flag": True} for i in range(3)]
    recs[1].update(gx_adv0=0.2, gx_tiscl=9.0)  # the GAN's gradient balance, logged on some records only
    loss, evals = curve_keys(recs)
    assert loss == ["d_loss", "g_loss"]
    assert evals == ["r_precision", "fid", "soa_c", "eval_colour_acc"]
    assert gradient_keys(recs) == ["gx_adv0", "gx_tiscl"]
    assert plot_curves(recs[:1], ["d_loss"], "one point") is None  # a single point is not a curve
    one = Image.open(io.BytesIO(plot_curves(recs, ["d_loss"], "t")))
    four = Image.open(io.BytesIO(plot_curves(recs, ["d_loss", "g_loss", "fid", "soa_c"], "t")))
    assert four.width == 3 * one.width and four.height > one.height  # 3 columns, 2 rows of panels


@pytest.mark.parametrize("value, text", [(26.55, "26.55"), (0.512345, "0.5123"), (12345.6, "12,345.6"), (7, "7"),
                                         (None, "—"), (True, "yes"), ((0.5, 0.02), "0.5 ± 0.02"),
                                         ([1, 2.5], "[1, 2.5]"), (list(range(10)), "10 values, mean 4.5")])
def test_format(value, text):
    assert _fmt(value) == text


def test_metric_tables_nestings():
    # sets at the top
    tables, details = metric_tables({"generated": {"fid": 1.5, "is": 2.0}, "real": {"fid": 0.0}})
    assert details == [] and len(tables) == 1
    assert tables[0]["columns"] == ["generated", "real"]
    assert tables[0]["rows"] == [("fid", {"generated": 1.5, "real": 0.0}), ("is", {"generated": 2.0})]
    # sets inside each metric, with mean/std leaves; column order generated, real, then others
    tables, _ = metric_tables({"r_precision": {"dmgan": {"real": {"mean": 0.9, "std": 0.05},
                                                         "generated": {"mean": 0.5, "std": 0.1},
                                                         "fake": {"mean": 0.1, "std": 0.0}}}})
    assert tables[0]["title"] == "r_precision" and tables[0]["columns"] == ["generated", "real", "fake"]
    assert tables[0]["rows"] == [("dmgan", {"real": (0.9, 0.05), "generated": (0.5, 0.1), "fake": (0.1, 0.0)})]
