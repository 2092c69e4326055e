"""The pixel-reconstruction tokenizer, Fig. 6's baseline (nbs/04a_reconstruction.ipynb): its contract and token grids,
its registration with the tokenizer module's loaders, the full preset on the meta device and clear errors on bad
input. Save/load and exact resume run on it in tests/test_tokenizer.py, with the semantic tokenizer."""
import subprocess
import sys

import pytest
import torch

from illume_ref.config import QuantizerConfig, TokenizerConfig, get_config
from illume_ref.reconstruction import ConvDecoder, ConvEncoder, ReconstructionTokenizer
from illume_ref.tokenizer import SemanticVisionTokenizer, build_tokenizer, load_tokenizer, tokenizer_class
from illume_ref.toyworld import render, render_batch, sample_scene, sample_scenes


@pytest.fixture(scope="module")
def images():
    return render_batch(sample_scenes(0, 4), 64)


def pixel(num_codes=64):
    torch.manual_seed(2)
    return ReconstructionTokenizer(64, QuantizerConfig(num_codes=num_codes, kmeans_init=False), TokenizerConfig(tokens_per_image=64),
                                   channels=(8, 16, 32), embed_dim=32).eval()


def test_reconstruction_contract(images):
    tok = pixel()
    idx = tok.encode(images)
    assert idx.shape == (4, 64)
    with torch.no_grad():
        x = tok.decode(idx)
        assert x.shape == (4, 3, 64, 64) and 0 <= x.min() and x.max() <= 1
        assert tok.decode_features(idx).shape == (4, 64, 32)
        out = tok(images)
    assert torch.equal(out['indices'], idx) and torch.allclose(out['recon'], x)
    assert set(out['metrics']) == {'l1', 'mse', 'psnr', 'vq_loss', 'perplexity', 'usage'}
    assert torch.equal(tok.encode_pixels(images), idx)                      # the trusted path gives the same codes
    # other grids: 32 px -> 4x4 tokens; 224 px -> 16x16 (factor 14 = patchify 7 + one stride-2 stage)
    small = ReconstructionTokenizer(32, QuantizerConfig(num_codes=8, kmeans_init=False), TokenizerConfig(tokens_per_image=16), channels=(8,))
    assert small.encode(torch.rand(2, 3, 32, 32)).shape == (2, 16)
    assert ConvEncoder(224, 16, (8,), 4, 1)(torch.zeros(1, 3, 224, 224)).shape == (1, 4, 16, 16)
    assert ConvDecoder(224, 16, (8,), 4, 1)(torch.zeros(1, 4, 16, 16)).shape == (1, 3, 224, 224)
    with pytest.raises(ValueError, match="cannot be cut into a 7x7 token grid"):
        ReconstructionTokenizer(64, tokenizer_config=TokenizerConfig(tokens_per_image=49))


def test_registered_with_the_tokenizer_loaders(tmp_path):
    assert tokenizer_class("reconstruction") is ReconstructionTokenizer
    cfg = get_config("toy")
    built = build_tokenizer(cfg, "reconstruction")
    assert type(built) is ReconstructionTokenizer and (built.num_codes, built.grid, built.image_size) == (512, 8, 64)
    pixel().save_pretrained(tmp_path / "rec")
    assert type(load_tokenizer(tmp_path / "rec")) is ReconstructionTokenizer
    with pytest.raises(ValueError, match="holds a ReconstructionTokenizer checkpoint, not a SemanticVisionTokenizer"):
        SemanticVisionTokenizer.from_pretrained(tmp_path / "rec")
    # a process that never imported this module is told how to load the folder
    code = (f"from illume_ref.tokenizer import load_tokenizer\n"
            f"try: load_tokenizer({str(tmp_path / 'rec')!r})\n"
            f"except ValueError as e: print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "holds a ReconstructionTokenizer model" in out.stdout and "import illume_ref.reconstruction" in out.stdout


def test_full_preset_on_meta():
    full = get_config("full")
    with torch.device("meta"):
        rec = ReconstructionTokenizer.from_config(full, channels=(128, 256))
    idx = torch.zeros(2, 256, dtype=torch.long, device="meta")
    assert rec.quantizer.codebook.shape == (16384, 8) and rec.decode(idx).shape == (2, 3, 224, 224)
    assert rec.decode_features(idx).shape == (2, 256, 1024)
    assert (rec.num_codes, rec.tokens_per_image, rec.grid) == (16384, 256, 16)


def test_bad_input():
    rec = pixel()
    with pytest.raises(ValueError, match="got min -3"):
        rec.decode(torch.full((1, 64), -3))
    with pytest.raises(TypeError, match="expected integer code indices"):
        rec.decode_features(torch.zeros(1, 64))
    with pytest.raises(ValueError, match=r"expected code indices of shape \(B, 64\)"):
        rec.decode(torch.zeros(1, 63, dtype=torch.long))
    with pytest.raises(ValueError, match="got 48x48 px"):
        rec.encode([render(sample_scene(0), size=48)])
    with pytest.raises(ValueError, match="got 48x48 px"):
        rec.encode_pixels(torch.rand(1, 3, 48, 48))
    with pytest.raises(ValueError, match="NaN"):
        rec.encode(torch.full((1, 3, 64, 64), float("nan")))
