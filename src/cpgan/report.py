"""The run report: one self-contained ``RUN_DIR/report.html`` (every image inlined as base64 PNG).

It reads only what the stages leave on disk (DESIGN §2, §8), so it can be written at any time, for a finished,
running or half-run directory; a stage that has not run says "not run yet":

* the metric table of ``evaluate/metrics.json`` — any nesting that contains set names (``generated``,
  ``real``, ...) becomes tables with one row per metric and one column per set (see :func:`metric_tables`);
* sample grids: the latest ``gan/samples/*.png`` (with ``captions.txt`` when present), every PNG under
  ``evaluate/`` and ``damsm/attention/``;
* per-stage status and time from each ``done.json``;
* training curves from each ``metrics.jsonl``: every numeric key whose name contains ``loss``, and separately
  the evaluation curves (R-precision, SOA, accuracies, FID, IS, ``eval_*`` keys), drawn with matplotlib's Agg
  canvas directly (no pyplot, so no global backend is changed); for the GAN also the gradient balance
  (``gx_*`` keys: gradient norms of the adversarial and TISCL terms at the stage images);
* the resolved ``config.yaml`` and the versions of python, torch, torchvision, numpy and cpgan.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import platform
import re
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from .stages.base import PIPELINE
from .utils.checkpoint import atomic_write_text
from .utils.logging import read_jsonl

__all__ = ["write_report", "build_report", "metric_tables", "curve_keys", "gradient_keys", "plot_curves", "versions",
           "add_report_command"]

SET_NAMES = ("generated", "real", "fake", "ceiling")
_SET_PREFIXES = ("generated_", "real_")
_NOT_CURVES = {"time", "step", "epoch", "minutes", "seconds", "lr", "skipped_images"}
_EVAL_TOKENS = {"fid", "is", "kid", "soa", "acc", "accuracy", "precision", "recall", "inception", "score"}
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_INLINE_BYTES = 3 << 20   # larger PNGs are downscaled before inlining
MAX_PLOT_KEYS = 24           # curves per figure


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: Any) -> str:
    """A metric value as text: 4 significant digits, thousands with one decimal, ints as they are."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:,.1f}" if abs(v) >= 1000 else f"{v:.4g}"
    if isinstance(v, tuple) and len(v) == 2:  # (mean, std)
        return f"{_fmt(v[0])} ± {_fmt(v[1])}"
    if isinstance(v, list):
        nums = [x for x in v if _is_num(x)]
        if len(nums) == len(v) and 0 < len(v) <= 8:
            return "[" + ", ".join(_fmt(x) for x in v) + "]"
        if len(nums) == len(v) and v:
            return f"{len(v)} values, mean {_fmt(sum(nums) / len(nums))}"
        return f"{len(v)} items"
    return str(v)


def _duration(seconds: Any) -> str:
    if not _is_num(seconds):
        return "—"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(s + 0.5), 60)  # round half up
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def _png_data_url(path: Path) -> str | None:
    """Inline a PNG file (downscaled when larger than ``MAX_INLINE_BYTES``); None if it is not a PNG."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if raw[:8] != _PNG_MAGIC:
        return None
    if len(raw) > MAX_INLINE_BYTES:
        from PIL import Image

        with Image.open(io.BytesIO(raw)) as im:
            im.thumbnail((1600, 1600))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            raw = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(raw).decode("ascii")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------------------------------
# metric tables
# --------------------------------------------------------------------------------------------------
def _is_set(name: str) -> bool:
    return name in SET_NAMES or name.startswith(_SET_PREFIXES)


def _flatten(obj: Any, path: tuple = ()) -> Iterable[tuple[tuple, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, path + (str(k),))
    else:
        yield path, obj


def _merge_mean_std(leaves: list[tuple[tuple, Any]]) -> list[tuple[tuple, Any]]:
    """Pair ``X`` with ``X_std`` and ``.../mean`` with ``.../std`` into one ``(mean, std)`` value."""
    index = {p: v for p, v in leaves}

    def partner(p: tuple, v: Any) -> tuple | None:
        if not p or not _is_num(v):
            return None
        q = p[:-1] + ("std",) if p[-1] == "mean" else p[:-1] + (p[-1] + "_std",)
        return q if _is_num(index.get(q)) else None

    partners = {p: partner(p, v) for p, v in leaves}
    consumed = {q for q in partners.values() if q is not None}
    out = []
    for p, v in leaves:
        q = partners[p]
        if q is not None:
            out.append((p[:-1] if p[-1] == "mean" else p, (v, index[q])))
        elif p not in consumed:
            out.append((p, v))
    return out


def metric_tables(metrics: Any) -> tuple[list[dict], list[tuple[str, Any]]]:
    """Arrange a nested metrics object into tables: rows = metrics, columns = sets.

    A leaf whose path contains a set name (``generated``, ``real``, ``fake``, ``ceiling`` or a name starting
    with ``generated_`` / ``real_``; the outermost one counts) goes to the column of that set; its row is the
    path without the set name. Rows are grouped into one table per remaining prefix (the common leading part of
    all prefixes is dropped from the titles). ``X`` with ``X_std`` and ``mean`` with ``std`` are shown as
    ``mean ± std``. Leaves outside any set are returned separately as ``(name, value)`` details.

    Returns ``(tables, details)`` with ``tables = [{"title": str, "columns": [set...], "rows": [(metric,
    {set: value})...]}]``.
    """
    leaves = _merge_mean_std(list(_flatten(metrics)))
    groups: dict[tuple, dict] = {}
    details: list[tuple[str, Any]] = []
    for path, value in leaves:
        i = next((k for k, name in enumerate(path) if _is_set(name)), None)
        if i is None:
            if not (isinstance(value, dict) and not value):
                details.append((" / ".join(path) or "value", value))
            continue
        row = path[:i] + path[i + 1:]
        group, label = (row[:-1], row[-1]) if row else ((), "value")
        g = groups.setdefault(group, {"columns": [], "rows": {}})
        if path[i] not in g["columns"]:
            g["columns"].append(path[i])
        g["rows"].setdefault(label, {})[path[i]] = value
    keys = list(groups)
    common = 0
    if len(keys) > 1:
        while all(len(k) > common for k in keys) and len({k[common] for k in keys}) == 1:
            common += 1
    tables = []
    for key in keys:
        g = groups[key]
        cols = [c for c in SET_NAMES if c in g["columns"]] + [c for c in g["columns"] if c not in SET_NAMES]
        tables.append({"title": " / ".join(key[common:]), "columns": cols, "rows": list(g["rows"].items())})
    return tables, details


def _tables_html(metrics: Any) -> str:
    tables, details = metric_tables(metrics)
    parts = []
    for t in tables:
        if t["title"]:
            parts.append(f"<h3>{_e(t['title'])}</h3>")
        head = "".join(f"<th>{_e(c)}</th>" for c in t["columns"])
        body = "".join(
            f"<tr><td class='k'>{_e(name)}</td>" + "".join(f"<td class='num'>{_e(_fmt(vals.get(c)))}</td>"
                                                          for c in t["columns"]) + "</tr>"
            for name, vals in t["rows"])
        parts.append(f"<table class='metrics'><thead><tr><th>metric</th>{head}</tr></thead><tbody>{body}</tbody>"
                     "</table>")
    if details:
        rows = "".join(f"<tr><td class='k'>{_e(k)}</td><td>{_e(_fmt(v))}</td></tr>" for k, v in details)
        parts.append(f"<h3>details</h3><table class='kv'><tbody>{rows}</tbody></table>")
    return "\n".join(parts) or "<p class='muted'>metrics.json is empty.</p>"


# --------------------------------------------------------------------------------------------------
# curves
# --------------------------------------------------------------------------------------------------
def _tokens(key: str) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", key.lower())) - {""}


def _numeric_keys(records: list[dict]) -> list[str]:
    """Keys with a numeric value in any record, in order of first appearance."""
    seen: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k not in seen and _is_num(v):
                seen[k] = None
    return list(seen)


def curve_keys(records: list[dict]) -> tuple[list[str], list[str]]:
    """``(loss_keys, eval_keys)`` of a metrics.jsonl in order of first appearance.

    Loss: numeric keys whose name contains ``loss``. Evaluation: numeric keys naming R-precision, SOA,
    an accuracy, FID, IS (or any ``eval_*`` key), except ``*_std`` (drawn as a band) and times.
    """
    seen = [k for k in _numeric_keys(records) if k not in _NOT_CURVES]
    loss = [k for k in seen if "loss" in k.lower()]
    evals = []
    for k in seen:
        if k in loss or k.endswith("_std"):
            continue
        toks = _tokens(k)
        if toks & _NOT_CURVES and not toks & _EVAL_TOKENS:
            continue
        if toks & _EVAL_TOKENS or "r_precision" in k or k.lower().startswith("eval_"):
            evals.append(k)
    return loss, evals


def gradient_keys(records: list[dict]) -> list[str]:
    """The GAN's gradient-balance keys (``gx_*``, see ``Trainer.train_step``) in order of first appearance."""
    return [k for k in _numeric_keys(records) if k.startswith("gx_")]


def _series(records: list[dict], key: str) -> tuple[list[float], list[float], list[float] | None, str]:
    rows = [r for r in records if _is_num(r.get(key))]
    with_step = all(_is_num(r.get("step")) for r in rows)
    xs = [float(r["step"]) if with_step else float(i) for i, r in enumerate(rows, 1)]
    ys = [float(r[key]) for r in rows]
    std = [float(r[key + "_std"]) for r in rows] if all(_is_num(r.get(key + "_std")) for r in rows) else None
    return xs, ys, std, ("step" if with_step else "log record")


def plot_curves(records: list[dict], keys: list[str], title: str, smooth: bool = False) -> bytes | None:
    """Small multiples (one panel per key) as PNG bytes; None when no key has two points or more."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = [(k, *_series(records, k)) for k in keys]
    series = [s for s in series if len(s[1]) >= 2][:MAX_PLOT_KEYS]
    if not series:
        return None
    ncols = min(3, len(series))
    nrows = math.ceil(len(series) / ncols)
    width, height = 3.7 * ncols, 2.6 * nrows + 0.4
    fig = Figure(figsize=(width, height), dpi=90)
    FigureCanvasAgg(fig)
    # fixed margins in inches (tight_layout would cost a second full draw)
    fig.subplots_adjust(left=0.6 / width, right=1 - 0.15 / width, bottom=0.5 / height, top=1 - 0.65 / height,
                        wspace=0.32, hspace=0.65)
    fig.suptitle(title, fontsize=11, x=0.12 / width, y=1 - 0.1 / height, ha="left", va="top")
    for i, (key, xs, ys, std, xlabel) in enumerate(series):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        few = len(xs) <= 30
        if smooth and len(ys) > 50:
            ax.plot(xs, ys, color="#4f5bd5", alpha=0.25, lw=0.8)
            ema, acc, beta = [], ys[0], 0.9
            for y in ys:
                acc = beta * acc + (1 - beta) * y
                ema.append(acc)
            ax.plot(xs, ema, color="#4f5bd5", lw=1.6)
        else:
            ax.plot(xs, ys, color="#4f5bd5", lw=1.4, marker="o" if few else None, ms=3)
        if std is not None:
            ax.fill_between(xs, [y - s for y, s in zip(ys, std)], [y + s for y, s in zip(ys, std)],
                            color="#4f5bd5", alpha=0.15, lw=0)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# versions
# --------------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    """Versions of python and the main packages (installed metadata; the module's ``__version__`` otherwise)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "cpgan", "matplotlib", "pillow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            try:
                mod = __import__("PIL" if name == "pillow" else name)
                out[name] = getattr(mod, "__version__", "unknown")
            except ImportError:
                out[name] = "not installed"
    return out


# --------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------
_CSS = """
body{margin:0;background:#f6f7fb;color:#1d2330;font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h1 span{color:#4f5bd5}
h2{font-size:17px;margin:0 0 12px}h3{font-size:14px;margin:18px 0 8px;color:#394056}
section{background:#fff;border:1px solid #e3e6ee;border-radius:12px;padding:18px 22px;margin:18px 0}
.muted{color:#6b7385}nav a{margin-right:14px;color:#4f5bd5;text-decoration:none}
table{border-collapse:collapse;margin:6px 0 4px;font-size:13px}
th,td{padding:5px 12px;border-bottom:1px solid #eceef4;text-align:left;vertical-align:top}
th{background:#f3f4fa;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.k{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12.5px}
.st-done{color:#1f7a3a;font-weight:600}.st-incomplete{color:#a35c00;font-weight:600}.st-missing{color:#8a90a0}
pre{background:#f7f8fc;border:1px solid #e3e6ee;border-radius:8px;padding:12px;overflow:auto;font-size:12px}
figure{margin:10px 0;display:inline-block;vertical-align:top;margin-right:14px}
figure img{max-width:100%;min-width:160px;border-radius:6px;border:1px solid #e3e6ee;image-rendering:pixelated}
figcaption{font-size:12px;color:#6b7385}
img.curve{max-width:100%;image-rendering:auto;border:none}
.stage h3{margin-top:14px}
"""


def _stage_rows(run_dir: Path) -> tuple[list[str], dict[str, dict]]:
    names = list(PIPELINE)
    if run_dir.is_dir():
        extra = sorted(p.name for p in run_dir.iterdir()
                       if p.is_dir() and p.name not in names and ((p / "done.json").exists()
                                                                   or (p / "metrics.jsonl").exists()))
        names += extra
    info = {}
    for name in names:
        d = run_dir / name
        done = _read_json(d / "done.json") if (d / "done.json").exists() else None
        if isinstance(done, dict):
            status = "done"
        elif d.is_dir():
            status = "incomplete"
        else:
            status = "missing"
        info[name] = {"status": status, "done": done if isinstance(done, dict) else {}}
    return names, info


def _summary_text(summary: Any, limit: int = 8) -> str:
    if not isinstance(summary, dict):
        return ""
    items = [(k, v) for k, v in summary.items() if not isinstance(v, (list, dict))]
    text = ", ".join(f"{k}={_fmt(v)}" for k, v in items[:limit])
    return text + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def _figures(paths: list[Path], run_dir: Path) -> str:
    out = []
    for p in paths:
        url = _png_data_url(p)
        if url is None:
            continue
        out.append(f"<figure><img src='{url}' alt='{_e(p.name)}'><figcaption>{_e(p.relative_to(run_dir))}"
                   "</figcaption></figure>")
    return "".join(out)


def _images_section(run_dir: Path, max_samples: int, max_other: int) -> str:
    parts = []
    sdir = run_dir / "gan" / "samples"
    samples = sorted(sdir.glob("*.png"), key=lambda p: (p.stat().st_mtime, _natural_key(p))) if sdir.is_dir() else []
    parts.append("<h3>Generator samples (latest first)</h3>")
    if samples:
        latest = samples[::-1][:max_samples]
        parts.append(_figures(latest, run_dir))
        if len(samples) > len(latest):
            parts.append(f"<p class='muted'>{len(samples) - len(latest)} older sample grids not shown.</p>")
        caps = sdir / "captions.txt"
        if caps.exists():
            parts.append(f"<details><summary>captions of the sample grids</summary><pre>{_e(caps.read_text())}</pre>"
                         "</details>")
    else:
        parts.append("<p class='muted'>gan: not run yet (no sample grids).</p>")
    for title, folder, stage in (("Evaluation images", run_dir / "evaluate", "evaluate"),
                                 ("DAMSM word attention", run_dir / "damsm" / "attention", "damsm")):
        parts.append(f"<h3>{title}</h3>")
        pngs = sorted(folder.rglob("*.png"), key=_natural_key) if folder.is_dir() else []
        if pngs:
            parts.append(_figures(pngs[:max_other], run_dir))
            if len(pngs) > max_other:
                parts.append(f"<p class='muted'>{len(pngs) - max_other} more images not shown.</p>")
        else:
            parts.append(f"<p class='muted'>{stage}: not run yet (no images).</p>")
    return "".join(parts)


def build_report(run_dir: str | Path, max_samples: int = 4, max_other: int = 12) -> str:
    """The report's HTML text (see the module docstring for its content)."""
    run_dir = Path(run_dir)
    names, info = _stage_rows(run_dir)
    n_done = sum(1 for n in names if info[n]["status"] == "done")
    toc = ("<nav><a href='#metrics'>metrics</a><a href='#images'>images</a><a href='#stages'>stages</a>"
           "<a href='#curves'>curves</a><a href='#config'>config</a><a href='#versions'>versions</a></nav>")
    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>CPGAN report · {_e(run_dir.name)}"
           f"</title><style>{_CSS}</style></head><body><main>",
           f"<h1>CP<span>GAN</span> run report · {_e(run_dir.name)}</h1>",
           f"<p class='muted'>{_e(run_dir.resolve())} · written {_e(time.strftime('%Y-%m-%d %H:%M:%S'))} · "
           f"{n_done} of {len(names)} stages finished</p>", toc]

    # metrics
    out.append("<section id='metrics'><h2>Metrics (generated vs real ceiling)</h2>")
    mpath = run_dir / "evaluate" / "metrics.json"
    metrics = _read_json(mpath) if mpath.exists() else None
    if metrics is None:
        reason = "metrics.json is unreadable" if mpath.exists() else "not run yet"
        out.append(f"<p class='muted'>evaluate: {reason}.</p>")
    else:
        out.append(_tables_html(metrics))
    out.append("</section>")

    out.append(f"<section id='images'><h2>Images</h2>{_images_section(run_dir, max_samples, max_other)}</section>")

    # stages table
    rows, total = [], 0.0
    for n in names:
        st, done = info[n]["status"], info[n]["done"]
        label = {"done": "done", "incomplete": "incomplete (running or interrupted)", "missing": "not run yet"}[st]
        secs = done.get("seconds")
        total += float(secs) if _is_num(secs) else 0.0
        rows.append(f"<tr><td class='k'>{_e(n)}</td><td class='st-{st}'>{_e(label)}</td>"
                    f"<td>{_e(done.get('finished', '—'))}</td><td class='num'>{_e(_duration(secs))}</td>"
                    f"<td>{_e(_summary_text(done.get('summary')))}</td></tr>")
    rows.append(f"<tr><th>total</th><th></th><th></th><th class='num'>{_e(_duration(total))}</th><th></th></tr>")
    out.append("<section id='stages'><h2>Stages</h2><table><thead><tr><th>stage</th><th>status</th>"
               "<th>finished</th><th>time</th><th>summary</th></tr></thead><tbody>" + "".join(rows) +
               "</tbody></table></section>")

    # curves
    out.append("<section id='curves'><h2>Training curves</h2>")
    for n in names:
        out.append(f"<div class='stage'><h3>{_e(n)}</h3>")
        records = read_jsonl(run_dir / n / "metrics.jsonl")
        if not records:
            msg = "not run yet" if info[n]["status"] == "missing" else "nothing logged"
            out.append(f"<p class='muted'>{msg}.</p></div>")
            continue
        loss_keys, eval_keys = curve_keys(records)
        drew = False
        groups = ((loss_keys, f"{n}: losses", True), (eval_keys, f"{n}: evaluation", False),
                  (gradient_keys(records), f"{n}: gradient norm at the stage images", True))
        for keys, title, smooth in groups:
            png = plot_curves(records, keys, title, smooth=smooth) if keys else None
            if png is not None:
                drew = True
                url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
                out.append(f"<img class='curve' src='{url}' alt='{_e(title)}'>")
        if not drew:
            out.append(f"<p class='muted'>{len(records)} log records, no loss or evaluation curve to draw.</p>")
        out.append("</div>")
    out.append("</section>")

    # config and versions
    cfg = run_dir / "config.yaml"
    cfg_html = (f"<pre>{_e(cfg.read_text())}</pre>" if cfg.exists()
                else "<p class='muted'>not run yet (no config.yaml).</p>")
    out.append(f"<section id='config'><h2>Resolved config</h2>{cfg_html}</section>")
    vrows = "".join(f"<tr><td class='k'>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in versions().items())
    out.append(f"<section id='versions'><h2>Versions</h2><table class='kv'><tbody>{vrows}</tbody></table></section>")
    out.append("</main></body></html>\n")
    return "\n".join(out)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``RUN_DIR/report.html`` (or ``out``) atomically and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist; run a pipeline first, e.g. "
                                f"`cpgan run shapes-quick --out {run_dir}`")
    path = Path(out) if out is not None else run_dir / "report.html"
    atomic_write_text(path, build_report(run_dir))
    return path


def cmd_report(args: argparse.Namespace) -> int:
    path = write_report(args.run, args.out)
    print(f"wrote {path}")
    return 0


def add_report_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``cpgan report --run RUN_DIR [--out FILE]`` (sets ``func=cmd_report``)."""
    sp = subparsers.add_parser("report", help="write RUN_DIR/report.html (metrics, samples, curves, config)",
                               description="Write a self-contained HTML report of a run directory.")
    sp.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory")
    sp.add_argument("--out", default=None, help="output file (default RUN_DIR/report.html)")
    sp.set_defaults(func=cmd_report)
    return sp
