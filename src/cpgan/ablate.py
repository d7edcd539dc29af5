"""``cpgan ablate``: the paper's ablation table (§4.2, Fig. 6), trained and measured under one protocol.

Rows (DESIGN §3.6; paper §4.2, Fig. 6): the AttnGAN⁺ baseline (plain text encoder, grid image encoder,
global conditional discriminator — with CPGAN's hinge losses, truncated noise and batch, which every row
shares), each component added alone (+MATE, +OAIE, +FGCD), each pair, and CPGAN (MATE + OAIE + FGCD). A row is
nothing but three config overrides (:data:`ROWS`) applied on top of a base preset; the same rows exist as
presets ``configs/ablation/<row>.yaml`` (``base: shapes``) for a single ``cpgan run ablation/<row>``.

Protocol (what makes the rows comparable):

* every row and seed uses the same base preset, the same ``--set`` overrides, the same GAN budget
  (``--budget-minutes`` sets ``gan.max_minutes``; other stages keep the preset's budgets) and the same seeds;
  no row is tuned more than another;
* seed ``k`` adds ``k`` to the preset's value of every *training* seed: :data:`SEED_KEYS` (detector,
  captioner, DAMSM, GAN). The data set (``data.seed``), the judge (``evaluator.seed``) and the evaluation
  noise (``evaluate.seed``) are fixed, so every row and seed is measured on the same images by the same
  evaluator with the same noise;
* the shapes world is generated once into ``OUT/_shared/data`` (``data.root`` of every run, as an absolute
  path, so moving OUT invalidates the stage hashes and re-runs everything).

Sharing (a content-addressed stage cache): every stage before ``gan`` (:data:`SHARED_STAGES`: data, vocab,
evaluator, detector, captioner, memory, damsm) is trained at most once per stage hash, in its own run directory
``OUT/_shared/stages/<stage>-<identity>/`` (``identity``: ``stages.base.identity_hash``, the stage hash blind to
the stage's budget keys, so a longer budget continues the same checkpoint; the folder holds links to its
upstream stages), and linked into each row's run
directory ``OUT/<row>/seed<k>/`` as a relative symlink (a copy where symlinks are not possible). The stage
hash (``stages.base.stage_hash``: the stage's config keys + its upstream hashes) decides what is shared, so
sharing is exactly "identical inputs and settings": the data and vocabulary once; the evaluator once (its
config has no per-seed key); the detector, captioner and memory of seed ``k`` once for every row that uses
them; the DAMSM of seed ``k`` once per (text encoder, image encoder) pair — e.g. AttnGAN⁺ and +FGCD use the
very same DAMSM, so the FGCD comparison is exactly controlled. ``gan`` and ``evaluate`` run in the row's own
directory with ``run_stages(..., only=["gan", "evaluate"])``; ``run_stages`` checks that the linked upstream
stages are up to date (same hash) and refuses to run otherwise.

Resumability: a row/seed whose ``evaluate/done.json`` carries the hash of its current config is skipped
without touching anything; an interrupted row resumes from its checkpoints (``run_stages``), so a long table
can be built in several invocations (all seed-0 rows first, then seed 1, ...). A new ``--budget-minutes``
changes every row's GAN hash: each row's GAN continues from its checkpoint up to the new total budget (the
stage's budget keys) and is evaluated again; any other changed override re-trains the affected stages in
place (use another ``--out`` to keep both tables).

Workers: several invocations may run on the same OUT at once (e.g. one per CPU core with
``OMP_NUM_THREADS=1``, or one per GPU): each shared stage is trained under a file lock by the first worker that
needs it (the others wait and reuse it), and a row/seed being trained by one worker is skipped by the others.
Every worker writes the table of what is finished when it ends.

R-precision is measured twice: with the row's own DAMSM (which its generator was trained against, so not
comparable between rows) and with one **independent DAMSM** shared by all rows (plain + grid encoders trained
like the AttnGAN⁺ row's with ``damsm.seed + 1000``; ``evaluate.independent_damsm``), the column
``R-prec (dmgan indep)``. ``--no-independent-damsm`` skips it.

Outputs: ``OUT/ablation.json`` (setup; per row and seed the raw ``evaluate/metrics.json`` splits and the stage
minutes; per row mean ± spread over seeds; the real-image ceiling), ``OUT/ablation.md`` (one markdown table
per test split) and ``OUT/ablation.png`` (the same 6 test captions drawn by every row).

Spread: the sample standard deviation over seeds (``ddof=1``); with a single seed there is no spread and
the table shows the value alone.
"""
from __future__ import annotations

import copy
import math
import os
import re
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .config import Config, ConfigError, get_key, hash_of, load_config, parse_override, set_key, to_dict
from .stages.base import (PIPELINE, StageError, identity_hash, registry, resolve_device, run_stages, stage_hash,
                          stage_status)
from .utils.checkpoint import atomic_write_json, atomic_write_text
from .utils.locks import file_lock
from .utils.logging import echo

# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------
ABLATION_KEYS: tuple[str, ...] = ("model.text_encoder", "model.image_encoder", "model.cond_disc")
"""The three switches of DESIGN §3.6; the ablation owns them (``--set`` may not change them)."""

SEED_KEYS: tuple[str, ...] = ("detector.seed", "captioner.seed", "damsm.seed", "gan.seed")
"""Training seeds offset by the seed index ``k``. Not seeded: ``data.seed``, ``evaluator.seed``,
``evaluate.seed`` (same data, same judge, same evaluation noise for every row and seed)."""

SHARED_STAGES: tuple[str, ...] = ("data", "vocab", "evaluator", "detector", "captioner", "memory", "damsm")
"""Stages trained once per stage hash in ``OUT/_shared/stages`` and linked into the rows."""

ROW_STAGES: tuple[str, ...] = ("gan", "evaluate")
"""Stages every row and seed runs in its own directory."""


@dataclass(frozen=True)
class AblationRow:
    """One row of the table: a file-safe ``slug``, the paper's ``label`` and its config overrides."""

    slug: str
    label: str
    overrides: tuple[str, ...]

    def switches(self) -> dict[str, str]:
        """``{dotted key: value}`` of the row's overrides."""
        return {k: v for k, v in (parse_override(o) for o in self.overrides)}


def _switches(text: str, image: str, disc: str) -> tuple[str, ...]:
    return (f"model.text_encoder={text}", f"model.image_encoder={image}", f"model.cond_disc={disc}")


ROWS: tuple[AblationRow, ...] = (
    AblationRow("attngan-plus", "AttnGAN⁺", _switches("plain", "grid", "global")),
    AblationRow("mate", "+MATE", _switches("mate", "grid", "global")),
    AblationRow("oaie", "+OAIE", _switches("plain", "oaie", "global")),
    AblationRow("fgcd", "+FGCD", _switches("plain", "grid", "fgcd")),
    AblationRow("mate-oaie", "MATE+OAIE", _switches("mate", "oaie", "global")),
    AblationRow("mate-fgcd", "MATE+FGCD", _switches("mate", "grid", "fgcd")),
    AblationRow("oaie-fgcd", "OAIE+FGCD", _switches("plain", "oaie", "fgcd")),
    AblationRow("cpgan", "CPGAN", _switches("mate", "oaie", "fgcd")),
)
"""The paper's rows, in the order of its table (Fig. 6)."""

_ALIASES = {"attngan": "attngan-plus", "attngan+": "attngan-plus", "attngan_plus": "attngan-plus",
            "baseline": "attngan-plus", "all": "cpgan"}


def _norm(name: str) -> str:
    n = name.strip().lower().replace("⁺", "+")
    n = n.lstrip("+").replace("+", "-").replace("_", "-").replace(" ", "")
    return n


def resolve_rows(spec: str | Sequence[str] | None) -> list[AblationRow]:
    """Rows named by ``spec`` (``"mate,cpgan"``, labels such as ``"+MATE"`` work too), in table order."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return list(ROWS)
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    by_slug = {r.slug: r for r in ROWS}
    by_norm = {_norm(r.label): r for r in ROWS} | {_norm(r.slug): r for r in ROWS}
    picked: set[str] = set()
    for raw in names:
        if not raw.strip():
            continue
        key = raw.strip().lower()
        row = by_slug.get(_ALIASES.get(key, key)) or by_norm.get(_norm(raw))
        if row is None:
            raise ConfigError(f"unknown ablation row '{raw.strip()}'; rows: {', '.join(r.slug for r in ROWS)}")
        picked.add(row.slug)
    if not picked:
        raise ConfigError(f"--rows names no row; rows: {', '.join(r.slug for r in ROWS)}")
    return [r for r in ROWS if r.slug in picked]


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------
def base_config(preset: str, out: str | Path, overrides: Iterable[str] = (),
                budget_minutes: float | None = None) -> Config:
    """The preset with the user's overrides, the GAN budget and (shapes world) ``data.root = OUT/_shared/data``.

    Raises ConfigError when an override touches one of :data:`ABLATION_KEYS` (the rows set those).
    """
    overrides = list(overrides)
    for ov in overrides:
        key, _ = parse_override(ov)
        if key.strip() in ABLATION_KEYS:
            raise ConfigError(f"--set {key.strip()} is chosen by each ablation row; remove it "
                              f"(use --rows to pick rows)")
    cfg = load_config(preset, overrides)
    if budget_minutes is not None:
        if not budget_minutes > 0:
            raise ConfigError(f"--budget-minutes must be a positive number of minutes, got {budget_minutes}")
        cfg.gan.max_minutes = float(budget_minutes)
    if cfg.data.source == "shapes" and not cfg.data.root:
        cfg.data.root = str((Path(out) / "_shared" / "data").resolve())
    return cfg


def row_config(base: Config, row: AblationRow, seed: int) -> Config:
    """A copy of ``base`` with the row's switches and training seeds offset by ``seed`` (:data:`SEED_KEYS`)."""
    if seed < 0:
        raise ConfigError(f"seed index must be >= 0, got {seed}")
    cfg = copy.deepcopy(base)
    for ov in row.overrides:
        key, value = parse_override(ov)
        set_key(cfg, key, value)
    for key in SEED_KEYS:
        set_key(cfg, key, int(get_key(base, key)) + seed)
    cfg.name = f"{base.name}-{row.slug}-seed{seed}"
    return cfg


INDEPENDENT_SEED_OFFSET = 1000
"""The independent DAMSM is the AttnGAN⁺ row's (plain + grid) with ``damsm.seed`` raised by this much."""


def independent_damsm_config(base: Config) -> Config:
    """Config of the DAMSM that measures every row's R-precision: plain text + grid image encoder, trained
    like the rows' DAMSMs but with another seed, so no row's generator was trained against it."""
    cfg = row_config(base, resolve_rows("attngan-plus")[0], 0)
    cfg.damsm.seed = int(base.damsm.seed) + INDEPENDENT_SEED_OFFSET
    cfg.name = f"{base.name}-independent-damsm"
    return cfg


def run_dir_of(out: str | Path, row: AblationRow, seed: int) -> Path:
    """``OUT/<row>/seed<k>``."""
    return Path(out) / row.slug / f"seed{seed}"


def evaluate_hash(cfg: Config, stages: dict | None = None) -> str:
    """Hash the ``evaluate`` stage of a run with ``cfg`` records in its done marker when up to date."""
    return stage_hash(cfg, "evaluate", stages if stages is not None else registry(), {})


def row_status(cfg: Config, run_dir: Path, stages: dict | None = None) -> str:
    """``done`` (evaluate finished under this config), ``stale`` (finished under another config) or ``pending``."""
    done = stage_status(Path(run_dir), "evaluate")
    if not done:
        return "pending"
    return "done" if done.get("hash") == evaluate_hash(cfg, stages) else "stale"


# --------------------------------------------------------------------------------------------------
# Shared stages
# --------------------------------------------------------------------------------------------------
class AblationInterrupted(Exception):
    """A stage was interrupted (SIGINT/SIGTERM) after saving its checkpoint."""


def link_stage(src: Path, dst: Path) -> str:
    """Make ``dst`` a relative symlink to the stage folder ``src`` (a copy where symlinks fail).

    An existing link elsewhere, or a real folder (stale: callers keep up-to-date folders), is replaced.
    Returns ``"link"`` or ``"copy"``.
    """
    src, dst = Path(src), Path(dst)
    if dst.is_symlink():
        if dst.resolve() == src.resolve():
            return "link"
        dst.unlink()
    elif dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        dst.symlink_to(os.path.relpath(src.resolve(), dst.parent.resolve()), target_is_directory=True)
        return "link"
    except OSError:
        shutil.copytree(src, dst)
        return "copy"


class StageCache:
    """Content-addressed stage outputs: ``ROOT/<stage>-<identity>/`` is a run directory holding that stage.

    ``ensure(cfg, name)`` trains the stage there unless its done marker already carries the hash, after
    linking its (transitive, needed) upstream stages from their own cache folders.
    """

    def __init__(self, root: Path, stages: dict | None = None):
        self.root = Path(root)
        self.stages = stages if stages is not None else registry()

    def _closure(self, cfg: Config, name: str) -> list[str]:
        """Needed upstream stages of ``name``, transitively, in pipeline order."""
        seen: set[str] = set()
        todo = list(self.stages[name].upstream)
        while todo:
            u = todo.pop()
            if u in seen or u not in self.stages or not self.stages[u].needed(cfg):
                continue
            seen.add(u)
            todo.extend(self.stages[u].upstream)
        return [s for s in PIPELINE if s in seen]

    def folder(self, cfg: Config, name: str) -> Path:
        """Cache run directory of stage ``name`` of ``cfg`` (named by the budget-blind identity hash)."""
        return self.root / f"{name}-{identity_hash(cfg, name, self.stages, {})}"

    def ensure(self, cfg: Config, name: str) -> Path:
        """Run directory in which stage ``name`` of ``cfg`` is finished (training it if needed)."""
        h = stage_hash(cfg, name, self.stages, {})
        cdir = self.folder(cfg, name)
        done = stage_status(cdir, name)
        if done and done.get("hash") == h:
            return cdir
        for u in self._closure(cfg, name):
            if u in SHARED_STAGES:
                link_stage(self.ensure(cfg, u) / u, cdir / u)
        # Another worker on the same OUT may be training this stage: wait for it, then reuse its result.
        lock = cdir.with_name(cdir.name + ".lock")
        with file_lock(lock, on_wait=lambda: echo(
                f"[ablate] shared stage {name}: another worker is training it in {cdir}; waiting")):
            done = stage_status(cdir, name)
            if done and done.get("hash") == h:
                return cdir
            echo(f"[ablate] shared stage {name}: training in {cdir}")
            res = run_stages(cfg, cdir, only=[name])
            if res.get(name, {}).get("status") == "interrupted":
                raise AblationInterrupted(name)
            done = stage_status(cdir, name)
            if not done or done.get("hash") != h:
                raise StageError(f"shared stage '{name}' did not finish in {cdir}; run `cpgan ablate` again")
            return cdir

    def link_into(self, cfg: Config, run_dir: Path) -> list[str]:
        """Link every needed shared stage of ``cfg`` into ``run_dir``; returns their names."""
        linked = []
        for name in SHARED_STAGES:
            if name not in self.stages or not self.stages[name].needed(cfg):
                continue
            h = stage_hash(cfg, name, self.stages, {})
            own = run_dir / name
            done = stage_status(run_dir, name)
            if not own.is_symlink() and done and done.get("hash") == h:
                linked.append(name)  # an up-to-date folder trained here earlier: keep it
                continue
            link_stage(self.ensure(cfg, name) / name, own)
            linked.append(name)
        return linked


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------
METRICS: tuple[tuple[str, str, int], ...] = (
    ("r_precision_dmgan", "R-prec (dmgan)", 3),
    ("r_precision_cpgan_batch", "R-prec (cpgan-batch)", 3),
    ("soa_c", "SOA-C", 3),
    ("soa_i", "SOA-I", 3),
    ("colour_acc", "colour acc", 3),
    ("shape_acc", "shape acc", 3),
    ("fid", "FID ↓", 2),
    ("inception_score", "IS", 2),
)
"""(metrics.json key, column title, decimals) of the table, in column order."""

_INDEP = re.compile(r"^r_precision_\w*indep\w*$")


def independent_keys(values: Iterable[dict]) -> list[str]:
    """Keys like ``r_precision_dmgan_indep`` (R-precision by an independent DAMSM) present in any dict."""
    keys = {k for d in values for k in d if _INDEP.match(k) and not k.endswith("_std")}
    return sorted(keys)


def mean_spread(values: Iterable[Any]) -> dict:
    """``{"mean", "spread", "n"}`` over the numeric values (None/NaN ignored); spread = sample std (ddof=1)."""
    xs = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
          and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return {"mean": None, "spread": None, "n": 0}
    mean = sum(xs) / n
    spread = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return {"mean": mean, "spread": spread, "n": n}


def stage_minutes(run_dir: Path) -> dict:
    """Minutes from each stage's ``done.json`` in ``run_dir`` (following links): per stage, total, GAN.

    A stage that reports its own cumulative training time (``summary.minutes``, e.g. the GAN continued from a
    checkpoint over several calls) counts with that; otherwise the wall time of its last run (``seconds``).
    """
    per = {}
    for name in PIPELINE:
        done = stage_status(Path(run_dir), name)
        if not done:
            continue
        own = (done.get("summary") or {}).get("minutes")
        if isinstance(own, (int, float)) and not isinstance(own, bool):
            per[name] = float(own)
        elif isinstance(done.get("seconds"), (int, float)):
            per[name] = float(done["seconds"]) / 60.0
    return {"minutes": sum(per.values()) if per else None, "minutes_gan": per.get("gan"), "per_stage": per}


def _load_metrics(run_dir: Path) -> dict | None:
    from .stages.base import read_json

    return read_json(Path(run_dir) / "evaluate" / "metrics.json")


def summarize(out: str | Path, rows: Sequence[AblationRow], seeds: Sequence[int],
              hashes: dict[tuple[str, int], str] | None = None, setup: dict | None = None) -> dict:
    """The content of ``ablation.json`` from the finished row/seed run directories under ``out``.

    ``hashes[(slug, seed)]``: the evaluate hash of the current config; a run finished under another hash is
    reported as ``stale`` and left out of the means. Without ``hashes`` every finished run counts.
    """
    out = Path(out)
    result: dict = {**(setup or {}), "seeds": list(seeds),
                    "spread": "sample standard deviation over seeds (ddof=1); null with one seed",
                    "rows": [], "real": {}}
    splits: list[str] = []
    real_vals: dict[str, dict[str, list]] = {}
    all_generated: list[dict] = []
    for row in rows:
        per_seed: dict[str, dict] = {}
        for k in seeds:
            rd = run_dir_of(out, row, k)
            done = stage_status(rd, "evaluate")
            metrics = _load_metrics(rd) if done else None
            if metrics is None:
                status = "pending"
            elif hashes is not None and done.get("hash") != hashes.get((row.slug, k)):
                status = "stale"
            else:
                status = "done"
            entry: dict = {"status": status, "run_dir": str(rd)}
            if status == "done":
                entry.update(stage_minutes(rd))
                entry["splits"] = metrics.get("splits", {})
                entry["n_images"] = metrics.get("n_images")
                for split, sets in entry["splits"].items():
                    if split not in splits:
                        splits.append(split)
                    all_generated.append(sets.get("generated", {}))
            per_seed[str(k)] = entry
        result["rows"].append({"slug": row.slug, "label": row.label, "overrides": list(row.overrides),
                               "seeds": per_seed})
    keys = [k for k, _, _ in METRICS] + independent_keys(all_generated)
    result["metrics"] = keys
    result["splits"] = splits
    for r in result["rows"]:
        done = [e for e in r["seeds"].values() if e["status"] == "done"]
        summ: dict = {"n_done": len(done)}
        for split in splits:
            summ[split] = {key: mean_spread(e["splits"].get(split, {}).get("generated", {}).get(key) for e in done)
                           for key in keys}
            for e in done:
                real = e["splits"].get(split, {}).get("real", {})
                for key in keys:
                    real_vals.setdefault(split, {}).setdefault(key, []).append(real.get(key))
        summ["minutes"] = mean_spread(e.get("minutes") for e in done)
        summ["minutes_gan"] = mean_spread(e.get("minutes_gan") for e in done)
        r["summary"] = summ
    result["real"] = {split: {key: mean_spread(vals) for key, vals in kv.items()} for split, kv in real_vals.items()}
    return result


def _fmt(stat: dict | None, digits: int) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    s = f"{stat['mean']:.{digits}f}"
    if stat.get("spread") is not None:
        s += f" ± {stat['spread']:.{digits}f}"
    return s


def _title(key: str) -> tuple[str, int]:
    for k, title, digits in METRICS:
        if k == key:
            return title, digits
    return "R-prec (" + key[len("r_precision_"):].replace("_", " ") + ")", 3


def format_markdown(summary: dict) -> str:
    """Markdown: one table per split, rows × metrics as ``mean ± spread``, and the real-image ceiling row."""
    keys = summary.get("metrics") or [k for k, _, _ in METRICS]
    n_seeds = len(summary.get("seeds", []))
    lines = ["# Ablation (paper §4.2, Fig. 6)", ""]
    setup = [f"preset `{summary['preset']}`" if summary.get("preset") else None,
             f"GAN budget {summary['budget_minutes']:g} min per row" if summary.get("budget_minutes") else None,
             f"{n_seeds} seed(s) per row",
             f"overrides {', '.join('`' + o + '`' for o in summary['overrides'])}" if summary.get("overrides") else None]
    lines.append("Setup: " + "; ".join(s for s in setup if s) + ".")
    lines.append("Cells are mean ± spread over seeds (spread = sample standard deviation; a value alone = one "
                 "finished seed). Minutes: every stage of the row from done.json, shared stages counted in full.")
    lines.append("")
    if not summary.get("splits"):
        lines.append("No row has finished yet.")
        return "\n".join(lines) + "\n"
    for split in summary["splits"]:
        titles = [_title(k) for k in keys]
        lines.append(f"## {split}")
        lines.append("")
        lines.append("| row | " + " | ".join(t for t, _ in titles) + " | minutes | GAN min | seeds |")
        lines.append("|---" * (len(keys) + 4) + "|")
        for r in summary["rows"]:
            s = r["summary"]
            cells = [_fmt(s.get(split, {}).get(k), d) for k, (_, d) in zip(keys, titles)]
            lines.append(f"| {r['label']} | " + " | ".join(cells) +
                         f" | {_fmt(s.get('minutes'), 1)} | {_fmt(s.get('minutes_gan'), 1)} | {s['n_done']}/{n_seeds} |")
        real = summary.get("real", {}).get(split, {})
        n_real = max((v.get("n", 0) for v in real.values()), default=0)
        cells = [_fmt(real.get(k), d) for k, (_, d) in zip(keys, titles)]
        lines.append("| real images (ceiling) | " + " | ".join(cells) + f" | — | — | {n_real} runs |")
        lines.append("")
    lines.append("The real-image row scores the real test images of the same captions (mean over every finished "
                 "row and seed). Its R-precision uses each row's own DAMSM, so it varies with the row; SOA, "
                 "accuracies and IS come from the shared evaluator; FID of real vs real is 0 by definition.")
    stale = [f"{r['label']} seed {k}" for r in summary["rows"] for k, e in r["seeds"].items() if e["status"] == "stale"]
    if stale:
        lines.append("")
        lines.append(f"Left out (finished under another configuration; run `cpgan ablate` again): {', '.join(stale)}.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------------------
def write_figure(summary: dict, path: Path, n_captions: int = 6, device: str = "cpu") -> Path | None:
    """The same ``n_captions`` test captions drawn by every finished row (its first finished seed).

    One row of images per ablation row (``Sampler.generate(caption, n=1, seed=0)``, final stage), caption
    labels on top. Returns None when no row has finished.
    """
    from .data.dataset import load_split
    from .sampling import Sampler

    picks = []
    for r in summary["rows"]:
        seeds = [k for k, e in r["seeds"].items() if e["status"] == "done"]
        if seeds:
            picks.append((r["label"], seeds[0], Path(r["seeds"][seeds[0]]["run_dir"])))
    if not picks:
        return None
    recs = load_split(picks[0][2], "test").records
    captions = [rec["captions"][0] for rec in recs[:n_captions] if rec.get("captions")]
    grid = []
    for _label, _seed, rd in picks:
        sampler = Sampler.from_run(rd, device)
        grid.append([sampler.generate(c, n=1, seed=0)["images"][-1][0] for c in captions])
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nr, nc = len(picks), len(captions)
    fig = Figure(figsize=(1.5 * nc + 1.2, 1.5 * nr + 1.0), dpi=150)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nr, nc, squeeze=False)
    for i, (label, seed, _) in enumerate(picks):
        for j, img in enumerate(grid[i]):
            ax = axes[i][j]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(textwrap.fill(captions[j], 22), fontsize=5)
            if j == 0:
                ax.set_ylabel(label + ("" if str(seed) == str(summary.get("seeds", [0])[0]) else f"\nseed {seed}"),
                              fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
def _check_data_setup(out: Path, cfg: Config) -> None:
    """One OUT holds one shapes world: a later call with other generation settings would regenerate
    ``OUT/_shared/data`` under the stages already trained on it, so it is refused. (Only the generation
    parameters are compared; ``data.root`` follows OUT, and a moved OUT re-runs everything anyway through the
    stage hashes.)"""
    import json

    if cfg.data.source != "shapes":
        return
    p = out / "_shared" / "data_config.json"
    mine = {k: getattr(cfg.data, k) for k in ("image_size", "n_train", "n_test", "n_test_novel", "seed")}
    if p.exists():
        try:
            old = json.loads(p.read_text())
        except json.JSONDecodeError:
            old = None
        if old is not None and old != mine:
            diff = sorted(k for k in set(old) | set(mine) if old.get(k) != mine.get(k))
            raise ConfigError(f"{out} was built with other data settings ({', '.join('data.' + k for k in diff)}); "
                              "use another --out for a different data set")
        return
    atomic_write_json(p, mine)


def write_outputs(out: Path, summary: dict, figure: bool = True, device: str = "cpu") -> dict[str, Path]:
    """``ablation.json``, ``ablation.md`` and (``figure``) ``ablation.png`` under ``out``."""
    paths = {"json": out / "ablation.json", "md": out / "ablation.md"}
    atomic_write_json(paths["json"], summary)
    atomic_write_text(paths["md"], format_markdown(summary))
    if figure:
        png = write_figure(summary, out / "ablation.png", device=device)
        if png is not None:
            paths["png"] = png
    return paths


def run_ablation(preset: str, out: str | Path, rows: str | Sequence[str] | None = None, seeds: int = 2,
                 budget_minutes: float | None = None, overrides: Iterable[str] = (), figure: bool = True,
                 table_only: bool = False, shared_only: bool = False, independent: bool = True) -> dict:
    """Train (unless ``table_only``) and evaluate every row × seed, then write the table; returns the summary.

    ``shared_only`` trains the shared stages every row needs (data, evaluator, detector, captioner, memory,
    DAMSM) and no GAN. Several calls may work on the same OUT at once (one per core or GPU): shared stages and
    rows are protected by file locks (:mod:`cpgan.utils.locks`), so the workers split the rows between them.

    The summary has ``interrupted: True`` when a stage was stopped by a signal (its checkpoint is saved;
    run again to resume).
    """
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds must be a positive number of seeds, got {seeds}")
    out = Path(out)
    overrides = list(overrides)
    picked = resolve_rows(rows)
    base = base_config(preset, out, overrides, budget_minutes)
    stages = registry()
    missing = [s for s in (*SHARED_STAGES, *ROW_STAGES) if s not in stages]
    if missing:
        raise StageError(f"stages not implemented in this install: {', '.join(missing)}")
    seed_list = list(range(seeds))
    cache = StageCache(out / "_shared" / "stages", stages)
    ind_cfg = None
    if independent and not base.evaluate.independent_damsm:
        ind_cfg = independent_damsm_config(base)
        base.evaluate.independent_damsm = str(cache.folder(ind_cfg, "damsm").resolve())
    configs = {(r.slug, k): row_config(base, r, k) for k in seed_list for r in picked}
    hashes = {key: evaluate_hash(c, stages) for key, c in configs.items()}
    setup = {"preset": preset, "overrides": overrides, "budget_minutes": budget_minutes,
             "gan_max_minutes": base.gan.max_minutes, "seed_keys": list(SEED_KEYS),
             "base_config_hash": hash_of(to_dict(base)),
             "shared": "content-addressed stage cache OUT/_shared/stages/<stage>-<identity hash> for "
                       + ", ".join(SHARED_STAGES) + "; gan and evaluate per row and seed"}
    interrupted = False
    if not table_only:
        out.mkdir(parents=True, exist_ok=True)
        _check_data_setup(out, base)
        todo = [(r, k) for k in seed_list for r in picked]
        busy = []
        try:
            if ind_cfg is not None and not table_only:
                echo("[ablate] independent DAMSM (plain + grid, another seed) for every row's R-precision")
                cache.ensure(ind_cfg, "damsm")
            for i, (row, k) in enumerate(todo, 1):
                cfg, rd = configs[(row.slug, k)], run_dir_of(out, row, k)
                tag = f"[ablate] ({i}/{len(todo)}) {row.label} seed {k}"
                status = row_status(cfg, rd, stages)
                if status == "done":
                    echo(f"{tag}: finished earlier, skipping ({rd})")
                    continue
                with file_lock(rd.with_name(rd.name + ".lock"), blocking=False) as free:
                    if not free:
                        echo(f"{tag}: another worker is training it; skipping")
                        busy.append(f"{row.slug}/seed{k}")
                        continue
                    if status == "stale":
                        echo(f"{tag}: finished under another configuration; re-running")
                    echo(f"{tag}: preparing shared stages")
                    linked = cache.link_into(cfg, rd)
                    if shared_only:
                        echo(f"{tag}: shared stages ready ({', '.join(linked)})")
                        continue
                    own = [s for s in ROW_STAGES if stages[s].needed(cfg)]
                    echo(f"{tag}: running {', '.join(own)} in {rd} (linked: {', '.join(linked)})")
                    res = run_stages(cfg, rd, only=own)
                    if any(v.get("status") == "interrupted" for v in res.values()):
                        raise AblationInterrupted(row.slug)
                    m = (_load_metrics(rd) or {}).get("splits", {}).get("test", {}).get("generated", {})
                    brief = ", ".join(f"{_title(key)[0]} {m[key]:.3f}"
                                      for key in ("r_precision_dmgan", "soa_c", "fid")
                                      if isinstance(m.get(key), (int, float)))
                    echo(f"{tag}: done ({brief})")
            if busy:
                echo(f"[ablate] left to other workers: {', '.join(busy)}; the last worker to finish writes the "
                     "full table (or run again with --table-only)")
        except AblationInterrupted:
            interrupted = True
            echo("[ablate] interrupted; finished rows are kept — run the same command again to resume")
        except BaseException:
            try:
                write_outputs(out, summarize(out, picked, seed_list, hashes, setup), figure=False)
            except Exception as e:  # noqa: BLE001 - never hide the original error
                echo(f"[ablate] could not write the partial table: {e}")
            raise
    summary = summarize(out, picked, seed_list, hashes, setup)
    summary["interrupted"] = interrupted
    out.mkdir(parents=True, exist_ok=True)
    paths = write_outputs(out, summary, figure=figure, device=str(resolve_device(base.device)))
    n_done = sum(r["summary"]["n_done"] for r in summary["rows"])
    echo(f"[ablate] {n_done}/{len(picked) * seeds} row-seeds finished; table: {paths['md']}"
         + (f"; figure: {paths['png']}" if "png" in paths else ""))
    return summary


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def cmd_ablate(args) -> int:
    summary = run_ablation(args.preset, args.out, rows=args.rows, seeds=args.seeds,
                           budget_minutes=args.budget_minutes, overrides=args.overrides,
                           figure=not args.no_figure, table_only=args.table_only, shared_only=args.shared_only,
                           independent=not args.no_independent_damsm)
    print(format_markdown(summary), end="")
    return 130 if summary.get("interrupted") else 0


def add_ablate_command(sub) -> None:
    """Register ``cpgan ablate`` on an argparse sub-parser set."""
    sp = sub.add_parser(
        "ablate", help="train and measure the paper's ablation rows (AttnGAN⁺ … CPGAN) and write the table",
        description="Train every ablation row (paper §4.2: AttnGAN⁺, +MATE, +OAIE, +FGCD, the pairs, CPGAN) for "
                    "every seed on one base preset with the same budget, share the data, evaluator and identical "
                    "stages between rows, evaluate each, and write OUT/ablation.json, OUT/ablation.md and "
                    "OUT/ablation.png. Finished rows are skipped, so the table can be built over several calls.")
    sp.add_argument("--preset", default="shapes", help="base preset or YAML file (default: shapes)")
    sp.add_argument("--seeds", type=int, default=2, help="seeds per row (default 2); seed k adds k to "
                    + ", ".join(SEED_KEYS))
    sp.add_argument("--budget-minutes", type=float, default=None,
                    help="GAN training minutes per row and seed (sets gan.max_minutes; default: the preset's)")
    sp.add_argument("--rows", default="", help="comma-separated subset of: " + ",".join(r.slug for r in ROWS))
    sp.add_argument("--out", default="runs/ablation", help="output folder (default: runs/ablation)")
    sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key for every row (repeatable); the three ablation switches are "
                         "set by the rows")
    sp.add_argument("--table-only", action="store_true", help="train nothing; rebuild the table from finished rows")
    sp.add_argument("--no-figure", action="store_true", help="skip OUT/ablation.png")
    sp.add_argument("--no-independent-damsm", action="store_true",
                    help="skip the independent DAMSM (plain + grid, damsm.seed + 1000) that measures every row's "
                         "R-precision (column 'R-prec (dmgan indep)')")
    sp.add_argument("--shared-only", action="store_true",
                    help="train only the stages shared between rows (data … DAMSM), no GAN")
    sp.set_defaults(func=cmd_ablate)
