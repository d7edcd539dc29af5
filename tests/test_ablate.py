"""`cpgan ablate`: row definitions, YAML presets, aggregation (mean ± spread), resumability, shared stages."""
import json
import math
import random
import statistics
from pathlib import Path

import pytest

from cpgan import ablate
from cpgan.ablate import ROWS, row_config, run_dir_of, summarize
from cpgan.config import ConfigError, config_dir, list_presets, load_config, to_dict
from cpgan.stages.base import registry, run_stages as real_run_stages, stage_hash, stage_status

# The paper's rows (§4.2, Fig. 6) written out independently: label -> components added to AttnGAN⁺.
PAPER_ROWS = {
    "AttnGAN⁺": set(), "+MATE": {"mate"}, "+OAIE": {"oaie"}, "+FGCD": {"fgcd"},
    "MATE+OAIE": {"mate", "oaie"}, "MATE+FGCD": {"mate", "fgcd"}, "OAIE+FGCD": {"oaie", "fgcd"},
    "CPGAN": {"mate", "oaie", "fgcd"},
}


def _expected_switches(components: set) -> dict:
    return {"text_encoder": "mate" if "mate" in components else "plain",
            "image_encoder": "oaie" if "oaie" in components else "grid",
            "cond_disc": "fgcd" if "fgcd" in components else "global"}


def _switches(cfg) -> dict:
    return {"text_encoder": cfg.model.text_encoder, "image_encoder": cfg.model.image_encoder,
            "cond_disc": cfg.model.cond_disc}


# --------------------------------------------------------------------------------------------------
# Rows and presets
# --------------------------------------------------------------------------------------------------
def test_rows_have_the_papers_switches_and_seed_offsets():
    assert [r.label for r in ROWS] == list(PAPER_ROWS)
    base = load_config("shapes-quick", ["gan.seed=7", "damsm.seed=3"])
    for row in ROWS:
        cfg = row_config(base, row, seed=2)
        assert _switches(cfg) == _expected_switches(PAPER_ROWS[row.label]), row.label
        # training seeds offset by the seed index, the data / judge / evaluation noise fixed
        assert (cfg.gan.seed, cfg.damsm.seed) == (9, 5)
        assert (cfg.detector.seed, cfg.captioner.seed) == (base.detector.seed + 2, base.captioner.seed + 2)
        assert (cfg.data.seed, cfg.evaluator.seed, cfg.evaluate.seed) == (
            base.data.seed, base.evaluator.seed, base.evaluate.seed)
        # nothing else changes
        a, b = to_dict(cfg), to_dict(base)
        for sec in ("data", "text", "evaluator", "memory", "evaluate"):
            assert a[sec] == b[sec]
    assert base.model.text_encoder == "mate"  # the base is not modified in place
    assert len({tuple(sorted(_switches(row_config(base, r, 0)).items())) for r in ROWS}) == 8


def test_yaml_presets_match_rows_and_stay_out_of_the_preset_list():
    folder = config_dir() / "ablation"
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(r.slug for r in ROWS)
    shapes = load_config("shapes")
    for row in ROWS:
        path = folder / f"{row.slug}.yaml"
        assert "base: shapes" in path.read_text()
        cfg = load_config(str(path))
        assert _switches(cfg) == _expected_switches(PAPER_ROWS[row.label])
        # exactly the shapes preset plus the row's switches (what `cpgan ablate --preset shapes` trains, seed 0)
        want = to_dict(row_config(shapes, row, 0))
        got = to_dict(cfg)
        want.pop("name"), got.pop("name")
        assert got == want, row.slug
        assert to_dict(load_config(f"ablation/{row.slug}")) == to_dict(cfg)  # the preset-style name works too
    presets = list_presets()
    assert presets == sorted(p.stem for p in config_dir().glob("*.yaml"))
    assert not any("ablation" in p or p in {r.slug for r in ROWS} for p in presets)


def test_resolve_rows_and_config_errors(tmp_path):
    assert [r.slug for r in ablate.resolve_rows("cpgan, +MATE,attngan")] == ["attngan-plus", "mate", "cpgan"]
    assert [r.slug for r in ablate.resolve_rows("MATE+FGCD,oaie_fgcd")] == ["mate-fgcd", "oaie-fgcd"]
    assert len(ablate.resolve_rows(None)) == 8
    with pytest.raises(ConfigError, match="unknown ablation row 'nope'.*attngan-plus"):
        ablate.resolve_rows("mate,nope")
    with pytest.raises(ConfigError, match="model.cond_disc is chosen by each ablation row"):
        ablate.base_config("shapes-quick", tmp_path, ["model.cond_disc=fgcd"])
    with pytest.raises(ConfigError, match="--budget-minutes"):
        ablate.base_config("shapes-quick", tmp_path, [], budget_minutes=0)
    cfg = ablate.base_config("shapes-quick", tmp_path / "o", ["gan.max_minutes=99"], budget_minutes=2.5)
    assert cfg.gan.max_minutes == 2.5
    assert Path(cfg.data.root) == (tmp_path / "o" / "_shared" / "data").resolve()
    from cpgan.cli import main

    assert main(["ablate", "--rows", "nope", "--out", str(tmp_path / "x")]) == 2
    assert main(["ablate", "--seeds", "0", "--out", str(tmp_path / "x")]) == 2


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------
KEYS = ("r_precision_dmgan", "r_precision_cpgan_batch", "soa_c", "soa_i", "colour_acc", "shape_acc", "fid",
        "inception_score")


def _fake_metrics(rng: random.Random, indep: bool = False) -> dict:
    def vals(real: bool):
        d = {k: rng.uniform(0.05, 0.95) for k in KEYS}
        d["fid"] = 0.0 if real else rng.uniform(5, 50)
        d["inception_score"] = rng.uniform(1, 8)
        d["r_precision_dmgan_std"] = 0.01
        if indep:
            d["r_precision_dmgan_indep"] = rng.uniform(0, 1)
            d["r_precision_dmgan_indep_std"] = 0.02
        return d

    return {"generator": "trained", "n_images": 100, "features": "x", "splits": {
        s: {"generated": vals(False), "real": vals(True)} for s in ("test", "test_novel")}}


def _write_run(rd: Path, metrics: dict | None, seconds: dict, hash_: str = "h") -> None:
    for stage, sec in seconds.items():
        (rd / stage).mkdir(parents=True, exist_ok=True)
        (rd / stage / "done.json").write_text(json.dumps({"hash": hash_ if stage == "evaluate" else "x",
                                                          "seconds": sec, "summary": {}}))
    if metrics is not None:
        (rd / "evaluate" / "metrics.json").write_text(json.dumps(metrics))


def test_summary_mean_spread_minutes_and_table(tmp_path):
    rng = random.Random(0)
    rows = [ROWS[0], ROWS[-1]]
    written = {}
    for row in rows:
        for k in (0, 1, 2):
            if row.slug == "cpgan" and k == 2:
                continue  # not finished yet
            m = _fake_metrics(rng, indep=row.slug == "cpgan")
            secs = {"damsm": 30.0 * (k + 1), "gan": 120.0 + k, "evaluate": 6.0}
            _write_run(run_dir_of(tmp_path, row, k), m, secs)
            written[(row.slug, k)] = (m, secs)
    s = summarize(tmp_path, rows, [0, 1, 2], setup={"preset": "shapes", "overrides": []})
    assert s["splits"] == ["test", "test_novel"]
    assert "r_precision_dmgan_indep" in s["metrics"] and "r_precision_dmgan_indep_std" not in s["metrics"]
    for r in s["rows"]:
        ks = [k for k in (0, 1, 2) if (r["slug"], k) in written]
        assert r["summary"]["n_done"] == len(ks)
        assert [r["seeds"][str(k)]["status"] for k in (0, 1, 2)] == ["done" if k in ks else "pending" for k in (0, 1, 2)]
        for split in ("test", "test_novel"):
            for key in KEYS:
                xs = [written[(r["slug"], k)][0]["splits"][split]["generated"][key] for k in ks]
                got = r["summary"][split][key]
                assert got["n"] == len(xs)
                assert got["mean"] == pytest.approx(statistics.mean(xs), rel=1e-12)
                assert got["spread"] == pytest.approx(statistics.stdev(xs), rel=1e-12)
        mins = [sum(written[(r["slug"], k)][1].values()) / 60 for k in ks]
        assert r["summary"]["minutes"]["mean"] == pytest.approx(statistics.mean(mins))
        assert r["summary"]["minutes_gan"]["mean"] == pytest.approx(statistics.mean(
            [written[(r["slug"], k)][1]["gan"] / 60 for k in ks]))
        # the raw per-seed metrics are kept as written
        assert r["seeds"]["0"]["splits"] == written[(r["slug"], 0)][0]["splits"]
    # the independent-DAMSM column is only filled where the metrics have it
    assert s["rows"][0]["summary"]["test"]["r_precision_dmgan_indep"]["mean"] is None
    assert s["rows"][1]["summary"]["test"]["r_precision_dmgan_indep"]["n"] == 2
    # real ceiling: over every finished row and seed
    reals = [written[key][0]["splits"]["test"]["real"]["soa_c"] for key in written]
    assert s["real"]["test"]["soa_c"]["mean"] == pytest.approx(statistics.mean(reals))
    assert s["real"]["test"]["soa_c"]["n"] == 5

    md = ablate.format_markdown(s)
    cp = s["rows"][1]["summary"]["test"]
    xs = [written[("cpgan", k)][0]["splits"]["test"]["generated"]["soa_c"] for k in (0, 1)]
    assert f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" in md
    assert "R-prec (dmgan indep)" in md
    row_line = next(line for line in md.splitlines() if line.startswith("| CPGAN |"))
    assert row_line.endswith("| 2/3 |") and f"{cp['fid']['mean']:.2f} ± {cp['fid']['spread']:.2f}" in row_line
    assert "| real images (ceiling) |" in md and "## test_novel" in md

    # without independent R-precision keys the column is omitted; one seed shows the value alone
    s1 = summarize(tmp_path, rows[:1], [0])
    md1 = ablate.format_markdown(s1)
    assert "indep" not in md1
    v = written[("attngan-plus", 0)][0]["splits"]["test"]["generated"]["shape_acc"]
    assert f"| {v:.3f} |" in md1 and s1["rows"][0]["summary"]["test"]["shape_acc"]["spread"] is None

    # a run finished under another configuration (hash) is reported stale and left out of the means
    hashes = {(r.slug, k): "h" for r in rows for k in (0, 1, 2)}
    hashes[("cpgan", 1)] = "other"
    s2 = summarize(tmp_path, rows, [0, 1, 2], hashes=hashes)
    assert s2["rows"][1]["seeds"]["1"]["status"] == "stale" and s2["rows"][1]["summary"]["n_done"] == 1
    assert "CPGAN seed 1" in ablate.format_markdown(s2)


def test_mean_spread_edge_cases():
    assert ablate.mean_spread([]) == {"mean": None, "spread": None, "n": 0}
    assert ablate.mean_spread([None, float("nan"), 2.0]) == {"mean": 2.0, "spread": None, "n": 1}
    got = ablate.mean_spread([1.0, 2.0, 4.0])
    assert got["mean"] == pytest.approx(7 / 3) and got["spread"] == pytest.approx(math.sqrt(7 / 3))  # deviations -4/3, -1/3, 5/3


# --------------------------------------------------------------------------------------------------
# Driver: resumability and sharing
# --------------------------------------------------------------------------------------------------
def _tiny(*extra):
    return ["data.n_train=64", "data.n_test=12", "data.n_test_novel=12", "evaluator.steps=2", "damsm.epochs=1",
            "evaluate.n_images=12", "device=cpu", *extra]


class _Recorder:
    """Stands in for run_stages: records calls; marks the stages done with their true hash.

    ``real_shared``: stages in this set are run by the real runner; for a row (gan, evaluate), the real runner
    is first asked to run every shared stage in the row directory and must find them all up to date.
    """

    def __init__(self, real_shared=frozenset()):
        self.calls, self.real_shared, self.stages = [], set(real_shared), registry()
        self.rng = random.Random(1)

    def __call__(self, cfg, run_dir, only=None, **kw):
        run_dir = Path(run_dir)
        self.calls.append((run_dir, tuple(only)))
        if set(only) <= self.real_shared:
            return real_run_stages(cfg, run_dir, only=only)
        if "gan" in only and self.real_shared:
            check = [s for s in ablate.SHARED_STAGES if self.stages[s].needed(cfg)]
            res = real_run_stages(cfg, run_dir, only=check)
            assert all(res[s]["status"] == "skipped" for s in check), res
        for s in only:
            (run_dir / s).mkdir(parents=True, exist_ok=True)
            h = stage_hash(cfg, s, self.stages, {})
            (run_dir / s / "done.json").write_text(json.dumps({"hash": h, "seconds": 60.0, "summary": {}}))
            if s == "evaluate":
                (run_dir / s / "metrics.json").write_text(json.dumps(_fake_metrics(self.rng)))
        return {s: {"status": "done"} for s in only}

    def count(self, stage):
        return sum(1 for _, only in self.calls if only == (stage,))


def test_resume_skips_finished_rows_and_shares_stages(tmp_path, monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(ablate, "run_stages", rec)
    out = tmp_path / "abl"
    args = dict(preset="shapes-quick", out=out, overrides=_tiny(), figure=False, independent=False)
    # a row finished earlier under the current configuration
    base = ablate.base_config("shapes-quick", out, _tiny())
    done_cfg = row_config(base, ROWS[0], 0)
    rd0 = run_dir_of(out, ROWS[0], 0)
    _write_run(rd0, _fake_metrics(random.Random(5)), {"evaluate": 1.0}, hash_=ablate.evaluate_hash(done_cfg))
    s = ablate.run_ablation(rows="attngan-plus,fgcd,mate,cpgan", seeds=1, **args)
    assert not any(rd0 in [d, *d.parents] for d, _ in rec.calls)  # the finished row was not touched
    row_calls = [(d, only) for d, only in rec.calls if only == ("gan", "evaluate")]
    assert [d for d, _ in row_calls] == [run_dir_of(out, r, 0) for r in (ROWS[1], ROWS[3], ROWS[7])]
    # each shared stage trained once per distinct hash: the data, vocab, evaluator, detector, captioner and
    # memory once; DAMSM once per (text, image) encoder pair: plain+grid (fgcd), mate+grid, mate+oaie
    assert [rec.count(st) for st in ("data", "vocab", "evaluator", "detector", "captioner", "memory", "damsm")] == \
        [1, 1, 1, 1, 1, 1, 3]
    ev = {(run_dir_of(out, r, 0) / "evaluator").resolve() for r in (ROWS[3], ROWS[1], ROWS[7])}
    assert len(ev) == 1 and (run_dir_of(out, ROWS[3], 0) / "evaluator").is_symlink()
    assert (run_dir_of(out, ROWS[1], 0) / "detector").resolve() == (run_dir_of(out, ROWS[7], 0) / "detector").resolve()
    assert not (run_dir_of(out, ROWS[3], 0) / "detector").exists()  # +FGCD does not use the detector
    assert [r["summary"]["n_done"] for r in s["rows"]] == [1, 1, 1, 1]
    assert (out / "ablation.json").exists() and (out / "ablation.md").exists()
    assert json.loads((out / "ablation.json").read_text())["rows"][0]["slug"] == "attngan-plus"

    # a second call runs nothing; a second seed re-trains only the seeded stages
    n = len(rec.calls)
    ablate.run_ablation(rows="attngan-plus,fgcd,mate,cpgan", seeds=1, **args)
    assert len(rec.calls) == n
    ablate.run_ablation(rows="attngan-plus,fgcd,mate,cpgan", seeds=2, **args)
    assert [rec.count(st) for st in ("data", "vocab", "evaluator", "detector", "captioner", "memory", "damsm")] == \
        [1, 1, 1, 2, 2, 2, 6]
    assert len([1 for _, only in rec.calls if only == ("gan", "evaluate")]) == 3 + 4
    # a new GAN budget changes every row's hash: the rows re-run, the shared stages do not
    ablate.run_ablation(rows="fgcd", seeds=1, budget_minutes=1.5, **args)
    assert rec.calls[-1] == (run_dir_of(out, ROWS[3], 0), ("gan", "evaluate"))
    assert rec.count("damsm") == 6
    # a longer budget of a shared stage re-runs it in the same cache folder (so it continues its checkpoint)
    damsm_dir = (run_dir_of(out, ROWS[3], 0) / "damsm").resolve().parent
    ablate.run_ablation(rows="fgcd", seeds=1, budget_minutes=1.5, **{**args, "overrides": _tiny("damsm.max_minutes=3")})
    assert rec.count("damsm") == 7 and [d for d, o in rec.calls if o == ("damsm",)][-1].resolve() == damsm_dir
    assert (run_dir_of(out, ROWS[3], 0) / "damsm").resolve().parent == damsm_dir
    # another data set in the same OUT is refused
    with pytest.raises(ConfigError, match="other data settings .data.n_train"):
        ablate.run_ablation(rows="fgcd", seeds=1, preset="shapes-quick", out=out,
                            overrides=_tiny("data.n_train=65"), figure=False)


def test_linked_stages_are_up_to_date_for_the_real_runner(tmp_path, monkeypatch):
    """Tiny real data/vocab/evaluator/DAMSM; the real runner then skips them in both rows' directories."""
    import torch

    torch.set_num_threads(1)
    rec = _Recorder(real_shared={"data", "vocab", "evaluator", "damsm"})
    monkeypatch.setattr(ablate, "run_stages", rec)
    out = tmp_path / "abl"
    ablate.run_ablation("shapes-quick", out, rows="attngan-plus,fgcd", seeds=1, overrides=_tiny(), figure=False)
    # DAMSM twice: the rows' plain+grid one and the independent one (same encoders, damsm.seed + 1000)
    assert rec.count("evaluator") == 1 and rec.count("damsm") == 2 and rec.count("data") == 1
    base = ablate.base_config("shapes-quick", out, _tiny())
    ind = Path(load_config(str(run_dir_of(out, ROWS[0], 0) / "config.yaml")).evaluate.independent_damsm)
    ind_cfg = load_config(str(ind / "config.yaml"))
    assert ind_cfg.damsm.seed == base.damsm.seed + ablate.INDEPENDENT_SEED_OFFSET
    assert (ind_cfg.model.text_encoder, ind_cfg.model.image_encoder) == ("plain", "grid")
    assert stage_status(ind, "damsm") and ind.resolve() != (run_dir_of(out, ROWS[0], 0) / "damsm").resolve().parent
    for row in (ROWS[0], ROWS[3]):
        rd = run_dir_of(out, row, 0)
        assert stage_status(rd, "evaluator")["summary"]["steps"] == 2
        assert (rd / "evaluator" / "evaluator.safetensors").exists()
    # the shapes world was generated once, in OUT/_shared/data
    loc = json.loads((run_dir_of(out, ROWS[0], 0) / "data" / "location.json").read_text())
    assert Path(loc["path"]) == (out / "_shared" / "data").resolve()
    assert len((out / "_shared" / "data" / "train" / "meta.jsonl").read_text().splitlines()) == 64


def test_figure_draws_the_same_captions_for_every_row(tmp_path, monkeypatch):
    import numpy as np

    import cpgan.data.dataset as dataset
    import cpgan.sampling as sampling

    caps = [f"a red circle number {i}" for i in range(8)]

    class FakeSplit:
        records = [{"captions": [c, "other"]} for c in caps]

    calls = []

    class FakeSampler:
        def __init__(self, rd):
            self.rd = rd

        @classmethod
        def from_run(cls, rd, device="cpu"):
            return cls(Path(rd))

        def generate(self, caption, n=4, seed=0, truncation=1.0):
            calls.append((self.rd.parent.name, caption, n, seed))
            return {"images": [np.zeros((n, 8, 8, 3), np.uint8), np.full((n, 16, 16, 3), 200, np.uint8)]}

    monkeypatch.setattr(dataset, "load_split", lambda rd, split: FakeSplit())
    monkeypatch.setattr(sampling, "Sampler", FakeSampler)
    rows = [ROWS[0], ROWS[2], ROWS[7]]
    for row in rows[:2]:
        _write_run(run_dir_of(tmp_path, row, 0), _fake_metrics(random.Random(2)), {"evaluate": 1.0})
    s = summarize(tmp_path, rows, [0])
    png = ablate.write_figure(s, tmp_path / "ablation.png")
    assert png.exists() and png.stat().st_size > 1000
    assert calls == [(slug, c, 1, 0) for slug in ("attngan-plus", "oaie") for c in caps[:6]]
    assert ablate.write_figure(summarize(tmp_path, [ROWS[7]], [0]), tmp_path / "none.png") is None


def test_stage_minutes_prefer_the_stages_own_cumulative_time(tmp_path):
    """A GAN continued over several calls reports its cumulative minutes; done.json's seconds are the last call's."""
    rd = tmp_path / "r"
    _write_run(rd, None, {"damsm": 120.0, "evaluate": 30.0})
    (rd / "gan").mkdir(parents=True)
    (rd / "gan" / "done.json").write_text(json.dumps({"hash": "x", "seconds": 42.0, "summary": {"minutes": 5.5}}))
    m = ablate.stage_minutes(rd)
    assert m["per_stage"] == {"damsm": 2.0, "gan": 5.5, "evaluate": 0.5}
    assert m["minutes_gan"] == 5.5 and m["minutes"] == pytest.approx(8.0)
