"""Stage runner: done markers, skipping, re-running when the config changes, clear errors."""
import json

import pytest

from cpgan.config import load_config
from cpgan.stages.base import StageError, run_stages


def _cfg(*extra):
    return load_config("shapes-quick", ["data.n_train=30", "data.n_test=10", "data.n_test_novel=10", *extra])


def test_skip_and_rerun_on_change(tmp_path):
    run_dir = tmp_path / "r"
    res = run_stages(_cfg(), run_dir, only=["data", "vocab"])
    assert res["data"]["status"] == "done" and res["vocab"]["status"] == "done"
    assert (run_dir / "config.yaml").exists()
    res = run_stages(_cfg(), run_dir, only=["data", "vocab"])
    assert res["data"]["status"] == "skipped" and res["vocab"]["status"] == "skipped"
    # a change in an unrelated section does not invalidate data/vocab
    res = run_stages(_cfg("gan.batch_size=3"), run_dir, only=["data", "vocab"])
    assert res["data"]["status"] == "skipped"
    # a data change re-runs data and, through the upstream hash, vocab
    res = run_stages(_cfg("data.seed=5"), run_dir, only=["data", "vocab"])
    assert res["data"]["status"] == "done" and res["vocab"]["status"] == "done"
    meta = [json.loads(l) for l in (run_dir / "data" / "train" / "meta.jsonl").read_text().splitlines()]
    assert len(meta) == 30


def test_missing_upstream_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match="needs 'data'"):
        run_stages(_cfg(), tmp_path / "r", only=["vocab"])
    with pytest.raises(StageError, match="unknown stage"):
        run_stages(_cfg(), tmp_path / "r", only=["nope"])


def test_cli_help_and_errors(capsys):
    from cpgan.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("demo", "run", "data", "damsm", "gan", "evaluate", "config", "presets"):
        assert cmd in out
    assert main(["config", "shapes-quick", "--set", "gan.batchsize=2"]) == 2
    assert "did you mean 'gan.batch_size'" in capsys.readouterr().err
    assert main(["run", "no-such-preset"]) == 2
    assert "presets:" in capsys.readouterr().err
