"""The toy ViT's pretraining on the toy world (nbs/03a_toy_encoder.ipynb): its labels and batches, the pretraining
loop (train scenes only), its cache (`pretrained_toy_encoder`: trained once, a half-written run finished again) and
the linear probes (fitted on train scenes, scored on test scenes)."""
import torch

import illume_ref.toy_encoder as toy_encoder_module
from illume_ref.config import EncoderConfig, get_config
from illume_ref.encoders import ToyViT
from illume_ref.toy_encoder import (linear_probe, pretrain_toy_encoder, pretrained_toy_encoder, probe_data, probe_tasks,
                                    toy_batch)
from illume_ref.toyworld import render_batch, scene_split

TINY = EncoderConfig(hidden_size=32, num_layers=1, num_heads=2)


def test_pretraining_lowers_loss_and_probe(tmp_path):
    cfg = get_config("toy").encoder
    model, history = pretrain_toy_encoder(cfg, steps=12, batch_size=8, seed=0, out_dir=tmp_path / "enc",
                                          progress=False, log_every=1)
    losses = [e["loss"] for e in history["train"]]
    assert len(losses) == 12 and history["steps"] == 12 and history["seconds"] > 0
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert (tmp_path / "enc" / "history.json").exists() and not model.training
    again = ToyViT.from_pretrained(tmp_path / "enc")
    px = model.preprocess(toy_batch(1, 2)["images"])
    assert torch.equal(again.eval()(px), model(px))
    acc = linear_probe(model, num_train=24, num_test=12, steps=30, return_majority=True)
    tasks = {"patch_shape", "patch_color", "object_shape", "object_color", "object_cell", "count"}
    assert tasks <= set(acc) and all(0 <= v <= 1 for v in acc.values())
    assert acc["patch_color"] > acc["patch_color_majority"]       # colour is linear in pixels even after 12 steps
    # the cache trains once, then loads
    a = pretrained_toy_encoder(cfg, steps=2, batch_size=4, cache=tmp_path / "cache", progress=False)
    b = pretrained_toy_encoder(cfg, steps=2, batch_size=4, cache=tmp_path / "cache", progress=False)
    assert torch.equal(a(px), b(px)) and len(list((tmp_path / "cache").iterdir())) == 1


def test_pretraining_resumes_exactly(tmp_path):
    "Interrupted at step 3 and resumed, the pretraining ends with the weights of a straight run (the shared Trainer)."
    straight, _ = pretrain_toy_encoder(TINY, steps=6, batch_size=4, out_dir=tmp_path / "straight", progress=False)
    _, part = pretrain_toy_encoder(TINY, steps=6, batch_size=4, out_dir=tmp_path / "resumed", progress=False, stop_at=3)
    assert part["steps"] == 3 and not (tmp_path / "resumed" / "history.json").exists()
    resumed, history = pretrain_toy_encoder(TINY, steps=6, batch_size=4, out_dir=tmp_path / "resumed", progress=False,
                                            resume=True)
    assert history["steps"] == 6
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_toy_batch_renders_with_render_batch_and_keeps_to_its_split():
    b = toy_batch(3, 5, split="test")
    assert {scene_split(s) for s in b["scenes"]} == {"test"}
    assert torch.equal(b["images"], render_batch(b["scenes"], 64))
    assert b["shape"].shape == (5, 64) and b["cell"].shape == (5, 64)


def test_pretraining_draws_train_scenes_and_probes_score_test_scenes(monkeypatch):
    drawn = []

    def recording(rng, batch_size, image_size=64, patch_size=8, world=None, split=None):     # the real batch, recorded
        drawn.append(split)
        b = toy_batch(rng, batch_size, image_size, patch_size, world, split)
        drawn.append({scene_split(s) for s in b["scenes"]})
        return b
    monkeypatch.setattr(toy_encoder_module, "toy_batch", recording)
    model, _ = pretrain_toy_encoder(TINY, steps=3, batch_size=4, progress=False)
    assert drawn == ["train", {"train"}] * 3
    drawn.clear()
    linear_probe(model, num_train=6, num_test=6, steps=2)
    assert drawn == ["train", {"train"}, "test", {"test"}]
    assert probe_data(model, 4, seed=2, split="val")["cell"].shape == (4, 64)


def test_pretraining_and_probes_normalise_with_the_encoders_normalize(monkeypatch):
    """The loop and the probes feed the ViT `normalize(images)` of their rendered batches (no second check), and the
    features are those of the old inline `(x - mean) / std`."""
    seen, real = [], ToyViT.normalize
    monkeypatch.setattr(ToyViT, "normalize", lambda self, x: seen.append(tuple(x.shape)) or real(self, x))
    model, _ = pretrain_toy_encoder(TINY, steps=2, batch_size=4, progress=False)
    assert seen == [(4, 3, 64, 64)] * 2
    d = probe_data(model, 3, seed=5, split="test")
    b = toy_batch(5, 3, split="test")
    with torch.no_grad():
        assert torch.equal(d["features"], model((b["images"] - 0.5) / 0.5).float())


def test_toy_encoder_cache_counts_a_run_done_only_with_its_history(tmp_path):
    "model.safetensors is written before history.json: a folder without the history is trained again."
    from safetensors.torch import save_file
    a = pretrained_toy_encoder(TINY, steps=2, batch_size=2, cache=tmp_path, progress=False)
    (folder,) = tmp_path.glob("toy_vit-*")
    assert (folder / "history.json").exists()
    (folder / "history.json").unlink()                                  # as if stopped between the two writes
    save_file({k: torch.zeros_like(v) for k, v in a.state_dict().items()}, str(folder / "model.safetensors"))
    b = pretrained_toy_encoder(TINY, steps=2, batch_size=2, cache=tmp_path, progress=False)
    assert (folder / "history.json").exists()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())   # retrained (seeded), not the zeros


def test_cache_key_is_pinned(monkeypatch):
    """The toy preset's encoder is cached under a pinned key: a change to it (or to what it hashes) retrains the
    encoder and every cached part trained on it, so it must be deliberate."""
    from illume_ref.core import cache_key
    keys = []
    monkeypatch.setattr(toy_encoder_module, "cached_run",
                        lambda name, key, build, load, cache=None: keys.append((name, cache_key(key))))
    pretrained_toy_encoder(get_config("toy").encoder)
    assert keys == [("toy_vit", "b37bdde230")]


def test_probe_tasks_pool_each_object():
    d = probe_data(ToyViT(TINY).eval(), 4, seed=1)
    tasks = probe_tasks(d)
    assert len(tasks["object_shape"][1]) == int(d["num_objects"].sum()) == len(tasks["object_cell"][1])
    assert tasks["count"][0].shape == (4, 32) and torch.equal(tasks["count"][1], d["num_objects"] - 1)
