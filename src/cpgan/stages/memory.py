"""Stage ``memory``: build the word memory bank M, CPGAN eq. (7) (paper §3.2; DESIGN §3.1; REFERENCE §5.4, §6).

One streaming pass over the **train** split — every caption of every image (REFERENCE §6 choice 4) — in batches
of ``memory.chunk_size`` (image, caption) pairs, in a fixed order (image-major, captions in stored order):

1. :func:`cpgan.models.memory.word_region_attention`: the trained captioner (``captioner`` stage), fed
   ``[BOS, w_1 … w_{T-1}]`` under teacher forcing, gives for each word w_t the attention α over the image's
   regions at the step that *emits* w_t (choice 5: no off-by-one), its argmax q_n and weight a_{q_n,n};
2. :func:`cpgan.models.memory.attention_records` -> one record per word occurrence
   ``(word id, image index, a_{q_n,n}, v_{q_n,n}, q_n)``;
3. :class:`cpgan.models.memory.MemoryBuilder` keeps, per word, the top-K (``memory.top_k``) images by relevance
   a_{q_n,n} (an image's relevance = its best occurrence, choice 6) and finally averages their salient region
   features weighted by relevance, eq. (7).

Choices: the bank is indexed by the caption vocabulary's ids (the captioner shares them; row 0 = ``<end>`` is
zero); stored vectors are the raw detector region features (choice 8), read from the region store without loss
(the builder's feature pool uses the store's dtype); words never seen get a zero row and ``seen = False``
(choice 9); every word is kept, stop words included (choice 10, as the release); images whose store entry has
no valid region contribute no record (their attention would point at padding) and are counted.  Note that
eq. (7)'s relevance a_{q_n,n} is a softmax peak, so it favours images with few valid regions (fewer competitors);
the shapes report below shows how much the kept entries profit from that.

Resumable: every ``memory.checkpoint_every`` batches (and on SIGTERM) the builder's ``state_dict`` (which holds
the records consumed), the next batch index and the report counters are saved to ``memory/state.safetensors``;
a resumed pass continues with the next batch and ends with exactly the bank of an uninterrupted pass.

Outputs: ``memory/memory.safetensors`` with ``bank (V, F)`` float32, ``seen (V,)`` bool, ``occurrences (V,)``
int64 (records per word), ``num_images (V,)`` (images kept, ≤ K), ``image_ids (V, K)`` (train-split image
indices of the kept images, -1 = empty), ``region_ids (V, K)`` (their salient regions q_n) and ``relevance (V, K)``
(their a_{q_n,n}); JSON sidecar with K, the vocabulary sha256 and counts.

Shapes world report (``data.source == "shapes"``):

* ``salient_on_object_rate``: for colour words and shape words (all synonyms, :data:`cpgan.data.shapes.COLOUR_WORDS`,
  :data:`~cpgan.data.shapes.SHAPE_WORDS`), the share of records (one per word occurrence) whose most salient
  region q_n has its box centre inside the ground-truth box of an object of that colour / shape;
  ``salient_on_object_chance`` is the same share when q_n is drawn uniformly among the image's valid regions
  (per record: the fraction of valid regions whose centre lies in such a box); ``..._topk`` is the rate over the
  (word, image) entries finally kept in the bank; ``salient_on_any_object_rate`` (q_n on any object) and
  ``salient_named_given_object_rate`` vs ``..._chance`` (among records whose q_n is on an object, the share on a
  named one, vs the share of the image's on-object regions that are named) separate "finds objects" from
  "finds the object the word names"; ``salient_on_object_ceiling`` (:func:`emit_step_ceiling`) is the best rate
  any captioner can reach at the emitting step, since captions name the objects in a random order;
* a cosine-similarity table of memories — synonym pairs (ball/circle, box/square, big/large, little/small, ...)
  vs unrelated pairs (circle/star, red/blue, ...) — raw and after subtracting the mean memory of the seen words
  (detector features share a large common component), written to ``memory/similarity.json``.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from ..config import Config
from ..data import shapes
from ..data.dataset import SplitData, load_split, load_vocab
from ..data.text import Vocabulary, tokenize
from ..models.memory import MemoryBuilder, attention_records, word_region_attention
from ..utils.checkpoint import atomic_write_json, load_state, save_state, save_weights
from ..utils.logging import echo, progress
from .base import Deadline, Stage, StageContext, StageError
from .captioner import RegionView, load_captioner

STATE = "state.safetensors"
WEIGHTS = "memory.safetensors"
CATEGORIES = ("colour", "shape")


# --------------------------------------------------------------------------------------------------
# Shapes-world report helpers
# --------------------------------------------------------------------------------------------------
def word_categories(vocab: Vocabulary) -> tuple[torch.Tensor, torch.Tensor]:
    """``(colour_of (V,), shape_of (V,))`` int64: canonical colour / shape index of each vocabulary word
    (any synonym, :data:`shapes.COLOUR_WORDS` / :data:`shapes.SHAPE_WORDS`), -1 for other words."""
    colour_of = torch.full((len(vocab),), -1, dtype=torch.int64)
    shape_of = torch.full((len(vocab),), -1, dtype=torch.int64)
    for table, names, out in ((shapes.COLOUR_WORDS, shapes.COLOURS, colour_of),
                              (shapes.SHAPE_WORDS, shapes.SHAPES, shape_of)):
        for canon, forms in table.items():
            for w in forms:
                if w in vocab:
                    out[vocab.word2id[w]] = names.index(canon)
    return colour_of, shape_of


def object_tables(data: SplitData) -> dict[str, torch.Tensor]:
    """Ground-truth objects of a shapes split, padded to the largest count O:
    ``boxes (N, O, 4)`` normalised xyxy, ``colour``/``shape (N, O)`` indices (-1 = no object)."""
    n = len(data)
    o = max([len(r.get("objects", [])) for r in data.records] + [1])
    boxes = torch.zeros(n, o, 4)
    colour = torch.full((n, o), -1, dtype=torch.int64)
    shape = torch.full((n, o), -1, dtype=torch.int64)
    for i, rec in enumerate(data.records):
        for j, ob in enumerate(rec.get("objects", [])):
            boxes[i, j] = torch.tensor([float(x) for x in ob["box"]])
            colour[i, j] = shapes.COLOURS.index(ob["colour"])
            shape[i, j] = shapes.SHAPES.index(ob["shape"])
    return {"boxes": boxes, "colour": colour, "shape": shape}


def on_object(region_boxes: torch.Tensor, word_ids: torch.Tensor, obj_boxes: torch.Tensor, obj_colour: torch.Tensor,
              obj_shape: torch.Tensor, colour_of: torch.Tensor,
              shape_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per record n and region i: is the centre of region box i inside the box of an object that the record's
    word names (its colour for a colour word, its shape for a shape word)?  And inside the box of any object?

    ``region_boxes (N, R, 4)``, ``word_ids (N,)``, ``obj_boxes (N, O, 4)``, ``obj_colour``/``obj_shape (N, O)``
    (-1 = no object), ``colour_of``/``shape_of (V,)`` from :func:`word_categories`.  Returns ``(named (N, R),
    any (N, R))`` bool.
    """
    wc, ws = colour_of[word_ids].unsqueeze(1), shape_of[word_ids].unsqueeze(1)  # (N, 1)
    match = ((wc >= 0) & (obj_colour == wc)) | ((ws >= 0) & (obj_shape == ws))  # (N, O)
    cx = (region_boxes[..., 0] + region_boxes[..., 2]).unsqueeze(-1) / 2  # (N, R, 1)
    cy = (region_boxes[..., 1] + region_boxes[..., 3]).unsqueeze(-1) / 2
    ob = obj_boxes.unsqueeze(1)  # (N, 1, O, 4)
    inside = (cx >= ob[..., 0]) & (cx <= ob[..., 2]) & (cy >= ob[..., 1]) & (cy <= ob[..., 3])  # (N, R, O)
    inside = inside & (obj_colour >= 0).unsqueeze(1)
    return (inside & match.unsqueeze(1)).any(-1), inside.any(-1)


def emit_step_ceiling(records: list[dict]) -> dict[str, float | None]:
    """Best salient-on-object rate any captioner can reach at the step that *emits* each word (eq. 7's
    alignment), on shapes-world captions: the word is not read yet, so an oracle can only attend uniformly
    among the objects that agree with the caption so far (not yet named, and of the size / colour words already
    read for the current phrase); a word's hit chance is the share of those that it names.

    Captions name objects in a random order, so the first colour word of a two-object caption is a guess
    (chance 1/2 unless a size word or equal colours decide). Counted on objects, not detected regions.
    Returns the mean over colour words, shape words and both (None where there are none)."""
    tot = {"colour": [0.0, 0], "shape": [0.0, 0]}
    for rec in records:
        objs = rec.get("objects", [])
        for cap in rec.get("captions", []):
            left, pend = list(range(len(objs))), {}
            for tok in tokenize(cap):
                if tok in shapes.SIZE_OF:
                    pend["size"] = shapes.SIZE_OF[tok]
                    continue
                kind = "colour" if tok in shapes.COLOUR_OF else "shape" if tok in shapes.SHAPE_OF else None
                if kind is None or not left:
                    continue
                val = (shapes.COLOUR_OF if kind == "colour" else shapes.SHAPE_OF)[tok]
                cand = [i for i in left if all(objs[i][k] == v for k, v in pend.items())] or left
                tot[kind][0] += sum(objs[i][kind] == val for i in cand) / len(cand)
                tot[kind][1] += 1
                pend[kind] = val
                if kind == "shape":  # the phrase is complete: that object is named
                    named = [i for i in left if all(objs[i][k] == v for k, v in pend.items())]
                    if named:
                        left.remove(named[0])
                    pend = {}
    out: dict[str, float | None] = {k: (h / n if n else None) for k, (h, n) in tot.items()}
    n_all = tot["colour"][1] + tot["shape"][1]
    out["all"] = (tot["colour"][0] + tot["shape"][0]) / n_all if n_all else None
    return out


def _pairs(groups: list[list[str]]) -> list[tuple[str, str]]:
    return [p for g in groups for p in itertools.combinations(g, 2)]


def similarity_pairs() -> dict[str, list[tuple[str, str, str]]]:
    """Word pairs of the shapes world: ``{"synonyms": [(group, a, b)], "unrelated": [(group, a, b)]}``.

    Synonyms: every pair of surface forms of one shape, colour, size or background (single tokens; the size
    phrases "medium sized"/"mid sized" contribute medium/mid).  Unrelated: every pair of distinct canonical
    shapes and of distinct canonical colours, and small/large.
    """
    size_groups = [["small", "little", "tiny"], ["large", "big"], ["medium", "mid"]]
    syn = [("shape", a, b) for a, b in _pairs(list(shapes.SHAPE_WORDS.values()))]
    syn += [("colour", a, b) for a, b in _pairs(list(shapes.COLOUR_WORDS.values()))]
    syn += [("size", a, b) for a, b in _pairs(size_groups)]
    syn += [("background", a, b) for a, b in _pairs(list(shapes.BACKGROUND_WORDS.values()))]
    unrel = [("shape", a, b) for a, b in itertools.combinations(shapes.SHAPES, 2)]
    unrel += [("colour", a, b) for a, b in itertools.combinations(shapes.COLOURS, 2)]
    unrel += [("size", "small", "large")]
    return {"synonyms": syn, "unrelated": unrel}


def similarity_table(bank: torch.Tensor, seen: torch.Tensor, vocab: Vocabulary) -> dict:
    """Cosine similarities of memories for :func:`similarity_pairs` (pairs whose two words are seen).

    ``cosine``: of the raw memories; ``centred``: after subtracting the mean memory of all seen words (a large
    component shared by every detector feature otherwise dominates the raw cosine).
    """
    seen_ids = seen.nonzero().flatten()
    centre = bank[seen_ids].mean(0) if seen_ids.numel() else torch.zeros(bank.shape[1])

    def cos(x: torch.Tensor, y: torch.Tensor) -> float:
        d = float(x.norm() * y.norm())
        return float(x @ y) / d if d > 0 else float("nan")

    out: dict = {}
    for kind, pairs in similarity_pairs().items():
        table = {}
        for group, a, b in pairs:
            if a in vocab and b in vocab and bool(seen[vocab.word2id[a]]) and bool(seen[vocab.word2id[b]]):
                va, vb = bank[vocab.word2id[a]].double(), bank[vocab.word2id[b]].double()
                table[f"{a}/{b}"] = {"group": group, "cosine": cos(va, vb),
                                     "centred": cos(va - centre.double(), vb - centre.double())}
        out[kind] = table
    for kind in ("synonyms", "unrelated"):
        vals = list(out[kind].values())
        for field, name in (("cosine", "mean"), ("centred", "mean_centred")):
            finite = [v[field] for v in vals if math.isfinite(v[field])]
            out[f"{name}_{kind}"] = float(np.mean(finite)) if finite else None
        out[f"pairs_{kind}"] = len(vals)
    return out


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
def caption_pairs(data: SplitData) -> np.ndarray:
    """``(P, 2)`` int64 (image index, caption index) of every caption of the split, image-major."""
    rows = [(i, k) for i, caps in enumerate(data.captions) for k in range(len(caps))]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def _pad(caps: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad full-length captions with 0 (no cut: every word of every caption gets a record)."""
    lengths = torch.tensor([len(c) for c in caps], dtype=torch.int64)
    out = torch.zeros(len(caps), max(int(lengths.max()), 1), dtype=torch.int64)
    for i, c in enumerate(caps):
        out[i, :len(c)] = torch.tensor(c, dtype=torch.int64)
    return out, lengths


_STAT_KEYS = ("records", "hits", "chance", "any", "obj_records", "obj_chance")


def _new_stats() -> dict:
    return {f"{k}_{c}": 0.0 for c in CATEGORIES for k in _STAT_KEYS}


def salience_counts(on: torch.Tensor, on_any: torch.Tensor, valid: torch.Tensor, q: torch.Tensor) -> dict:
    """Per-record salience statistics from :func:`on_object` masks ``(N, R)``, region ``valid (N, R)`` and the
    salient region ``q (N,)``: ``hits`` (q on a named object), ``chance`` (share of valid regions on a named
    object), ``any`` (q on any object), ``obj_ok`` (some valid region lies on an object) and ``obj_chance``
    (share of the valid on-object regions that are on a named object; 0 where ``obj_ok`` is False)."""
    rows = torch.arange(on.shape[0])
    n_valid = valid.sum(1).clamp_min(1).double()
    n_obj = (on_any & valid).sum(1).double()
    return {"hits": on[rows, q], "chance": (on & valid).sum(1).double() / n_valid, "any": on_any[rows, q],
            "obj_ok": n_obj > 0, "obj_chance": (on & valid).sum(1).double() / n_obj.clamp_min(1)}


def run(cfg: Config, ctx: StageContext) -> dict:
    m = cfg.memory
    if m.top_k < 1 or m.chunk_size < 1:
        raise StageError(f"memory.top_k and memory.chunk_size must be >= 1 (got {m.top_k}, {m.chunk_size})")
    device = ctx.device
    vocab = load_vocab(ctx.run_dir)
    train = load_split(ctx.run_dir, "train")
    ctx.require("captioner")
    model, cap_meta = load_captioner(ctx.run_dir, device, vocab)
    regions = RegionView(ctx.run_dir, "train", train.keys)
    if regions.feat_dim != model.feat_dim:
        raise StageError(f"the captioner expects {model.feat_dim}-d region features but the train store has "
                         f"{regions.feat_dim}; re-run the captioner stage on this detector's output")
    feat_dtype = torch.float16 if regions.feat_dtype == "float16" else torch.float32  # lossless pool
    builder = MemoryBuilder(len(vocab), m.top_k, regions.feat_dim, store_features=m.store_features,
                            feature_dtype=feat_dtype)
    report = cfg.data.source == "shapes"
    if report:
        colour_of, shape_of = word_categories(vocab)
        objs = object_tables(train)

    pairs = caption_pairs(train)
    n_batches = math.ceil(len(pairs) / m.chunk_size)
    state_path = ctx.dir / STATE
    batch, spent, stats, no_region = 0, 0.0, _new_stats(), 0
    if state_path.exists():
        st = load_state(state_path)
        if st["n_batches"] != n_batches or st["pairs"] != len(pairs):
            raise StageError(f"{state_path} belongs to another pass ({st['pairs']} captions); delete it to restart")
        builder.load_state_dict(st["builder"])
        batch, spent, stats, no_region = st["batch"], st["seconds"], st["stats"], st["no_region"]
        echo(f"[memory] resuming at batch {batch}/{n_batches} ({builder.records_consumed} records consumed)")
    resumed_at = batch
    clock = Deadline(0, spent)  # elapsed time only: the pass must finish to give a valid bank

    def save() -> None:
        save_state(state_path, {"builder": builder.state_dict(), "batch": batch, "n_batches": n_batches,
                                "pairs": len(pairs), "seconds": clock.elapsed, "stats": stats,
                                "no_region": no_region})

    bar = progress(total=n_batches, initial=batch, desc="memory")
    while batch < n_batches:
        if ctx.stop_requested:
            save()
            bar.close()
            return {"interrupted": True, "batches": batch, "records": builder.records_consumed}
        sel = pairs[batch * m.chunk_size:(batch + 1) * m.chunk_size]
        uimg, inv = np.unique(sel[:, 0], return_inverse=True)
        feats_u, valid_u, boxes_u = regions.batch(uimg, device)
        has = valid_u.any(1)[torch.from_numpy(inv).to(device)]
        no_region += int((~has).sum())
        keep = has.nonzero().flatten().cpu().numpy()
        if keep.size:
            rows = torch.from_numpy(inv[keep]).to(device)  # row of each kept caption in the unique-image batch
            img_ids = torch.from_numpy(sel[keep, 0])
            caps, lens = _pad([train.captions[int(i)][int(k)] for i, k in sel[keep]])
            caps, lens = caps.to(device), lens.to(device)
            feats = feats_u[rows]
            _, q, a = word_region_attention(model, feats, valid_u[rows], caps, lens)
            # records carry the caption row as "image id" first, to look up boxes/objects for the report
            words, crow, w, f, reg = attention_records(caps, lens, torch.arange(len(keep), device=device), q, a, feats)
            img = img_ids[crow.cpu()]
            builder.update(words, img, w, f if m.store_features else None, reg)
            if report and words.numel():
                wc = words.cpu()
                on, on_any = on_object(boxes_u[rows][crow].cpu(), wc, objs["boxes"][img], objs["colour"][img],
                                       objs["shape"][img], colour_of, shape_of)  # (N, R)
                sc = salience_counts(on, on_any, valid_u[rows][crow].cpu(), reg.cpu())
                for cat, table in (("colour", colour_of), ("shape", shape_of)):
                    sel_c = table[wc] >= 0
                    stats[f"records_{cat}"] += float(sel_c.sum())
                    stats[f"hits_{cat}"] += float(sc["hits"][sel_c].sum())
                    stats[f"chance_{cat}"] += float(sc["chance"][sel_c].sum())
                    stats[f"any_{cat}"] += float(sc["any"][sel_c].sum())
                    stats[f"obj_records_{cat}"] += float(sc["obj_ok"][sel_c].sum())
                    stats[f"obj_chance_{cat}"] += float(sc["obj_chance"][sel_c].sum())
        batch += 1
        bar.update(1)
        if m.checkpoint_every > 0 and batch % m.checkpoint_every == 0 and batch < n_batches:
            save()
            ctx.log(batch, records=builder.records_consumed, minutes=clock.elapsed / 60)
    bar.close()
    save()

    def lookup(image_ids: torch.Tensor, region_ids: torch.Tensor) -> torch.Tensor:
        """Features of (train image, region) pairs from the region store, read 256 images at a time."""
        out = torch.empty(len(image_ids), regions.feat_dim)
        img, reg = image_ids.numpy(), region_ids.numpy()
        for s in range(0, len(img), 256):
            f = regions.store.get_batch(regions.rows[img[s:s + 256]])["feats"]
            out[s:s + 256] = torch.from_numpy(f[np.arange(len(f)), reg[s:s + 256]]).float()
        return out

    mem = builder.finalize(None if m.store_features else lookup)
    seen = mem.seen  # row 0 (<end>) never occurs in a caption: zero and unseen
    tensors = {"bank": mem.bank, "seen": seen, "occurrences": mem.occurrences, "num_images": mem.num_images,
               "image_ids": mem.image_ids, "region_ids": builder.region_ids.clone(), "relevance": mem.weights}
    counts = {"words": len(vocab), "seen_words": int(seen.sum()), "unseen_words": int((~seen).sum()),
              "records": builder.records_consumed, "captions": len(pairs), "images": len(train),
              "captions_without_regions": no_region}
    meta = {"top_k": m.top_k, "vocab_sha256": vocab.sha256(), "feature_dim": regions.feat_dim,
            "feature_source": str(regions.path), "captioner_step": cap_meta.get("step"), "counts": counts,
            "index": "rows are caption-vocabulary ids; image_ids are train-split image indices"}
    save_weights(ctx.dir / WEIGHTS, tensors, meta)
    summary: dict = {"top_k": m.top_k, **counts, "minutes": clock.elapsed / 60, "resumed_at_batch": resumed_at,
                     "state_bytes": builder.state_bytes()}
    if report:
        summary.update(_shapes_report(stats, builder, regions, objs, colour_of, shape_of))
        summary["salient_on_object_ceiling"] = emit_step_ceiling(train.records)
        sim = similarity_table(mem.bank, seen, vocab)
        atomic_write_json(ctx.dir / "similarity.json", sim)
        summary["similarity"] = sim
        def fmt(key: str, cat: str) -> str:
            v = summary[key][cat]
            return "n/a" if v is None else f"{v:.3f}"

        echo(f"[memory] salient region on a named object: colour {fmt('salient_on_object_rate', 'colour')} "
             f"(chance {fmt('salient_on_object_chance', 'colour')}), shape {fmt('salient_on_object_rate', 'shape')} "
             f"(chance {fmt('salient_on_object_chance', 'shape')}; emit-step ceiling "
             f"{fmt('salient_on_object_ceiling', 'colour')} / {fmt('salient_on_object_ceiling', 'shape')}); on any object "
             f"{fmt('salient_on_any_object_rate', 'all')}, named among objects "
             f"{fmt('salient_named_given_object_rate', 'all')} "
             f"(chance {fmt('salient_named_given_object_chance', 'all')})")
        if sim["mean_centred_synonyms"] is not None and sim["mean_centred_unrelated"] is not None:
            echo(f"[memory] centred cosine: synonyms {sim['mean_centred_synonyms']:.3f}, "
                 f"unrelated {sim['mean_centred_unrelated']:.3f}")
    ctx.log(**{k: v for k, v in summary.items() if isinstance(v, (int, float))})
    return summary


def _shapes_report(stats: dict, builder: MemoryBuilder, regions: RegionView, objs: dict,
                   colour_of: torch.Tensor, shape_of: torch.Tensor) -> dict:
    """Salient-region-on-object rates (all records, and the entries kept in the bank) and chance levels.

    ``salient_on_object_rate`` / ``_chance``: q_n on an object the word names / the same for a uniformly drawn
    valid region.  ``salient_on_any_object_rate``: q_n on any object.  ``salient_named_given_object_rate``: of the
    records whose q_n is on an object, the share on a named one; ``_chance``: the share of on-object valid regions
    that are on a named object — a captioner that finds objects but not the *named* one sits at this chance.
    """
    def ratio(a: float, b: float) -> float | None:
        return a / b if b > 0 else None

    def per_cat(num: str, den: str) -> dict:
        out = {c: ratio(stats[f"{num}_{c}"], stats[f"{den}_{c}"]) for c in CATEGORIES}
        out["all"] = ratio(sum(stats[f"{num}_{c}"] for c in CATEGORIES), sum(stats[f"{den}_{c}"] for c in CATEGORIES))
        return out

    # entries kept in the bank (word, image, region) for colour/shape words
    kept = torch.isfinite(builder.weights) & ((colour_of >= 0) | (shape_of >= 0)).unsqueeze(1)
    words, slot = kept.nonzero(as_tuple=True)
    topk: dict = {}
    if words.numel():
        img, reg = builder.image_ids[words, slot], builder.region_ids[words, slot]
        boxes = torch.from_numpy(regions.store.get_batch(regions.rows[img.numpy()])["boxes"]).float()
        on, _ = on_object(boxes, words, objs["boxes"][img], objs["colour"][img], objs["shape"][img], colour_of,
                          shape_of)
        hit = on[torch.arange(on.shape[0]), reg]
        for cat, table in (("colour", colour_of), ("shape", shape_of)):
            sel = table[words] >= 0
            topk[cat] = float(hit[sel].double().mean()) if bool(sel.any()) else None
        topk["all"] = float(hit.double().mean())
    return {"salient_on_object_rate": per_cat("hits", "records"),
            "salient_on_object_chance": per_cat("chance", "records"),
            "salient_on_any_object_rate": per_cat("any", "records"),
            "salient_named_given_object_rate": per_cat("hits", "any"),
            "salient_named_given_object_chance": per_cat("obj_chance", "obj_records"),
            "salient_on_object_records": {c: int(stats[f"records_{c}"]) for c in CATEGORIES},
            "salient_on_object_rate_topk": topk}


STAGE = Stage(name="memory", run=run, upstream=("vocab", "detector", "captioner"), config_keys=("memory",),
              needed=lambda cfg: cfg.model.text_encoder == "mate",
              help="build the word memory bank, eq. (7)", budget_keys=("memory.checkpoint_every",))
