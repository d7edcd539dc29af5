"""Semantic Object Accuracy for the shapes world (REFERENCE §8.4, DESIGN §6).

SOA (Hinz, Heinrich & Wermter, TPAMI 2020) asks a detector whether the objects a caption names are
in the generated image. In the shapes world a class is a (colour, shape) pair (8 x 8 = 64 classes) and
the detector is the shapes evaluator (a grid detector trained on real images). This module works on
*detections*, not images: for each image it receives

* ``named``: the objects the caption names, as ``(colour, shape)`` pairs (tuples/lists, or dicts with
  ``"colour"`` and ``"shape"`` keys such as ``cpgan.data.shapes.parse_caption`` returns; extra keys
  like ``"size"`` are ignored). Either element may be ``None`` when the caption leaves it open
  ("a red object", "a circle");
* ``detected``: the (colour, shape) pairs the evaluator found (fully specified);
* optionally the named and the detected background.

Definitions (sets: a class named or detected twice counts once; counts and sizes are not checked):

* a named object ``(c, s)`` is *found* when some detection matches it, ``None`` matching anything;
* ``soa_i``: mean over images (with at least one named object) of [every named object found] —
  the image-level SOA; on COCO, Hinz et al.'s SOA-I is the image-weighted per-class rate, which here
  is ``soa_i_weighted``;
* ``soa_c``: for each fully specified class (c, s), the share of images naming it in which (c, s) was
  detected; ``soa_c`` is the mean of these rates over the classes that occur (Hinz et al.'s SOA-C).
  Partially specified names do not enter the per-class rates. ``soa_i_weighted`` = Σ class hits /
  Σ class occurrences (Hinz et al.'s SOA-I);
* ``colour_acc`` / ``shape_acc``: mean over images of [every named colour is among the detected
  colours] (resp. shapes), over images that name at least one colour (resp. shape);
* ``object_partial``, ``colour_partial``, ``shape_partial``: partial credit, mean over images of the
  share of named objects (resp. distinct named colours, shapes) that were found;
* ``background_acc``: mean over images with a named background of [detected == named].

A metric with an empty denominator is ``None`` (JSON-friendly). Real test images passed through the
same evaluator give the ceiling (DESIGN §6).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["SOAAccumulator", "soa_scores"]

Pair = tuple[str | None, str | None]


def _pair(obj: Any, *, allow_none: bool) -> Pair:
    if isinstance(obj, Mapping):
        c, s = obj.get("colour"), obj.get("shape")
    else:
        try:
            c, s = obj
        except (TypeError, ValueError):
            raise ValueError(f"expected a (colour, shape) pair or a dict with 'colour'/'shape', got {obj!r}") from None
    if not allow_none and (c is None or s is None):
        raise ValueError(f"detections must name both colour and shape, got {obj!r}")
    return c, s


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class SOAAccumulator:
    """Streaming SOA: call :meth:`update` once per generated image, then :meth:`compute`."""

    def __init__(self) -> None:
        self.n_images = 0  # images with at least one named object
        self.n_skipped = 0  # images whose caption names no object
        self._all_found: list[float] = []
        self._obj_partial: list[float] = []
        self._colour_all: list[float] = []
        self._colour_partial: list[float] = []
        self._shape_all: list[float] = []
        self._shape_partial: list[float] = []
        self._bg: list[float] = []
        self._class_hits: dict[tuple[str, str], int] = {}
        self._class_count: dict[tuple[str, str], int] = {}

    def update(
        self,
        named: Iterable[Any],
        detected: Iterable[Any],
        named_bg: str | None = None,
        detected_bg: str | None = None,
    ) -> "SOAAccumulator":
        """Add one image: the caption's named objects and the evaluator's detections."""
        named_set = {_pair(o, allow_none=True) for o in named}
        named_set.discard((None, None))  # "an object": names nothing checkable
        det_set = {_pair(o, allow_none=False) for o in detected}
        det_colours = {c for c, _ in det_set}
        det_shapes = {s for _, s in det_set}

        if named_bg is not None:
            self._bg.append(float(detected_bg == named_bg))

        if not named_set:
            self.n_skipped += 1
            return self
        self.n_images += 1

        found = [
            any((c is None or c == dc) and (s is None or s == ds) for dc, ds in det_set) for c, s in named_set
        ]
        self._all_found.append(float(all(found)))
        self._obj_partial.append(sum(found) / len(found))

        colours = {c for c, _ in named_set if c is not None}
        if colours:
            hit = [c in det_colours for c in colours]
            self._colour_all.append(float(all(hit)))
            self._colour_partial.append(sum(hit) / len(hit))
        shapes = {s for _, s in named_set if s is not None}
        if shapes:
            hit = [s in det_shapes for s in shapes]
            self._shape_all.append(float(all(hit)))
            self._shape_partial.append(sum(hit) / len(hit))

        for c, s in named_set:
            if c is not None and s is not None:
                key = (c, s)
                self._class_count[key] = self._class_count.get(key, 0) + 1
                self._class_hits[key] = self._class_hits.get(key, 0) + int(key in det_set)
        return self

    def compute(self) -> dict:
        """All SOA numbers (fractions in [0, 1]; ``None`` where nothing was counted)."""
        per_class = {f"{c} {s}": self._class_hits[(c, s)] / n for (c, s), n in sorted(self._class_count.items())}
        total = sum(self._class_count.values())
        return dict(
            soa_i=_mean(self._all_found),
            soa_c=_mean(list(per_class.values())),
            soa_i_weighted=(sum(self._class_hits.values()) / total) if total else None,
            colour_acc=_mean(self._colour_all),
            shape_acc=_mean(self._shape_all),
            object_partial=_mean(self._obj_partial),
            colour_partial=_mean(self._colour_partial),
            shape_partial=_mean(self._shape_partial),
            background_acc=_mean(self._bg),
            n_images=self.n_images,
            n_skipped=self.n_skipped,
            n_background=len(self._bg),
            n_classes=len(per_class),
            per_class=per_class,
        )


def soa_scores(
    named: Iterable[Iterable[Any]],
    detected: Iterable[Iterable[Any]],
    named_bg: Iterable[str | None] | None = None,
    detected_bg: Iterable[str | None] | None = None,
) -> dict:
    """One-shot SOA over per-image lists (same definitions as :class:`SOAAccumulator`)."""
    named, detected = list(named), list(detected)
    if len(named) != len(detected):
        raise ValueError(f"got named objects for {len(named)} images but detections for {len(detected)}")
    nbg = list(named_bg) if named_bg is not None else [None] * len(named)
    dbg = list(detected_bg) if detected_bg is not None else [None] * len(named)
    if len(nbg) != len(named) or len(dbg) != len(named):
        raise ValueError("background lists must have one entry per image")
    acc = SOAAccumulator()
    for n, d, nb, db in zip(named, detected, nbg, dbg):
        acc.update(n, d, nb, db)
    return acc.compute()
