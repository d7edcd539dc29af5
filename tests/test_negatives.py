"""Word-swap hard negatives (cpgan.negatives): every swap changes exactly one word of the right kind."""
from __future__ import annotations

import pytest
import torch

from cpgan.data.shapes import COLOUR_OF, SHAPE_OF
from cpgan.negatives import WordSwapper, parse_kinds, word_classes

WORDS = ["<pad>", "<unk>", "a", "red", "blue", "violet", "purple", "circle", "ball", "square", "star", "above",
         "on", "grass"]
W2ID = {w: i for i, w in enumerate(WORDS)}


def _ids(text: str) -> list[int]:
    return [W2ID[w] for w in text.split()]


def test_each_swap_changes_one_word_to_another_class():
    sw = WordSwapper(W2ID, [SHAPE_OF, COLOUR_OF])
    caps = ["a red circle above a blue square", "a violet ball on grass", "a blue star", "on grass"]
    ids = [_ids(c) for c in caps]
    T = 9
    captions = torch.tensor([x + [0] * (T - len(x)) for x in ids])
    lengths = torch.tensor([len(x) for x in ids])
    seen_classes = set()
    for seed in range(40):
        out, valid = sw(captions, lengths, torch.Generator().manual_seed(seed))
        assert out.shape == (2, 4, T) and valid.shape == (2, 4)
        assert valid.tolist() == [[True, True, True, False], [True, True, True, False]]
        for k, table in enumerate((SHAPE_OF, COLOUR_OF)):
            for b in range(4):
                diff = (out[k, b] != captions[b]).nonzero().flatten().tolist()
                if not valid[k, b]:
                    assert diff == []
                    continue
                assert len(diff) == 1 and diff[0] < lengths[b]
                old, new = WORDS[captions[b, diff[0]]], WORDS[out[k, b, diff[0]]]
                assert old in table and new in table and table[old] != table[new]
                seen_classes.add((k, table[new]))
    # class names are the replacement words; every class of the vocabulary is reached
    assert seen_classes == {(0, "circle"), (0, "square"), (0, "star"), (1, "red"), (1, "blue"), (1, "purple")}


def test_swap_picks_every_candidate_position():
    sw = WordSwapper(W2ID, [SHAPE_OF])
    captions = torch.tensor([_ids("a red circle above a blue square")])
    lengths = torch.tensor([7])
    positions = set()
    for seed in range(30):
        out, _ = sw(captions, lengths, torch.Generator().manual_seed(seed))
        positions |= set((out[0, 0] != captions[0]).nonzero().flatten().tolist())
    assert positions == {2, 6}


def test_padding_is_never_swapped():
    sw = WordSwapper(W2ID, [SHAPE_OF])
    captions = torch.tensor([_ids("a red") + [W2ID["circle"]] * 3])  # 'circle' only in the padding
    out, valid = sw(captions, torch.tensor([2]), torch.Generator().manual_seed(0))
    assert not bool(valid.any()) and torch.equal(out[0], captions)


def test_kinds_and_sources_are_checked():
    assert parse_kinds("shape, colour", "x") == (("shape", 1), ("colour", 1))
    assert parse_kinds("shape:7,colour:2", "x") == (("shape", 7), ("colour", 2))
    assert parse_kinds("", "x") == ()
    with pytest.raises(ValueError, match="unknown kind 'size'"):
        parse_kinds("size", "damsm.hard_negatives")
    for bad in ("shape:0", "shape:x", "shape,shape:2"):
        with pytest.raises(ValueError, match="damsm.hard_negatives"):
            parse_kinds(bad, "damsm.hard_negatives")
    with pytest.raises(ValueError, match="at most 2"):
        WordSwapper(W2ID, [SHAPE_OF], [3])  # circle/ball, square, star in the vocabulary
    with pytest.raises(ValueError, match="only the shapes world"):
        word_classes("shape", "coco")
    with pytest.raises(ValueError, match="two classes"):
        WordSwapper({"a": 0, "circle": 1}, [SHAPE_OF])


def test_n_negatives_share_the_word_and_differ_in_class():
    sw = WordSwapper(W2ID, [SHAPE_OF, COLOUR_OF], [2, 1])
    assert sw.num_negatives == 3
    captions = torch.tensor([_ids("a red circle above a blue square"), _ids("a violet ball on grass a a")])
    lengths = torch.tensor([7, 5])
    for seed in range(20):
        out, valid = sw(captions, lengths, torch.Generator().manual_seed(seed))
        assert out.shape == (3, 2, 7) and bool(valid.all())
        for b in range(2):
            pos = [(out[k, b] != captions[b]).nonzero().flatten().tolist() for k in range(2)]
            assert len(pos[0]) == 1 and pos[0] == pos[1]  # the same shape word, twice
            new = {SHAPE_OF[WORDS[out[k, b, pos[0][0]]]] for k in range(2)}
            old = SHAPE_OF[WORDS[captions[b, pos[0][0]]]]
            assert len(new) == 2 and old not in new  # the two other shape classes of the vocabulary
