"""Tests of the captions, their parser and the judge (illume_ref.captions, notebook 01b)."""
import json
import random

import pytest

from illume_ref.captions import (CAPTION_CATEGORIES, CaptionSpec, ObjectSpec, caption_categories, check_spec,
                                 check_spec_details, make_caption, parse_caption, sample_caption, scene_for_caption)
from illume_ref.oracle import detect
from illume_ref.toyworld import COLORS, Scene, ToyObject, render, sample_scene

def _recolor(scene):
    return Scene([ToyObject(o.shape, COLORS[(COLORS.index(o.color) + 1) % len(COLORS)], o.row, o.col)
                  for o in scene.objects], scene.grid_size)


def _flip(scene):
    g = scene.grid_size
    return Scene([ToyObject(o.shape, o.color, g - 1 - o.row, g - 1 - o.col) for o in scene.objects], g)


@pytest.mark.parametrize('category', CAPTION_CATEGORIES)
def test_caption_roundtrip_per_category(category):
    texts = set()
    for seed in range(600):
        smp = sample_caption(seed, category)
        texts.add(smp['caption'])
        spec = parse_caption(smp['caption'])
        assert spec.category == category, smp
        assert check_spec(spec, smp['scene']), (smp, check_spec_details(spec, smp['scene']))
        if seed < 40:
            assert check_spec(spec, detect(render(smp['scene'], antialias=bool(seed % 2))))
        if category in ('colors', 'color_attr', 'descriptive'):
            assert not check_spec(spec, _recolor(smp['scene'])), smp
        if category == 'position':
            assert not check_spec(spec, _flip(smp['scene'])), smp
        if category in ('counting', 'single_object', 'two_object'):
            kept = [o for o in smp['scene'].objects if o.shape != smp['scene'].objects[0].shape]
            assert not check_spec(spec, Scene(kept)), smp
    assert len(texts) > (60 if category == 'single_object' else 100)  # many phrasings, not a handful of strings


def test_captions_of_random_scenes_parse_true():
    rng = random.Random(0)
    for seed in range(1500):
        scene = sample_scene(seed)
        for cat in caption_categories(scene):
            text = make_caption(scene, cat, rng)
            assert check_spec(parse_caption(text), scene), (text, scene)


def test_counting_is_exact():
    spec = parse_caption('a photo of three discs')
    three = Scene([ToyObject('circle', c, 0, i) for i, c in enumerate(['red', 'blue', 'green'])])
    assert check_spec(spec, three)
    assert not check_spec(spec, Scene(three.objects[:2]))
    assert not check_spec(spec, Scene(three.objects + [ToyObject('circle', 'red', 2, 2)]))
    details = check_spec_details(spec, Scene(three.objects[:2]))
    assert details == [{'requirement': 'exactly 3 circle', 'found': 2, 'passed': False}]


def test_spec_roundtrip_and_bad_specs():
    spec = parse_caption('there are two objects: a red circle in the top left and a blue cross at the center')
    assert CaptionSpec.from_dict(json.dumps(spec.to_dict())) == spec
    with pytest.raises(ValueError, match='valid shapes: circle'): ObjectSpec(shape='hexagon')
    with pytest.raises(ValueError, match='valid colours: red'): ObjectSpec(color='magenta')
    with pytest.raises(ValueError, match='valid colours'): parse_caption('a magenta circle')
    with pytest.raises(ValueError, match='valid shapes'): parse_caption('two red hexagons')
    with pytest.raises(ValueError, match='no object'): parse_caption('a sunny day at the beach')
    with pytest.raises(ValueError, match='valid relations'): CaptionSpec([ObjectSpec(), ObjectSpec()], [(0, 'near', 1)])


def test_scene_for_caption_makes_a_scene_the_caption_describes():
    "The inverse of check_spec: for every category, a scene the judge accepts; None where no scene can exist."
    for i in range(140):
        cap = sample_caption(i, CAPTION_CATEGORIES[i % len(CAPTION_CATEGORIES)])['caption']
        scene = scene_for_caption(cap, rng=i)
        assert scene is not None and check_spec(cap, scene), cap
        assert check_spec(cap, detect(render(scene)))                      # what it draws reads back the same
    assert scene_for_caption('a photo of three squares', rng=4) == scene_for_caption('a photo of three squares', rng=random.Random(4))
    placed = scene_for_caption('there are two objects: a red circle in the top left corner and a blue square at the center')
    assert {(o.shape, o.color, o.row, o.col) for o in placed.objects} == {('circle', 'red', 0, 0), ('square', 'blue', 1, 1)}
    assert scene_for_caption('a photo of ten squares') is None                 # 10 objects, 9 cells
    assert len(scene_for_caption('a photo of ten squares', grid_size=4).objects) == 10
    assert scene_for_caption('a sunny day') is None                            # parse_caption finds no object
