import re
import pytest

from illume_ref.config import (PRESETS, ConfigError, EncoderConfig, IllumeRefConfig, StageConfig, get_config)


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
    assert (c.stage1.batch_size, c.stage1.steps) == (256, 5000)
    assert c.stage2.lrs == {"adapter": 5e-5, "llm": 5e-5}
    assert (c.stage2.batch_size, c.stage2.steps) == (1024, 15000)
    assert c.stage3.lrs == {"vision_encoder": 2e-6, "adapter": 2e-5, "llm": 2e-5}
    assert (c.stage3.batch_size, c.stage3.steps) == (1024, 8000)
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
