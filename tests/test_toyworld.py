"""Tests of the toy world's scenes, splits and renders (illume_ref.toyworld, notebook 01) as a user imports it."""
import json
import random
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from illume_ref.toyworld import (COLORS, PALETTE, SHAPES, SPLITS, Scene, ToyObject, render, render_batch, sample_scene,
                                 sample_scenes, scene_split, to_rgb_array)

def test_vocabulary_sizes_and_separation():
    assert len(SHAPES) >= 5 and len(COLORS) >= 6 and set(COLORS) == set(PALETTE)
    pal = np.array(list(PALETTE.values()), float)
    d = np.linalg.norm(pal[:, None] - pal[None], axis=-1) + np.eye(len(pal)) * 1e9
    assert d.min() > 80


def test_sampling_is_deterministic_and_valid():
    for seed in range(300):
        a, b = sample_scene(seed), sample_scene(seed)
        assert a == b and 1 <= len(a) <= 4
        a.validate()
    assert len({sample_scene(s).key() for s in range(300)}) > 250
    assert sample_scene(np.random.default_rng(5)) == sample_scene(np.random.default_rng(5))


def test_scene_dict_roundtrip():
    for seed in range(50):
        s = sample_scene(seed, grid_size=4, max_objects=6)
        assert Scene.from_dict(s.to_dict()) == s
        assert Scene.from_dict(json.loads(s.to_json())) == s


def test_world_keywords_and_world_object():
    class World:
        grid_size, min_objects, max_objects, shapes, colors = 2, 3, 3, ['star', 'cross'], ['red']
    for seed in range(20):
        s = sample_scene(seed, world=World())
        assert s.grid_size == 2 and len(s) == 3
        assert {o.shape for o in s.objects} <= {'star', 'cross'} and {o.color for o in s.objects} == {'red'}


@pytest.mark.parametrize('kw, match', [(dict(shapes=['hexagon']), 'valid shapes: circle'),
                                       (dict(colors=['magenta']), 'valid colours: red'),
                                       (dict(max_objects=10), 'max_objects')])
def test_bad_world_settings(kw, match):
    with pytest.raises(ValueError, match=match): sample_scene(0, **kw)


def test_objects_never_share_cells_or_touch():
    s = Scene([ToyObject('square', 'red', 0, 0), ToyObject('square', 'blue', 0, 1)])
    a = np.array(render(s))
    bg = np.all(a == a[0, 0], axis=-1)
    col_between = 64 // 3  # the cell boundary column is background from top to bottom
    assert bg[:, col_between].all()
    with pytest.raises(ValueError, match='share a cell'):
        Scene([ToyObject('star', 'red', 1, 1), ToyObject('circle', 'red', 1, 1)]).validate()


def test_to_rgb_array_scales_16bit_images():
    a = np.full((4, 4), 65535, np.uint16); a[:, :2] = 32768
    im = Image.fromarray(a)                                                          # mode I;16
    assert to_rgb_array(im)[0, 0].tolist() == [128] * 3 and to_rgb_array(im)[0, 3].tolist() == [255] * 3


def test_sample_scenes_draws_from_one_generator_and_keeps_splits_apart():
    rng = random.Random(4)
    assert sample_scenes(4, 6) == [sample_scene(rng) for _ in range(6)]          # no split: plain draws
    drawn = {s: sample_scenes(0, 400, split=s) for s in SPLITS}                  # the same seed for every split
    for s, scenes in drawn.items():
        assert {scene_split(x) for x in scenes} == {s}
    keys = {s: {x.key() for x in v} for s, v in drawn.items()}
    assert not keys['train'] & keys['val'] and not keys['train'] & keys['test'] and not keys['val'] & keys['test']
    assert sample_scenes(7, 5, split='test') == sample_scenes(7, 5, split='test')
    with pytest.raises(ValueError, match='valid splits: train, val, test'): sample_scenes(0, 1, split='dev')
    tiny = dict(grid_size=1, max_objects=1, shapes=['star'], colors=['red'])    # one scene: two splits are empty
    empty = next(s for s in SPLITS if s != scene_split(sample_scene(0, **tiny)))
    with pytest.raises(RuntimeError, match='the world is too small'): sample_scenes(0, 1, split=empty, max_tries=20, **tiny)


def test_render_batch_stacks_the_renders():
    import torch
    scenes = sample_scenes(0, 3)
    batch = render_batch(scenes, 32, antialias=True)
    assert tuple(batch.shape) == (3, 3, 32, 32) and batch.dtype == torch.float32
    for b, s in zip(batch, scenes):
        assert np.array_equal((b.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), np.asarray(render(s, 32, True)))
    with pytest.raises(ValueError, match='at least one scene'): render_batch([])


def test_the_toy_world_imports_without_torch():
    code = ("import sys; import illume_ref.toyworld, illume_ref.oracle, illume_ref.captions, illume_ref.tasks; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_the_toy_world_floors():
    "toyworld < oracle < captions < tasks: each module imports only the ones below it."
    import ast
    from pathlib import Path
    import illume_ref
    order = ['toyworld', 'oracle', 'captions', 'tasks']
    root = Path(illume_ref.__file__).parent
    for i, name in enumerate(order):
        tree = ast.parse((root / f'{name}.py').read_text())
        imported = {n.module.rsplit('.', 1)[-1] for n in ast.walk(tree)
                    if isinstance(n, ast.ImportFrom) and n.module and (n.level or n.module.startswith('illume_ref'))}
        assert not imported & set(order[i:]), (name, sorted(imported))
        assert set(order[:i]) & imported or i == 0, (name, sorted(imported))     # and it does build on the floor below
