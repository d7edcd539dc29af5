"""One typed configuration tree for every stage (DESIGN §2, §7).

A run is described by a :class:`Config`: YAML presets in ``configs/`` fill it in, dotted overrides on the
command line (``--set gan.batch_size=8``) adjust it, and the resolved tree is written to the run directory.
Unknown keys are errors that name the nearest valid key; values are checked against the field types.

Stages read only the sections they declare (``stages.base.Stage.config_keys``), and the hash of those
sections decides whether a finished stage can be reused.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem the user can fix (bad key, bad value, unknown preset)."""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
HASH_NEUTRAL = {"hash_neutral": True}
"""Field metadata: the option is left out of stage hashes while it holds its default (see :func:`hash_dict`)."""


@dataclass
class DataConfig:
    """Where the images and captions come from (DESIGN §2, §5)."""

    source: str = "shapes"
    """``shapes`` (built-in synthetic world), ``coco`` (raw MS-COCO 2014 layout), ``attngan`` (the
    AttnGAN/CPGAN layout: captions.pickle, train|test/filenames.pickle, text/, images/) or ``folder``
    (images with same-named .txt files, or a JSONL manifest)."""
    root: str = ""
    """Data set folder. For ``shapes`` an empty root means: generate into ``RUN_DIR/data``."""
    image_size: int = 64
    """Largest (final) image resolution; lower stage resolutions are derived from it."""
    n_train: int = 8000
    n_test: int = 1000
    n_test_novel: int = 500
    seed: int = 0
    captions_per_image: int = 5
    augment: bool = False
    """AttnGAN augmentation (resize to 76/64 of the size, random crop, horizontal flip). Off for the shapes
    world, whose captions name left/right relations and whose judge needs whole objects."""
    test_fraction: float = 0.1
    """``folder`` source without explicit splits: share of images (by key hash) put in ``test``."""
    manifest: str = ""
    """``folder`` source: optional JSONL manifest (``{"image": ..., "captions": [...], "split": ...}``)."""
    max_images: int = 0
    """Use at most this many images per split (0 = all); handy for smoke tests on large data sets."""
    num_workers: int = 0


@dataclass
class TextConfig:
    """Tokenisation and caption lengths (DESIGN §3.3: words per caption)."""

    words_num: int = 20
    """Maximum words per caption in GAN training (CPGAN release: 20). Longer captions are cut by a random
    order-preserving subset, as AttnGAN does, in training only."""
    eval_words_num: int = 20
    min_count: int = 1


@dataclass
class ModelConfig:
    """Architecture and ablation switches (DESIGN §3, §3.6)."""

    text_encoder: str = "plain"
    """``plain`` (AttnGAN RNN_ENCODER) or ``mate`` (Memory-Attended Text Encoder)."""
    image_encoder: str = "grid"
    """``grid`` (AttnGAN CNN_ENCODER) or ``oaie`` (Object-Aware Image Encoder)."""
    cond_disc: str = "global"
    """``global`` (AttnGAN conditional head) or ``fgcd`` (Fine-grained Conditional Discriminator)."""
    embedding_dim: int = 256
    word_dim: int = 300
    memory_dim: int = 1024
    z_dim: int = 100
    condition_dim: int = 100
    gf_dim: int = 48
    df_dim: int = 96
    r_num: int = 3
    branch_num: int = 3
    base_size: int = 64
    """Resolution of the first stage; stage i has base_size * 2**i pixels."""
    image_backbone: str = "small"
    """Image-encoder trunk: ``small`` (CPU presets, trained whole) or ``inception`` (frozen Inception-v3)."""
    image_backbone_width: int = 64
    inception_weights: str = ""
    """Local file with ImageNet Inception-v3 weights for the ``inception`` backbone (nothing is downloaded)."""
    grid_size: int = 8
    num_regions: int = 36
    fgcd_patches: int = 4
    spectral_norm: bool = True
    d_batch_norm: bool = True
    """BatchNorm in the discriminators (AttnGAN/CPGAN: on). Real and fake pass D in separate batches, so BN
    normalises each by its own statistics; off leaves spectral norm alone (common in hinge GANs)."""
    released_mask_bug: bool = False
    """Reproduce the released word-attention mask indexing (``mask.repeat(queryL, 1)``, DESIGN §4)."""
    ca_noise: float = field(default=1.0, metadata=HASH_NEUTRAL)
    """Scale of conditioning augmentation's sample, ``c = mu + ca_noise * sigma * eps`` (1 = the release; 0 =
    ``c = mu``; not in the paper). On the shapes world the CA collapses to its prior (mu varies by ~0.1 between
    captions against a unit sample), so the first stage gets almost no caption; 0 removes the sample, but did
    not by itself make the first stage use the caption; with ``gan.tiscl_stages=all`` it does (README)."""
    stage_grad: float = field(default=1.0, metadata=HASH_NEUTRAL)
    """Factor on the gradient that flows from each refinement stage back into the previous stage's features
    (the forward pass is unchanged; 1 = the release, 0 = every stage learns only from its own losses, as
    StackGAN-v1 trained its stages apart; not in the paper). With 1, TISCL's gradient at the last image reaches
    the first stage through the shared features and swamps its discriminator's (README)."""


@dataclass
class EvaluatorConfig:
    """The shapes-world judge (DESIGN §6): a grid detector independent of the project's detector.

    Defaults are the measured recipe (``cpgan.evaluator_train.RECIPE_SHAPES_64``): 3,000 steps of batch 32,
    Adam 3e-3, widths (16, 32, 64) -> SOA-I 0.974 / 0.983 on real test images (two seeds) in ~5 min.
    """

    steps: int = 3000
    max_minutes: float = 10.0
    batch_size: int = 32
    lr: float = 3e-3
    width: int = 16
    """Channel width w of the first block; the trunk is (w, 2w, 4w)."""
    seed: int = 20241


@dataclass
class DetectorConfig:
    """YOLOv3-style detector providing top-36 boxes and 1024-d region features (DESIGN §3.1, §3.2)."""

    cfg: str = "configs/darknet/shapes-small.cfg"
    weights: str = ""
    """Darknet ``.weights`` file; when given, the detector is loaded instead of trained."""
    input_size: int = 64
    steps: int = 3000
    max_minutes: float = 6.0
    batch_size: int = 32
    lr: float = 1e-3
    conf_thresh: float = 0.05
    nms_thresh: float = 0.45
    feature_layer: int = -1
    """Darknet layer index whose output feeds RoIAlign for region features (-1 = the cfg's default)."""
    seed: int = 0


@dataclass
class CaptionerConfig:
    """Bottom-Up/Top-Down captioner used to find each word's salient region (DESIGN §3.1)."""

    embed_dim: int = 256
    hidden_dim: int = 512
    att_dim: int = 256
    steps: int = 2000
    max_minutes: float = 4.0
    batch_size: int = 64
    lr: float = 5e-4
    seed: int = 0
    dropout: float = 0.5
    """Dropout on the language-LSTM output before the word classifier (common BUTD reimplementations)."""
    init_std: float = 0.01
    """Weights ~ N(0, init_std), biases 0 (BUTD paper)."""
    feature_center: bool = False
    """Subtract the mean training region feature from every region feature inside the captioner (not in BUTD;
    see :class:`cpgan.models.captioner.UpDownCaptioner`). The memory (eq. 7) still averages the raw features."""
    mean_feature: bool = True
    """Feed the mean region feature v̄ to the attention LSTM (BUTD). False makes attention the only visual path
    (not in BUTD; see :class:`cpgan.models.captioner.UpDownCaptioner`)."""
    attention: str = field(default="additive", metadata=HASH_NEUTRAL)
    """``additive`` (BUTD) or ``dot`` (scaled dot product; our option, see the captioner module)."""
    max_words: int = 20
    """Training captions are cut to their first ``max_words`` words (release: 20; ruotianluo: 16)."""
    grad_clip: float = 0.1
    """Clip every gradient element to [-grad_clip, grad_clip] (ruotianluo ``grad_clip_mode=value``; 0 = off)."""
    log_every: int = 50
    """Steps between training-loss log lines."""
    val_every: int = 500
    """Steps between validations on the test split (teacher-forced loss, greedy samples); also at the end."""
    val_images: int = 500
    """Validate on (all captions of) the first ``val_images`` test images (0 = all)."""
    num_samples: int = 5
    """Test images whose greedy-decoded captions are logged at every validation (sanity check)."""
    checkpoint_every: int = 200
    """Steps between resumable checkpoints (also written on SIGTERM and when the time budget ends)."""


@dataclass
class MemoryConfig:
    """Word memory, eq. (7)."""

    top_k: int = 10
    """K: number of most relevant images whose salient regions are averaged per word."""
    chunk_size: int = 256
    """(image, caption) pairs per batch of the streaming pass (one captioner forward each)."""
    checkpoint_every: int = 50
    """Batches between resumable checkpoints of the streaming pass (also written on SIGTERM)."""
    store_features: bool = True
    """Keep the top-K winners' region features in memory during the pass (V·K·F values, in the region store's
    dtype, so lossless); False keeps only (image, region) pointers and reads the winners' features back from
    the region store at the end (for very large vocabularies or K)."""


@dataclass
class DamsmConfig:
    """DAMSM pretraining of the text and image encoders (DESIGN §3.3, AttnGAN pretrain_DAMSM)."""

    epochs: int = 600
    max_minutes: float = 8.0
    batch_size: int = 48
    lr: float = 2e-3
    lr_decay: float = 0.98
    rnn_grad_clip: float = 0.25
    words_num: int = 15
    gamma1: float = 4.0
    gamma2: float = 5.0
    gamma3: float = 10.0
    dropout: float = 0.5
    seed: int = 0
    text_weights: str = ""
    """Optional AttnGAN ``text_encoder*.pth`` to start from / use frozen."""
    image_weights: str = ""
    """Optional AttnGAN ``image_encoder*.pth`` to start from / use frozen."""
    hard_negatives: str = field(default="", metadata=HASH_NEUTRAL)
    """Word-swap hard negatives in training (not in the paper; ``cpgan.negatives``): comma-separated of
    ``shape`` and ``colour``, each optionally ``:N``; each image's caption with one shape (colour) word swapped
    for another class (N different classes at the same word) joins that image's image->caption softmax, so the
    encoders must tell the named shapes apart. Shapes world only. Empty = off (AttnGAN)."""
    augment: str = field(default="", metadata=HASH_NEUTRAL)
    """Differentiable augmentation (a ``gan.augment`` policy, ``cpgan.diffaug``) of every training image before
    the image encoder (not in the paper; validation and R-precision see clean images). ``noise:SIGMA`` makes the
    image encoder robust to pixel noise: trained on clean images alone, its features break down at SIGMA 0.1
    (top-1 of 32 falls from 0.98 to 0.68, 0.08 at 0.2), the sign of an encoder whose gradient — TISCL's, which
    trains G — points along pixel patterns rather than shapes. Region features of real images (OAIE) come from
    the clean image. Empty = off (AttnGAN)."""


@dataclass
class GanConfig:
    """Generator/discriminator training (DESIGN §3.4–3.5)."""

    steps: int = 100000
    max_minutes: float = 15.0
    batch_size: int = 32
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    lambda_tiscl: float = 5.0
    tiscl_warmup: int = field(default=0, metadata=HASH_NEUTRAL)
    """Steps over which the TISCL weight ramps linearly from 0 to ``lambda_tiscl`` (0 = the full weight from
    the first step, as the paper). Not in the paper: lets the adversarial terms shape backgrounds and layout
    before the DAMSM term pulls colours in."""
    tiscl_anneal: str = field(default="", metadata=HASH_NEUTRAL)
    """``START:END:FINAL`` — λ of TISCL falls linearly from ``lambda_tiscl`` at step START to FINAL at step END
    and stays there (empty = the fixed λ of the paper). Not in the paper: a large λ teaches colours and
    backgrounds fast, but G then pleases the frozen DAMSM with patterns the discriminators would reject; a
    smaller λ late in training gives the adversarial terms the say over how objects look."""
    kl_weight: float = 1.0
    ema_decay: float = 0.999
    """EMA of the generator weights used for sampling (0 = off)."""
    standing_batches: int = 8
    """Training batches over which the EMA generator's BatchNorm statistics are re-estimated before it
    samples or is saved (BigGAN's standing statistics; 0 = keep the raw generator's running statistics)."""
    init: str = "attngan"
    """Weight initialisation of G and the Ds: ``attngan`` (its trainer's ``weights_init``: orthogonal
    conv/linear weights, BN weight ~ N(1, 0.02)) or ``pytorch`` (the layers' defaults)."""
    amp: str = ""
    """Mixed precision of the forward passes: ``bf16`` (``torch.autocast`` with bfloat16; losses, optimiser and
    weights stay float32), empty = float32, or ``auto`` = bf16 where the hardware has native bfloat16 (a CPU
    with AVX512-BF16/AMX, a GPU that supports it) and float32 elsewhere. On an AVX512-BF16 CPU a shapes-quick
    step is about 1.5x faster with the same quality per step."""
    augment: str = ""
    """Differentiable augmentation of every image the discriminators see, real and generated alike
    (DiffAugment, Zhao et al. 2020; not in the paper): comma-separated of ``translation`` (shift by up to 1/8 of
    the size, zero padding), ``cutout`` (one zeroed square of half the size), ``lowpass`` (2x2 mean, upsampled
    back), ``zoom`` (a random crop of 3/4 to all of the side, resized back) and ``noise`` / ``noise:SIGMA``
    (Gaussian pixel noise, default SIGMA 0.1); see ``cpgan.diffaug``. Colour jitter is not offered: the captions
    name colours. Empty = off (the paper)."""
    tiscl_augment: str = field(default="", metadata=HASH_NEUTRAL)
    """DiffAugment policy (as ``augment``) applied to the generated image before the DAMSM image encoder in
    TISCL — an expectation over transformations, so G cannot please the encoder with pixel-exact patterns.
    Empty = off (the paper)."""
    tiscl_views: int = field(default=1, metadata=HASH_NEUTRAL)
    """Independently augmented views (``tiscl_augment``) of each generated image that TISCL averages over
    (1 = one view; not in the paper). Each view gets its own DAMSM loss (the batch's other captions stay the
    negatives), and the mean is the TISCL term: a lower-variance expectation over transformations, as CLIP
    guidance averages many augmented crops so that the generator draws the object rather than a pattern that
    pleases the encoder at one position. The views go through the image encoder as one batch."""
    tiscl_hard_negatives: str = field(default="", metadata=HASH_NEUTRAL)
    """Word-swap hard negatives in TISCL (as ``damsm.hard_negatives``; not in the paper): the generated image
    must match its caption better than the caption with one shape (colour) word swapped; ``shape:7`` = against
    every other shape at that word. Empty = off."""
    d_hard_negatives: str = field(default="", metadata=HASH_NEUTRAL)
    """The mismatched caption X̄ of eq. (5)'s ⅓[1+D^c(I, X̄)] term (not in the paper): ``shape`` (or ``colour``) =
    the image's own caption with one shape (colour) word swapped (``cpgan.negatives``), so that the conditional
    discriminator must check that attribute; empty = another image's caption (the paper)."""
    tiscl_balance: float = field(default=0.0, metadata=HASH_NEUTRAL)
    """Adaptive TISCL weight (not in the paper; after the adaptive GAN weight of Esser et al. 2021): > 0 caps λ at
    every step so that the norm of λ·TISCL's gradient at the last stage image is at most this many times that
    of the last discriminator's adversarial loss (two extra partial backward passes, through D and the DAMSM
    image encoder, not through G). 0 = a fixed λ (the paper). With a fixed λ 10 on ``shapes-quick`` the ratio
    is ~70, and the last stage draws what fools the DAMSM rather than what D calls real."""
    tiscl_stages: str = field(default="last", metadata=HASH_NEUTRAL)
    """Which stage images TISCL scores: ``last`` (the paper, AttnGAN) or ``all`` (every stage's image, resized
    bilinearly to the last stage's size, each term at weight λ; not in the paper) — a direct caption signal for
    the first stage, whose own discriminator is otherwise all that teaches it the caption. With
    ``model.ca_noise=0 model.stage_grad=0`` the 32-px stage of ``shapes-quick`` draws caption-coloured objects
    (judge colour 0.55 vs 0.04) but the last stage was no better after 1,000 steps (README)."""
    checkpoint_every: int = 200
    sample_every: int = 200
    log_every: int = 20
    eval_images: int = 300
    """Shapes world: evaluator scores of the EMA generator on this many test captions at every sample step
    (the training curves of the report)."""
    seed: int = 0


@dataclass
class EvaluateConfig:
    """Metrics (DESIGN §6)."""

    n_images: int = 1000
    batch_size: int = 50
    truncation: float = 0.0
    """Truncated-normal noise bound at sampling (BigGAN); 0 = plain N(0, 1) as in training. On an
    under-trained generator truncation at 1.0 collapsed the shapes (colour accuracy 0.03 vs 0.14)."""
    r_precision_folds: int = 10
    inception_weights: str = ""
    independent_damsm: str = ""
    """A run directory holding a finished ``damsm`` stage trained with ``model.text_encoder=plain`` and
    ``model.image_encoder=grid`` on the same vocabulary (e.g. another seed): its encoders measure R-precision
    (``r_precision_dmgan_indep``) independently of the DAMSM the generator was trained against. Empty = off."""
    seed: int = 0


@dataclass
class Config:
    """The whole tree. ``name`` labels the run; ``device`` is ``auto``, ``cpu`` or ``cuda[:N]``."""

    name: str = "run"
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    damsm: DamsmConfig = field(default_factory=DamsmConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": ("shapes", "coco", "attngan", "folder"),
    "model.text_encoder": ("plain", "mate"),
    "model.image_encoder": ("grid", "oaie"),
    "model.cond_disc": ("global", "fgcd"),
    "model.image_backbone": ("small", "inception"),
    "gan.tiscl_stages": ("last", "all"),
}


# --------------------------------------------------------------------------------------------------
# Conversion, validation, overrides
# --------------------------------------------------------------------------------------------------
def to_dict(cfg: Any) -> dict:
    """The config tree as plain nested dicts (JSON/YAML serialisable)."""
    return dataclasses.asdict(cfg)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys.extend(_all_keys(t, prefix + f.name + "."))
        else:
            keys.append(prefix + f.name)
    return keys


def valid_keys() -> list[str]:
    """Every dotted leaf key of :class:`Config`."""
    return _all_keys(Config)


def _unknown_key(key: str, candidates: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; run `cpgan config --keys` to list valid keys"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, typ: type) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            if isinstance(value, str):
                try:
                    return int(value)
                except ValueError:
                    pass
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}") from None
    if typ is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        value = str(value)
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(CHOICES[key])}; got '{value}'")
        return value
    raise ConfigError(f"config key '{key}' has unsupported type {typ}")


def from_dict(data: dict, base: Config | None = None) -> Config:
    """Build a :class:`Config` from nested dicts, on top of ``base`` (defaults when None)."""
    cfg = base if base is not None else Config()
    for key, value in _flatten(data).items():
        set_key(cfg, key, value)
    return cfg


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set a dotted leaf key, checking the key exists and the value has the right type."""
    keys = valid_keys()
    if key not in keys:
        raise _unknown_key(key, keys)
    parts = key.split(".")
    obj: Any = cfg
    for p in parts[:-1]:
        obj = getattr(obj, p)
    hints = typing.get_type_hints(type(obj))
    setattr(obj, parts[-1], _coerce(key, value, hints[parts[-1]]))


def get_key(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1 base-60 numbers: ``2:30:1`` stays the text it looks like
    (``gan.tiscl_anneal``), where ``safe_load`` would read the integer 9001."""


def _number_or_text(construct):
    def build(loader, node):
        return node.value if ":" in node.value else construct(loader, node)
    return build


_Loader.add_constructor("tag:yaml.org,2002:int", _number_or_text(yaml.SafeLoader.construct_yaml_int))
_Loader.add_constructor("tag:yaml.org,2002:float", _number_or_text(yaml.SafeLoader.construct_yaml_float))


def _yaml_load(text: str) -> Any:
    """``yaml.safe_load`` for config files and ``--set`` values, minus base-60 numbers (:class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[str, Any]:
    """``'gan.batch_size=8'`` -> ``('gan.batch_size', 8)`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. gan.batch_size=8")
    key, raw = text.split("=", 1)
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


# --------------------------------------------------------------------------------------------------
# Presets and files
# --------------------------------------------------------------------------------------------------
def config_dir() -> Path:
    """The repository's ``configs/`` folder (next to ``src/``), or ``$CPGAN_CONFIG_DIR``."""
    env = os.environ.get("CPGAN_CONFIG_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "configs"


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def list_presets() -> list[str]:
    d = config_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def _read_yaml(path: Path) -> dict:
    try:
        data = _yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections")
    return data


def load_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """Load a preset name (``shapes-quick``) or a YAML file, then apply ``key=value`` overrides.

    A YAML file may say ``base: PRESET`` to start from another preset.
    """
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        cand = config_dir() / f"{name_or_path}.yaml"
        if not cand.exists():
            if path.suffix in (".yaml", ".yml"):
                raise ConfigError(f"config file '{name_or_path}' not found")
            presets = ", ".join(list_presets()) or "(none found)"
            raise ConfigError(f"unknown preset '{name_or_path}'; presets: {presets}")
        path = cand
    cfg = _load_file(path, seen=set())
    for ov in overrides or []:
        key, value = parse_override(ov)
        set_key(cfg, key, value)
    return cfg


def _load_file(path: Path, seen: set[Path]) -> Config:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    seen.add(path)
    data = _read_yaml(path)
    base_name = data.pop("base", None)
    base = None
    if base_name:
        base_path = Path(base_name)
        if not base_path.suffix:
            base_path = config_dir() / f"{base_name}.yaml"
        elif not base_path.is_absolute():
            base_path = path.parent / base_path
        if not base_path.exists():
            raise ConfigError(f"{path}: base '{base_name}' not found; presets: {', '.join(list_presets())}")
        base = _load_file(base_path, seen)
    try:
        return from_dict(data, base)
    except ConfigError as e:
        raise ConfigError(f"{path.name}: {e}") from None


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def hash_of(obj: Any) -> str:
    """Stable short hash of a JSON-serialisable object."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def hash_dict(obj: Any) -> Any:
    """``obj`` (a config node) as plain data for hashing: like :func:`to_dict`, but fields declared with
    ``metadata=HASH_NEUTRAL`` are left out while they hold their default.

    A new option whose default reproduces the old behaviour is declared hash-neutral, so adding it does not
    invalidate (and re-train) every finished stage of existing run directories; setting it to anything else
    changes the hash as usual. Never mark an option whose default changes what a stage computes."""
    if not dataclasses.is_dataclass(obj):
        return obj
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if f.metadata.get("hash_neutral") and f.default is not dataclasses.MISSING and v == f.default:
            continue
        out[f.name] = hash_dict(v)
    return out


def section_hash(cfg: Config, keys: list[str]) -> str:
    """Hash of the named sections / dotted keys of ``cfg`` (what a stage's result depends on)."""
    return hash_of({k: hash_dict(get_key(cfg, k)) for k in keys})
