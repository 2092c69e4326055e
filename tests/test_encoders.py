"""The semantic encoder (nbs/03_encoder.ipynb): HF vision towers built, saved and loaded through
`VisionTower`; the toy ViT's save/load; one input check and one normalisation (`normalize`) on every path; clear
errors on bad input. The toy ViT's pretraining, cache and probes are tests/test_toy_encoder.py's."""
import json

import pytest
import torch
import transformers
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from illume_ref.config import EncoderConfig, get_config
import illume_ref.encoders as encoders_module
from illume_ref.encoders import CLIP_MEAN, HALF_MEAN, ToyViT, VisionTower, build_encoder, images_to_tensor, merge_tokens
from illume_ref.toyworld import render_batch, sample_scenes

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    "Tiny CLIP and SigLIP vision towers (64 px, patch 4: a 16x16 grid), saved to disk."
    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(image_size=64, patch_size=4, **TINY)).eval()
    siglip = SiglipVisionModel(SiglipVisionConfig(image_size=64, patch_size=4, **TINY)).eval()
    clip.save_pretrained(root / "clip")
    siglip.save_pretrained(root / "siglip")
    (root / "siglip" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}))
    return {"root": root, "clip": clip, "siglip": siglip}


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("layer", [-1, -2, 0])
def test_tower_layer_and_cls(towers, kind, layer):
    enc = VisionTower.from_pretrained(towers["root"] / kind, select_layer=layer).eval()
    px = enc.preprocess(torch.rand(2, 3, 64, 64))
    with torch.no_grad():
        ref = towers[kind](px, output_hidden_states=True).hidden_states[layer]
        out = enc(px)
    prefix = 1 if kind == "clip" else 0                      # CLIP has a CLS token, SigLIP none
    assert ref.shape == (2, 256 + prefix, 32)
    assert out.shape == (2, 256, 32) == (2, enc.num_tokens, enc.output_dim)
    torch.testing.assert_close(out, ref[:, prefix:])
    if layer != -1:                                          # a different layer gives different features
        assert not torch.allclose(out, enc.__class__.from_pretrained(towers["root"] / kind, select_layer=-1)(px))


def test_tower_keep_cls_and_merge(towers):
    keep = VisionTower.from_pretrained(towers["root"] / "clip", drop_cls=False)
    px = keep.preprocess(torch.rand(1, 3, 64, 64))
    assert keep(px).shape == (1, 257, 32)
    merged = VisionTower.from_pretrained(towers["root"] / "clip", token_merge=2)
    feats = merged(px)
    assert feats.shape == (1, 64, 128) and (merged.num_tokens, merged.output_dim) == (64, 128)   # 16x16 -> 8x8, 4C
    flat = VisionTower.from_pretrained(towers["root"] / "clip")(px)                                  # (1, 256, 32)
    grid = flat.view(16, 16, 32)
    # merged token (0, 1) = patches (0,2), (0,3), (1,2), (1,3) concatenated
    torch.testing.assert_close(feats[0, 1], torch.cat([grid[0, 2], grid[0, 3], grid[1, 2], grid[1, 3]]))
    with pytest.raises(ValueError, match="drop_cls=True"):
        VisionTower.from_pretrained(towers["root"] / "clip", drop_cls=False, token_merge=2)(px)
    with pytest.raises(ValueError, match="does not divide"):
        VisionTower.from_pretrained(towers["root"] / "clip", token_merge=3)


def test_tower_normalisation(towers):
    clip = VisionTower.from_pretrained(towers["root"] / "clip")
    siglip = VisionTower.from_pretrained(towers["root"] / "siglip")
    assert clip.image_mean == CLIP_MEAN                      # no preprocessor config saved: CLIP defaults
    assert siglip.image_mean == (0.1, 0.2, 0.3)              # read from preprocessor_config.json
    x = torch.full((1, 3, 64, 64), 0.5)
    torch.testing.assert_close(siglip.preprocess(x)[0, :, 0, 0], torch.tensor([1.0, 0.6, 1 / 3]))
    from PIL import Image
    assert clip.preprocess(Image.new("RGB", (100, 80))).shape == (1, 3, 64, 64)   # PIL resized


def test_full_clip_checkpoint_loads_vision_part(tmp_path):
    from transformers import CLIPConfig, CLIPModel
    full = CLIPModel(CLIPConfig(vision_config=dict(image_size=32, patch_size=8, **TINY),
                                text_config=dict(vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1, **TINY))).eval()
    full.save_pretrained(tmp_path / "clip_full")
    enc = VisionTower.from_pretrained(tmp_path / "clip_full", select_layer=-1)
    px = enc.preprocess(torch.rand(1, 3, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(enc(px), full.vision_model(px, output_hidden_states=True).hidden_states[-1][:, 1:])


def test_build_encoder_hf_checks_config(towers):
    cfg = EncoderConfig(kind="hf", name_or_path=str(towers["root"] / "siglip"), image_size=64, patch_size=4,
                        hidden_size=32, select_layer=-2, token_merge=2)
    enc = build_encoder(cfg)
    assert isinstance(enc, VisionTower) and not enc.training
    assert not any(p.requires_grad for p in enc.parameters())
    assert (enc.num_tokens, enc.output_dim) == (cfg.num_tokens, 128)
    with pytest.raises(ValueError, match="hidden_size=64, but the tower"):
        build_encoder(cfg.replace(hidden_size=64))


def test_full_preset_on_meta_device():
    full = get_config("full").encoder
    assert full.kind == "hf" and full.num_tokens == 256
    with torch.device("meta"):
        tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                 num_attention_heads=16, image_size=224, patch_size=14))
    enc = VisionTower(tower, select_layer=full.select_layer, drop_cls=full.drop_cls, token_merge=full.token_merge,
                      image_size=full.image_size)
    out = enc(torch.empty(1, 3, 224, 224, device="meta"))
    assert out.shape == (1, 256, 1024) and out.device.type == "meta"
    n = sum(p.numel() for p in tower.parameters())
    assert 300e6 < n < 306e6, n                               # CLIP ViT-L/14 vision tower: ~303M
    merged = VisionTower(tower, select_layer=-2, token_merge=2, image_size=448)
    assert (merged.num_tokens, merged.output_dim) == (256, 4096)


def test_toy_vit_round_trip(tmp_path):
    cfg = get_config("toy").encoder
    torch.manual_seed(0)
    model = ToyViT(cfg).eval()
    px = model.preprocess(render_batch(sample_scenes(0, 3), 64))
    feats = model(px)
    assert feats.shape == (3, 64, 128) and (model.num_tokens, model.output_dim, model.image_size) == (64, 128, 64)
    model.save_pretrained(tmp_path / "toy")
    assert {p.name for p in (tmp_path / "toy").iterdir()} >= {"config.json", "model.safetensors"}
    loaded = build_encoder(cfg.replace(name_or_path=str(tmp_path / "toy")))
    assert torch.equal(loaded(px), feats)
    assert not torch.equal(ToyViT(cfg).eval()(px), feats)   # a fresh init differs: the weights were really loaded
    assert ToyViT.from_pretrained(tmp_path / "toy", cfg.replace(token_merge=2))(px).shape == (3, 16, 512)
    assert model.image_mean == HALF_MEAN
    with pytest.raises(ValueError, match="num_layers=2, but the ToyViT saved"):
        ToyViT.from_pretrained(tmp_path / "toy", cfg.replace(num_layers=2))


@pytest.mark.parametrize("bad, message", [
    (torch.rand(2, 4, 64, 64), "3 colour channels .* got 4"),
    (torch.rand(2, 1, 64, 64), "3 colour channels .* got 1"),
    (torch.rand(1, 2, 3, 64, 64), "5-D"),
    (torch.full((1, 3, 64, 64), float("nan")), "NaN"),
    (torch.rand(1, 3, 64, 64) * 255, r"in \[0, 1\]"),
    ("image.png", "got str"),
])
def test_bad_images(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ToyViT(EncoderConfig()).preprocess(bad)


def test_bad_pixel_values_and_paths(towers, tmp_path):
    toy = ToyViT(EncoderConfig())
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\), got \(2, 3, 32, 32\)"):
        toy(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\), got \(2, 4, 64, 64\)"):
        toy(torch.rand(2, 4, 64, 64))
    nan = torch.zeros(1, 3, 64, 64); nan[0, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="1 NaN"):
        toy(nan)
    tower = VisionTower.from_pretrained(towers["root"] / "clip")
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\), got \(1, 3, 48, 48\)"):
        tower(torch.rand(1, 3, 48, 48))
    with pytest.raises(FileNotFoundError, match="no model at .*does not exist"):
        VisionTower.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected a config.json"):
        VisionTower.from_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no ToyViT at"):
        build_encoder(EncoderConfig(name_or_path=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="not a ToyViT"):
        ToyViT.from_pretrained(towers["root"] / "clip")
    with pytest.raises(ValueError, match="out of range"):
        VisionTower.from_pretrained(towers["root"] / "clip", select_layer=-5)


def test_merge_tokens_errors():
    assert merge_tokens(torch.randn(2, 1024, 8), 2).shape == (2, 256, 32)
    with pytest.raises(ValueError, match="square"):
        merge_tokens(torch.randn(1, 10, 4), 2)
    assert images_to_tensor(torch.zeros(3, 5, 5, dtype=torch.uint8)).shape == (1, 3, 5, 5)


def test_num_tokens_counts_kept_prefix_tokens(towers):
    "drop_cls=False keeps CLIP's CLS: num_tokens must say 257, as the output has; SigLIP has no prefix token."
    for kind, prefix in (("clip", 1), ("siglip", 0)):
        keep = VisionTower.from_pretrained(towers["root"] / kind, drop_cls=False)
        assert "out=(256 + prefix, 32)" in keep.extra_repr()                # printing runs no forward pass
        assert keep.num_tokens == 256 + prefix and keep.num_prefix_tokens == prefix
        assert keep(keep.preprocess(torch.rand(2, 3, 64, 64))).shape == (2, keep.num_tokens, 32)
    assert VisionTower.from_pretrained(towers["root"] / "clip").num_tokens == 256


def test_tower_normalisation_override_and_remote_code_flag(towers):
    enc = VisionTower.from_pretrained(towers["root"] / "siglip", image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25))
    assert (enc.image_mean, enc.image_std, enc.trust_remote_code) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), False)


def test_non_square_pictures_are_padded_not_stretched():
    "A 4:1 strip keeps its shapes' proportions: it is centred on a square of its background colour."
    from PIL import Image
    strip = Image.new("RGB", (64, 16), (245, 245, 245)); strip.paste((200, 0, 0), (28, 4, 36, 12))   # an 8x8 square
    x = images_to_tensor(strip, 64)[0]
    red = (x[0] > 0.6) & (x[1] < 0.3)
    rows, cols = red.any(1).nonzero().flatten(), red.any(0).nonzero().flatten()
    assert abs(len(rows) - len(cols)) <= 1 and 7 <= len(cols) <= 9          # still square, not 4x taller
    assert torch.allclose(x[:, 2, 2], torch.tensor([245 / 255] * 3), atol=1e-2)   # background above the strip


def test_normalize_is_the_one_normalisation(towers):
    "`normalize` is exactly the old `(x - mean) / std` in fp32, then the cast; `preprocess` is the check, the resize, then it."
    x = torch.rand(3, 3, 64, 64)
    for enc in (ToyViT(EncoderConfig(hidden_size=32, num_layers=1, num_heads=2)).eval(),
                VisionTower.from_pretrained(towers["root"] / "clip")):            # 0.5 / 0.5, and CLIP's statistics
        mean = torch.tensor(enc.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(enc.image_std).view(1, 3, 1, 1)
        assert torch.equal(enc.normalize(x), (x - mean) / std)
        assert torch.equal(enc.preprocess(x), enc.normalize(x)) and torch.equal(enc.encode(x), enc(enc.normalize(x)))
        assert enc.preprocess(torch.rand(2, 3, 48, 48)).shape == (2, 3, 64, 64)          # preprocess resizes ...
        with pytest.raises(ValueError, match=r"normalize expects a \(B, 3, 64, 64\) batch.*got \(2, 3, 48, 48\)"):
            enc.normalize(torch.rand(2, 3, 48, 48))                                   # ... normalize does not
        with pytest.raises(TypeError, match="got dtype torch.uint8"):
            enc.normalize(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
        with pytest.raises(ValueError, match="normalize expects"):
            enc.normalize(x[0])                                                         # one image is not a batch
    half = ToyViT(EncoderConfig(hidden_size=32, num_layers=1, num_heads=2)).to(torch.bfloat16)
    assert torch.equal(half.normalize(x), ((x - 0.5) / 0.5).to(torch.bfloat16))           # fp32 arithmetic, then the cast


def test_normalize_reads_no_pixel_value_and_encode_checks_once(monkeypatch):
    "The trusted path runs no images_to_tensor (a host-syncing range check); encode runs it once."
    enc = ToyViT(EncoderConfig(hidden_size=32, num_layers=1, num_heads=2)).eval()
    x = torch.rand(2, 3, 64, 64)
    calls, real = [], encoders_module.images_to_tensor
    monkeypatch.setattr(encoders_module, "images_to_tensor", lambda *a, **k: calls.append(1) or real(*a, **k))
    enc(enc.normalize(x))
    assert calls == []
    enc.encode(x)
    assert calls == [1]
    bad = torch.full((1, 3, 64, 64), 7.0)                      # out of range: normalize trusts, preprocess checks
    assert enc.normalize(bad).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        enc.preprocess(bad)
