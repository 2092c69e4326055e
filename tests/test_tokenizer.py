"""The vision tokenizers (nbs/04_tokenizer.ipynb): the semantic tokenizer's contract (encode -> (B, N),
decode_features -> (B, N, C)), one check and one normalisation on the way to the codes, the registry, save/load and
mismatch errors, exact resume of `train_tokenizer`, the cache, the full preset on the meta device, and clear errors on
bad input. The tests of the shared contract run on every registered kind, the pixel baseline of
nbs/04a_reconstruction.ipynb included; its own tests are tests/test_reconstruction.py's."""
import json

import numpy as np
import pytest
import torch
import transformers
from transformers import CLIPVisionConfig, CLIPVisionModel

import illume_ref.tokenizer as tokenizer_module
from illume_ref.config import EncoderConfig, QuantizerConfig, TokenizerConfig, get_config
from illume_ref.encoders import ToyViT, VisionTower
from illume_ref.reconstruction import ReconstructionTokenizer      # registers kind='reconstruction' for the shared tests
from illume_ref.tokenizer import (FeatureDecoder, SemanticVisionTokenizer, code_probe, evaluate_tokenizer, load_tokenizer,
                                  tokenizer_class, toy_tokenizer_dir, train_tokenizer)
from illume_ref.toyworld import COLORS, PALETTE, render, render_batch, sample_scene, sample_scenes, scene_split

transformers.logging.set_verbosity_error()

ENC = EncoderConfig(hidden_size=32, num_layers=1, num_heads=2)          # 64 px, patch 8: 8x8 tokens of 32 dims
TINY = ['tokenizer.train.batch_size=8', 'tokenizer.train.save_every=2', 'tokenizer.train.log_every=1',
        'quantizer.num_codes=32', 'tokenizer.decoder_layers=1', 'tokenizer.decoder_hidden=32', 'tokenizer.decoder_heads=2']


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return ToyViT(ENC).eval()


@pytest.fixture(scope="module")
def images():
    return render_batch(sample_scenes(0, 4), 64)


def semantic(encoder, num_codes=64, kmeans=False):
    torch.manual_seed(1)
    return SemanticVisionTokenizer(encoder, QuantizerConfig(num_codes=num_codes, kmeans_init=kmeans),
                                   TokenizerConfig(tokens_per_image=64, decoder_layers=1, decoder_hidden=32, decoder_heads=2)).eval()


def pixel(num_codes=64):
    torch.manual_seed(2)
    return ReconstructionTokenizer(64, QuantizerConfig(num_codes=num_codes, kmeans_init=False), TokenizerConfig(tokens_per_image=64),
                                   channels=(8, 16, 32), embed_dim=32).eval()


def test_semantic_contract(encoder, images):
    tok = semantic(encoder)
    idx = tok.encode(images)
    assert idx.shape == (4, 64) and idx.dtype == torch.long and 0 <= idx.min() and idx.max() < 64
    pil = [render(sample_scene(i)) for i in range(2)]
    as_tensor = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) / 255 for p in pil])
    assert torch.equal(tok.encode(pil), tok.encode(as_tensor))
    with torch.no_grad():
        out = tok(images)
        feats = tok.decode_features(idx)
        assert feats.shape == (4, 64, encoder.output_dim) == (4, tok.tokens_per_image, tok.feature_dim)
        assert torch.equal(out['indices'], idx) and torch.equal(out['recon'], feats)
        torch.testing.assert_close(out['features'], encoder(encoder.preprocess(images)))
        assert torch.equal(tok.encode_features(out['features']), idx)
    assert (tok.num_codes, tok.tokens_per_image, tok.grid) == (64, 64, 8)
    assert set(out['metrics']) == {'cosine', 'mse', 'vq_loss', 'perplexity', 'usage'}


def test_semantic_loss_is_the_documented_sum(encoder, images):
    tok = semantic(encoder).train()
    out = tok(images)
    t, m = tok.tokenizer_config, out['metrics']
    cos = torch.nn.functional.cosine_similarity(out['recon'], out['features'], dim=-1).mean()
    torch.testing.assert_close(out['loss'], t.cosine_weight * (1 - cos) + t.mse_weight * m['mse'] + m['vq_loss'])
    out['loss'].backward()
    assert all(p.grad is None for p in tok.encoder.parameters())                 # frozen
    assert tok.decoder.proj_in.weight.grad is not None and tok.quantizer.in_proj.weight.grad is not None
    assert not tok.encoder.training


def test_feature_decoder_uses_positions():
    torch.manual_seed(0)
    dec = FeatureDecoder(8, 16, num_tokens=4, hidden=16, num_layers=1, num_heads=2)
    x = torch.randn(1, 1, 8).expand(1, 4, 8)                                   # the same code at 4 positions
    y = dec(x)
    assert y.shape == (1, 4, 16) and not torch.allclose(y[0, 0], y[0, 1])


@pytest.mark.parametrize("kind", ["semantic", "reconstruction"])
def test_save_load_roundtrip_and_mismatches(kind, encoder, images, tmp_path):
    tok = semantic(encoder) if kind == "semantic" else pixel()
    tok.save_pretrained(tmp_path / "t")
    back = load_tokenizer(tmp_path / "t")
    assert type(back) is type(tok)
    assert torch.equal(back.encode(images), tok.encode(images))
    idx = tok.encode(images)
    with torch.no_grad():
        assert torch.equal(back.decode_features(idx), tok.decode_features(idx))
    with pytest.raises(ValueError, match=r"has num_codes=64, but the config asks for quantizer.num_codes=512"):
        load_tokenizer(tmp_path / "t", config=get_config("toy"))
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg["quantizer"]["num_codes"] = 128
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'quantizer.codebook' has shape \(64, 8\) in the weights but \(128, 8\).*64 codes"):
        load_tokenizer(tmp_path / "t")


def test_load_errors(encoder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "nothing")
    encoder.save_pretrained(tmp_path / "enc")
    with pytest.raises(ValueError, match="holds a ToyViT model, not a tokenizer"):
        load_tokenizer(tmp_path / "enc")
    semantic(encoder).save_pretrained(tmp_path / "sem")
    other = ToyViT(EncoderConfig(hidden_size=16, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match=r"encoder gives \(64 tokens, 16 dims\).*\(64, 32\)"):
        SemanticVisionTokenizer.from_pretrained(tmp_path / "sem", encoder=other)


@pytest.mark.parametrize("kind", ["semantic", "reconstruction"])
def test_train_resume_is_bit_identical(kind, encoder, tmp_path):
    cfg = get_config("toy").override(TINY)
    a, ha = train_tokenizer(cfg, tmp_path / "a", kind, steps=4, progress=False, encoder=encoder, eval_images=8)
    _, hb = train_tokenizer(cfg, tmp_path / "b", kind, steps=4, progress=False, encoder=encoder, eval_images=8, stop_at=3)
    assert hb["eval"] is None and hb["steps"] == 3 and not (tmp_path / "b" / "model.safetensors").exists()
    b, hb = train_tokenizer(cfg, tmp_path / "b", kind, steps=4, progress=False, encoder=encoder, eval_images=8, resume=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ha["eval"] == hb["eval"] and [r["loss"] for r in ha["train"]] == [r["loss"] for r in hb["train"]]
    assert len(ha["train"]) == 4 and {"usage", "perplexity", "codes_used"} <= set(ha["eval"])
    assert (tmp_path / "a" / "history.json").exists() and (tmp_path / "a" / "checkpoints").is_dir()
    loaded = load_tokenizer(tmp_path / "a", config=cfg)
    assert all(torch.equal(v, sa[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        train_tokenizer(cfg, tmp_path / "a", kind, steps=4, progress=False, encoder=encoder)
    # a different seed gives different weights (the test above could not pass by accident)
    c, _ = train_tokenizer(cfg.override(["tokenizer.train.seed=1"]), tmp_path / "c", kind, steps=4, progress=False,
                           encoder=encoder, eval_images=8)
    assert not torch.equal(c.state_dict()["quantizer.codebook"], sa["quantizer.codebook"])


def test_training_learns_and_keeps_encoder_frozen(encoder, tmp_path):
    cfg = get_config("toy").override(TINY + ["tokenizer.train.lr=3e-3", "tokenizer.train.log_every=5", "tokenizer.train.save_every=100"])
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    untrained = semantic(encoder, num_codes=32, kmeans=True)
    untrained.train()(render_batch(sample_scenes(5, 32, split='train'), 64)); untrained.eval()   # k-means init only
    start = evaluate_tokenizer(untrained, render_batch(sample_scenes(0, 32, split='test'), 64))["cosine"]
    tok, h = train_tokenizer(cfg, tmp_path / "t", "semantic", steps=30, progress=False, encoder=encoder, eval_images=32)
    assert h["eval"]["cosine"] > start + 0.1, (start, h["eval"])
    assert h["train"][-1]["loss"] < h["train"][0]["loss"]
    assert all(torch.equal(before[k], v) for k, v in tok.encoder.state_dict().items())


def test_tokenizer_owns_a_frozen_copy_of_its_encoder(images):
    "The caller's encoder (e.g. the MLLM's, which stage 3 trains) stays trainable, and training it moves no code."
    torch.manual_seed(0)
    caller = ToyViT(ENC).train()
    tok = semantic(caller)
    assert all(p.requires_grad for p in caller.parameters()) and caller.training        # the caller's module as it was
    assert tok.encoder is not caller and not any(p.requires_grad for p in tok.encoder.parameters())
    codes = tok.encode(images)
    opt = torch.optim.SGD(caller.parameters(), lr=0.5)
    for _ in range(3):                                                                  # train the caller's encoder
        loss = caller(caller.preprocess(images)).pow(2).mean() - caller.patch_embed.weight.sum()
        opt.zero_grad(); loss.backward(); opt.step()
    assert not torch.equal(caller.patch_embed.weight, tok.encoder.patch_embed.weight)   # it did change
    assert torch.equal(tok.encode(images), codes)
    assert torch.equal(SemanticVisionTokenizer.from_config(get_config("toy").override(TINY), caller).encoder.pos_embed,
                       caller.pos_embed) and caller.pos_embed.requires_grad              # from_config copies too


def test_training_sees_only_train_scenes_and_is_scored_on_test_scenes(encoder, tmp_path, recorded_scenes):
    drawn = recorded_scenes(tokenizer_module)
    cfg = get_config("toy").override(TINY)
    _, h = train_tokenizer(cfg, tmp_path / "t", "semantic", steps=3, progress=False, encoder=encoder, eval_images=16)
    assert [split for split, _ in drawn] == ["train"] * 3 + ["test"] and h["eval"]["split"] == "test"
    trained = {sc.key() for split, scenes in drawn[:3] for sc in scenes}
    assert {scene_split(sc) for sc in drawn[-1][1]} == {"test"} and not trained & {sc.key() for sc in drawn[-1][1]}


class _ColourCodes:
    "Stands in for a tokenizer whose code for a patch is the palette colour covering most of it (0: background)."
    image_size, grid = 64, 8

    def __init__(self, constant=False): self.constant, self.num_codes = constant, len(COLORS) + 1

    def encode(self, images):
        B = images.shape[0]
        if self.constant: return torch.zeros(B, 64, dtype=torch.long)
        pal = torch.tensor([PALETTE[c] for c in COLORS], dtype=torch.float32) / 255        # (K, 3)
        match = (images.permute(0, 2, 3, 1)[..., None, :] - pal).abs().sum(-1) < 0.02      # (B, S, S, K)
        counts = match.float().reshape(B, 8, 8, 8, 8, len(COLORS)).sum((2, 4))            # (B, gy, gx, K)
        return torch.where(counts.sum(-1) > 0, counts.argmax(-1) + 1, 0).reshape(B, 64)


def test_code_probe_reads_the_codes(encoder):
    res = code_probe(pixel(num_codes=16), num_train=30, num_test=20, steps=5)
    assert set(res) == {"patch_shape", "patch_color", "object_shape", "object_color", "object_cell", "count"}
    assert all(0 <= v <= 1 for v in res.values())
    # codes that name each patch's colour: the colour probes must read them (majority class is ~0.1-0.15);
    # codes that say nothing: no probe can beat the majority class by much
    told = code_probe(_ColourCodes(), num_train=120, num_test=60, steps=50)
    blind = code_probe(_ColourCodes(constant=True), num_train=120, num_test=60, steps=50)
    assert told["patch_color"] > 0.95 and told["object_color"] > 0.95, told
    assert blind["patch_color"] < 0.3 and blind["object_color"] < 0.3, blind


def test_full_preset_on_meta():
    full = get_config("full")
    with torch.device("meta"):
        tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                 num_attention_heads=16, image_size=224, patch_size=14))
        tok = SemanticVisionTokenizer.from_config(full, VisionTower(tower, select_layer=-1, image_size=224))
    assert (tok.num_codes, tok.tokens_per_image, tok.grid, tok.feature_dim) == (16384, 256, 16, 1024)
    assert tok.quantizer.codebook.shape == (16384, 8) and tok.quantizer.codebook.device.type == "meta"
    idx = torch.zeros(2, 256, dtype=torch.long, device="meta")
    assert tok.decode_features(idx).shape == (2, 256, 1024)
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(tok.quantizer) == 16384 * 8 + (1024 * 8 + 8) + (8 * 1024 + 1024)
    block = 2 * 2 * 1024 + (1024 * 3072 + 3072) + (1024 * 1024 + 1024) + (1024 * 4096 + 4096) + (4096 * 1024 + 1024)
    assert n(tok.decoder) == (1024 * 1024 + 1024) + 256 * 1024 + 6 * block + 2 * 1024 + (1024 * 1024 + 1024)
    assert 300e6 < n(tok.encoder) < 310e6                                          # CLIP-L/14 vision tower
    assert sum(p.requires_grad for p in tok.encoder.parameters()) == 0


def test_bad_input(encoder, images):
    tok = semantic(encoder)
    with pytest.raises(ValueError, match=r"code indices must lie in \[0, 64\) \(num_codes=64\); got min 0, max 64"):
        tok.decode_features(torch.cat([torch.zeros(1, 63, dtype=torch.long), torch.tensor([[64]])], 1))
    with pytest.raises(ValueError, match="got min -3"):
        tok.decode_features(torch.full((1, 64), -3))
    with pytest.raises(ValueError, match=r"expected code indices of shape \(B, 64\).*got shape \(2, 10\)"):
        tok.decode_features(torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(TypeError, match="expected integer code indices"):
        tok.decode_features(torch.zeros(1, 64))
    with pytest.raises(ValueError, match=r"expects 64x64 px images.*got 32x32 px"):
        tok.encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="got 48x48 px"):
        tok.encode([render(sample_scene(0), size=48)])
    with pytest.raises(ValueError, match=r"expects 64x64 px images.*got 48x48 px"):
        tok.encode_pixels(torch.rand(2, 3, 48, 48))
    with pytest.raises(TypeError, match="expects float pixels"):
        tok.encode_pixels(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected 3 colour channels.*got 1"):
        tok.encode(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="NaN"):
        tok(torch.full((1, 3, 64, 64), float("nan")))
    with pytest.raises(ValueError, match=r"features contain 2048 NaN and 0 inf values"):
        tok.encode_features(torch.full((1, 64, 32), float("nan")))
    with pytest.raises(ValueError, match=r"expected features of shape \(B, 64, 32\), got \(1, 64, 16\)"):
        tok.encode_features(torch.zeros(1, 64, 16))
    with pytest.raises(ValueError, match="asks for 16 tokens per image, but the encoder gives 64"):
        SemanticVisionTokenizer(encoder, QuantizerConfig(), TokenizerConfig(tokens_per_image=16))
    with pytest.raises(ValueError, match="unknown tokenizer kind 'vqgan'"):
        train_tokenizer(get_config("toy"), "/nonexistent", kind="vqgan")


def test_hf_tower_is_referenced_by_path(tmp_path, images):
    torch.manual_seed(0)
    clip = lambda: CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4)
    CLIPVisionModel(clip()).save_pretrained(tmp_path / "clip")
    enc = VisionTower.from_pretrained(tmp_path / "clip", select_layer=-2)
    tok = SemanticVisionTokenizer(enc, QuantizerConfig(num_codes=16, kmeans_init=False), TokenizerConfig(tokens_per_image=64)).eval()
    tok.save_pretrained(tmp_path / "tok")
    saved = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert saved["encoder"]["kind"] == "hf" and saved["encoder"]["select_layer"] == -2
    assert (saved["encoder"]["image_mean"], saved["encoder"]["image_std"]) == (list(enc.image_mean), list(enc.image_std))
    assert "trust_remote_code" not in saved["encoder"]                     # a folder never asks to run code
    assert not (tmp_path / "tok" / "encoder").exists()                      # not copied: referenced
    back = load_tokenizer(tmp_path / "tok")
    assert back.encoder.select_layer == -2 and torch.equal(back.encode(images), tok.encode(images))
    # a tower built in memory has no path: loading then needs the encoder passed in
    mem = SemanticVisionTokenizer(VisionTower(CLIPVisionModel(clip())), QuantizerConfig(num_codes=16, kmeans_init=False),
                                  TokenizerConfig(tokens_per_image=64))
    mem.save_pretrained(tmp_path / "mem")
    with pytest.raises(ValueError, match="pass encoder="):
        load_tokenizer(tmp_path / "mem")
    assert load_tokenizer(tmp_path / "mem", encoder=mem.encoder).num_codes == 16


def test_hf_tower_normalisation_is_saved_with_the_tokenizer(tmp_path, images):
    "A tower loaded with its own image_mean / image_std gets them back from the tokenizer folder."
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4)).save_pretrained(tmp_path / "clip")
    enc = VisionTower.from_pretrained(tmp_path / "clip", image_mean=(0.1, 0.2, 0.3), image_std=(0.4, 0.5, 0.6))
    tok = SemanticVisionTokenizer(enc, QuantizerConfig(num_codes=16, kmeans_init=False), TokenizerConfig(tokens_per_image=64)).eval()
    tok.save_pretrained(tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok")
    assert (back.encoder.image_mean, back.encoder.image_std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert torch.equal(back.encode(images), tok.encode(images))


def test_tokenizer_cache_counts_a_run_done_only_with_its_history(tmp_path):
    "save_pretrained writes model.safetensors before train_tokenizer writes history.json: without it, the run is finished again."
    from safetensors.torch import load_file, save_file
    from illume_ref.tokenizer import pretrained_toy_tokenizer
    cfg = get_config("toy").override(TINY)
    a = pretrained_toy_tokenizer(cfg, "reconstruction", steps=2, cache=tmp_path, progress=False)
    folder = toy_tokenizer_dir(cfg, "reconstruction", 2, tmp_path)
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "history.json").unlink()                                  # as if stopped between the two writes
    save_file({k: torch.zeros_like(v) for k, v in weights.items()}, str(folder / "model.safetensors"))
    b = pretrained_toy_tokenizer(cfg, "reconstruction", steps=2, cache=tmp_path, progress=False)
    assert (folder / "history.json").exists()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())   # from the checkpoint, not the zeros


REMOTE_CONFIG = """from transformers import CLIPVisionConfig
from pathlib import Path
Path(MARKER).write_text("remote code ran")
class EvilConfig(CLIPVisionConfig):
    model_type = "evil_vision"
"""


def test_a_saved_folder_runs_no_code(tmp_path, images):
    """A tokenizer folder whose encoder points at a tower folder with an `auto_map` module (and that says
    trust_remote_code: true) loads without running that module; only the caller's explicit flag runs it."""
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4)).save_pretrained(tmp_path / "tower")
    tok = SemanticVisionTokenizer(VisionTower.from_pretrained(tmp_path / "tower"),
                                  QuantizerConfig(num_codes=16, kmeans_init=False), TokenizerConfig(tokens_per_image=64))
    tok.save_pretrained(tmp_path / "tok")
    # turn the tower folder into one that asks for remote code, and the tokenizer folder into one that says yes
    marker = tmp_path / "RAN"
    (tmp_path / "tower" / "evil.py").write_text(REMOTE_CONFIG.replace("MARKER", repr(str(marker))))
    cfg = json.loads((tmp_path / "tower" / "config.json").read_text())
    cfg.update(model_type="evil_vision", auto_map={"AutoConfig": "evil.EvilConfig"})
    (tmp_path / "tower" / "config.json").write_text(json.dumps(cfg))
    saved = json.loads((tmp_path / "tok" / "config.json").read_text())
    saved["encoder"]["trust_remote_code"] = True
    (tmp_path / "tok" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_tokenizer(tmp_path / "tok")
    assert not marker.exists()
    # the caller's flag is what turns it on (the module runs; the tower it describes is then loaded)
    try: load_tokenizer(tmp_path / "tok", trust_remote_code=True)
    except Exception: pass
    assert marker.read_text() == "remote code ran"


def test_tokenizer_cache_verifies_a_finished_run_before_trusting_it(tmp_path):
    "A cached run with its history.json but truncated weights is moved aside (kept) and trained again."
    import warnings
    from illume_ref.tokenizer import pretrained_toy_tokenizer
    cfg = get_config("toy").override(TINY)
    a = pretrained_toy_tokenizer(cfg, "reconstruction", steps=2, cache=tmp_path, progress=False)
    folder = toy_tokenizer_dir(cfg, "reconstruction", 2, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = pretrained_toy_tokenizer(cfg, "reconstruction", steps=2, cache=tmp_path, progress=False)
    assert any("does not load" in str(w.message) and "model.safetensors" in str(w.message) for w in caught)
    assert (folder.with_name(folder.name + ".broken-1") / "model.safetensors").exists()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())   # the same 2-step run again


def test_encode_checks_once_and_normalises_once(encoder, images, tmp_path, monkeypatch):
    """`encode` runs the one value check (`images_to_tensor`) once, `encode_pixels` (a collate's or a renderer's checked
    batch) none; both give the codes, and the quantizer's input is the encoder's `normalize` -- numerically the old
    inline `((x - mean) / std).to(device, dtype)`, here with CLIP's statistics, where the order of the steps shows."""
    CLIPVisionModel(CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4)).save_pretrained(tmp_path / "clip")
    for enc in (encoder, VisionTower.from_pretrained(tmp_path / "clip").eval()):
        tok = semantic(enc)
        calls, real = [], tokenizer_module.images_to_tensor
        monkeypatch.setattr(tokenizer_module, "images_to_tensor", lambda *a, **k: calls.append(1) or real(*a, **k))
        codes = tok.encode(images)
        assert calls == [1]
        assert torch.equal(tok.encode_pixels(images), codes) and calls == [1]
        monkeypatch.setattr(tokenizer_module, "images_to_tensor", real)
        mean = torch.tensor(enc.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(enc.image_std).view(1, 3, 1, 1)
        with torch.no_grad():
            old = tok.encoder(((images - mean) / std).to(tok.encoder.device, tok.encoder.dtype)).float()
            assert torch.equal(tok.quantizer_input(images), old)
        assert torch.equal(codes, tok.quantizer.encode(old))
        assert torch.equal(tok.encode_pixels(images, batch_size=3), codes)            # batching changes nothing


def test_registry_and_the_floors():
    "The registry names each kind; the lower module never imports the higher one (the baseline registers itself)."
    import subprocess, sys
    assert tokenizer_class("semantic") is SemanticVisionTokenizer
    assert tokenizer_class("reconstruction") is ReconstructionTokenizer
    with pytest.raises(ValueError, match="unknown tokenizer kind 'vqgan': expected one of 'semantic', 'reconstruction'"):
        tokenizer_class("vqgan")
    code = ("import sys, illume_ref.tokenizer as t\n"
            "assert 'illume_ref.reconstruction' not in sys.modules, 'imported'\n"
            "try: t.tokenizer_class('reconstruction')\n"
            "except ValueError as e: print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "registered by importing illume_ref.reconstruction" in out.stdout


def test_encoders_does_not_import_the_toy_pretraining():
    import subprocess, sys
    code = "import sys, illume_ref.encoders\nassert 'illume_ref.toy_encoder' not in sys.modules, 'imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_cache_folders_are_pinned_and_name_the_encoder_run(monkeypatch):
    """The toy preset's tokenizers are cached under pinned keys (a change retrains them and everything downstream, so
    it must be deliberate), and the semantic one's names the toy ViT run it is built on."""
    cfg = get_config("toy")
    assert [toy_tokenizer_dir(cfg, k).name for k in ("semantic", "reconstruction")] == [
        "tokenizer-semantic-62fb56ad45", "tokenizer-reconstruction-1b414eee64"]
    assert "encoder_run" not in tokenizer_module._toy_tokenizer_key(cfg, "reconstruction", None)
    monkeypatch.setattr(tokenizer_module, "toy_encoder_key", lambda enc: {"another": "run"})   # another ViT run:
    assert toy_tokenizer_dir(cfg, "semantic").name != "tokenizer-semantic-62fb56ad45"            # another folder
    assert toy_tokenizer_dir(cfg, "reconstruction").name == "tokenizer-reconstruction-1b414eee64"
