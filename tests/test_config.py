"""Config tree: presets, overrides, typo suggestions, hashing."""
import pytest

from cpgan.config import (Config, ConfigError, list_presets, load_config, parse_override, section_hash, set_key,
                          valid_keys)


def test_presets_exist_and_load():
    presets = list_presets()
    for name in ("shapes-quick", "shapes", "coco-paper", "cub"):
        assert name in presets
        cfg = load_config(name)
        assert isinstance(cfg, Config)
    # `base:` inheritance: shapes overrides only what it names
    quick, full = load_config("shapes-quick"), load_config("shapes")
    assert full.data.image_size == 128 and quick.data.image_size == 64
    assert full.model.text_encoder == quick.model.text_encoder
    cub = load_config("cub")
    assert cub.data.source == "attngan" and cub.text.words_num == 18 and cub.model.gf_dim == 48


def test_overrides_are_typed():
    cfg = load_config("shapes-quick", ["gan.batch_size=8", "model.spectral_norm=false", "gan.lr_g=1e-3",
                                       "data.root=/tmp/x"])
    assert cfg.gan.batch_size == 8 and isinstance(cfg.gan.batch_size, int)
    assert cfg.model.spectral_norm is False
    assert cfg.gan.lr_g == pytest.approx(1e-3)
    assert cfg.data.root == "/tmp/x"
    assert parse_override("a.b=3") == ("a.b", 3)
    # YAML 1.1 reads "2:30:1" as the base-60 integer 9001; a colon-separated value stays text
    assert parse_override("gan.tiscl_anneal=2:30:1") == ("gan.tiscl_anneal", "2:30:1")
    assert load_config("shapes-quick", ["gan.tiscl_anneal=2:30:1"]).gan.tiscl_anneal == "2:30:1"


def test_config_file_keeps_colon_values_as_text(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("gan:\n  tiscl_anneal: 2:30:1\n  lr_g: 1.0e-3\n  batch_size: 8\n")
    cfg = load_config(str(f))
    assert cfg.gan.tiscl_anneal == "2:30:1" and cfg.gan.lr_g == pytest.approx(1e-3) and cfg.gan.batch_size == 8


def test_typo_names_nearest_key():
    with pytest.raises(ConfigError, match="did you mean 'gan.batch_size'"):
        load_config("shapes-quick", ["gan.batch_sze=8"])
    with pytest.raises(ConfigError, match="expects an integer"):
        load_config("shapes-quick", ["gan.batch_size=abc"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_config("shapes-quick", ["model.cond_disc=patch"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config("shapes-quick", ["gan.batch_size"])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="presets: .*shapes-quick"):
        load_config("shapes-quik")


def test_yaml_file_with_base(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("base: shapes-quick\ngan:\n  batch_size: 4\n")
    cfg = load_config(str(p))
    assert cfg.gan.batch_size == 4 and cfg.data.source == "shapes"
    bad = tmp_path / "bad.yaml"
    bad.write_text("gan:\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown config key 'gan.batchsize'"):
        load_config(str(bad))


def test_section_hash_tracks_only_named_keys():
    a, b = Config(), Config()
    set_key(b, "gan.batch_size", 7)
    assert section_hash(a, ["damsm", "data"]) == section_hash(b, ["damsm", "data"])
    assert section_hash(a, ["gan"]) != section_hash(b, ["gan"])
    assert "model.cond_disc" in valid_keys()


def test_hash_neutral_option_leaves_the_hash_of_older_configs_unchanged():
    """A hash-neutral option at its default hashes like a config that predates it; any other value does not."""
    import dataclasses

    from cpgan.config import hash_of, to_dict

    cfg = Config()
    assert cfg.captioner.attention == "additive"
    older = to_dict(cfg)["captioner"]
    del older["attention"]  # the section as written before the option existed
    assert section_hash(cfg, ["captioner"]) == hash_of({"captioner": older})
    set_key(cfg, "captioner.attention", "dot")
    assert section_hash(cfg, ["captioner"]) != hash_of({"captioner": older})
    # only options that declare it are left out
    neutral = [f.name for f in dataclasses.fields(cfg.captioner) if f.metadata.get("hash_neutral")]
    assert neutral == ["attention"]
