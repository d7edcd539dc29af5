"""Text pipeline compatible with AttnGAN / CPGAN (REFERENCE.md §7.6; taoxugit/AttnGAN ``code/datasets.py``).

The released CPGAN code inherits AttnGAN's caption handling, so a caption is turned into word ids exactly
the way AttnGAN does it:

1. ``tokenize``: lower-case the whole caption, split it with ``RegexpTokenizer(r'\\w+')`` semantics (maximal
   runs of Unicode word characters: letters, digits and ``_``; everything else, including hyphens and
   apostrophes, separates tokens), then drop every non-ASCII character of each token
   (AttnGAN: ``t.encode('ascii', 'ignore').decode('ascii')``) and drop tokens that became empty.
   Consequences (documented choices that follow AttnGAN literally):

   * ``"café"`` -> ``"caf"`` (the accented letter is a word character, so it stays inside the token and is
     then deleted, not replaced by ``e``); ``"日本"`` -> dropped entirely;
   * digits are kept (``"2 dogs"`` -> ``["2", "dogs"]``), as is ``_``;
   * ``"mid-sized"`` -> ``["mid", "sized"]``; ``"it's"`` -> ``["it", "s"]``.

2. ``Vocabulary``: id 0 is ``"<end>"`` (AttnGAN's ``ixtoword[0]``), which is also the padding id; the other
   words follow in a deterministic order (Python code-point sort), unlike AttnGAN whose order depended on
   dict iteration order. ``min_count`` filters rare words (AttnGAN keeps every word: count >= 0).

3. ``sample_words``: a caption longer than ``words_num`` keeps a random, order-preserving subset of
   ``words_num`` tokens (AttnGAN ``get_caption``: shuffle the indices, keep the first ``words_num``, sort);
   ``truncate`` is the deterministic alternative (first ``words_num`` tokens) for evaluation.

4. ``pad_captions``: batch of id lists -> ``(B, T)`` LongTensor padded with 0 plus lengths ``(B,)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

import numpy as np

from ..utils.atomic import atomic_write_text

if TYPE_CHECKING:  # torch is imported lazily so that tokenising (e.g. in the shapes generator) stays light
    import torch

__all__ = [
    "END_TOKEN",
    "tokenize",
    "Vocabulary",
    "sample_words",
    "truncate",
    "pad_captions",
]

END_TOKEN = "<end>"
_VOCAB_FORMAT = "cpgan-vocabulary"
_VOCAB_VERSION = 1

# ``\w`` on ``str`` patterns is Unicode-aware in Python, like NLTK's RegexpTokenizer(r'\w+') on unicode text.
_WORD_RE = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """Split a caption into AttnGAN tokens: lower-case, ``\\w+`` runs, non-ASCII characters removed.

    >>> tokenize("A big-red Ball, isn't it? café 2")
    ['a', 'big', 'red', 'ball', 'isn', 't', 'it', 'caf', '2']
    """
    if not isinstance(text, str):
        raise ValueError(f"tokenize expects a str caption, got {type(text).__name__}")
    # AttnGAN replaces the two-replacement-character sequence by a space before tokenising.
    text = text.replace("\ufffd\ufffd", " ")
    out: list[str] = []
    for tok in _WORD_RE.findall(text.lower()):
        tok = tok.encode("ascii", "ignore").decode("ascii")
        if tok:
            out.append(tok)
    return out


class Vocabulary:
    """Word <-> id mapping with ``"<end>"`` (= padding) at id 0.

    Build with ``Vocabulary.build(captions_tokens)`` or ``Vocabulary(words)`` where ``words`` lists the
    words for ids 1..V-1 in id order (``"<end>"`` is prepended automatically).
    """

    def __init__(self, words: Iterable[str] = ()) -> None:
        id2word = [END_TOKEN]
        word2id = {END_TOKEN: 0}
        for w in words:
            if not isinstance(w, str) or not w:
                raise ValueError(f"vocabulary words must be non-empty strings, got {w!r}")
            if w == END_TOKEN:
                raise ValueError(f"{END_TOKEN!r} is reserved for id 0; do not list it among the words")
            if w in word2id:
                raise ValueError(f"duplicate vocabulary word {w!r}")
            word2id[w] = len(id2word)
            id2word.append(w)
        self._id2word: tuple[str, ...] = tuple(id2word)
        self._word2id: dict[str, int] = word2id

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def build(cls, captions_tokens: Iterable[Sequence[str]], min_count: int = 1) -> "Vocabulary":
        """Vocabulary of every token occurring at least ``min_count`` times, sorted by code point.

        ``captions_tokens`` is an iterable of token lists (output of ``tokenize``). ``"<end>"`` tokens are
        ignored (reserved for id 0).
        """
        if isinstance(captions_tokens, str):
            raise ValueError("Vocabulary.build expects a list of token lists, not a single string")
        if int(min_count) < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts: Counter[str] = Counter()
        for toks in captions_tokens:
            if isinstance(toks, str):
                raise ValueError(
                    "Vocabulary.build expects token lists (e.g. [tokenize(c) for c in captions]), got a string"
                )
            counts.update(t for t in toks if t != END_TOKEN)
        return cls(sorted(w for w, c in counts.items() if c >= min_count))

    # -- mapping ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._id2word)

    def __contains__(self, word: object) -> bool:
        return word in self._word2id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self._id2word == other._id2word

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words, sha256={self.sha256()[:12]})"

    @property
    def word2id(self) -> Mapping[str, int]:
        """Read-only word -> id mapping (includes ``"<end>": 0``)."""
        return MappingProxyType(self._word2id)

    @property
    def id2word(self) -> tuple[str, ...]:
        """Words in id order (``id2word[0] == "<end>"``)."""
        return self._id2word

    def encode(
        self, tokens: Sequence[str], on_unknown: Literal["drop", "error"] = "drop"
    ) -> tuple[list[int], list[str]]:
        """Map tokens to ids. Returns ``(ids, unknown_words)``.

        ``on_unknown="drop"`` skips out-of-vocabulary tokens and lists them (in order) in ``unknown_words``;
        ``"error"`` raises ValueError naming them. ``"<end>"`` is never a caption word and counts as unknown.
        """
        if on_unknown not in ("drop", "error"):
            raise ValueError(f"on_unknown must be 'drop' or 'error', got {on_unknown!r}")
        if isinstance(tokens, str):
            raise ValueError("encode expects a token list; call tokenize(text) first or use encode_text")
        ids: list[int] = []
        unknown: list[str] = []
        for t in tokens:
            i = self._word2id.get(t)
            if i is None or i == 0:
                unknown.append(t)
            else:
                ids.append(i)
        if unknown and on_unknown == "error":
            raise ValueError(
                f"{len(unknown)} word(s) not in the vocabulary: {sorted(set(unknown))}; "
                "use on_unknown='drop' or rebuild the vocabulary with these captions"
            )
        return ids, unknown

    def encode_text(
        self, text: str, on_unknown: Literal["drop", "error"] = "drop"
    ) -> tuple[list[int], list[str]]:
        """``encode(tokenize(text))``."""
        return self.encode(tokenize(text), on_unknown=on_unknown)

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Ids -> words. Id 0 (``"<end>"``/padding) is skipped; an id outside [0, V) raises ValueError."""
        out: list[str] = []
        n = len(self._id2word)
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise ValueError(f"word id {i} is outside the vocabulary range [0, {n})")
            if i != 0:
                out.append(self._id2word[i])
        return out

    # -- persistence --------------------------------------------------------------------------------------
    def to_json(self) -> str:
        """Canonical JSON text (the input of ``sha256``)."""
        return json.dumps(
            {"format": _VOCAB_FORMAT, "version": _VOCAB_VERSION, "words": list(self._id2word)},
            ensure_ascii=True,
            separators=(",", ":"),
        )

    def sha256(self) -> str:
        """Hex sha256 of the canonical JSON (identifies the vocabulary in checkpoint sidecars)."""
        return hashlib.sha256(self.to_json().encode("ascii")).hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON atomically (temp file in the same folder, fsync, rename)."""
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        """Read a file written by ``save``; raises FileNotFoundError / ValueError with a clear message."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"vocabulary file not found: {path} (run the vocab stage to create it)")
        try:
            with open(path, encoding="ascii") as f:
                obj = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a vocabulary JSON file ({e})") from None
        if not isinstance(obj, dict) or obj.get("format") != _VOCAB_FORMAT:
            raise ValueError(f"{path} is not a cpgan vocabulary file (missing format '{_VOCAB_FORMAT}')")
        if obj.get("version") != _VOCAB_VERSION:
            raise ValueError(f"{path}: unsupported vocabulary version {obj.get('version')!r}")
        words = obj.get("words")
        if not isinstance(words, list) or not words or words[0] != END_TOKEN:
            raise ValueError(f"{path}: 'words' must be a list starting with {END_TOKEN!r}")
        return cls(words[1:])


def sample_words(ids: Sequence[int], words_num: int, rng: np.random.Generator) -> list[int]:
    """AttnGAN ``get_caption``: keep a random order-preserving subset of ``words_num`` ids if longer.

    Shuffles the indices with ``rng``, keeps the first ``words_num`` and sorts them. A caption of at most
    ``words_num`` ids is returned unchanged (as a new list) and ``rng`` is not used.
    """
    words_num = int(words_num)
    if words_num < 1:
        raise ValueError(f"words_num must be >= 1, got {words_num}")
    ids = [int(i) for i in ids]
    n = len(ids)
    if n <= words_num:
        return ids
    ix = rng.permutation(n)[:words_num]
    ix.sort()
    return [ids[i] for i in ix]


def truncate(ids: Sequence[int], words_num: int) -> list[int]:
    """Deterministic counterpart of ``sample_words`` for evaluation: the first ``words_num`` ids."""
    words_num = int(words_num)
    if words_num < 1:
        raise ValueError(f"words_num must be >= 1, got {words_num}")
    return [int(i) for i in ids[:words_num]]


def pad_captions(captions: Sequence[Sequence[int]], words_num: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Pad a batch of id lists with 0 (``"<end>"``).

    Returns ``(ids (B, T) int64, lengths (B,) int64)`` with ``T = min(max length, words_num)``. Captions
    longer than ``words_num`` are cut to their first ``words_num`` ids (call ``sample_words`` beforehand for
    AttnGAN's random subset). Raises ValueError for an empty batch, an empty caption or an id < 1 (0 is
    reserved for padding).
    """
    import torch

    words_num = int(words_num)
    if words_num < 1:
        raise ValueError(f"words_num must be >= 1, got {words_num}")
    if len(captions) == 0:
        raise ValueError("pad_captions got an empty batch (no captions)")
    rows: list[list[int]] = []
    for b, cap in enumerate(captions):
        cap = [int(i) for i in cap]
        if not cap:
            raise ValueError(
                f"caption {b} of the batch is empty (no known words after tokenising); "
                "drop it or rebuild the vocabulary"
            )
        if min(cap) < 1:
            raise ValueError(f"caption {b} contains word id {min(cap)}; ids must be >= 1 (0 is padding)")
        rows.append(cap[:words_num])
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    T = int(lengths.max())
    out = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):  # batch assembly, not a hot tensor path
        out[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out, lengths
