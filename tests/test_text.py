"""Tests of the AttnGAN-compatible text pipeline (cpgan.data.text)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cpgan.data.text import END_TOKEN, Vocabulary, pad_captions, sample_words, tokenize, truncate


# -- tokenize -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("A big red ball above a small blue box.",
         ["a", "big", "red", "ball", "above", "a", "small", "blue", "box"]),
        ("Hello, WORLD!!!", ["hello", "world"]),
        ("2 dogs and 10 cats", ["2", "dogs", "and", "10", "cats"]),
        ("a mid-sized box", ["a", "mid", "sized", "box"]),
        ("it's the dog's bone", ["it", "s", "the", "dog", "s", "bone"]),
        ("a café near the naïve Zoë", ["a", "caf", "near", "the", "nave", "zo"]),
        ("ÉCOLE", ["cole"]),
        ("日本 tea", ["tea"]),
        ("", []),
        ("   ", []),
        ("?!., -- ;:", []),
        ("snake_case word", ["snake_case", "word"]),
        ("tab\tand\nnewline", ["tab", "and", "newline"]),
        ("x\ufffd\ufffdy", ["x", "y"]),
        ("3.5m tall", ["3", "5m", "tall"]),
    ],
)
def test_tokenize_hand_written(text, expected):
    assert tokenize(text) == expected


def test_tokenize_rejects_non_strings():
    with pytest.raises(ValueError, match="str"):
        tokenize(None)  # type: ignore[arg-type]


# -- Vocabulary ---------------------------------------------------------------------------------------------
def _toy_vocab() -> Vocabulary:
    caps = ["a red ball", "A blue box", "the red box", "zebra"]
    return Vocabulary.build([tokenize(c) for c in caps])


def test_vocabulary_build_order_and_end_token():
    v = _toy_vocab()
    assert v.id2word == ("<end>", "a", "ball", "blue", "box", "red", "the", "zebra")
    assert len(v) == 8
    assert v.word2id["<end>"] == 0 and v.id2word[0] == END_TOKEN
    assert all(v.word2id[w] == i for i, w in enumerate(v.id2word))
    # order does not depend on caption order
    rev = Vocabulary.build([tokenize(c) for c in ["zebra", "the red box", "A blue box", "a red ball"]])
    assert rev == v and rev.sha256() == v.sha256()


def test_vocabulary_min_count():
    v = Vocabulary.build([["a", "b", "a"], ["c", "a", "b"]], min_count=2)
    assert v.id2word == ("<end>", "a", "b")
    with pytest.raises(ValueError):
        Vocabulary.build([["a"]], min_count=0)
    with pytest.raises(ValueError, match="token lists"):
        Vocabulary.build(["a red ball"])


def test_encode_decode_and_unknown_words():
    v = _toy_vocab()
    ids, unk = v.encode(["a", "green", "red", "ball", "<end>", "cat"])
    assert ids == [1, 5, 2] and unk == ["green", "<end>", "cat"]
    assert v.decode(ids) == ["a", "red", "ball"]
    assert v.decode([1, 5, 2, 0, 0]) == ["a", "red", "ball"]  # padding skipped
    assert v.decode(torch.tensor([7, 0])) == ["zebra"]
    with pytest.raises(ValueError, match="green"):
        v.encode(["a", "green"], on_unknown="error")
    with pytest.raises(ValueError, match="on_unknown"):
        v.encode(["a"], on_unknown="skip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outside"):
        v.decode([8])
    assert v.encode_text("The RED zebra!") == ([6, 5, 7], [])


def test_vocabulary_save_load_round_trip(tmp_path):
    v = _toy_vocab()
    p = tmp_path / "sub" / "vocab.json"
    v.save(p)
    w = Vocabulary.load(p)
    assert w == v and w.id2word == v.id2word and w.sha256() == v.sha256()
    assert json.loads(p.read_text())["words"][0] == "<end>"
    assert [f.name for f in p.parent.iterdir()] == ["vocab.json"]  # no temp files left
    # the hash is a content hash: it changes with the words
    assert Vocabulary(["a", "b"]).sha256() != Vocabulary(["b", "a"]).sha256()


def test_vocabulary_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Vocabulary.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a vocabulary"):
        Vocabulary.load(bad)
    bad.write_text(json.dumps({"format": "cpgan-vocabulary", "version": 1, "words": ["a", "<end>"]}))
    with pytest.raises(ValueError, match="<end>"):
        Vocabulary.load(bad)
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary(["a", "a"])


# -- sample_words / truncate --------------------------------------------------------------------------------
def test_sample_words_subset_order_length():
    ids = list(range(101, 131))  # 30 distinct ids
    for seed in range(20):
        out = sample_words(ids, 12, np.random.default_rng(seed))
        assert len(out) == 12
        assert set(out) <= set(ids)
        assert out == sorted(out)  # ids increase with position, so order preserved <=> sorted
    # deterministic per seed, different seeds give different subsets
    a = sample_words(ids, 12, np.random.default_rng(3))
    b = sample_words(ids, 12, np.random.default_rng(3))
    c = sample_words(ids, 12, np.random.default_rng(4))
    assert a == b and a != c


def test_sample_words_matches_attngan_procedure():
    """Reference: AttnGAN get_caption — shuffle index list, keep first words_num, sort."""
    ids = [5, 9, 2, 7, 7, 3, 8, 1, 4, 6]
    rng_ref = np.random.default_rng(11)
    perm = rng_ref.permutation(len(ids))
    keep = sorted(int(i) for i in perm[:4])
    expected = [ids[i] for i in keep]
    assert sample_words(ids, 4, np.random.default_rng(11)) == expected


def test_sample_words_short_and_every_subset_reachable():
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert sample_words([3, 1, 2], 5, rng) == [3, 1, 2]
    assert sample_words([3, 1, 2], 3, rng) == [3, 1, 2]
    assert rng.bit_generator.state == state  # rng untouched when nothing is dropped
    seen = {tuple(sample_words([1, 2, 3, 4], 2, rng)) for _ in range(300)}
    assert seen == {(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)}
    with pytest.raises(ValueError):
        sample_words([1], 0, rng)


def test_truncate():
    assert truncate([4, 5, 6, 7], 2) == [4, 5]
    assert truncate([4, 5], 5) == [4, 5]
    with pytest.raises(ValueError):
        truncate([1], 0)


# -- pad_captions -------------------------------------------------------------------------------------------
def test_pad_captions():
    ids, lens = pad_captions([[3, 4, 5], [7], [1, 2]], words_num=10)
    assert ids.dtype == torch.long and lens.dtype == torch.long
    assert ids.tolist() == [[3, 4, 5], [7, 0, 0], [1, 2, 0]]
    assert lens.tolist() == [3, 1, 2]
    ids, lens = pad_captions([[1, 2, 3, 4, 5, 6], [9, 8]], words_num=4)
    assert ids.tolist() == [[1, 2, 3, 4], [9, 8, 0, 0]] and lens.tolist() == [4, 2]


def test_pad_captions_errors():
    with pytest.raises(ValueError, match="caption 1 .* empty"):
        pad_captions([[1], []], words_num=5)
    with pytest.raises(ValueError, match="empty batch"):
        pad_captions([], words_num=5)
    with pytest.raises(ValueError, match="padding"):
        pad_captions([[1, 0, 2]], words_num=5)
