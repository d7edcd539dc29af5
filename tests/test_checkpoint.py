"""Atomic, pickle-free checkpoints."""
import json
import os

import pytest
import torch

from cpgan.utils.checkpoint import load_state, load_weights, save_state, save_weights


def test_weights_roundtrip_with_sidecar(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    p = tmp_path / "w.safetensors"
    save_weights(p, m.state_dict(), {"step": 3, "vocab_sha256": "abc"})
    sd, meta = load_weights(p)
    assert meta == {"step": 3, "vocab_sha256": "abc"}
    for k, v in m.state_dict().items():
        assert torch.equal(sd[k], v)
    assert json.loads((tmp_path / "w.json").read_text())["step"] == 3


def test_state_roundtrip_optimizer_and_rng(tmp_path):
    m = torch.nn.Linear(5, 2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    m(torch.randn(4, 5)).sum().backward()
    opt.step()
    state = {"model": m.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state(), "step": 7,
             "history": [1.5, 2.5], "pair": (1, "a"), "nested": {"x": None}}
    save_state(tmp_path / "s.safetensors", state)
    back = load_state(tmp_path / "s.safetensors")
    assert back["step"] == 7 and back["history"] == [1.5, 2.5] and back["pair"] == (1, "a")
    assert back["nested"] == {"x": None}
    assert torch.equal(back["rng"], state["rng"])
    opt2 = torch.optim.Adam(m.parameters(), lr=1e-3)
    opt2.load_state_dict(back["opt"])  # int keys of the optimizer state survive
    assert set(opt2.state_dict()["state"].keys()) == {0, 1}
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_failed_write_leaves_old_file(tmp_path, monkeypatch):
    p = tmp_path / "s.safetensors"
    save_state(p, {"a": torch.ones(2)})
    import cpgan.utils.checkpoint as ck

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(RuntimeError):
        save_state(p, {"a": torch.zeros(2)})
    assert torch.equal(load_state(p)["a"], torch.ones(2))
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="unreadable"):
        load_state(p)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_weights(p)
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "missing.safetensors")


def test_check_state_dict_names_the_problem():
    from cpgan.utils.checkpoint import check_state_dict

    own = {"a.weight": torch.zeros(2, 3), "head.bias": torch.zeros(2)}
    check_state_dict(own, {"a.weight": torch.ones(2, 3)}, "the net", "hint", optional=("head",))
    with pytest.raises(ValueError, match=r"weights do not fit the net: 1 keys missing \(e.g. \['head.bias'\]\).*; hint"):
        check_state_dict(own, {"a.weight": torch.ones(2, 3)}, "the net", "hint")
    with pytest.raises(ValueError, match=r"unexpected keys \['b'\]"):
        check_state_dict(own, {**own, "b": torch.zeros(1)}, "the net", "hint")
    with pytest.raises(ValueError, match=r"'a.weight' has shape \(3, 2\) but the net has \(2, 3\); hint"):
        check_state_dict(own, {"a.weight": torch.zeros(3, 2), "head.bias": torch.zeros(2)}, "the net", "hint")
