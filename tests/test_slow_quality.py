"""Quality checks that train real models for minutes (``make test-slow``; excluded from ``make test``).

They assert the acceptance figures of the DAMSM issue at a reduced scale, against chance levels computed
from the data, so they can fail.
"""
import json

import pytest

from cpgan.config import load_config
from cpgan.stages.base import run_stages

pytestmark = pytest.mark.slow


def test_damsm_attention_localises_attribute_words(tmp_path):
    """Colour/shape words: the attention peak falls inside a box of the object they name far above chance,
    and the real-image R-precision (dmgan protocol) is well above the 1% of random encoders."""
    cfg = load_config("shapes-quick", ["model.text_encoder=plain", "model.image_encoder=grid",
                                       "data.n_train=3000", "data.n_test=300", "data.n_test_novel=50",
                                       "damsm.max_minutes=4"])
    run_stages(cfg, tmp_path / "run", only=["data", "vocab", "damsm"])
    s = json.loads((tmp_path / "run" / "damsm" / "done.json").read_text())["summary"]
    assert s["attention_hit_rate"] > 2 * s["attention_chance"], s
    assert s["r_precision_test"] > 0.3, s
