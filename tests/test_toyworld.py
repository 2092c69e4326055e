"""Tests of the toy shapes world (illume_ref.toyworld) as a user imports it."""
import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from illume_ref.toyworld import (
    COLORS, PALETTE, SHAPES, CAPTION_CATEGORIES, EDIT_TYPES, POPE_VARIANTS, SPLITS, TASKS, VQA_TYPES,
    CaptionSpec, Detection, ObjectSpec, Scene, ToyObject, build_dataset, build_dataset_dict, check_spec,
    check_spec_details, detect, detect_scene, edit_types, make_caption, make_edit, mc_question, oracle_accuracy,
    oracle_robustness, parse_caption, perturb, pope_negative, pope_question, read_folder, render, sample_caption,
    sample_scene, caption_categories, scene_split, to_rgb_array, vqa_question, write_folder,
    BACKGROUND, METADATA_FILE, check_type, read_jsonl, read_text)


# --- scenes -------------------------------------------------------------------------------------------------------
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


# --- images and the oracle -----------------------------------------------------------------------------------------
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


# --- captions, parsing, judging -----------------------------------------------------------------------------------
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


# --- VQA, MC, POPE, edits ------------------------------------------------------------------------------------------
def test_vqa_answers_are_true():
    for seed in range(400):
        scene = sample_scene(seed)
        for qt in VQA_TYPES:
            q = vqa_question(scene, qt, seed)
            if qt == 'color': assert q['answer'] in COLORS and q['answer'] in {o.color for o in scene.objects}
            if qt == 'shape': assert q['answer'] in {o.shape for o in scene.objects}
            if qt == 'count': assert q['answer'].isdigit()
    s = Scene([ToyObject('star', 'blue', 0, 0), ToyObject('circle', 'red', 2, 2)])
    for seed in range(30):
        q = vqa_question(s, 'color', seed)
        assert q['answer'] == ('blue' if ('star' in q['question'] or 'top left' in q['question']) else 'red')
    with pytest.raises(ValueError, match='valid types'): vqa_question(s, 'mood')


def test_multiple_choice_format():
    for seed in range(200):
        q = mc_question(sample_scene(seed), rng=seed)
        assert len(q['options']) == len(set(q['options'])) == 4
        assert q['options']['ABCD'.index(q['answer'])] == q['answer_text']
        assert '\nA. ' in q['prompt'] and '\nD. ' in q['prompt']


def test_pope_negatives():
    freq = Counter({('red', 'star'): 9, ('blue', 'cross'): 5})
    for seed in range(300):
        scene = sample_scene(seed)
        present = {(o.color, o.shape) for o in scene.objects}
        for v in POPE_VARIANTS:
            neg = pope_negative(scene, v, seed, freq, top_k=2)
            assert neg not in present
            if v == 'adversarial': assert any((neg[0] == c) != (neg[1] == s) for c, s in present)
            assert pope_question(scene, True, v, seed)['answer'] == 'yes'
    assert pope_negative(Scene([]), 'popular', 0, freq, top_k=1) == ('red', 'star')
    with pytest.raises(ValueError, match='valid variants'): pope_negative(sample_scene(0), 'sneaky')


def test_edits_change_exactly_what_they_say():
    for seed in range(300):
        scene = sample_scene(seed)
        for et in edit_types(scene):
            e = make_edit(scene, et, seed)
            src, tgt, op = e['source'], e['target'], e['edit']
            tgt.validate()
            if et == 'add': assert len(tgt) == len(src) + 1 and tgt.at(*op['cell']).color == op['color']
            if et == 'remove': assert len(tgt) == len(src) - 1 and tgt.at(*op['cell']) is None
            if et == 'recolor': assert tgt.at(*op['cell']).color == op['color'] != src.at(*op['cell']).color
            if et == 'move': assert tgt.at(*op['to']) is not None and tgt.at(*op['cell']) is None
    with pytest.raises(ValueError, match='cannot remove'):
        make_edit(Scene([ToyObject('star', 'red', 0, 0)]), 'remove')
    with pytest.raises(ValueError, match='valid types'): make_edit(sample_scene(0), 'blur')


# --- data sets ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def vqa_splits():
    return build_dataset_dict('vqa', {'train': 600, 'val': 150, 'test': 150}, seed=0)


def test_splits_never_share_scenes(vqa_splits):
    keys = {s: {Scene.from_dict(x).key() for x in vqa_splits[s]['scene']} for s in SPLITS}
    assert not (keys['train'] & keys['val']) and not (keys['train'] & keys['test']) and not (keys['val'] & keys['test'])
    for s in SPLITS:
        assert all(scene_split(Scene.from_dict(x)) == s for x in vqa_splits[s]['scene'])
    edits = build_dataset('edit', 'test', 40, seed=1)
    assert all(scene_split(Scene.from_dict(x)) == 'test' for x in list(edits['source_scene']) + list(edits['target_scene']))


def test_datasets_are_seeded(vqa_splits):
    a, b = build_dataset('vqa', 'val', 30, seed=0), build_dataset('vqa', 'val', 30, seed=0)
    assert list(a['question']) == list(b['question']) and list(a['scene']) == list(b['scene'])
    assert list(build_dataset('vqa', 'val', 30, seed=1)['scene']) != list(a['scene'])
    assert list(vqa_splits['val']['scene'])[:30] == list(a['scene'])  # the same seed gives the same split whatever else is built


@pytest.mark.parametrize('task', TASKS)
def test_every_task_builds(task):
    ds = build_dataset(task, 'train', 24, seed=2, image_size=48)
    assert len(ds) == 24
    img_col = 'source_image' if task == 'edit' else 'image'
    assert ds[0][img_col].size == (48, 48)
    if task == 'caption':
        assert set(ds['category']) == set(CAPTION_CATEGORIES) and len(set(ds['caption'])) > 20
        for r in ds:  # the stored spec judges the stored image
            assert check_spec(CaptionSpec.from_dict(r['spec']), detect(r['image']))
    if task == 'pope':
        assert Counter(ds['answer']) == {'yes': 12, 'no': 12} and set(ds['variant']) == set(POPE_VARIANTS)
    if task == 'edit':
        assert set(ds['edit_type']) == set(EDIT_TYPES)
        for r in ds:
            assert detect_scene(r['target_image']) == Scene.from_dict(r['target_scene'])


def test_dataset_sizes_from_world():
    class World:
        image_size, num_train, num_val, num_test, seed = 32, 8, 4, 2, 5
    dd = build_dataset_dict('pope', world=World())
    assert {k: len(v) for k, v in dd.items()} == {'train': 8, 'val': 4, 'test': 2}
    assert dd['train'][0]['image'].size == (32, 32)


def test_bad_task_and_split():
    with pytest.raises(ValueError, match='valid tasks'): build_dataset('poetry', n=2)
    with pytest.raises(ValueError, match='valid splits'): build_dataset('vqa', 'dev', 2)


def test_folder_roundtrip(tmp_path):
    for task in ('mc', 'edit'):
        ds = build_dataset(task, 'val', 12, seed=0)
        back = read_folder(write_folder(ds, tmp_path / task))
        assert back.column_names == ds.column_names and len(back) == 12
        for col in ds.column_names:
            if col.endswith('image'):
                assert all(np.array_equal(np.array(x), np.array(y)) for x, y in zip(back[col], ds[col]))
            else:
                assert list(back[col]) == list(ds[col])


def test_folder_reads_plain_imagefolder_layout(tmp_path):
    render(sample_scene(0)).save(tmp_path / 'a.png')
    (tmp_path / 'metadata.jsonl').write_text(json.dumps({'file_name': 'a.png', 'text': 'hello', 'n': 3}) + '\n')
    ds = read_folder(tmp_path)
    assert ds.column_names == ['image', 'text', 'n'] and ds[0]['n'] == 3
    assert detect_scene(ds[0]['image']) == sample_scene(0)


def test_folder_errors_name_file_and_line(tmp_path):
    write_folder(build_dataset('vqa', 'test', 5, seed=0), tmp_path)
    with open(tmp_path / 'metadata.jsonl', 'a') as fh: fh.write('{"question": "unterminated\n')
    with pytest.raises(ValueError, match=r'metadata\.jsonl:6: malformed JSON'): read_folder(tmp_path)
    lines = (tmp_path / 'metadata.jsonl').read_text().splitlines()[:5]
    (tmp_path / 'metadata.jsonl').write_text('\n'.join(lines) + '\n')
    (tmp_path / 'images' / '000002_image.png').write_bytes(b'\x89PNG garbage')
    with pytest.raises(ValueError, match=r"metadata\.jsonl:3: field 'file_name': cannot read image .*000002_image\.png"):
        read_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match='metadata.jsonl'): read_folder(tmp_path / 'images')


# --- bad input to the folder readers: every error names the file, line and field -----------------------------------
def test_read_text_names_file_offset_and_line(tmp_path):
    (tmp_path / 'latin1.jsonl').write_bytes(b'{"a": 1}\n{"b": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl' is not UTF-8 text: byte 0xe9 at offset 19 \(line 2\)"):
        read_text(tmp_path / 'latin1.jsonl')
    (tmp_path / 'bom.jsonl').write_bytes(b'\xef\xbb\xbf{"a": 1}\n')
    assert read_jsonl(tmp_path / 'bom.jsonl') == [(1, {'a': 1})]                  # a byte-order mark is dropped
    with pytest.raises(FileNotFoundError, match='nothere.jsonl'): read_text(tmp_path / 'nothere.jsonl')
    with pytest.raises(ValueError, match='is a folder'): read_text(tmp_path)


def test_read_jsonl_lines(tmp_path):
    (tmp_path / 'r.jsonl').write_text('{"t": "a\u2028b"}\n\n[1]\n', encoding='utf-8')
    with pytest.raises(ValueError, match=r'r\.jsonl:3: expected a JSON object, got a list'): read_jsonl(tmp_path / 'r.jsonl')
    (tmp_path / 'r.jsonl').write_text('{"t": "a\u2028b"}\n\n{"t": "c"}\n', encoding='utf-8')
    assert read_jsonl(tmp_path / 'r.jsonl') == [(1, {'t': 'a\u2028b'}), (3, {'t': 'c'})]   # U+2028 ends no line


def test_check_type_names_field_expected_and_got():
    assert check_type(3, (int, str), 'f:1', 'question_id') == 3
    with pytest.raises(ValueError, match=r"f:2: field 'question_id' must be an integer or a string, got true/false True"):
        check_type(True, (int, str), 'f:2', 'question_id')
    with pytest.raises(ValueError, match=r"f:3: field 'text' must be a string, got null None"): check_type(None, str, 'f:3', 'text')


def _folder(tmp_path, n=3):
    write_folder(build_dataset('vqa', 'test', n, seed=0), tmp_path)
    return [json.loads(l) for l in (tmp_path / METADATA_FILE).read_text().splitlines()]


def _rewrite(tmp_path, recs):
    (tmp_path / METADATA_FILE).write_text(''.join(json.dumps(r) + '\n' for r in recs))


def test_folder_metadata_not_utf8(tmp_path):
    _folder(tmp_path)
    with open(tmp_path / METADATA_FILE, 'ab') as fh: fh.write(b'{"question": "\xff"}\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl' is not UTF-8 text: .*\(line 4\)"): read_folder(tmp_path)


def test_folder_field_types(tmp_path):
    recs = _folder(tmp_path)
    _rewrite(tmp_path, [recs[0], {**recs[1], 'file_name': 7}, recs[2]])
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2: field 'file_name' must be a string, got an integer 7"):
        read_folder(tmp_path)
    _rewrite(tmp_path, [recs[0], recs[1], {**recs[2], 'answer': 3}])
    with pytest.raises(ValueError, match=r"metadata\.jsonl:3: field 'answer' is an integer 3, but line 1 has a string"):
        read_folder(tmp_path)
    _rewrite(tmp_path, [{**recs[0], 'tags': [1]}, {**recs[1], 'tags': ['x']}, {**recs[2], 'tags': [2]}])
    with pytest.raises(ValueError, match=r"metadata\.jsonl: the records do not form one table"): read_folder(tmp_path)


def test_folder_keys_in_another_order_and_ints_with_floats(tmp_path):
    recs = _folder(tmp_path)
    _rewrite(tmp_path, [{**recs[0], 'w': 1}, dict(reversed(list({**recs[1], 'w': 2.5}.items()))), {**recs[2], 'w': None}])
    ds = read_folder(tmp_path)
    assert ds.column_names[:2] == ['image', 'question'] and list(ds['w']) == [1.0, 2.5, None]


def test_folder_missing_tiny_and_16bit_images(tmp_path):
    recs = _folder(tmp_path)
    (tmp_path / recs[1]['file_name']).unlink()
    with pytest.raises(FileNotFoundError, match=r"metadata\.jsonl:2: field 'file_name': no such image file: .*000001_image\.png"):
        read_folder(tmp_path)
    Image.new('RGB', (1, 1)).save(tmp_path / recs[1]['file_name'])
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2: field 'file_name': image .* is 1x1 px"): read_folder(tmp_path)
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(tmp_path / recs[1]['file_name'])      # 16-bit grey
    Image.new('RGBA', (16, 16), (0, 0, 0, 0)).save(tmp_path / recs[2]['file_name'])                 # fully transparent
    ds = read_folder(tmp_path)
    assert ds[1]['image'].mode == 'RGB' and ds[1]['image'].getpixel((0, 0)) == (128, 128, 128)     # scaled, not clipped
    assert ds[2]['image'].getpixel((0, 0)) == BACKGROUND                                            # alpha on the canvas


def test_to_rgb_array_scales_16bit_images():
    a = np.full((4, 4), 65535, np.uint16); a[:, :2] = 32768
    im = Image.fromarray(a)                                                          # mode I;16
    assert to_rgb_array(im)[0, 0].tolist() == [128] * 3 and to_rgb_array(im)[0, 3].tolist() == [255] * 3


def test_write_folder_composites_alpha_and_keeps_missing_images(tmp_path):
    import datasets as hf
    ds = hf.Dataset.from_dict({'image': [Image.new('RGBA', (16, 16), (0, 0, 0, 0)), None], 'n': [1, 2]},
                              features=hf.Features({'image': hf.Image(), 'n': hf.Value('int64')}))
    back = read_folder(write_folder(ds, tmp_path))
    assert back[0]['image'].getpixel((3, 3)) == BACKGROUND and back[1]['image'] is None
    assert json.loads((tmp_path / METADATA_FILE).read_text().splitlines()[1])['file_name'] is None


def test_write_folder_keeps_the_old_index_when_writing_fails(tmp_path):
    ds = build_dataset('vqa', 'test', 3, seed=0)
    write_folder(ds, tmp_path)
    before = (tmp_path / METADATA_FILE).read_text()

    class _Breaks:                                  # a data set whose third row cannot be read
        features = ds.features
        def __iter__(self):
            yield ds[0]; yield ds[1]; raise OSError('disk gone')
    with pytest.raises(OSError, match='disk gone'): write_folder(_Breaks(), tmp_path)
    assert (tmp_path / METADATA_FILE).read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]          # no temporary file left behind
