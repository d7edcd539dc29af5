"""Authors' release files: restricted unpickling, recognition, conversion, MEM_TRANS loading."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from cpgan.interop.official import (
    UnrecognizedFileError,
    import_official,
    load_mem_trans,
    load_official,
)
from cpgan.interop.unpickle import (
    TORCH_LEGACY_MAGIC,
    PickleFormatError,
    UnsafePickleError,
    restricted_load,
    restricted_loads,
)

torch.set_num_threads(1)

FIX = Path(__file__).parent / "fixtures" / "official"
NET_T = FIX / "NET_T.pkl"
NET_T_SHA256 = "64ce9320b89e7f40655dccf865430deaf7251a12067eeff729332f2a4d0865ff"  # keys.md

# keys.md "Real release file models/NET_T.pkl": shape, mean, std, min, max, mean |w| (measured
# independently of this code: three extraction routes, bit-identical tensors).
NET_T_STATS = {
    "memory_emb_1.weight": ((512, 1024, 1), -2.181479, 10.551268, -13.206461, 13.210733, 10.074436),
    "memory_emb_1.bias": ((512,), -5.229166, 8.095017, -13.056976, 12.915998, 8.718957),
    "memory_emb_2.weight": ((256, 512, 1), -0.143531, 11.822512, -13.233917, 13.213751, 11.446570),
}
NET_T_GLOBALS = {
    "model.MEM_TRANS",
    "torch.nn.modules.conv.Conv1d",
    "torch.nn.modules.activation.LeakyReLU",
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch.FloatStorage",
    "torch.nn.backends.thnn._get_thnn_function_backend",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------
# NET_T.pkl
# ------------------------------------------------------------------------------------------


def test_net_t_loads_with_released_shapes_and_statistics():
    assert sha256(NET_T) == NET_T_SHA256
    kind, sd, info = load_official(NET_T)
    assert kind == "MEM_TRANS"
    assert info["container"] == "torch-legacy" and info["pickle_protocol"] == 2
    assert info["class"] == "model.MEM_TRANS"
    assert set(info["globals"]) == NET_T_GLOBALS
    assert info["sys_info"]["protocol_version"] == 1001
    assert info["attributes"]["nef"] == 256 and info["attributes"]["training"] is False
    assert sorted(s["numel"] for s in info["storages"]) == [512, 131072, 524288]
    assert list(sd) == list(NET_T_STATS)
    for name, (shape, mean, std, lo, hi, mabs) in NET_T_STATS.items():
        t = sd[name]
        assert tuple(t.shape) == shape and t.dtype == torch.float32
        d = t.double()
        assert abs(d.mean().item() - mean) < 1e-5
        assert abs(d.std().item() - std) < 1e-5
        assert abs(d.min().item() - lo) < 1e-5 and abs(d.max().item() - hi) < 1e-5
        assert abs(d.abs().mean().item() - mabs) < 1e-5


class ConvProjection(nn.Module):
    """Same parameter names as the released MEM_TRANS / the MATE memory projection."""

    def __init__(self):
        super().__init__()
        self.memory_emb_1 = nn.Conv1d(1024, 512, 1, bias=True)
        self.memory_emb_2 = nn.Conv1d(512, 256, 1, bias=False)
        self.leakrelu = nn.LeakyReLU(0.01)

    def forward(self, m):  # (B, 1024, T) -> (B, 256, T)
        return self.memory_emb_2(self.leakrelu(self.memory_emb_1(m)))


class LinearProjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.memory_emb_1 = nn.Linear(1024, 512)
        self.memory_emb_2 = nn.Linear(512, 256, bias=False)

    def forward(self, m):  # (B, T, 1024) -> (B, T, 256)
        return self.memory_emb_2(F.leaky_relu(self.memory_emb_1(m), 0.01))


def test_load_mem_trans_forward_equals_functional_ops():
    _, sd, _ = load_official(NET_T)
    x = torch.randn(2, 1024, 5, generator=torch.Generator().manual_seed(0)) * 0.05
    w1, b1, w2 = sd["memory_emb_1.weight"], sd["memory_emb_1.bias"], sd["memory_emb_2.weight"]
    ref = F.conv1d(F.leaky_relu(F.conv1d(x, w1, b1), 0.01), w2)
    conv = load_mem_trans(ConvProjection(), sd)
    with torch.no_grad():
        assert torch.allclose(conv(x), ref, rtol=1e-5, atol=1e-3)
        lin = load_mem_trans(LinearProjection(), sd)
        ref_lin = F.linear(F.leaky_relu(F.linear(x.transpose(1, 2), w1[:, :, 0], b1), 0.01), w2[:, :, 0])
        assert torch.allclose(lin(x.transpose(1, 2)), ref_lin, rtol=1e-5, atol=1e-3)
        assert torch.allclose(ref_lin.transpose(1, 2), ref, rtol=1e-5, atol=0.05)  # outputs ~3e4


def test_load_mem_trans_into_the_mate_memory_projection():
    from cpgan.models.text_encoder import MemoryProjection

    _, sd, _ = load_official(NET_T)
    proj = load_mem_trans(MemoryProjection(), sd)
    x = torch.randn(3, 1024, 4, generator=torch.Generator().manual_seed(1)) * 0.05
    ref = F.conv1d(F.leaky_relu(F.conv1d(x, sd["memory_emb_1.weight"], sd["memory_emb_1.bias"]), 0.01), sd["memory_emb_2.weight"])
    with torch.no_grad():
        assert torch.allclose(proj(x), ref, rtol=1e-5, atol=1e-3)


def test_load_mem_trans_rejects_wrong_names_and_shapes():
    _, sd, _ = load_official(NET_T)
    with pytest.raises(ValueError, match="missing"):
        load_mem_trans(ConvProjection(), {k: v for k, v in sd.items() if k != "memory_emb_1.bias"})
    bad = dict(sd)
    bad["memory_emb_2.weight"] = torch.zeros(128, 512, 1)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_mem_trans(ConvProjection(), bad)
    wrapper = nn.Module()
    wrapper.proj = ConvProjection()
    with pytest.raises(ValueError, match="submodule"):
        load_mem_trans(wrapper, sd)


# ------------------------------------------------------------------------------------------
# Malicious pickles
# ------------------------------------------------------------------------------------------


def legacy_header(proto: int = 2) -> bytes:
    buf = io.BytesIO()
    pickle.dump(TORCH_LEGACY_MAGIC, buf, protocol=proto)
    pickle.dump(1001, buf, protocol=proto)
    pickle.dump({"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}, buf, protocol=proto)
    return buf.getvalue()


def py2_os_system(cmd: str) -> bytes:
    """Protocol-2 pickle as Python 2 writes it: GLOBAL 'os system', SHORT_BINSTRING arg, REDUCE."""
    arg = cmd.encode()
    return b"\x80\x02cos\nsystem\nq\x00U" + bytes([len(arg)]) + arg + b"q\x01\x85q\x02Rq\x03."


class EvalPayload:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        import builtins

        return (builtins.eval, (f"open({self.path!r}, 'w').close()",))


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")
def test_malicious_pickles_are_refused_and_not_executed(tmp_path, monkeypatch):
    sentinel = tmp_path / "pwned"
    control = tmp_path / "control"
    p4 = pickle.dumps(EvalPayload(sentinel), protocol=4)
    # control: the payload is live when unpickled normally
    pickle.loads(pickle.dumps(EvalPayload(control), protocol=4))
    assert control.exists()

    payloads = {
        "py2-os.system-plain": py2_os_system(f"touch {sentinel}"),
        "py2-os.system-legacy": legacy_header() + py2_os_system(f"touch {sentinel}"),
        "p4-eval-plain": p4,
        "p4-eval-legacy": legacy_header(4) + p4,
        "p2-eval-legacy": legacy_header() + pickle.dumps(EvalPayload(sentinel), protocol=2),
    }
    for name, data in payloads.items():
        with pytest.raises(UnsafePickleError, match=r"refused to load global '(os\.system|builtins\.eval|__builtin__\.eval)'") as exc:
            restricted_loads(data)
        assert "refused" in str(exc.value), name
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(data)
        with pytest.raises(UnsafePickleError):
            load_official(path)
    # inside a zip checkpoint
    zpath = tmp_path / "evil.pth"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("archive/data.pkl", p4)
        z.writestr("archive/version", "3\n")
    with pytest.raises(UnsafePickleError, match=r"(builtins|__builtin__)\.eval"):
        restricted_load(zpath)
    # a stowaway attribute inside an otherwise legitimate whole-module pickle
    fake = types.ModuleType("model")
    monkeypatch.setitem(sys.modules, "model", fake)

    class MEM_TRANS(ConvProjection):
        pass

    MEM_TRANS.__module__ = "model"
    MEM_TRANS.__qualname__ = "MEM_TRANS"
    fake.MEM_TRANS = MEM_TRANS
    m = MEM_TRANS()
    m.evil = EvalPayload(sentinel)
    torch.save(m, tmp_path / "NET_T_evil.pkl", _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafePickleError, match=r"(builtins|__builtin__)\.eval"):
        load_official(tmp_path / "NET_T_evil.pkl")
    assert not sentinel.exists()


def test_garbage_is_a_format_error(tmp_path):
    with pytest.raises(PickleFormatError):
        restricted_loads(b"\x00\x01not a pickle at all")
    truncated = NET_T.read_bytes()[:-1000]
    with pytest.raises(PickleFormatError, match="truncated"):
        restricted_loads(truncated)
    with pytest.raises(FileNotFoundError):
        load_official(tmp_path / "missing.pkl")


# ------------------------------------------------------------------------------------------
# Whole modules re-saved with stand-in classes of the authors' code, and state_dict files
# ------------------------------------------------------------------------------------------


@pytest.fixture()
def authors_modules(monkeypatch):
    """Fake top-level modules ``model`` and ``GlobalAttention`` with small look-alike classes."""
    model = types.ModuleType("model")
    ga = types.ModuleType("GlobalAttention")
    monkeypatch.setitem(sys.modules, "model", model)
    monkeypatch.setitem(sys.modules, "GlobalAttention", ga)

    def register(mod, cls):
        cls.__module__ = mod.__name__
        cls.__qualname__ = cls.__name__
        setattr(mod, cls.__name__, cls)
        return cls

    class MEM_TRANS(ConvProjection):
        pass

    class GlobalAttentionGeneral(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_context = nn.Conv2d(8, 4, 1, bias=False)
            self.sm = nn.Softmax(dim=1)
            self.mask = None

    class CA_NET(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 16)

    class INIT_STAGE_G(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Sequential(nn.Linear(12, 32, bias=False), nn.BatchNorm1d(32))

    class NEXT_STAGE_G(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = GlobalAttentionGeneral()
            self.upsample = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(4, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8))

    class G_NET(nn.Module):
        def __init__(self):
            super().__init__()
            self.ca_net = CA_NET()
            self.h_net1 = INIT_STAGE_G()
            self.h_net2 = NEXT_STAGE_G()

    class RNN_ENCODER(nn.Module):
        def __init__(self):
            super().__init__()
            self.word_encoder = nn.Embedding(30, 10)
            self.encoder = nn.Conv1d(10 + 6, 10, 1, bias=False)
            self.drop = nn.Dropout(0.5)
            self.rnn = nn.LSTM(10, 4, 1, batch_first=True, bidirectional=True)

    for mod, cls in ((model, MEM_TRANS), (ga, GlobalAttentionGeneral), (model, CA_NET), (model, INIT_STAGE_G),
                     (model, NEXT_STAGE_G), (model, G_NET), (model, RNN_ENCODER)):
        register(mod, cls)
    return model


def assert_same_state(sd, module):
    ref = module.state_dict()
    assert list(sd) == list(ref)
    for k in ref:
        assert sd[k].dtype == ref[k].dtype and torch.equal(sd[k], ref[k]), k


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")
def test_whole_modules_resaved_in_legacy_and_zip_format(tmp_path, authors_modules):
    torch.manual_seed(0)
    mem = authors_modules.MEM_TRANS()
    g = authors_modules.G_NET()
    g.h_net1.fc[1].running_mean.normal_()
    g.h_net1.fc[1].num_batches_tracked += 7
    g.h_net2.att.mask = torch.tensor([[False, True, True], [False, False, True]])  # saved after a forward
    rnn = authors_modules.RNN_ENCODER()
    for name, module, kind in (("NET_T", mem, "MEM_TRANS"), ("NET_G", g, "G_NET"), ("Text_Encoder", rnn, "RNN_ENCODER")):
        for zip_format in (False, True):
            path = tmp_path / f"{name}_{zip_format}.pkl"
            torch.save(module, path, _use_new_zipfile_serialization=zip_format)
            got_kind, sd, info = load_official(path)
            assert got_kind == kind
            assert info["container"] == ("torch-zip" if zip_format else "torch-legacy")
            assert info["class"] == f"model.{type(module).__name__}"
            assert_same_state(sd, module)
    # the saved attention mask was a BoolStorage in the file but is not state
    _, sd, info = load_official(tmp_path / "NET_G_False.pkl")
    assert "bool" in {s["dtype"] for s in info["storages"]}
    assert not any("mask" in k for k in sd)
    assert int(sd["h_net1.fc.1.num_batches_tracked"]) == 7


def write_legacy(path: Path, tensors: dict, location: str = "cuda:0", little: bool = True) -> None:
    """An independent writer of the legacy torch container (magic, version, sys_info, pickle, keys, data)."""
    by_key = {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, torch.storage.TypedStorage):
                key = str(obj._data_ptr())
                by_key[key] = obj
                return ("storage", getattr(torch, obj._pickle_storage_type()), key, location, obj._size(), None)
            return None

    buf = io.BytesIO()
    pickle.dump(TORCH_LEGACY_MAGIC, buf, protocol=2)
    pickle.dump(1001, buf, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": little, "type_sizes": {"short": 2, "int": 4, "long": 8}}, buf, protocol=2)
    Pickler(buf, protocol=2).dump(tensors)
    keys = sorted(by_key)
    pickle.dump(keys, buf, protocol=2)
    arrays = {str(t.untyped_storage().data_ptr()): t for t in tensors.values()}
    for key in keys:
        t = arrays[key]
        arr = t.contiguous().numpy()
        buf.write(struct.pack("<q" if little else ">q", t.numel()))
        buf.write(arr.astype(arr.dtype.newbyteorder("<" if little else ">")).tobytes())
    path.write_bytes(buf.getvalue())


@pytest.mark.parametrize("little", [True, False])
def test_cuda_and_big_endian_legacy_state_dicts_map_to_cpu(tmp_path, little):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "encoder.weight": torch.randn(20, 8, generator=g),
        "rnn.weight_ih_l0": torch.randn(16, 8, generator=g),
        "rnn.weight_hh_l0": torch.randn(16, 4, generator=g).double(),
        "rnn.steps": torch.arange(5),
    }
    path = tmp_path / "text_encoder100.pth"
    write_legacy(path, tensors, location="cuda:1", little=little)
    kind, sd, info = load_official(path)
    assert kind == "ATTNGAN_RNN_ENCODER"
    assert info["storage_locations"] == ["cuda:1"]
    for k, t in tensors.items():
        assert sd[k].device.type == "cpu" and sd[k].dtype == t.dtype and torch.equal(sd[k], t)


def test_attngan_zip_state_dicts(tmp_path):
    rnn = nn.Module()
    rnn.encoder = nn.Embedding(40, 12)
    rnn.rnn = nn.LSTM(12, 6, batch_first=True, bidirectional=True)
    torch.save(rnn.state_dict(), tmp_path / "text_encoder200.pth")
    kind, sd, info = load_official(tmp_path / "text_encoder200.pth")
    assert kind == "ATTNGAN_RNN_ENCODER" and info["container"] == "torch-zip"
    assert_same_state(sd, rnn)
    cnn = nn.Module()
    cnn.Conv2d_1a_3x3 = nn.Module()
    cnn.Conv2d_1a_3x3.conv = nn.Conv2d(3, 4, 3, bias=False)
    cnn.emb_features = nn.Conv2d(16, 8, 1, bias=False)
    cnn.emb_cnn_code = nn.Linear(32, 8)
    # nn.DataParallel-style prefix is stripped
    torch.save({"module." + k: v for k, v in cnn.state_dict().items()}, tmp_path / "image_encoder200.pth")
    kind, sd, info = load_official(tmp_path / "image_encoder200.pth")
    assert kind == "CNN_ENCODER" and info["stripped_prefix"] == "module."
    assert_same_state(sd, cnn)


# ------------------------------------------------------------------------------------------
# Plain pickles: transvob.pkl, vocab.pkl, memoryft
# ------------------------------------------------------------------------------------------


def test_transvob_and_vocab_structure():
    kind, sd, info = load_official(FIX / "transvob.pkl")
    assert kind == "TRANSVOB" and info["container"] == "pickle" and info["pickle_protocol"] == 0
    t = sd["transvob"]
    assert t.dtype == torch.int64 and t.shape == (27297,)
    assert int(t[0]) == 9487  # <end>/pad has no memory
    assert int((t == 9487).sum()) == 17820
    other = t[t != 9487]
    assert other.numel() == 9477 and torch.unique(other).numel() == 9477 and int(other.min()) >= 1
    kind, sd, info = load_official(FIX / "vocab.pkl")
    assert kind == "VOCAB" and sd == {}
    ix = info["ix_to_word"]
    assert len(ix) == 9487 and info["min_id"] == 1 and info["max_id"] == 9487 and info["contiguous"]
    assert ix["9487"] == "UNK"
    assert all(isinstance(w, str) and w for w in ix.values())
    assert all(str(int(i)) in ix for i in other)


def write_memoryft(path: Path, ids, dim: int, seed: int = 0, protocol: int = 2, dtype=np.float32):
    rng = np.random.default_rng(seed)
    mem = {str(i): rng.standard_normal(dim).astype(dtype) for i in ids}
    with open(path, "wb") as f:
        pickle.dump(mem, f, protocol=protocol)
    return mem


@pytest.mark.parametrize("protocol,dtype", [(0, np.float64), (2, np.float32), (5, np.float32)])
def test_memoryft_dict_to_dense_bank(tmp_path, protocol, dtype):
    path = tmp_path / "memoryft_9487.pkl"
    mem = write_memoryft(path, list(range(1, 30)) + [35], 1024, protocol=protocol, dtype=dtype)
    kind, sd, info = load_official(path)
    assert kind == "MEMORY_FEATURES"
    assert sd["memory"].shape == (36, 1024) and sd["memory"].dtype == torch.float32
    assert sd["present"].tolist() == [False] + [True] * 29 + [False] * 5 + [True]
    for k, v in mem.items():
        assert np.allclose(sd["memory"][int(k)].numpy(), v.astype(np.float32))
    assert torch.count_nonzero(sd["memory"][30:35]) == 0
    assert info["num_entries"] == 30 and info["dim"] == 1024


# ------------------------------------------------------------------------------------------
# import_official
# ------------------------------------------------------------------------------------------


def test_import_official_folder(tmp_path):
    rel = tmp_path / "release"
    (rel / "models").mkdir(parents=True)
    (rel / "memory").mkdir()
    (rel / "models" / "NET_T.pkl").write_bytes(NET_T.read_bytes())
    for name in ("transvob.pkl", "vocab.pkl"):
        (rel / "memory" / name).write_bytes((FIX / name).read_bytes())
    mem = write_memoryft(rel / "memory" / "memoryft_9487.pkl", range(1, 11), 1024)
    (rel / "README.md").write_text("not a weight file")
    (rel / "models" / "evil.pkl").write_bytes(py2_os_system(f"touch {tmp_path / 'pwned'}"))
    (rel / "models" / "broken.pkl").write_bytes(b"\x80\x02garbage")
    torch.save({"foo.weight": torch.zeros(3)}, rel / "models" / "other.pth")

    out = tmp_path / "out"
    report = import_official([rel], out)
    kinds = {Path(c["source"]).name: c["kind"] for c in report["converted"]}
    assert kinds == {"NET_T.pkl": "MEM_TRANS", "transvob.pkl": "TRANSVOB", "vocab.pkl": "VOCAB",
                     "memoryft_9487.pkl": "MEMORY_FEATURES"}
    skipped = {Path(s["source"]).name: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"README.md", "evil.pkl", "broken.pkl", "other.pth"}
    assert "suffix" in skipped["README.md"]
    assert "refused" in skipped["evil.pkl"] and "system" in skipped["evil.pkl"]
    assert "not a readable pickle" in skipped["broken.pkl"]
    assert "match no known" in skipped["other.pth"]
    assert not (tmp_path / "pwned").exists()

    _, ref, _ = load_official(NET_T)
    st = load_file(out / "NET_T.safetensors")
    assert set(st) == set(ref) and all(torch.equal(st[k], ref[k]) for k in ref)
    side = json.loads((out / "NET_T.json").read_text())
    assert side["kind"] == "MEM_TRANS" and side["source_sha256"] == NET_T_SHA256
    assert side["tensors"]["memory_emb_1.weight"] == {"shape": [512, 1024, 1], "dtype": "float32"}
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab["kind"] == "VOCAB" and vocab["info"]["ix_to_word"]["9487"] == "UNK"
    assert not (out / "vocab.safetensors").exists()
    bank = load_file(out / "memoryft_9487.safetensors")
    assert np.allclose(bank["memory"][7].numpy(), mem["7"])
    assert torch.equal(load_file(out / "transvob.safetensors")["transvob"],
                       load_official(FIX / "transvob.pkl")[1]["transvob"])
    on_disk = json.loads((out / "import_report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    # re-running over the output folder converts nothing new from it and overwrites atomically
    again = import_official([rel / "models" / "NET_T.pkl"], out)
    assert [c["kind"] for c in again["converted"]] == ["MEM_TRANS"]


def test_unrecognised_content_is_reported(tmp_path):
    p = tmp_path / "filenames.pickle"
    p.write_bytes(pickle.dumps(["COCO_train2014_000000000009", "COCO_train2014_000000000025"], protocol=2))
    with pytest.raises(UnrecognizedFileError, match="a list"):
        load_official(p)
