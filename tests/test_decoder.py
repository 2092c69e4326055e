"""The diffusion decoder (§3.1, notebook 05): projector, UNet/VAE loading, pipeline, training resume, bad inputs."""
import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from illume_ref.config import QuantizerConfig, get_config
from illume_ref.decoder import (ConditionProjector, DiffusionDecoder, IllumeDecoderPipeline,
                                adapt_cross_attention, add_input_channels, bench_decoder, evaluate_decoder,
                                format_bench_decoder, images_to_sample, noise_schedule, render_encode_decode,
                                sample_to_images, sampling_scheduler, train_decoder, pretrained_toy_decoder,
                                resolve_decoder_config, seen_in_training)
from illume_ref.encoders import ToyViT
from illume_ref.tokenizer import SemanticVisionTokenizer
from illume_ref.toyworld import render_batch, sample_scenes, scene_split
from illume_ref.training import step_rng


def tiny_cfg(**decoder):
    over = {'decoder.block_out_channels': [16, 16], 'decoder.cross_attention_dim': 16, 'decoder.attention_head_dim': 4,
            'decoder.train.batch_size': 2, 'decoder.train.save_every': 2, 'decoder.train.log_every': 1}
    over.update({f'decoder.{k}': v for k, v in decoder.items()})
    return get_config('toy').override(over)


@pytest.fixture(scope='module')
def tokenizer():
    "An untrained semantic tokenizer on a random 1-layer toy ViT: 64 tokens of width 32, 16 codes."
    torch.manual_seed(0)
    cfg = get_config('toy')
    enc = ToyViT(cfg.encoder.replace(hidden_size=32, num_layers=1, num_heads=2))
    tok = SemanticVisionTokenizer(enc, QuantizerConfig(num_codes=16, kmeans_init=False),
                                  cfg.tokenizer.replace(decoder_layers=1, decoder_hidden=32, decoder_heads=2))
    return tok.eval()


@pytest.fixture(scope='module')
def pipe(tokenizer):
    torch.manual_seed(0)
    dec = DiffusionDecoder.from_config(tiny_cfg().decoder, tokenizer.feature_dim, tokenizer.tokens_per_image)
    p = dec.eval().pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def test_projector_positions_null_and_errors():
    proj = ConditionProjector(16, 32, 4)
    f = torch.randn(3, 4, 16)
    with torch.no_grad():
        ctx = proj(f, torch.tensor([True, False, False]))
        assert ctx.shape == (3, 4, 32)
        assert torch.equal(ctx[0], proj.null(1)[0]) and torch.equal(ctx[1], proj(f)[1])
        assert not torch.allclose(proj(f.flip(1)).flip(1), proj(f))       # learned positions: token order matters
    with pytest.raises(ValueError, match=r'expects 4 tokens per image \(a 2x2 grid\), got 9'):
        proj(torch.randn(1, 9, 16))
    with pytest.raises(ValueError, match='expects features of width 16, got 8'):
        proj(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match='square grid'):
        ConditionProjector(16, 32, 6)
    sp = ConditionProjector(16, 32, 4, spatial_channels=3)
    with torch.no_grad():
        m = sp.spatial_map(f, 8, drop=torch.tensor([False, False, True]))
        assert m.shape == (3, 3, 8, 8) and m[2].abs().sum() == 0
        assert torch.allclose(m[0, :, 4, 0], sp.spatial(sp.norm(f))[0, 2])      # token 2 is the bottom-left cell
    assert proj.spatial_map(f, 8) is None


def test_pixel_folding_is_lossless_and_schedules():
    x = torch.rand(2, 3, 64, 64)
    z = images_to_sample(x, patch_size=4)
    assert z.shape == (2, 48, 16, 16)
    assert torch.allclose(sample_to_images(z, patch_size=4), x, atol=1e-6)
    toy, full = noise_schedule(get_config('toy').decoder), noise_schedule(get_config('full').decoder)
    assert toy.config.beta_schedule == 'squaredcos_cap_v2' and full.config.beta_schedule == 'scaled_linear'
    assert sampling_scheduler(toy).config.thresholding and not sampling_scheduler(full).config.thresholding


def test_loss_dropout_and_v_prediction():
    dec = DiffusionDecoder.from_config(tiny_cfg(condition_dropout=0.999).decoder, 16, 4).train()
    out = dec.loss(torch.rand(2, 3, 64, 64), torch.randn(2, 4, 16))
    assert out['loss'] > 0 and out['dropped'] == 1.0
    out['loss'].backward()
    assert dec.unet.conv_in.weight.grad is not None and dec.condition_projector.mlp[0].weight.grad is not None
    v = DiffusionDecoder.from_config(tiny_cfg(prediction_type='v_prediction').decoder, 16, 4)
    assert v.noise_scheduler.config.prediction_type == 'v_prediction'
    x = DiffusionDecoder.from_config(tiny_cfg().decoder, 16, 4, prediction_type='sample')
    assert x.pipeline().scheduler.config.prediction_type == 'sample'
    assert x.loss(torch.rand(2, 3, 64, 64), torch.randn(2, 4, 16))['loss'] > 0
    with pytest.raises(ValueError, match="expected 'epsilon', 'v_prediction' or 'sample', got 'x0'"):
        DiffusionDecoder.from_config(tiny_cfg().decoder, 16, 4, prediction_type='x0')
    with pytest.raises(ValueError, match=r'expected images of shape \(B, 3, 64, 64\), got \(2, 3, 32, 32\)'):
        dec.loss(torch.rand(2, 3, 32, 32), torch.randn(2, 4, 16))


def test_config_chooses_prediction_and_token_map():
    toy = get_config('toy').decoder
    assert (toy.prediction_type, toy.spatial_channels) == ('sample', 16)       # what notebook 05 found to work
    dec = DiffusionDecoder.from_config(tiny_cfg().decoder, 16, 4)
    assert dec.noise_scheduler.config.prediction_type == 'sample' and dec.unet.config.in_channels == 48 + 16
    flat = DiffusionDecoder.from_config(tiny_cfg(spatial_channels=0).decoder, 16, 4)
    assert flat.unet.config.in_channels == 48 and flat.condition_projector.spatial is None
    assert resolve_decoder_config(get_config('full').decoder).spatial_channels == 0     # latent default: no map
    assert resolve_decoder_config(toy, 0, 'epsilon').to_dict() == toy.replace(spatial_channels=0, prediction_type='epsilon').to_dict()


def test_cached_decoder_is_reused_and_pruned(tokenizer, tmp_path):
    cfg = tiny_cfg(**{'train.steps': 4})
    pipe, hist = pretrained_toy_decoder(cfg, tokenizer, cache=tmp_path, progress=False, eval_images=2)
    (folder,) = tmp_path.glob('decoder-*')
    assert [p.name for p in (folder / 'checkpoints').iterdir()] == ['step-000004'] and hist['steps'] == 4
    again, _ = pretrained_toy_decoder(cfg, tokenizer, cache=tmp_path, progress=False, eval_images=2)     # loaded, not retrained
    assert len(list(tmp_path.glob('decoder-*'))) == 1
    for k, v in pipe.unet.state_dict().items(): assert torch.equal(v, again.unet.state_dict()[k]), k
    pretrained_toy_decoder(cfg, tokenizer, cache=tmp_path, progress=False, eval_images=2, prediction_type='v_prediction')
    assert len(list(tmp_path.glob('decoder-*'))) == 2                                        # another run, another entry


def test_full_preset_on_meta_is_sd_sized():
    cfg = get_config('full')
    with torch.device('meta'):
        dec = DiffusionDecoder.from_config(cfg.decoder, cfg.encoder.hidden_size, cfg.tokenizer.tokens_per_image,
                                           pretrained=False)
        out = dec.unet(torch.empty(2, 4, 64, 64), 10, encoder_hidden_states=torch.empty(2, 256, 1024)).sample
    n = sum(p.numel() for p in dec.unet.parameters())
    assert dec.sample_shape == (4, 64, 64) and out.shape == (2, 4, 64, 64)
    assert 850e6 < n < 880e6, n                                   # SD 1.5's UNet: 859.5M at width 768
    assert list(dec.unet.config.block_out_channels) == [320, 640, 1280, 1280]
    assert dec.unet.config.cross_attention_dim == 1024


def test_pretrained_unet_and_vae_loading(tmp_path):
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32),
                                down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                                up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), layers_per_block=1,
                                cross_attention_dim=24, attention_head_dim=4, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32, 32), down_block_types=('DownEncoderBlock2D',) * 2,
                        up_block_types=('UpDecoderBlock2D',) * 2, latent_channels=4, norm_num_groups=32, sample_size=16)
    unet.save_pretrained(tmp_path / 'unet'); vae.save_pretrained(tmp_path / 'vae')
    cfg = get_config('full').decoder.replace(image_size=16, vae_scale_factor=2, block_out_channels=[32, 32],
                                             cross_attention_dim=32, pretrained_unet=str(tmp_path / 'unet'),
                                             pretrained_vae=str(tmp_path / 'vae'))
    dec = DiffusionDecoder.from_config(cfg, 16, 4)
    assert dec.unet.config.cross_attention_dim == 32 and dec.sample_shape == (4, 8, 8)
    sd_before, sd_after = unet.state_dict(), dec.unet.state_dict()
    changed = [k for k in sd_after if sd_after[k].shape != sd_before[k].shape or not torch.equal(sd_after[k], sd_before[k])]
    assert changed and all('attn2.to_k' in k or 'attn2.to_v' in k for k in changed)
    assert torch.equal(dec.vae.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    assert dec.train().loss(torch.rand(2, 3, 16, 16), torch.randn(2, 4, 16))['loss'] > 0
    p = dec.eval().pipeline(); p.set_progress_bar_config(disable=True)
    feats = torch.randn(1, 4, 16)
    run = lambda pp: pp(features=feats, num_inference_steps=2, output_type='pt', generator=torch.Generator().manual_seed(0)).images
    a = run(p)
    assert a.shape == (1, 3, 16, 16)
    p.save_pretrained(tmp_path / 'pipe')
    p2 = IllumeDecoderPipeline.from_pretrained(tmp_path / 'pipe'); p2.set_progress_bar_config(disable=True)
    assert p2.vae is not None and torch.equal(run(p2), a)
    assert adapt_cross_attention(dec.unet, 32) == 0
    # a spatial condition on a pretrained UNet: zero-initialised extra input channels change nothing at first
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 32)
    with torch.no_grad():
        y = dec.unet(x, 5, encoder_hidden_states=ctx).sample
        add_input_channels(dec.unet, 3)
        assert torch.allclose(dec.unet(torch.cat([x, torch.randn(1, 3, 8, 8)], 1), 5, encoder_hidden_states=ctx).sample, y, atol=1e-5)
    sdec = DiffusionDecoder.from_config(cfg, 16, 4, spatial_channels=3)
    assert sdec.unet.config.in_channels == 7 and sdec.sample_shape == (4, 8, 8)
    assert sdec.train().loss(torch.rand(2, 3, 16, 16), torch.randn(2, 4, 16))['loss'] > 0
    with pytest.raises(ValueError, match=r'block_out_channels=\[32, 32\], but the decoder config asks for block_out_channels=\[32, 64\]'):
        DiffusionDecoder.from_config(cfg.replace(block_out_channels=[32, 64]), 16, 4)
    with pytest.raises(ValueError, match='vae_scale_factor=2, but the decoder config asks for vae_scale_factor=8'):
        DiffusionDecoder.from_config(cfg.replace(vae_scale_factor=8, image_size=64), 16, 4)


def test_pipeline_determinism_and_round_trip(pipe, tokenizer, tmp_path):
    codes = tokenizer.encode(render_batch(sample_scenes(0, 2, split='test'), 64))
    run = lambda p, seed: p(indices=codes, tokenizer=tokenizer, num_inference_steps=3, output_type='pt',
                            generator=torch.Generator().manual_seed(seed)).images
    a = run(pipe, 0)
    assert a.shape == (2, 3, 64, 64) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(run(pipe, 0), a) and not torch.equal(run(pipe, 1), a)
    pipe.save_pretrained(tmp_path / 'pipe')
    index = json.loads((tmp_path / 'pipe' / 'model_index.json').read_text())
    assert index['condition_projector'] == ['illume_ref.decoder', 'ConditionProjector'] and index['vae'] == [None, None]
    p2 = IllumeDecoderPipeline.from_pretrained(tmp_path / 'pipe'); p2.set_progress_bar_config(disable=True)
    assert torch.equal(run(p2, 0), a)
    pil = pipe(indices=codes, tokenizer=tokenizer, num_inference_steps=2).images
    assert len(pil) == 2 and pil[0].size == (64, 64)


@pytest.mark.parametrize('prediction', ['epsilon', 'v_prediction', 'sample'])
def test_perfect_denoiser_recovers_the_image(pipe, prediction):
    "With the exact answer (noise, v or x_0) from the UNet, both solvers land on x_0: the sampling loop is right."
    x_img = torch.rand(2, 3, 64, 64)
    x0 = images_to_sample(x_img, patch_size=4)
    sched = noise_schedule(get_config('toy').decoder, prediction)

    class Perfect(torch.nn.Module):
        config, device, dtype = pipe.unet.config, torch.device('cpu'), torch.float32
        def forward(self, x, t, encoder_hidden_states=None):
            abar, x = sched.alphas_cumprod[t], x[:, :48]                          # (drop the spatial condition map)
            x0_ = x0.repeat(len(x) // 2, 1, 1, 1)
            eps = (x - abar.sqrt() * x0_) / (1 - abar).sqrt()
            answer = {'epsilon': eps, 'sample': x0_, 'v_prediction': abar.sqrt() * eps - (1 - abar).sqrt() * x0_}
            return SimpleNamespace(sample=answer[prediction])

    for kind in ('dpm', 'ddim'):
        p = IllumeDecoderPipeline(Perfect(), sampling_scheduler(sched, kind), pipe.condition_projector, pixel_patch_size=4)
        p.set_progress_bar_config(disable=True)
        out = p(features=torch.randn(2, 64, 32), num_inference_steps=8, output_type='pt').images
        assert torch.allclose(out, x_img, atol=1e-4), kind


def test_bad_inputs(pipe, tokenizer):
    codes = torch.zeros(1, 64, dtype=torch.long)
    with pytest.raises(ValueError, match=r'code indices must lie in \[0, 16\)'):
        pipe(indices=codes + 16, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r'shape \(B, 64\)'):
        pipe(indices=torch.zeros(1, 49, dtype=torch.long), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r'expects 64 tokens per image \(a 8x8 grid\), got 49 \(a 7x7 grid\)'):
        pipe(features=torch.randn(1, 49, 32))
    with pytest.raises(ValueError, match='needs the tokenizer'):
        pipe(indices=codes)
    other = SimpleNamespace(tokens_per_image=64, feature_dim=128)
    with pytest.raises(ValueError, match='trained on 64 tokens of width 32, but the tokenizer gives 64 tokens of width 128'):
        pipe(indices=codes, tokenizer=other)


def test_train_stop_resume_is_bit_identical(tokenizer, tmp_path):
    cfg = tiny_cfg()
    p1, h1 = train_decoder(cfg, tokenizer, tmp_path / 'once', steps=4, progress=False, eval_images=0)
    train_decoder(cfg, tokenizer, tmp_path / 'twice', steps=4, progress=False, stop_at=2)
    p2, h2 = train_decoder(cfg, tokenizer, tmp_path / 'twice', steps=4, progress=False, resume=True, eval_images=2)
    for k, v in p1.unet.state_dict().items(): assert torch.equal(v, p2.unet.state_dict()[k]), k
    for k, v in p1.condition_projector.state_dict().items(): assert torch.equal(v, p2.condition_projector.state_dict()[k]), k
    assert [r['loss'] for r in h1['train']] == [r['loss'] for r in h2['train']]
    assert (tmp_path / 'twice' / 'pipeline' / 'model_index.json').exists() and 0 <= h2['eval']['object_recall'] <= 1
    with pytest.raises(FileExistsError, match='already holds checkpoints'):
        train_decoder(cfg, tokenizer, tmp_path / 'once', steps=4, progress=False)
    with pytest.raises(ValueError, match='does not match model'):
        train_decoder(tiny_cfg(block_out_channels=[32, 32]), tokenizer, tmp_path / 'twice', steps=6, progress=False, resume=True)


def test_the_decoder_ema_warms_up(tokenizer, tmp_path):
    "After one step the sampled weights are 2/11 the initial and 9/11 the trained ones (not 0.999 the initial)."
    from illume_ref.core import seed_everything
    cfg = tiny_cfg()
    averaged, _ = train_decoder(cfg, tokenizer, tmp_path / 'ema', steps=1, progress=False, eval_images=0)
    trained, _ = train_decoder(tiny_cfg(use_ema=False), tokenizer, tmp_path / 'raw', steps=1, progress=False, eval_images=0)
    seed_everything(cfg.decoder.train.seed)                          # the initial weights train_decoder starts from
    init = DiffusionDecoder.from_config(resolve_decoder_config(cfg.decoder), tokenizer.feature_dim, tokenizer.tokens_per_image)
    w0, w1 = init.unet.conv_in.weight.detach(), trained.unet.conv_in.weight.detach()
    assert not torch.allclose(w0, w1)
    torch.testing.assert_close(averaged.unet.conv_in.weight.detach(), 2 / 11 * w0 + 9 / 11 * w1)


def test_seen_in_training_replays_the_draws():
    from illume_ref.config import TrainConfig
    step3 = sample_scenes(step_rng(0, 3), 2, split='train')
    assert seen_in_training(step3, TrainConfig(steps=4, batch_size=2)) == [True, True]
    assert seen_in_training(step3, TrainConfig(steps=3, batch_size=2)) == [False, False]
    assert seen_in_training(step3, TrainConfig(steps=4, batch_size=2, seed=1)) != [True, True]
    assert seen_in_training(step3, TrainConfig(steps=2, batch_size=2, grad_accum=2)) == [True, True]   # micro-step 3
    assert seen_in_training(step3, TrainConfig(steps=1, batch_size=2, grad_accum=2)) == [False, False]
    held_out = sample_scenes(0, 200, split='test')
    assert sum(seen_in_training(held_out, TrainConfig(steps=600, batch_size=32))) == 0     # the toy run's draws


def test_training_draws_train_scenes_and_is_scored_on_val_scenes(tokenizer, pipe, tmp_path, recorded_scenes):
    import illume_ref.decoder as decoder_module
    drawn = recorded_scenes(decoder_module)
    _, h = train_decoder(tiny_cfg(), tokenizer, tmp_path / 'd', steps=2, progress=False, eval_images=3)
    assert [split for split, _ in drawn] == ['train', 'train', 'val'] and h['eval']['split'] == 'val'
    assert all(scene_split(sc) == split for split, scenes in drawn for sc in scenes)
    drawn.clear()
    r = evaluate_decoder(pipe, tokenizer, 2, num_inference_steps=1)
    assert r['split'] == 'test' and [split for split, _ in drawn] == ['test'] and r['images'] == 2


def test_render_encode_decode_is_the_pipeline_on_the_rendered_codes(pipe, tokenizer):
    scenes = sample_scenes(1, 3, split='test')
    out = render_encode_decode(pipe, tokenizer, scenes, batch_size=2, seed=5, num_inference_steps=2)
    codes = tokenizer.encode(render_batch(scenes, tokenizer.image_size))
    first = pipe(indices=codes[:2], tokenizer=tokenizer, num_inference_steps=2, output_type='pt',
                 generator=torch.Generator().manual_seed(5)).images
    assert out.shape == (3, 3, 64, 64) and torch.equal(out[:2], first)


def test_bench_times_the_sampling_loop():
    "Eight solver steps run the UNet eight times: the bench must see them take clearly longer than one."
    rows = bench_decoder(steps=(1, 8), batch_sizes=(1,), preset='toy', guidance_scale=1.0)
    assert [(r['steps'], r['batch_size']) for r in rows] == [(1, 1), (8, 1)]
    one, eight = rows
    assert eight['seconds'] > 2 * one['seconds'], (one['seconds'], eight['seconds'])
    text = format_bench_decoder(rows)
    lines = text.splitlines()
    assert len(lines) == 5 and 'images/s' in lines[1]
    for r, line in zip(rows, lines[3:]):                               # each row printed with its own numbers
        assert line.split()[2:5] == [str(r['steps']), '1', f"{r['seconds']:.3f}"], line
