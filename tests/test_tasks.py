"""Tests of the tasks, data sets and folder IO (illume_ref.tasks, notebook 01c)."""
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from illume_ref.captions import CAPTION_CATEGORIES, CaptionSpec, check_spec
from illume_ref.oracle import detect, detect_scene
from illume_ref.tasks import (EDIT_TYPES, METADATA_FILE, POPE_VARIANTS, TASKS, VQA_TYPES, build_dataset,
                              build_dataset_dict, check_type, edit_types, make_edit, mc_question, pope_negative,
                              pope_question, read_folder, read_jsonl, read_text, vqa_question, write_folder)
from illume_ref.toyworld import BACKGROUND, COLORS, SPLITS, Scene, ToyObject, render, sample_scene, scene_split

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
