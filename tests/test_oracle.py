"""Tests of the oracle detector (illume_ref.oracle, notebook 01a)."""
import numpy as np
import pytest
from PIL import Image

from illume_ref.oracle import (Detection, detect, detect_scene, oracle_accuracy, oracle_rates, oracle_robustness,
                               perturb)
from illume_ref.toyworld import (COLORS, SHAPES, Scene, ToyObject, render, render_batch, sample_scene, sample_scenes,
                                 to_rgb_array)

@pytest.mark.parametrize('antialias', [False, True])
def test_oracle_is_exact_on_random_scenes(antialias):
    for seed in range(1500):
        scene = sample_scene(seed)
        assert detect_scene(render(scene, 64, antialias)) == scene, (seed, scene)


def test_oracle_exact_on_every_object_and_cell():
    for aa in (False, True):
        for shape in SHAPES:
            for color in COLORS:
                for cell in range(9):
                    s = Scene([ToyObject(shape, color, cell // 3, cell % 3)])
                    dets = detect(render(s, antialias=aa))
                    assert len(dets) == 1 and dets[0].to_object(3) == s.objects[0]


def test_oracle_other_sizes_and_grids():
    for seed in range(100):
        s = sample_scene(seed, grid_size=4, max_objects=8)
        assert detect_scene(render(s, 96), 4) == s
        s = sample_scene(seed)
        assert detect_scene(render(s, 128, True)) == s


def test_detection_boxes_and_cells():
    s = Scene([ToyObject('circle', 'green', 2, 1)])
    (d,) = detect(render(s))
    x0, y0, x1, y1 = d.box
    assert 21 < x0 < x1 < 43 and 42 < y0 < y1 <= 64 and d.cell(3) == (2, 1)
    assert isinstance(d, Detection) and d.image_size == (64, 64)


def test_oracle_degrades_gracefully():
    clean = oracle_accuracy(30, seed=1)
    assert clean['scene_accuracy'] == 1.0
    assert oracle_accuracy(30, seed=1, noise=20)['scene_accuracy'] >= 0.9
    assert oracle_accuracy(30, seed=1, shift=40)['scene_accuracy'] >= 0.9
    assert oracle_accuracy(30, seed=1, blur=4)['scene_accuracy'] < 0.9     # it is not magic
    r = oracle_robustness(noise_levels=(0, 80), blur_radii=(0,), shifts=(0,), n=10)
    assert set(r) == {'noise', 'blur', 'shift'} and r['noise']['scene_accuracy'][0] == 1.0
    assert r['noise']['scene_accuracy'][1] < 1.0


def test_perturb_is_seeded():
    img = render(sample_scene(2))
    assert np.array_equal(np.array(perturb(img, 15, 1, 30, rng=4)), np.array(perturb(img, 15, 1, 30, rng=4)))
    assert not np.array_equal(np.array(perturb(img, 15, rng=4)), np.array(img))


def test_image_inputs_are_converted():
    scene = sample_scene(11)
    ref = np.array(render(scene))
    inputs = [Image.fromarray(ref).convert('RGBA'), Image.fromarray(ref).convert('P'), ref / 255.0,
              (ref / 255.0).astype(np.float32), np.moveaxis(ref, -1, 0).copy()]
    try:
        import torch
        inputs += [torch.from_numpy(np.moveaxis(ref, -1, 0) / 255.0), torch.from_numpy(ref)]
    except ImportError:
        pass
    for x in inputs:
        assert to_rgb_array(x).shape == (64, 64, 3)
        assert detect_scene(x) == scene
    assert to_rgb_array(Image.fromarray(ref).convert('L')).shape == (64, 64, 3)
    with pytest.raises(ValueError, match=r'\[0, 1\]'): to_rgb_array(ref * 3.0)
    with pytest.raises(ValueError, match='expected an image'): to_rgb_array(np.zeros((2, 3, 4, 5)))


def test_oracle_rates():
    scenes = sample_scenes(0, 5, split='test')
    r = oracle_rates(render_batch(scenes, 64), scenes)
    assert r == {'object_recall': 1.0, 'object_precision': 1.0, 'scene_accuracy': 1.0, 'images': 5}
    import torch
    blank = torch.full((5, 3, 64, 64), 245 / 255)
    assert oracle_rates(blank, scenes)['object_recall'] == 0.0
    one_wrong = [render(s) for s in scenes[:4]] + [render(Scene(scenes[4].objects[1:]))]    # an object left out
    r = oracle_rates(one_wrong, scenes)
    n = sum(len(s) for s in scenes)
    assert r['scene_accuracy'] == 0.8 and r['object_recall'] == (n - 1) / n and r['object_precision'] == 1.0
    with pytest.raises(ValueError, match='got 4 images for 5 scenes'): oracle_rates(one_wrong[:4], scenes)
