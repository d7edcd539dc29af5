"""Stage ``vocab``: tokenise every caption, build the vocabulary from the train split, cache caption ids.

Tokenizer as AttnGAN/CPGAN (lower-case, ``\\w+``, non-ASCII dropped; :mod:`cpgan.data.text`). Id 0 is
``<end>``/padding. Captions with no token, and words unseen in train (test splits), are dropped and counted;
an image left without any caption is dropped from its split and counted.

Outputs: ``vocab/vocab.json`` and ``vocab/captions_<split>.json`` = ``{"keep": [record indices], "ids":
[[caption ids...] per kept image]}``.
"""
from __future__ import annotations

from collections import Counter

from ..config import Config
from ..data.dataset import load_records, resolve_data_dir
from ..data.text import Vocabulary, tokenize
from ..utils.checkpoint import atomic_write_json
from .base import Stage, StageContext


def splits_of(cfg: Config) -> list[str]:
    return ["train", "test", "test_novel"] if cfg.data.source == "shapes" else ["train", "test"]


def run(cfg: Config, ctx: StageContext) -> dict:
    data_dir = resolve_data_dir(ctx.run_dir)
    tokens: dict[str, list[list[list[str]]]] = {}
    for split in splits_of(cfg):
        recs, _ = load_records(data_dir, split)
        tokens[split] = [[tokenize(c) for c in r.get("captions", [])] for r in recs]
    vocab = Vocabulary.build([t for caps in tokens["train"] for t in caps], min_count=cfg.text.min_count)
    vocab.save(ctx.dir / "vocab.json")
    summary: dict = {"vocab_size": len(vocab), "vocab_sha256": vocab.sha256()}
    for split, per_image in tokens.items():
        keep, ids = [], []
        empty = unknown = dropped_images = 0
        oov: Counter = Counter()
        for i, caps in enumerate(per_image):
            enc = []
            for toks in caps:
                if not toks:
                    empty += 1
                    continue
                cid, unk = vocab.encode(toks, on_unknown="drop")
                oov.update(unk)
                unknown += len(unk)
                if cid:
                    enc.append(cid)
                else:
                    empty += 1
            if enc:
                keep.append(i)
                ids.append(enc)
            else:
                dropped_images += 1
        atomic_write_json(ctx.dir / f"captions_{split}.json", {"keep": keep, "ids": ids})
        summary[f"{split}_images"] = len(keep)
        summary[f"{split}_captions"] = sum(len(c) for c in ids)
        summary[f"{split}_dropped_captions"] = empty
        summary[f"{split}_dropped_images"] = dropped_images
        summary[f"{split}_unknown_words"] = unknown
        if oov:
            summary[f"{split}_top_unknown"] = [w for w, _ in oov.most_common(10)]
    ctx.log(**{k: v for k, v in summary.items() if not isinstance(v, list)})
    return summary


STAGE = Stage(name="vocab", run=run, upstream=("data",), config_keys=("text.min_count",),
              help="tokenise captions, build the vocabulary, cache caption ids")
