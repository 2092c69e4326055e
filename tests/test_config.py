import re
import pytest

from illume_ref.config import (PRESETS, STAGE_TASKS, ConfigError, EncoderConfig, IllumeRefConfig, StageConfig, get_config)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_build_validate_and_round_trip(preset, tmp_path):
    cfg = get_config(preset)
    assert cfg.preset == preset
    assert cfg.tokenizer.tokens_per_image == cfg.encoder.num_tokens
    for suffix in (".yaml", ".json"):
        path = cfg.save(tmp_path / f"{preset}{suffix}")
        assert IllumeRefConfig.load(path) == cfg
        assert get_config(path=path) == cfg


def test_full_preset_has_the_papers_values():
    c = get_config("full")
    assert (c.quantizer.num_codes, c.tokenizer.tokens_per_image, c.num_visual_tokens) == (16384, 256, 16384)
    assert (c.encoder.image_size, c.stage1.image_size, c.stage2.image_size) == (224, 224, 224)
    assert c.stage1.lrs == {"adapter": 1e-3, "visual_embed": 2e-4}
    assert (c.stage1.train.batch_size, c.stage1.train.steps) == (256, 5000)
    assert c.stage2.lrs == {"adapter": 5e-5, "llm": 5e-5}
    assert (c.stage2.train.batch_size, c.stage2.train.steps) == (1024, 15000)
    assert c.stage3.lrs == {"vision_encoder": 2e-6, "adapter": 2e-5, "llm": 2e-5}
    assert (c.stage3.train.batch_size, c.stage3.train.steps) == (1024, 8000)
    assert (c.stage3.anyres, c.stage3.max_slices, c.stage3.base_resolution) == (True, 9, 448)
    assert c.decoder.image_size == 512 and c.self_enhance.num_captions == 50000


def test_overrides_parse_values_and_types():
    c = get_config("toy", ["quantizer.num_codes=1024", "quantizer.beta=0.5", "world.antialias=true",
                           "world.colors=[red, blue]", "stage2.lrs.llm=1e-4", "llm.tokenizer_path=null"])
    assert c.quantizer.num_codes == 1024 and isinstance(c.quantizer.num_codes, int)
    assert c.quantizer.beta == 0.5 and c.world.antialias is True
    assert c.world.colors == ["red", "blue"] and c.stage2.lrs["llm"] == 1e-4
    assert get_config("toy").quantizer.num_codes == 512  # presets are fresh objects every time


@pytest.mark.parametrize("overrides,message", [
    (["quantizer.num_cods=8"], "unknown config key 'quantizer.num_cods'. Did you mean 'num_codes'"),
    (["qantizer.num_codes=8"], "Did you mean 'quantizer'"),
    (["encoder.patch_size=7"], "image size 64 is not divisible by patch size 7"),
    (["tokenizer.tokens_per_image=16"], "16 tokens per image, but the encoder gives a 8x8 token grid"),
    (["tokenizer.tokens_per_image=50"], "50 tokens do not form a square grid"),
    (["quantizer.num_codes=lots"], "'quantizer.num_codes' expects an integer, got 'lots'"),
    (["world.antialias=3"], "'world.antialias' expects true/false, got 3"),
    (["stage1.lrs.adaptor=1e-3"], "unknown parameter group 'adaptor'. Did you mean 'adapter'"),
    (["world.max_objects=12"], "12 objects do not fit in a 3x3 grid"),
    (["stage2.image_size=32"], "32 px, but the encoder takes 64 px inputs"),
    (["decoder.prediction_type=x0"], "expected 'epsilon', 'v_prediction' or 'sample', got 'x0'"),
    (["decoder.spatial_channels=-1"], "must be >= 0 (or None for the default), got -1"),
    (["quantizer.num_codes"], "must look like key.path=value"),
])
def test_bad_configs_name_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        get_config("toy", overrides)


def test_unknown_preset_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'tyo'. Did you mean 'toy'"):
        get_config("tyo")
    bad = tmp_path / "bad.yaml"
    bad.write_text("encoder:\n  hidden: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*unknown config key 'encoder.hidden'.*'hidden_size'"):
        IllumeRefConfig.load(bad)
    with pytest.raises(ConfigError, match="use a .yaml, .yml or .json"):
        get_config("toy").save(tmp_path / "cfg.txt")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        IllumeRefConfig.load(tmp_path / "nope.yaml")


def test_part_configs_check_themselves():
    with pytest.raises(ConfigError, match="needs a local path or hub id"):
        EncoderConfig(kind="hf")
    with pytest.raises(ConfigError, match="must train at least one parameter group"):
        StageConfig(name="stage1", lrs={})
    e = EncoderConfig(image_size=448, patch_size=14, token_merge=2, hidden_size=1024, num_heads=16)
    assert (e.grid, e.num_tokens, e.output_dim) == (16, 256, 4096)


def _numeric_fields(cfg, prefix=""):
    "(dotted name, value) of every number (or list of numbers) of a config, nested sections included."
    import dataclasses
    for f in dataclasses.fields(cfg):
        v, name = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v): yield from _numeric_fields(v, name + ".")
        elif isinstance(v, (int, float)) and not isinstance(v, bool): yield name, v
        elif isinstance(v, list) and v and all(isinstance(x, int) for x in v): yield name, v
        elif f.type.startswith("Optional[int]"): yield name, v


def test_every_size_count_and_rate_refuses_a_negative_value_by_name():
    "Every numeric field of every section: -1 (and NaN for floats) is refused with the dotted field named."
    names = [n for n, _ in _numeric_fields(get_config("toy"))]
    assert {"llm.hidden_size", "decoder.train.steps", "tokenizer.train.schedule_steps", "eval.fid_samples"} <= set(names)
    for name, value in _numeric_fields(get_config("toy")):
        if name == "encoder.select_layer": continue                  # counts from the end when negative
        bad = [-1] if isinstance(value, list) else -1
        with pytest.raises(ConfigError, match=re.escape(f"config field '{name}'")):
            get_config("toy", {name: bad})
        if isinstance(value, float):
            with pytest.raises(ConfigError, match=re.escape(f"'{name}' expects a finite number, got nan")):
                get_config("toy", {name: float("nan")})


@pytest.mark.parametrize("override,message", [
    ("llm.hidden_size=-256", "'llm.hidden_size': must be positive, got -256"),
    ("encoder.num_layers=-1", "'encoder.num_layers': must be positive, got -1"),
    ("llm.text_vocab_size=0", "'llm.text_vocab_size': must be positive, got 0"),
    ("tokenizer.decoder_layers=-3", "'tokenizer.decoder_layers': must be positive, got -3"),
    ("tokenizer.decoder_heads=0", "'tokenizer.decoder_heads': must be positive, got 0"),
    ("tokenizer.decoder_heads=3", "'tokenizer.decoder_hidden': 128 is not divisible by decoder_heads=3"),
    ("encoder.patch_size=0", "'encoder.patch_size': must be positive, got 0"),
    ("encoder.num_heads=0", "'encoder.num_heads': must be positive, got 0"),
    ("encoder.token_merge=0", "'encoder.token_merge': must be positive, got 0"),
    ("encoder.image_size=60", "image size 60 is not divisible by patch size 8"),
    ("encoder.select_layer=5", "'encoder.select_layer': 5 is out of range for 4 layers"),
    ("tokenizer.tokens_per_image=-4", "'tokenizer.tokens_per_image': must be positive, got -4"),
    ("tokenizer.train.batch_size=0", "'tokenizer.train.batch_size': must be positive, got 0"),
    ("decoder.block_out_channels=[16, 0]", "'decoder.block_out_channels': must be positive, got [16, 0]"),
    ("decoder.block_out_channels=[]", "'decoder.block_out_channels': needs at least one UNet block"),
    ("decoder.num_inference_steps=2000", "2000 sampling steps exceed the 1000 training timesteps"),
    ("decoder.ema_decay=1", "'decoder.ema_decay': must be in (0, 1), got 1.0"),
    ("decoder.condition_dropout=1", "'decoder.condition_dropout': must be in [0, 1), got 1.0"),
    ("llm.num_kv_heads=0", "'llm.num_kv_heads': must be positive, got 0"),
    ("llm.hidden_size=260", "head size 65 (hidden_size / num_heads) must be even"),
    ("stage2.caption_dropout=1.5", "'stage2.caption_dropout': must be in [0, 1), got 1.5"),
    ("stage1.train.steps=0", "'stage1.train.steps': must be positive, got 0"),
    ("stage1.data={caption: 0}", "'stage1.data': mixture weights are all 0"),
    ("self_enhance.good_threshold=0", "'self_enhance.good_threshold': must be in (0, 1], got 0.0"),
    ("self_enhance.aspects=[]", "needs at least one aspect"),
    ("eval.fid_samples=1", "a Frechet distance needs at least 2 samples, got 1"),
    ("eval.pope_per_split=0", "'eval.pope_per_split': must be positive, got 0"),
    ("world.shapes=[]", "'world.shapes': must be null (all) or a list of distinct names, got []"),
    ("world.max_objects=0", "'world.max_objects': must be >= min_objects=1, got 0"),
    ("tokenizer.cosine_weight=0", None),
    ("quantizer.kmeans_iters=0", "'quantizer.kmeans_iters': must be positive, got 0"),
    ("tokenizer.train.lr=.inf", "'tokenizer.train.lr' expects a finite number, got inf"),
    ("seed=-1", "config field 'seed': must be >= 0, got -1"),
])
def test_sizes_and_rates_out_of_range_are_refused(override, message):
    if message is None:                                              # one weight may be 0, not both
        cfg = get_config("toy", [override])
        assert cfg.tokenizer.cosine_weight == 0
        with pytest.raises(ConfigError, match="cosine_weight and mse_weight are both 0"):
            cfg.override(["tokenizer.mse_weight=0"])
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        get_config("toy", [override])


@pytest.mark.parametrize("value", ["[red", "{a: 1", "@x", "'open"])
def test_an_unparsable_override_value_is_a_config_error_naming_it(value):
    with pytest.raises(ConfigError, match=re.escape(f"cannot parse the value of override 'world.colors={value}'")):
        get_config("toy", [f"world.colors={value}"])


def test_preset_cannot_be_relabelled_by_an_override():
    with pytest.raises(ConfigError, match="'preset' cannot be overridden"):
        get_config("toy", ["preset=full"])


def test_a_partial_config_file_starts_from_its_preset(tmp_path):
    only = tmp_path / "full.yaml"
    only.write_text("preset: full\n")
    assert get_config(path=only) == get_config("full")
    assert get_config("full", path=only) == get_config("full")              # agreeing is fine
    part = tmp_path / "part.yaml"
    part.write_text("preset: small\nquantizer:\n  num_codes: 1024\nstage1:\n  lrs: {adapter: 0.01}\n")
    cfg = get_config(path=part)
    assert cfg == get_config("small", ["quantizer.num_codes=1024"]).replace(
        stage1=get_config("small").stage1.replace(lrs={"adapter": 0.01}))  # a dict-valued field is replaced whole
    assert cfg.quantizer.chunk_size == get_config("small").quantizer.chunk_size
    bare = tmp_path / "bare.json"
    bare.write_text('{"eval": {"batch_size": 4}}')
    assert get_config(path=bare) == get_config("toy", ["eval.batch_size=4"])          # no preset anywhere: toy
    assert get_config("full", path=bare) == get_config("full", ["eval.batch_size=4"])  # the file names none
    with pytest.raises(ConfigError, match=r"full.yaml' says preset: full, but preset 'toy' was asked for"):
        get_config("toy", path=only)
    (tmp_path / "typo.yaml").write_text("preset: ful\n")
    with pytest.raises(ConfigError, match=r"typo.yaml.*unknown preset 'ful'. Did you mean 'full'"):
        get_config(path=tmp_path / "typo.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping of fields, got a list"):
        get_config(path=tmp_path / "list.yaml")


def test_config_changes_names_each_differing_field():
    from illume_ref.configbase import config_changes
    old, new = get_config("toy"), get_config("toy", ["quantizer.beta=0.5", "stage2.lrs.vision_encoder=1e-5"])
    assert config_changes(old.to_dict(), new.to_dict()) == {"quantizer.beta": (0.25, 0.5),
                                                             "stage2.lrs.vision_encoder": ("<not set>", 1e-5)}


def test_save_is_atomic_and_keeps_normal_permissions(tmp_path, monkeypatch):
    import os
    path = get_config("toy").save(tmp_path / "config.yaml")
    umask = os.umask(0); os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    before = path.read_text()

    def disk_full(fd): raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)                 # the write fails before it is complete
    with pytest.raises(OSError, match="No space left"):
        get_config("full").save(path)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_stage_mixtures_name_only_tasks_their_stage_reads():
    toy = get_config("toy")
    with pytest.raises(ConfigError, match="stage1 does not read the task 'vqa'"):
        get_config("toy", ["stage1.data={vqa: 1.0}"])
    with pytest.raises(ConfigError, match="'assessment'.*not built yet"):
        get_config("toy", ["stage3.data={vqa: 1.0, assessment: 0.1}"])
    with pytest.raises(ConfigError, match="give one"):
        get_config("toy", ["stage1.lrs={visual_embed: 1e-3, llm: 1e-3}"])
    assert toy.stage2.caption_dropout == 0.1 and toy.stage1.caption_dropout == 0.0
    for preset in ("toy", "small", "full"):
        c = get_config(preset)
        for s in (c.stage1, c.stage2, c.stage3):
            assert set(s.data) <= set(STAGE_TASKS[s.name]) and s.train.warmup_steps == round(0.03 * s.train.steps)
