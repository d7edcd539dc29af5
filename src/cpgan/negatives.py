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

Shapes: ``captions (B, T)`` token ids -> ``(K, B, T)`` swapped ids and ``(K, B)`` validity, N negatives per kind
(``shape:N``; K = the sum of the N); a caption without a word of that kind is returned unchanged and marked
invalid.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["KINDS", "parse_kinds", "word_classes", "WordSwapper", "make_swapper", "encode_hard_negatives"]

KINDS = ("shape", "colour")


def parse_kinds(spec: str, option: str) -> tuple[tuple[str, int], ...]:
    """``"shape:3,colour"`` -> ``(("shape", 3), ("colour", 1))``; ``""`` -> ``()``.

    ``kind:N`` asks for N negatives of that kind per caption, all at the same word with N different replacement
    classes (``N`` = classes - 1 names every other class once). Bad specs are a one-line error.
    """
    out = []
    for item in (k.strip() for k in spec.split(",")):
        if not item:
            continue
        kind, _, count = item.partition(":")
        kind = kind.strip()
        if kind not in KINDS:
            raise ValueError(f"{option}: unknown kind {kind!r}; use a comma-separated list of "
                             f"{', '.join(KINDS)}, each optionally with :N negatives (e.g. shape:3)")
        try:
            n = int(count) if count.strip() else 1
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{option}: {item!r}: the count after ':' must be a positive integer")
        out.append((kind, n))
    if len({k for k, _ in out}) != len(out):
        raise ValueError(f"{option}: {spec!r} names a kind twice")
    return tuple(out)


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
        counts: per kind, the number of negatives N (default 1 each): all N change the same word, to N
            different classes (at most classes - 1).
    """

    def __init__(self, word2id: Mapping[str, int], tables: Sequence[Mapping[str, str]],
                 counts: Sequence[int] | None = None) -> None:
        if not tables:
            raise ValueError("WordSwapper needs at least one word table")
        counts = [1] * len(tables) if counts is None else list(counts)
        if len(counts) != len(tables):
            raise ValueError("WordSwapper: one count per word table")
        size = max(word2id.values()) + 1
        self.class_of: list[Tensor] = []  # per kind: (V,) class index, -1 = not a word of this kind
        self.replacement: list[Tensor] = []  # per kind: (C,) token id of each class
        self.counts = counts
        for table, n in zip(tables, counts):
            classes = sorted({c for w, c in table.items() if w in word2id})
            if len(classes) < 2:
                raise ValueError("a hard-negative kind needs at least two classes in the vocabulary")
            if not 1 <= n <= len(classes) - 1:
                raise ValueError(f"{n} negatives asked of a kind with {len(classes)} classes in the vocabulary "
                                 f"(at most {len(classes) - 1})")
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
    def num_negatives(self) -> int:
        """K, the negatives per caption (the sum of the counts)."""
        return sum(self.counts)

    def __call__(self, captions: Tensor, lengths: Tensor,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Swap one attribute word per caption, N times per kind.

        Args:
            captions: ``(B, T)`` token ids (padding beyond ``lengths`` is never chosen).
            lengths: ``(B,)`` caption lengths.
            generator: CPU generator of the random choices (``None``: the global one).

        Returns:
            ``(K, B, T)`` swapped captions (same lengths) and ``(K, B)`` bool, ``True`` where a word was
            swapped (the caption had a word of that kind); K = :attr:`num_negatives`, kinds in order.
        """
        b, t = captions.shape
        device = captions.device
        in_caption = torch.arange(t, device=device)[None, :] < lengths.to(device)[:, None]
        rows = torch.arange(b, device=device)
        out, valid = [], []
        for class_of, repl, n in zip(self.class_of, self.replacement, self.counts):  # one pass per kind (<= 2)
            c = repl.numel()
            cls = class_of.to(device)[captions].masked_fill(~in_caption, -1)  # (B, T)
            cand = cls >= 0
            # a uniformly random candidate position per caption, then n distinct random *other* classes
            pick = torch.rand(b, t, generator=generator).to(device).masked_fill(~cand, -1.0).argmax(1)
            shifts = torch.rand(b, c - 1, generator=generator).argsort(1)[:, :n].to(device) + 1  # (B, n)
            old = cls[rows, pick].clamp(min=0)
            new_tok = repl.to(device)[(old[:, None] + shifts) % c]  # (B, n)
            ok = cand.any(1)
            for j in range(n):  # n <= classes - 1 (7 for the shapes world)
                swapped = captions.clone()
                swapped[rows, pick] = torch.where(ok, new_tok[:, j], captions[rows, pick])
                out.append(swapped)
                valid.append(ok)
        return torch.stack(out), torch.stack(valid)


def make_swapper(spec: str, option: str, word2id: Mapping[str, int], source: str) -> WordSwapper | None:
    """The swapper an option asks for (``None`` when it is empty); errors name the option."""
    kinds = parse_kinds(spec, option)
    if not kinds:
        return None
    try:
        return WordSwapper(word2id, [word_classes(k, source) for k, _ in kinds], [n for _, n in kinds])
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
