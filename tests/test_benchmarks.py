"""The real-benchmark adapters (notebook 09a): POPE, MMBench, GenEval and Emu Edit files read and refused by name
(file:line, field, expected vs got), outputs in the layouts their scorers read, local scores, the lmms-eval bridge."""
import base64
import csv
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import illume_ref.benchmarks as B
from illume_ref.benchmarks import (emu_edit_outputs, evaluate_real, geneval_samples, lmms_eval_answers, mmbench_predictions,
                                   pope_answers, read_mmbench, read_pope_questions, read_records, score_geneval_folder,
                                   score_mmbench, score_pope, toy_geneval_metadata)
from illume_ref.captions import make_caption
from illume_ref.config import get_config
from illume_ref.evaluate import (AlwaysYesModel, BlankModel, OracleModel, circular_variants, extract_choice, pope_metrics,
                                 toy_suite)
from illume_ref.oracle import detect_scene
from illume_ref.tasks import POPE_VARIANTS
from illume_ref.toyworld import render, sample_scene

SMALL = {'eval.pope_per_split': 10, 'eval.mmbench_questions': 24, 'eval.vqa_questions': 24,
         'eval.geneval_prompts_per_category': 3, 'eval.geneval_images_per_prompt': 2, 'eval.fid_samples': 24,
         'eval.edit_samples': 12}


@pytest.fixture(scope='module')
def suite(): return toy_suite(get_config('toy', SMALL))


class _Constant:
    def __init__(self, text): self.text = text
    def answer(self, images, questions): return [self.text] * len(questions)


# ---- the adapters, end to end -------------------------------------------------------------------------------
def _pope_files(tmp_path, n=6, missing=(3,)):
    (tmp_path / 'img').mkdir()
    rng = random.Random(0)
    with open(tmp_path / 'q.jsonl', 'w') as fh:
        for i in range(n):
            sc = sample_scene(rng)
            if i not in missing: render(sc).save(tmp_path / 'img' / f'COCO_{i}.jpg')
            fh.write(json.dumps({'question_id': i, 'image': f'COCO_{i}.jpg', 'text': 'Is there a red circle in the image?',
                                 'label': ['yes', 'no'][i % 2], 'category': POPE_VARIANTS[i % 3]}) + '\n')
    return tmp_path / 'q.jsonl', tmp_path / 'img'


def test_pope_adapter_round_trip(tmp_path):
    q, img = _pope_files(tmp_path)
    s = pope_answers(AlwaysYesModel(), q, img, tmp_path / 'out' / 'answers.jsonl', model_id='m')
    assert s['written'] == 5 and s['skipped'] == {'missing image': 1} and 'q.jsonl:4' in s['skipped_items'][0]
    lines = [json.loads(l) for l in (tmp_path / 'out' / 'answers.jsonl').read_text().splitlines()]
    assert set(lines[0]) >= {'question_id', 'prompt', 'text', 'answer_id', 'model_id'} and lines[0]['model_id'] == 'm'
    sc = score_pope(tmp_path / 'out' / 'answers.jsonl', q)
    assert sc['all']['yes_ratio'] == 1.0 and sc['unanswered'] == 1 and set(POPE_VARIANTS) <= set(sc)


@pytest.mark.parametrize('content,match', [('', 'is empty'), ('{"question_id": 1, "image": "a", "text": "t"}\nnot json\n', r'q.jsonl:2'),
                                           ('{"question_id": 1, "text": "t"}\n', r"q.jsonl:1: record lacks 'image'")])
def test_pope_adapter_bad_input(tmp_path, content, match):
    (tmp_path / 'q.jsonl').write_text(content)
    with pytest.raises(ValueError, match=match):
        pope_answers(AlwaysYesModel(), tmp_path / 'q.jsonl', tmp_path, tmp_path / 'a.jsonl')


def _b64(img):
    buf = io.BytesIO(); img.save(buf, format='PNG'); return base64.b64encode(buf.getvalue()).decode()


def test_mmbench_adapter(tmp_path, suite):
    cols = ['index', 'question', 'hint', 'A', 'B', 'C', 'D', 'answer', 'category', 'l2-category', 'image']
    items = suite.mmbench[:3]
    with open(tmp_path / 'mmb.tsv', 'w', newline='') as fh:
        w = csv.writer(fh, delimiter='\t'); w.writerow(cols)
        for i, it in enumerate(items):
            w.writerow([i, it['question'], 'nan', *it['options'], it['answer'], it['qtype'], 'toy', _b64(render(it['scene'])) if i < 2 else '!!'])
    s = mmbench_predictions(_Constant('B'), tmp_path / 'mmb.tsv', tmp_path / 'pred.tsv', circular=True)
    assert s['written'] == 8 and sum(s['skipped'].values()) == 1 and 'mmb.tsv:4' in s['skipped_items'][0]
    rows = list(csv.DictReader(open(tmp_path / 'pred.tsv'), delimiter='\t'))
    assert 'prediction' in rows[0] and 'image' not in rows[0]
    assert sorted(int(r['index']) for r in rows) == [0, 1, 1000000, 1000001, 2000000, 2000001, 3000000, 3000001]
    assert score_mmbench(tmp_path / 'pred.tsv')['circular_accuracy'] == 0.0   # a constant letter never survives
    one = mmbench_predictions(_Constant('B'), tmp_path / 'mmb.tsv', tmp_path / 'pred1.tsv')
    assert one['written'] == 2


def test_geneval_adapter_layout_and_oracle_round_trip(tmp_path, suite):
    meta = toy_geneval_metadata(suite.geneval)
    assert {'tag', 'include', 'prompt'} <= set(meta[0])
    (tmp_path / 'meta.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in meta))
    s = geneval_samples(OracleModel(suite), tmp_path / 'meta.jsonl', tmp_path / 'out', n_samples=2)
    assert s['written'] == 2 * len(meta)
    assert json.loads((tmp_path / 'out' / '00001' / 'metadata.jsonl').read_text()) == meta[1]
    assert sorted(p.name for p in (tmp_path / 'out' / '00000' / 'samples').iterdir()) == ['00000.png', '00001.png']
    assert score_geneval_folder(tmp_path / 'out')['overall'] == 1.0
    geneval_samples(BlankModel(), tmp_path / 'meta.jsonl', tmp_path / 'blank', n_samples=1)
    assert score_geneval_folder(tmp_path / 'blank')['overall'] == 0.0
    (tmp_path / 'empty.jsonl').write_text('\n')
    with pytest.raises(ValueError, match='empty'):
        geneval_samples(BlankModel(), tmp_path / 'empty.jsonl', tmp_path / 'x')


def test_emu_edit_adapter(tmp_path, suite):
    (tmp_path / 'src').mkdir()
    with open(tmp_path / 'emu.jsonl', 'w') as fh:
        for i, it in enumerate(suite.edit[:4]):
            if i != 1: render(it['source']).save(tmp_path / 'src' / f'{i}.png')
            fh.write(json.dumps({'idx': 10 + i, 'instruction': it['instruction'], 'input_caption': make_caption(it['source'], 'descriptive'),
                                 'output_caption': make_caption(it['target'], 'descriptive'), 'image': f'{i}.png'}) + '\n')
    (tmp_path / 'src' / '3.png').write_bytes(b'not a png')
    s = emu_edit_outputs(OracleModel(suite), tmp_path / 'emu.jsonl', tmp_path / 'src', tmp_path / 'out')
    assert s['written'] == 2 and s['skipped'] == {'missing image': 1, 'unreadable image': 1}
    assert any('3.png' in w and 'cannot identify image file' in w for w in s['skipped_items'])
    assert detect_scene(Image.open(tmp_path / 'out' / '10.png')) == suite.edit[0]['target']
    assert len((tmp_path / 'out' / 'outputs.jsonl').read_text().splitlines()) == 2


# ---- MMBench circular copies and option letters, stale GenEval samples ------------------------------------
def _official_mmbench(path, items):
    "An MMBench TSV as the official files are: the rotated copies are rows already (index + k x 1e6, image a reference)."
    cols = ['index', 'question', 'hint', 'A', 'B', 'C', 'D', 'answer', 'category', 'l2-category', 'image']
    with open(path, 'w', newline='') as fh:
        w = csv.writer(fh, delimiter='\t'); w.writerow(cols)
        for i, it in enumerate(items):
            for k, (opts, ans) in enumerate(circular_variants(it['options'], it['answer'])):
                w.writerow([i + k * 1_000_000, it['question'], 'nan', *opts, ans, it['qtype'], 'toy',
                            _b64(render(it['scene'])) if k == 0 else str(i)])
    return path


def test_mmbench_file_with_circular_copies_is_not_rotated_again(tmp_path, suite):
    items = suite.mmbench[:3]
    tsv = _official_mmbench(tmp_path / 'dev.tsv', items)
    s = mmbench_predictions(_Constant('B'), tsv, tmp_path / 'pred.tsv', circular=True)
    assert (s['rows'], s['written'], s['circular_copies']) == (12, 12, 'in the file')
    idx = [int(r['index']) for r in csv.DictReader(open(tmp_path / 'pred.tsv'), delimiter='\t')]
    assert len(idx) == len(set(idx)) == 12 and sorted(idx) == sorted(i + k * 1_000_000 for i in range(3) for k in range(4))
    assert score_mmbench(tmp_path / 'pred.tsv')['n_questions'] == 3
    # evaluate_real (which asks for circular=True) writes the same 12 rows
    m = evaluate_real(_Constant('B'), tmp_path / 'run', mmbench=tsv)
    assert (m['mmbench']['written'], m['mmbench']['n_rows'], m['mmbench']['n_questions']) == (12, 12, 3)


def test_read_mmbench_keeps_letters_of_options_after_an_empty_one(tmp_path):
    (tmp_path / 'm.tsv').write_text('index\tquestion\tA\tB\tC\tD\n0\tq\tx\tnan\tz\t\n1\tq\tx\ty\tNone\t\n')
    rows = read_mmbench(tmp_path / 'm.tsv')
    assert [r['options'] for _, r in rows] == [['x', '', 'z'], ['x', 'y']]
    assert extract_choice('z', ['x', '', 'z']) == 'C' and extract_choice('', ['x', '', 'z']) is None


def test_geneval_refuses_a_non_empty_folder_and_keeps_it(tmp_path, suite):
    meta = toy_geneval_metadata(suite.geneval[:2])
    (tmp_path / 'meta.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in meta))
    geneval_samples(OracleModel(suite), tmp_path / 'meta.jsonl', tmp_path / 'out', n_samples=1)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / 'out').rglob('*'))
    with pytest.raises(FileExistsError, match=r"GenEval samples folder '.*out' is not empty"):
        geneval_samples(BlankModel(), tmp_path / 'meta.jsonl', tmp_path / 'out', n_samples=1)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / 'out').rglob('*')) == before
    assert score_geneval_folder(tmp_path / 'out')['overall'] == 1.0              # the oracle's samples, untouched
    (tmp_path / 'empty').mkdir()
    assert geneval_samples(BlankModel(), tmp_path / 'meta.jsonl', tmp_path / 'empty', n_samples=1)['written'] == 2
    (tmp_path / 'run' / 'geneval').mkdir(parents=True); (tmp_path / 'run' / 'geneval' / 'old.txt').write_text('x')
    rec = _Recorder(); (tmp_path / 'p').mkdir()
    with pytest.raises(FileExistsError, match='is not empty'):
        evaluate_real(rec, tmp_path / 'run', pope=_pope_files(tmp_path / 'p'), geneval=tmp_path / 'meta.jsonl')
    assert rec.images == [] and sorted(p.relative_to(tmp_path / 'run') for p in (tmp_path / 'run').rglob('*')) == \
        [Path('geneval'), Path('geneval/old.txt')]                                 # refused before any model call


# ---- bad input to the real-benchmark readers: refused by name (file:line, field, expected vs got) ----------------
def _jsonl(path, recs):
    path.write_text(''.join(json.dumps(r) + '\n' for r in recs)); return path


class _Recorder:
    "Answers 'yes' and keeps the images it was shown."
    def __init__(self): self.images = []
    def answer(self, images, questions): self.images += images; return ['yes'] * len(images)


def _pope_q(tmp_path, labels=('yes', 'no', 'yes'), ids=(1, 2, 3)):
    (tmp_path / 'img').mkdir(exist_ok=True)
    render(sample_scene(0)).save(tmp_path / 'img' / 'a.png')
    return _jsonl(tmp_path / 'q.jsonl', [{'question_id': i, 'image': 'a.png', 'text': 'Is there a red star?', 'label': l}
                                         for i, l in zip(ids, labels)])


def test_pope_labels_must_be_yes_or_no(tmp_path):
    q = _pope_q(tmp_path, labels=('yes', ' NO ', 'true'))
    _jsonl(tmp_path / 'a.jsonl', [{'question_id': i, 'text': 'No.'} for i in (1, 2, 3)])
    with pytest.raises(ValueError, match=r"q\.jsonl:3: label 'true': expected 'yes' or 'no'"): score_pope(tmp_path / 'a.jsonl', q)
    rec = _Recorder()
    with pytest.raises(ValueError, match=r"q\.jsonl:3: label 'true'"): pope_answers(rec, q, tmp_path / 'img', tmp_path / 'x.jsonl')
    assert rec.images == [] and not (tmp_path / 'x.jsonl').exists()              # refused before the model runs
    with pytest.raises(ValueError, match=r"labels\[1\]: label 'maybe'"): pope_metrics(['yes', 'no'], ['yes', 'maybe'])
    q = _pope_q(tmp_path, labels=('yes', ' NO ', 'Yes'))                          # case and spaces do not matter
    assert score_pope(tmp_path / 'a.jsonl', q)['all']['tn'] == 1


def test_pope_duplicate_ids_name_both_lines(tmp_path):
    q = _pope_q(tmp_path, ids=(1, 2, '1'))
    with pytest.raises(ValueError, match=r"q\.jsonl:3: duplicate question_id '1' \(line 1 has 1\)"):
        pope_answers(AlwaysYesModel(), q, tmp_path / 'img', tmp_path / 'x.jsonl')
    q = _pope_q(tmp_path)
    _jsonl(tmp_path / 'a.jsonl', [{'question_id': 1, 'text': 'yes'}, {'question_id': 2, 'text': 'no'}, {'question_id': 2, 'text': 'yes'}])
    with pytest.raises(ValueError, match=r"a\.jsonl:3: duplicate question_id 2 \(line 2 has 2\)"): score_pope(tmp_path / 'a.jsonl', q)


def test_pope_ids_match_by_key_not_by_type(tmp_path):
    q = _pope_q(tmp_path, ids=(1, 2, 3))
    _jsonl(tmp_path / 'a.jsonl', [{'question_id': '1', 'text': 'yes'}, {'question_id': ' 2', 'text': 'no'}, {'question_id': 3, 'text': 'yes'}])
    sc = score_pope(tmp_path / 'a.jsonl', q)
    assert sc['unanswered'] == 0 and sc['all']['accuracy'] == 1.0
    _jsonl(tmp_path / 'a.jsonl', [{'question_id': '1', 'text': 'yes'}, {'question_id': 9, 'text': 'no'}])
    with pytest.raises(ValueError, match=r"a\.jsonl:2: question_id 9 is not in"): score_pope(tmp_path / 'a.jsonl', q)


@pytest.mark.parametrize('field,value,expected', [('text', 5, 'a string'), ('question_id', [1], 'an integer or a string'),
                                                  ('image', None, 'a string'), ('label', True, 'a string'),
                                                  ('category', ['random'], 'a string')])
def test_read_records_checks_field_types(tmp_path, field, value, expected):
    q = _pope_q(tmp_path)
    recs = [json.loads(l) for l in q.read_text().splitlines()]
    recs[1][field] = value
    _jsonl(q, recs)
    with pytest.raises(ValueError, match=rf"q\.jsonl:2: field '{field}' must be {expected}, got "):
        pope_answers(AlwaysYesModel(), q, tmp_path / 'img', tmp_path / 'x.jsonl')
    recs[1][field] = 'x' if field != 'question_id' else 2
    recs[1].pop('category', None); recs[2]['category'] = None                     # an optional field may be absent or null
    _jsonl(q, recs)
    assert read_records(q, ('question_id', 'text'), ('category',))[2][0] == 3


def test_read_records_json_list_keeps_line_numbers(tmp_path):
    (tmp_path / 'e.json').write_text('[\n  {"instruction": "a"},\n  {"instruction":\n     2}\n]\n')
    with pytest.raises(ValueError, match=r"e\.json:3: field 'instruction' must be a string, got an integer 2"):
        read_records(tmp_path / 'e.json', ('instruction',))
    (tmp_path / 'e.json').write_text('[{"instruction": "a"}\n {"instruction": "b"}]')
    with pytest.raises(ValueError, match=r"e\.json:2: malformed JSON \(expected ',' or '\]'"): read_records(tmp_path / 'e.json')
    (tmp_path / 'e.json').write_text('[{"instruction": "a"},\n{"instruction": "b"}]\n')
    assert [n for n, _ in read_records(tmp_path / 'e.json')] == [1, 2]


def test_every_reader_names_a_non_utf8_file(tmp_path, suite):
    bad = b'{"question_id": 1, "image": "a.png", "text": "caf\xe9", "label": "yes"}\n'
    (tmp_path / 'q.jsonl').write_bytes(bad)
    msg = r"is not UTF-8 text: byte 0xe9 at offset \d+ \(line 1\)"
    with pytest.raises(ValueError, match=r"q\.jsonl' " + msg): pope_answers(AlwaysYesModel(), tmp_path / 'q.jsonl', tmp_path, tmp_path / 'a.jsonl')
    with pytest.raises(ValueError, match=r"q\.jsonl' " + msg): score_pope(tmp_path / 'q.jsonl', tmp_path / 'q.jsonl')
    (tmp_path / 'm.tsv').write_bytes('index\tquestion\tA\tB\n0\tcaf\u00e9?\tx\ty\n'.encode('latin-1'))
    with pytest.raises(ValueError, match=r"m\.tsv' is not UTF-8 text: byte 0xe9 at offset \d+ \(line 2\)"):
        mmbench_predictions(AlwaysYesModel(), tmp_path / 'm.tsv', tmp_path / 'p.tsv')
    (tmp_path / 'g.jsonl').write_bytes(b'{"tag": "x", "include": [], "prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"g\.jsonl' " + msg): geneval_samples(BlankModel(), tmp_path / 'g.jsonl', tmp_path / 'g')
    (tmp_path / 'e.jsonl').write_bytes(b'{"instruction": "caf\xe9", "image": "a.png"}\n')
    with pytest.raises(ValueError, match=r"e\.jsonl' " + msg): emu_edit_outputs(OracleModel(suite), tmp_path / 'e.jsonl', tmp_path, tmp_path / 'o')
    (tmp_path / 'f' / '00000').mkdir(parents=True)
    (tmp_path / 'f' / '00000' / 'metadata.jsonl').write_bytes(b'{"tag": "caf\xe9", "include": []}')
    with pytest.raises(ValueError, match=r"00000/metadata\.jsonl' " + msg): score_geneval_folder(tmp_path / 'f')


def test_readers_drop_a_byte_order_mark(tmp_path):
    (tmp_path / 'm.tsv').write_bytes(b'\xef\xbb\xbfindex\tquestion\tA\tB\n0\tq\tx\ty\n')
    assert read_mmbench(tmp_path / 'm.tsv')[0][1]['options'] == ['x', 'y']


def test_adapters_read_images_like_core_open_image(tmp_path):
    from illume_ref.toyworld import BACKGROUND
    (tmp_path / 'img').mkdir()
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(tmp_path / 'img' / 'grey16.png')
    Image.new('RGBA', (16, 16), (0, 0, 0, 0)).save(tmp_path / 'img' / 'clear.png')
    Image.new('RGB', (1, 1)).save(tmp_path / 'img' / 'dot.png')
    (tmp_path / 'img' / 'notes.png').write_text('not an image')
    names = ['grey16.png', 'clear.png', 'dot.png', 'notes.png', 'gone.png']
    q = _jsonl(tmp_path / 'q.jsonl', [{'question_id': i, 'image': n, 'text': 'Is there a star?'} for i, n in enumerate(names)])
    rec = _Recorder()
    s = pope_answers(rec, q, tmp_path / 'img', tmp_path / 'a.jsonl')
    assert [im.getpixel((0, 0)) for im in rec.images] == [(128, 128, 128), BACKGROUND]   # 16-bit scaled, alpha on the canvas
    assert s['skipped'] == {'image too small': 1, 'unreadable image': 1, 'missing image': 1}
    assert [w.split(': ', 1)[0] for w in s['skipped_items']] == [f"{q}:3 (dot.png)", f"{q}:4 (notes.png)", f"{q}:5 (gone.png)"]
    assert '1x1 px' in s['skipped_items'][0]



def _mmb(path, rows, cols=('index', 'question', 'A', 'B', 'C', 'D', 'answer', 'image')):
    with open(path, 'w', newline='') as fh:
        w = csv.writer(fh, delimiter='\t'); w.writerow(cols); w.writerows(rows)
    return path


def test_mmbench_rows_are_checked(tmp_path, suite):
    img = _b64(render(suite.mmbench[0]['scene']))
    ok = ['q', 'x', 'y', 'z', 'w', 'B', img]
    with pytest.raises(ValueError, match=r"m\.tsv:3: field 'index' must be an integer, got 'one'"):
        read_mmbench(_mmb(tmp_path / 'm.tsv', [[0, *ok], ['one', *ok]]))
    with pytest.raises(ValueError, match=r"m\.tsv:4: duplicate index '0' \(line 2 has '0'\)"):
        read_mmbench(_mmb(tmp_path / 'm.tsv', [[0, *ok], [1, *ok], ['0', *ok]]))
    with pytest.raises(ValueError, match=r"m\.tsv:2: field 'answer' must be one of A, B, C, got 'D'"):
        read_mmbench(_mmb(tmp_path / 'm.tsv', [[0, 'q', 'x', 'y', 'z', '', 'D', img]]))
    with pytest.raises(ValueError, match=r"m\.tsv:2: field 'answer' must be one of A, B, C, D, got 'AB'"):
        read_mmbench(_mmb(tmp_path / 'm.tsv', [[0, 'q', 'x', 'y', 'z', 'w', 'AB', img]]))
    with pytest.raises(ValueError, match=r"m\.tsv:2: expected at least the options A and B"):
        read_mmbench(_mmb(tmp_path / 'm.tsv', [[0, 'q', 'x', '', '', '', '', img]]))


def test_mmbench_test_split_and_image_references(tmp_path, suite):
    img = _b64(render(suite.mmbench[0]['scene']))
    cols = ('index', 'question', 'A', 'B', 'C', 'D', 'image')            # the test split has no answer column
    tsv = _mmb(tmp_path / 't.tsv', [[0, 'q', 'x', 'y', 'z', 'w', img], [1, 'q', 'x', 'y', 'z', 'w', '00'], [2, 'q', 'x', 'y', 'z', 'w', '7']], cols)
    s = mmbench_predictions(_Constant('B'), tsv, tmp_path / 'p.tsv', circular=True)
    assert (s['written'], s['skipped']) == (2, {'missing image': 1})             # '00' is index 0's image; 7 is no row
    assert 'refers to index 7, not in the file' in s['skipped_items'][0]
    with pytest.raises(ValueError, match=r"p\.tsv:1: no 'answer' column to score"): score_mmbench(tmp_path / 'p.tsv')


def test_score_mmbench_needs_answers_and_predictions(tmp_path):
    p = _mmb(tmp_path / 'p.tsv', [[0, 'q', 'x', 'y', 'z', 'w', 'A', 'A'], [1, 'q', 'x', 'y', 'z', 'w', 'nan', 'A']],
             ('index', 'question', 'A', 'B', 'C', 'D', 'answer', 'prediction'))
    with pytest.raises(ValueError, match=r"p\.tsv:3: no answer to score against"): score_mmbench(p)
    p = _mmb(tmp_path / 'p.tsv', [[0, 'q', 'x', 'y', 'z', 'w', 'A']], ('index', 'question', 'A', 'B', 'C', 'D', 'answer'))
    with pytest.raises(ValueError, match=r"p\.tsv:1: no 'prediction' column"): score_mmbench(p)


@pytest.mark.parametrize('change,match', [
    ({'prompt': 5}, r"g\.jsonl:2: field 'prompt' must be a string, got an integer 5"),
    ({'include': {'class': 'star'}}, r"g\.jsonl:2: field 'include' must be a list, got an object"),
    ({'include': [{'class': 'star', 'count': 'two'}]}, r"g\.jsonl:2: include\[0\]: field 'count' must be an integer, got a string 'two'"),
    ({'include': [{'class': 'star', 'count': 0}]}, r"include\[0\]: field 'count' must be at least 1, got 0"),
    ({'include': [{'count': 1}]}, r"include\[0\]: field 'class' must be a string, got null"),
    ({'include': [{'class': 'star', 'count': 1, 'position': ['left of', 0]}]}, r"include\[0\]: field 'position' must be \[relation, index of another"),
    ({'include': [{'class': 'star', 'count': 1}, {'class': 'disc', 'count': 1, 'position': ['beside', 0]}]}, r"include\[1\]: field 'position'"),
    ({'exclude': [{'class': 'star', 'count': True}]}, r"exclude\[0\]: field 'count' must be an integer, got true/false")])
def test_geneval_metadata_is_checked(tmp_path, suite, change, match):
    meta = toy_geneval_metadata(suite.geneval[:2])
    _jsonl(tmp_path / 'g.jsonl', [meta[0], {**meta[1], **change}])
    with pytest.raises(ValueError, match=match): geneval_samples(BlankModel(), tmp_path / 'g.jsonl', tmp_path / 'out', n_samples=1)
    assert not (tmp_path / 'out').exists()                                         # refused before any sample is written


def test_score_geneval_folder_checks_each_metadata_file(tmp_path, suite):
    meta = toy_geneval_metadata(suite.geneval[:2])
    _jsonl(tmp_path / 'g.jsonl', meta)
    geneval_samples(OracleModel(suite), tmp_path / 'g.jsonl', tmp_path / 'out', n_samples=1)
    m = tmp_path / 'out' / '00001' / 'metadata.jsonl'
    m.write_text(json.dumps({**meta[1], 'include': [{'class': 'star', 'count': '1'}]}))
    with pytest.raises(ValueError, match=r"00001/metadata\.jsonl:1: include\[0\]: field 'count' must be an integer"):
        score_geneval_folder(tmp_path / 'out')
    m.write_text(json.dumps(meta[1]) + '\n' + json.dumps(meta[1]) + '\n')
    with pytest.raises(ValueError, match=r"00001/metadata\.jsonl:2: expected one record, got 2"): score_geneval_folder(tmp_path / 'out')
    m.write_text(json.dumps(meta[1]))
    Image.new('RGB', (2, 2)).save(tmp_path / 'out' / '00001' / 'samples' / '00000.png')
    sc = score_geneval_folder(tmp_path / 'out')
    assert sc['skipped'] == {'image too small (scored as failure)': 1} and sc['n_images'] == 2


@pytest.mark.parametrize('recs,match', [
    ([{'idx': 1, 'instruction': 'make it red', 'image': '0.png'}, {'idx': '01', 'instruction': 'x', 'image': '0.png'}],
     r"e\.jsonl:2: duplicate idx '01' \(line 1 has it too\)"),
    ([{'idx': '../../escape', 'instruction': 'x', 'image': '0.png'}], r"e\.jsonl:1: field 'idx' '\.\./\.\./escape' cannot name an output file"),
    ([{'idx': 1, 'instruction': ['x'], 'image': '0.png'}], r"e\.jsonl:1: field 'instruction' must be a string, got a list"),
    ([{'idx': 1.5, 'instruction': 'x', 'image': '0.png'}], r"e\.jsonl:1: field 'idx' must be an integer or a string, got a number 1\.5"),
    ([{'idx': 1, 'instruction': 'x', 'image': 3}], r"e\.jsonl:1: field 'image' must be a string, got an integer 3"),
    ([{'idx': 1, 'instruction': 'x', 'image': None}], r"e\.jsonl:1: record names no image")])
def test_emu_edit_records_are_checked(tmp_path, suite, recs, match):
    render(suite.edit[0]['source']).save(tmp_path / '0.png')
    _jsonl(tmp_path / 'e.jsonl', recs)
    with pytest.raises(ValueError, match=match): emu_edit_outputs(OracleModel(suite), tmp_path / 'e.jsonl', tmp_path, tmp_path / 'out')
    assert not (tmp_path / 'out').exists() and not (tmp_path.parent / 'escape.png').exists()


def test_adapters_have_one_open_image():
    import illume_ref.core as core
    import illume_ref.evaluate as E
    import illume_ref.report as R
    assert B.open_image is core.open_image and B.to_rgb8 is core.to_rgb8          # the core readers, not a copy
    for mod in (B, E, R): assert 'open_image' not in mod.__all__


# ---- POPE's question file is parsed once per run ------------------------------------------------------------
def test_evaluate_real_reads_the_pope_question_file_once(tmp_path, monkeypatch):
    q, img = _pope_files(tmp_path, missing=())
    reads = []
    real_read_text = B.read_text
    monkeypatch.setattr(B, 'read_text', lambda path, *a, **k: reads.append(Path(path).name) or real_read_text(path, *a, **k))
    m = evaluate_real(AlwaysYesModel(), tmp_path / 'run', pope=(q, img))
    assert reads.count('q.jsonl') == 1 and reads.count('answers.jsonl') == 1          # the answers are scored as written
    assert m['pope']['scores']['all']['n'] == 6 and m['pope']['average']['yes_ratio'] == 1.0
    rows = read_pope_questions(q)
    assert score_pope(tmp_path / 'run' / 'pope' / 'answers.jsonl', q, questions=rows) == m['pope']['scores']


def test_score_pope_names_a_question_without_label(tmp_path):
    q = _pope_q(tmp_path)
    recs = [json.loads(l) for l in q.read_text().splitlines()]; recs[1].pop('label')
    _jsonl(q, recs); _jsonl(tmp_path / 'a.jsonl', [{'question_id': 1, 'text': 'yes'}])
    with pytest.raises(ValueError, match=r"q\.jsonl:2: record lacks 'label'"): score_pope(tmp_path / 'a.jsonl', q)
    with pytest.raises(ValueError, match=r"q\.jsonl:2: record lacks 'label': nothing to score against"):
        score_pope(tmp_path / 'a.jsonl', q, questions=read_pope_questions(q))


def test_adapters_pass_cfg_scale_and_seed_from_the_config(tmp_path, suite):
    class Recorder(OracleModel):
        def generate(self, prompts, num_images=1, seed=0, first_prompt=0, cfg_scale=None):
            self.seen.append(('generate', seed, cfg_scale)); return super().generate(prompts, num_images, seed, first_prompt)
        def edit(self, images, instructions, seed=0, first_prompt=0, cfg_scale=None):
            self.seen.append(('edit', seed, cfg_scale)); return super().edit(images, instructions, seed, first_prompt)
    _jsonl(tmp_path / 'meta.jsonl', toy_geneval_metadata(suite.geneval[:3]))
    (tmp_path / 'src').mkdir(); render(suite.edit[0]['source']).save(tmp_path / 'src' / '0.png')
    _jsonl(tmp_path / 'emu.jsonl', [{'idx': 0, 'instruction': suite.edit[0]['instruction'], 'image': '0.png', 'task': 'remove'}])
    m = Recorder(suite); m.seen = []
    cfg = get_config('toy', {'eval.cfg_scale': 2.0, 'eval.seed': 9, 'eval.geneval_images_per_prompt': 1})
    evaluate_real(m, tmp_path / 'run', cfg, geneval=tmp_path / 'meta.jsonl', emu_edit=(tmp_path / 'emu.jsonl', tmp_path / 'src'))
    assert set(m.seen) == {('generate', 9, 2.0), ('edit', 9, 2.0)}
    out = json.loads((tmp_path / 'run' / 'emu_edit' / 'outputs.jsonl').read_text())
    assert out['task'] == 'remove' and detect_scene(Image.open(tmp_path / 'run' / 'emu_edit' / '0.png')) == suite.edit[0]['target']


def test_generation_adapters_name_what_they_could_not_save(tmp_path, suite):
    class Broken(BlankModel):
        def generate(self, prompts, num_images=1, seed=0): return [[None, np.zeros(5)][:num_images] for _ in prompts]
        def edit(self, images, instructions, seed=0): return [np.zeros((2, 2, 2))] * len(images)
    _jsonl(tmp_path / 'meta.jsonl', toy_geneval_metadata(suite.geneval[:2]))
    s = geneval_samples(Broken(), tmp_path / 'meta.jsonl', tmp_path / 'g', n_samples=2)
    assert (s['written'], s['skipped']) == (0, {'no image returned': 2, 'unreadable image (ValueError)': 2})
    assert s['skipped_items'][0].startswith(f"{tmp_path / 'meta.jsonl'}:1 sample 0")
    (tmp_path / 'src').mkdir(); render(suite.edit[0]['source']).save(tmp_path / 'src' / '0.png')
    _jsonl(tmp_path / 'emu.jsonl', [{'idx': 'a', 'instruction': 'x', 'image': '0.png'}])
    e = emu_edit_outputs(Broken(), tmp_path / 'emu.jsonl', tmp_path / 'src', tmp_path / 'e')
    assert (e['written'], e['skipped'], e['skipped_items']) == (0, {'unreadable image (ValueError)': 1}, ['idx a: unreadable image (ValueError)'])
    assert (tmp_path / 'e' / 'outputs.jsonl').read_text() == ''


# ---- lmms-eval ------------------------------------------------------------------------------------------------
class _Request:
    "What an lmms-eval simple model reads of an `Instance`: its `args`."
    def __init__(self, *args): self.args = args


def test_lmms_eval_answers_follow_the_requests(tmp_path, suite):
    docs = {'pope': {'test': [{'image': render(it['scene']), 'question': it['question']} for it in suite.pope[:7]]}}
    visual = lambda doc: [doc['image']]
    reqs = [_Request(d['question'], {'until': ['\n']}, visual, i, 'pope', 'test') for i, d in enumerate(docs['pope']['test'])]
    assert lmms_eval_answers(OracleModel(suite), reqs[::-1], docs, batch_size=3) == [it['answer'] for it in suite.pope[:7]][::-1]
    render(suite.pope[0]['scene']).save(tmp_path / 'a.png')                        # a task that gives file paths
    paths = {'t': {'s': [{'q': suite.pope[0]['question']}]}}
    assert lmms_eval_answers(OracleModel(suite), [_Request(suite.pope[0]['question'], {}, lambda d: [str(tmp_path / 'a.png')], 0, 't', 's')], paths) \
        == [suite.pope[0]['answer']]


@pytest.mark.parametrize('req,match', [
    (_Request('q', {}, lambda d: [], 0, 'pope', 'test'), r"request 0 \(pope/test doc 0\): ModelLike.answer takes one image per question, the task gave 0"),
    (_Request('q', {}, lambda d: [Image.new('RGB', (8, 8))] * 2, 0, 'pope', 'test'), r"the task gave 2"),
    (_Request('q', {}, lambda d: [np.zeros((8, 8, 3))], 0, 'pope', 'test'), r"expected a PIL image or an image file path, got ndarray"),
    (_Request(['q'], {}, lambda d: [Image.new('RGB', (8, 8))], 0, 'pope', 'test'), r"the context must be a string, got list"),
    (_Request('q', {}), r"request 0: expected lmms-eval generate_until args")])
def test_lmms_eval_answers_refuse_what_they_cannot_answer(req, match):
    with pytest.raises(ValueError, match=match): lmms_eval_answers(AlwaysYesModel(), [req], {'pope': {'test': [{}]}})
