"""Word-swap hard negatives: captions that differ from the true one in a single attribute word.

Not in the paper (an option, off by default). The DAMSM's in-batch negatives rarely differ from the true
caption only in an object's shape, so nothing forces its word-region matching to look at shapes; colour and
background already separate a batch. A *hard negative* replaces one attribute word of the caption (one
shape word for ``shape``, one colour word for ``colour``) by a word of another class of the same kind, e.g.
"a red circle above a blue square" -> "a red star above a blue square". The changed caption describes a
different scene, so it is a valid negative for the image; :func:`cpgan.losses.damsm_loss` adds it to the
image->caption softmax of its own image (``damsm.hard_negatives`` when training the DAMSM,
``gan.tiscl_hard_negatives`` in TISCL, where it tells G which of two shapes its object should look like).

The word classes come from the shapes world's tables (``SHAPE_OF``, ``COLOUR_OF``); a data set without such
tables cannot use the option (:func:`word_classes` says so).

Shapes: ``captions (B, T)`` token ids -> ``(K, B, T)`` swapped ids and ``(K, B)`` validity, one negative per
kind (K = number of kinds); a caption without a word of that kind is returned unchanged and marked invalid.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["KINDS", "parse_kinds", "word_classes", "WordSwapper", "make_swapper", "encode_hard_negatives"]

KINDS = ("shape", "colour")


def parse_kinds(spec: str, option: str) -> tuple[str, ...]:
    """``"shape,colour"`` -> ``("shape", "colour")``; ``""`` -> ``()``; unknown kinds are a one-line error."""
    kinds = tuple(k.strip() for k in spec.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"{option}: unknown kind {bad[0]!r}; use a comma-separated list of {', '.join(KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"{option}: {spec!r} names a kind twice")
    return kinds


def word_classes(kind: str, source: str) -> Mapping[str, str]:
    """Word -> class table of one attribute ``kind`` for the data ``source`` (only ``shapes`` has them)."""
    if source != "shapes":
        raise ValueError(
            f"hard negatives ({kind}) need word classes, which only the shapes world defines; "
            f"data.source is {source!r}: leave damsm.hard_negatives and gan.tiscl_hard_negatives empty"
        )
    from .data.shapes import COLOUR_OF, SHAPE_OF

    return {"shape": SHAPE_OF, "colour": COLOUR_OF}[kind]


class WordSwapper:
    """Make word-swap hard negatives of caption batches (see the module docstring).

    Args:
        word2id: the vocabulary's word -> id map.
        tables: per kind, a word -> class map; words outside the vocabulary are ignored. The replacement
            word of a class is the class name when it is in the vocabulary, else its first word that is.
    """

    def __init__(self, word2id: Mapping[str, int], tables: Sequence[Mapping[str, str]]) -> None:
        if not tables:
            raise ValueError("WordSwapper needs at least one word table")
        size = max(word2id.values()) + 1
        self.class_of: list[Tensor] = []  # per kind: (V,) class index, -1 = not a word of this kind
        self.replacement: list[Tensor] = []  # per kind: (C,) token id of each class
        for table in tables:
            classes = sorted({c for w, c in table.items() if w in word2id})
            if len(classes) < 2:
                raise ValueError("a hard-negative kind needs at least two classes in the vocabulary")
            index = {c: i for i, c in enumerate(classes)}
            class_of = torch.full((size,), -1, dtype=torch.long)
            for w, c in table.items():
                if w in word2id:
                    class_of[word2id[w]] = index[c]
            repl = [word2id[c] if c in word2id else min(word2id[w] for w, cc in table.items()
                                                         if cc == c and w in word2id) for c in classes]
            self.class_of.append(class_of)
            self.replacement.append(torch.tensor(repl, dtype=torch.long))

    @property
    def num_kinds(self) -> int:
        return len(self.class_of)

    def __call__(self, captions: Tensor, lengths: Tensor,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Swap one attribute word per caption and kind.

        Args:
            captions: ``(B, T)`` token ids (padding beyond ``lengths`` is never chosen).
            lengths: ``(B,)`` caption lengths.
            generator: CPU generator of the random choices (``None``: the global one).

        Returns:
            ``(K, B, T)`` swapped captions (same lengths) and ``(K, B)`` bool, ``True`` where a word was
            swapped (the caption had a word of that kind).
        """
        b, t = captions.shape
        device = captions.device
        in_caption = torch.arange(t, device=device)[None, :] < lengths.to(device)[:, None]
        rows = torch.arange(b, device=device)
        out, valid = [], []
        for class_of, repl in zip(self.class_of, self.replacement):  # one pass per kind (K <= 2)
            cls = class_of.to(device)[captions].masked_fill(~in_caption, -1)  # (B, T)
            cand = cls >= 0
            # a uniformly random candidate position per caption, then a uniformly random *other* class
            pick = torch.rand(b, t, generator=generator).to(device).masked_fill(~cand, -1.0).argmax(1)
            shift = torch.randint(1, repl.numel(), (b,), generator=generator).to(device)
            old = cls[rows, pick]
            new_tok = repl.to(device)[(old.clamp(min=0) + shift) % repl.numel()]
            ok = cand.any(1)
            swapped = captions.clone()
            swapped[rows, pick] = torch.where(ok, new_tok, captions[rows, pick])
            out.append(swapped)
            valid.append(ok)
        return torch.stack(out), torch.stack(valid)


def make_swapper(spec: str, option: str, word2id: Mapping[str, int], source: str) -> WordSwapper | None:
    """The swapper an option asks for (``None`` when it is empty); errors name the option."""
    kinds = parse_kinds(spec, option)
    if not kinds:
        return None
    try:
        return WordSwapper(word2id, [word_classes(k, source) for k in kinds])
    except ValueError as e:
        raise ValueError(f"{option}: {e}") from None


def encode_hard_negatives(encode_text, swapper: WordSwapper, captions: Tensor, lengths: Tensor,
                          generator: torch.Generator | None = None):
    """Swap and encode: ``encode_text((N, T) ids, (N,) lengths) -> (words (N, d, T), sentence (N, d))``.

    Returns a :class:`cpgan.losses.HardNegatives` for ``damsm_loss(..., hard=...)``.
    """
    from .losses import HardNegatives

    swapped, valid = swapper(captions, lengths, generator)
    k, b, t = swapped.shape
    rep_len = lengths.repeat(k)
    words, sent = encode_text(swapped.reshape(k * b, t), rep_len)
    return HardNegatives(words.reshape(k, b, *words.shape[1:]), sent.reshape(k, b, -1), rep_len.reshape(k, b),
                         valid)
