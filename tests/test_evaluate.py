"""Known-answer tests of the toy suite (notebook 09): every scorer gives the right number where it is known, the one
batched-call loop, seeds that do not depend on the batch size, the feature cache; the Fréchet distance and the
encoder features it compares (notebook 03b, `feature_distance`)."""
import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch

import illume_ref.evaluate as E
from illume_ref.config import get_config
from illume_ref.encoders import ToyViT
from illume_ref.evaluate import (GENEVAL_CATEGORIES, AlwaysYesModel, BlankModel, ModelLike, OracleModel, RandomModel,
                                 SectionSkipped, call_answer, call_edit, call_generate, circular_variants, eval_edit,
                                 eval_fid, eval_geneval, eval_mmbench, eval_pope, eval_vqa, evaluate_toy, extract_choice,
                                 image_or_reason, normalize_answer, parse_yes_no, pope_metrics, random_circular_accuracy,
                                 toy_suite)
from illume_ref.feature_distance import encoder_tokens, frechet_distance, frechet_distance_features
from illume_ref.tasks import POPE_VARIANTS

SMALL = {'eval.pope_per_split': 10, 'eval.mmbench_questions': 24, 'eval.vqa_questions': 24,
         'eval.geneval_prompts_per_category': 3, 'eval.geneval_images_per_prompt': 2, 'eval.fid_samples': 24,
         'eval.edit_samples': 12}


@pytest.fixture(scope='module')
def cfg(): return get_config('toy', SMALL)


@pytest.fixture(scope='module')
def suite(cfg): return toy_suite(cfg)


@pytest.fixture(scope='module')
def encoder(cfg):
    torch.manual_seed(0)
    return ToyViT(cfg.encoder).eval()  # a fixed random encoder: the arithmetic does not need a trained one


# ---- parsers ---------------------------------------------------------------------------------------------
def test_parse_yes_no_follows_llava():
    assert [parse_yes_no(t) for t in ['Yes', 'No.', 'There is not a star.', "It isn't", '', 'Yes. No more']] == \
           ['yes', 'no', 'no', 'no', 'yes', 'yes']


def test_extract_choice():
    opts = ['red', 'blue', 'green', 'brown']
    cases = {'B': 'B', '(C)': 'C', 'D. brown': 'D', 'The answer is B.': 'B', 'A red circle': 'A', 'blue': 'B',
             'It is green': 'C', 'A or B': None, 'no idea': None, 'A': 'A'}
    assert {t: extract_choice(t, opts) for t in cases} == cases


def test_normalize_answer():
    assert [normalize_answer(t) for t in ['Three.', 'the Disc', 'Top-left', 'A plus sign', 'violet']] == \
           ['3', 'circle', 'top left', 'cross', 'purple']


# ---- POPE ------------------------------------------------------------------------------------------------
def test_pope_metrics_by_hand():
    m = pope_metrics(['yes', 'yes', 'yes', 'no'], ['yes', 'yes', 'no', 'no'])
    assert (m['tp'], m['fp'], m['tn'], m['fn']) == (2, 1, 1, 0)
    assert m['precision'] == pytest.approx(2 / 3) and m['recall'] == 1 and m['yes_ratio'] == 0.75
    assert m['f1'] == pytest.approx(0.8)


def test_pope_always_yes(suite):
    r = eval_pope(AlwaysYesModel(), suite)
    for v in POPE_VARIANTS:
        assert (r[v]['accuracy'], r[v]['recall'], r[v]['yes_ratio'], r[v]['precision']) == (0.5, 1.0, 1.0, 0.5)
    assert r['average']['f1'] == pytest.approx(2 / 3)


def test_pope_oracle_and_blank(suite):
    assert eval_pope(OracleModel(suite), suite)['average']['accuracy'] == 1.0
    assert eval_pope(BlankModel(), suite)['average']['yes_ratio'] == 1.0   # '' reads as yes, as in LLaVA's script


# ---- MMBench ---------------------------------------------------------------------------------------------
def test_circular_variants_rotate_answer():
    v = circular_variants(['a', 'b', 'c', 'd'], 'B')
    assert [ans for _, ans in v] == ['B', 'A', 'D', 'C']
    assert all(opts['ABCD'.index(ans)] == 'b' for opts, ans in v)


class _Constant:
    def __init__(self, text): self.text = text
    def answer(self, images, questions): return [self.text] * len(questions)


def test_mmbench_constant_letter_never_survives_circular_eval(suite):
    r = eval_mmbench(_Constant('A'), suite)
    assert r['circular_accuracy'] == 0.0   # the right letter moves through A-D: 'A' is right in exactly one pass
    assert r['single_pass_accuracy'] == pytest.approx(np.mean([it['answer'] == 'A' for it in suite.mmbench]))


def test_mmbench_oracle_and_random(cfg):
    s = toy_suite(get_config('toy', {**SMALL, 'eval.mmbench_questions': 300}))
    assert eval_mmbench(OracleModel(s), s)['circular_accuracy'] == 1.0
    r = eval_mmbench(RandomModel(seed=0), s)
    assert r['random_expected'] == pytest.approx(1 / 256)
    assert 0.18 < r['single_pass_accuracy'] < 0.32   # 1/4 +- 3 standard deviations (n = 300)
    assert r['circular_accuracy'] <= 6 / 300         # Poisson(300/256): P(>= 7) ~ 2e-4
    assert random_circular_accuracy([2, 4]) == pytest.approx((0.25 + 1 / 256) / 2)


# ---- VQA -------------------------------------------------------------------------------------------------
def test_vqa_known_answers(suite):
    assert eval_vqa(OracleModel(suite), suite)['accuracy'] == 1.0
    assert eval_vqa(BlankModel(), suite)['accuracy'] == 0.0
    r = eval_vqa(_Constant('Yes.'), suite)   # right exactly on the yes/no position questions whose answer is yes
    assert r['accuracy'] == pytest.approx(np.mean([it['answer'] == 'yes' for it in suite.vqa]))


# ---- GenEval ---------------------------------------------------------------------------------------------
def test_geneval_known_answers(suite):
    r = eval_geneval(OracleModel(suite), suite, 2)
    assert r['overall'] == 1.0 and set(r['categories']) == {'single_object', 'two_object', 'counting', 'colors', 'position', 'color_attr'}
    assert eval_geneval(BlankModel(), suite, 2)['overall'] == 0.0


def test_geneval_overall_is_mean_of_categories(suite):
    class HalfOracle(OracleModel):  # perfect on even prompts, blank on odd ones
        def generate(self, prompts, num_images=1, seed=0, first_prompt=0):
            good = super().generate(prompts, num_images, seed)
            return [g if self.index[p] % 2 == 0 else BlankModel().generate([p], num_images)[0] for p, g in zip(prompts, good)]
    # categories of unequal size (3 single_object prompts, 1 of every other), so that the mean over images and
    # the mean over categories differ: GenEval's overall is the latter
    keep, counts, items = {c: 3 if c == 'single_object' else 1 for c in GENEVAL_CATEGORIES}, Counter(), []
    for it in suite.geneval:
        if counts[it['category']] < keep[it['category']]: items.append(it); counts[it['category']] += 1
    s = dataclasses.replace(suite, geneval=items, cache={})
    m = HalfOracle(s); m.index = {it['prompt']: i for i, it in enumerate(items)}
    r = eval_geneval(m, s, 2)
    cats = r['categories']
    expected = {c: np.mean([i % 2 == 0 for i, it in enumerate(items) if it['category'] == c]) for c in GENEVAL_CATEGORIES}
    assert cats == pytest.approx(expected)
    per_image = np.mean([i % 2 == 0 for i in range(len(items))])
    assert r['overall'] == pytest.approx(np.mean(list(expected.values()))) and abs(per_image - r['overall']) > 0.05


def test_geneval_unreadable_images_are_counted_failures(suite):
    class Broken(BlankModel):
        def generate(self, prompts, num_images=1, seed=0): return [[None] * num_images for _ in prompts]
    r = eval_geneval(Broken(), suite, 2)
    assert r['overall'] == 0 and r['skipped'] == {'no image returned (scored as failure)': 2 * len(suite.geneval)}


def test_generate_contract_is_checked(suite):
    class Short(BlankModel):
        def generate(self, prompts, num_images=1, seed=0): return [[]] * len(prompts)
    with pytest.raises(ValueError, match='one list of 2 images per prompt'):
        eval_geneval(Short(), suite, 2)


# ---- Fréchet distance -------------------------------------------------------------------------------------
def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5000, 4))
    assert frechet_distance_features(x, x) == pytest.approx(0, abs=1e-8)
    assert frechet_distance(np.zeros(4), np.eye(4), np.full(4, 0.5), np.eye(4)) == pytest.approx(1.0)
    assert frechet_distance(np.zeros(4), np.eye(4), np.zeros(4), 9 * np.eye(4)) == pytest.approx(16.0)  # d (1 - 3)^2
    assert frechet_distance_features(x, 3 * x + 0.5) == pytest.approx(17.0, rel=0.05)
    from scipy import linalg
    a = np.cov(rng.normal(size=(40, 6)), rowvar=False); b = np.cov(rng.normal(size=(40, 6)) * 2 + 1, rowvar=False)
    ref = np.trace(a) + np.trace(b) - 2 * np.trace(linalg.sqrtm(a @ b)).real
    assert frechet_distance(np.zeros(6), a, np.zeros(6), b) == pytest.approx(ref, rel=1e-6)


def test_fid_analogue(suite, encoder):
    assert eval_fid(OracleModel(suite), suite, encoder)['fd'] == pytest.approx(0, abs=1e-6)
    assert eval_fid(BlankModel(), suite, encoder)['fd'] > eval_fid(RandomModel(0), suite, encoder)['fd'] > 1e-3


# ---- editing ---------------------------------------------------------------------------------------------
def test_edit_known_answers(suite, encoder):
    r = eval_edit(OracleModel(suite), suite, encoder)
    assert r['exact_success'] == 1.0 and r['clip_t'] == pytest.approx(1.0)
    r = eval_edit(AlwaysYesModel(), suite, encoder)   # returns the source: preserved perfectly, never edited
    assert (r['clip_i'], r['dino'], r['exact_success']) == (pytest.approx(1.0), pytest.approx(1.0), 0.0)


def test_doubles_satisfy_protocol(suite):
    for m in (OracleModel(suite), AlwaysYesModel(), RandomModel(), BlankModel()):
        assert isinstance(m, ModelLike)


def test_feature_cache_is_tied_to_the_encoder_object(suite, encoder):
    scenes = [it['scene'] for it in suite.fid[:3]]
    suite.cache[('probe', id(encoder))] = (object(), np.zeros((1, 1, 1)))     # what a freed object with this id left
    f = suite.features('probe', encoder, scenes)
    assert f.shape[0] == 3 and suite.cache[('probe', id(encoder))][0] is encoder
    assert suite.features('probe', encoder, scenes) is f                          # a real hit is reused
    del suite.cache[('probe', id(encoder))]


def test_no_is_not_zero():
    assert [normalize_answer(t) for t in ['No', 'no.', 'none', 'zero', 'No, none']] == ['no', 'no', '0', '0', 'no 0']


def test_parse_yes_no_rule_is_the_documented_one():
    # first sentence only; 'no' / 'not' as words in any case, or a word ending in n't (straight or typographic)
    cases = {'No': 'no', 'NOT at all': 'no', 'It isn\u2019t there.': 'no', "It isn't": 'no', 'Nothing is missing': 'yes',
             'Yes. No other star': 'yes', 'Notably, yes': 'yes', '': 'yes'}
    assert {t: parse_yes_no(t) for t in cases} == cases
    assert pope_metrics(['It isn\u2019t.'], ['no'])['tn'] == 1


# ---- one batched-call loop: seeds, settings, contracts ------------------------------------------------------
class _Draws:
    "Returns, for prompt i of a batch, the (seed, index) it was told to draw from; records every call's keywords."
    def __init__(self): self.calls = []
    def generate(self, prompts, num_images=1, seed=0, first_prompt=0, cfg_scale=None):
        self.calls.append({'n': len(prompts), 'seed': seed, 'first_prompt': first_prompt, 'cfg_scale': cfg_scale})
        return [[(seed, first_prompt + i, j) for j in range(num_images)] for i in range(len(prompts))]
    def edit(self, images, instructions, seed=0, first_prompt=0):
        self.calls.append({'n': len(images), 'seed': seed, 'first_prompt': first_prompt})
        return [(seed, first_prompt + i) for i in range(len(images))]


def test_generate_and_edit_draws_do_not_depend_on_batch_size():
    m = _Draws()
    runs = [call_generate(m, list('abcdefg'), 2, seed=11, batch_size=b) for b in (1, 3, 7, 32)]
    assert all(r == runs[0] for r in runs) and runs[0][5] == [(11, 5, 0), (11, 5, 1)]
    assert {c['seed'] for c in m.calls} == {11}                                  # the seed itself never moves
    assert [c['first_prompt'] for c in m.calls[7:10]] == [0, 3, 6]              # batch 3: where each batch starts
    edits = [call_edit(m, [None] * 5, ['x'] * 5, seed=2, batch_size=b) for b in (2, 5)]
    assert edits[0] == edits[1] == [(2, i) for i in range(5)]


def test_a_model_without_first_prompt_gets_seed_plus_start():
    class Old:
        def __init__(self): self.seeds = []
        def generate(self, prompts, num_images=1, seed=0): self.seeds.append(seed); return [[seed]] * len(prompts)
    m = Old()
    assert call_generate(m, list('abcde'), 1, seed=100, batch_size=2) == [[100], [100], [102], [102], [104]]
    assert m.seeds == [100, 102, 104]


def test_settings_reach_only_methods_that_take_them(cfg, suite, encoder):
    m = _Draws()
    call_generate(m, ['a', 'b'], 1, seed=0, cfg_scale=4.5); call_edit(m, [None], ['x'], seed=0, cfg_scale=4.5)
    assert m.calls[0]['cfg_scale'] == 4.5 and 'cfg_scale' not in m.calls[1]     # edit() does not take it
    call_generate(m, ['a'], 1, seed=0, cfg_scale=None)
    assert m.calls[-1]['cfg_scale'] is None                                       # None is not passed: the default stays

    class Recorder(OracleModel):
        def generate(self, prompts, num_images=1, seed=0, first_prompt=0, cfg_scale=None):
            self.seen.append((seed, cfg_scale)); return super().generate(prompts, num_images, seed, first_prompt)
    r = Recorder(suite); r.seen = []
    evaluate_toy(r, suite, cfg.override({'eval.cfg_scale': 1.5, 'eval.seed': 77}), encoder, sections=['geneval'])
    assert set(r.seen) == {(77, 1.5)}                                             # read from cfg.eval


def test_toy_scores_do_not_depend_on_batch_size(cfg, suite, encoder):
    runs = [evaluate_toy(RandomModel(seed=4), suite, cfg.override({'eval.batch_size': b}), encoder,
                         sections=['geneval', 'fid', 'edit']) for b in (1, 5, 64)]
    for sec in ('geneval', 'fid', 'edit'): assert runs[0][sec] == runs[1][sec] == runs[2][sec], sec
    # and the stand-in models draw a different scene for each prompt index (the draws are not all one)
    imgs = RandomModel().generate(['p'] * 4, seed=0)
    assert len({E.image_key(g[0]) for g in imgs}) > 1 and E.image_key(RandomModel().generate(['p'], seed=0, first_prompt=2)[0][0]) == E.image_key(imgs[2][0])


def test_call_contracts_and_skips():
    class Half:
        def answer(self, images, questions): return ['yes'][:len(questions) - 1]
        def edit(self, images, instructions, seed=0): raise NotImplementedError('no image head')
    with pytest.raises(ValueError, match=r'Half\.answer returned 1 answers for 2 questions'): call_answer(Half(), [None] * 2, ['q'] * 2)
    with pytest.raises(SectionSkipped, match=r'Half\.edit is not implemented: no image head'): call_edit(Half(), [None], ['x'], 0)
    with pytest.raises(SectionSkipped, match=r'Half has no generate\(\) method'): call_generate(Half(), ['p'], 1, 0)
    assert call_answer(type('Nones', (), {'answer': lambda self, i, q: [None, 3]})(), [None] * 2, ['q'] * 2) == ['', '3']


def test_image_or_reason_is_the_one_conversion(suite, encoder):
    assert image_or_reason(None) == (None, 'no image returned')
    assert image_or_reason(np.zeros(5)) == (None, 'unreadable image (ValueError)')
    assert image_or_reason('not an image') == (None, 'unreadable image (ValueError)')
    im, why = image_or_reason(np.full((10, 20, 3), 0.5), (16, 16))
    assert why is None and im.size == (16, 16) and im.mode == 'RGB'

    class Bad(OracleModel):      # every other image missing or not an image
        def generate(self, prompts, num_images=1, seed=0, first_prompt=0):
            good = super().generate(prompts, num_images, seed, first_prompt)
            return [g if (first_prompt + i) % 2 == 0 else [np.zeros(5)] * num_images for i, g in enumerate(good)]
        def edit(self, images, instructions, seed=0, first_prompt=0):
            return [e if i % 3 else None for i, e in enumerate(super().edit(images, instructions, seed, first_prompt))]
    f = eval_fid(Bad(suite), suite, encoder)
    assert f['skipped'] == {'unreadable image (ValueError)': len(suite.fid) // 2} and f['n_generated'] == len(suite.fid) - len(suite.fid) // 2
    e = eval_edit(Bad(suite), suite, encoder)
    n_none = len(range(0, len(suite.edit), 3))
    assert e['skipped'] == {'no image returned (scored 0)': n_none}
    assert e['exact_success'] == pytest.approx(1 - n_none / len(suite.edit))


def test_fid_and_edit_use_the_cache_before_rendering(cfg, encoder, monkeypatch):
    s = toy_suite(cfg)
    calls = []
    real_render_batch = E.render_batch
    monkeypatch.setattr(E, 'render_batch', lambda scenes, *a, **k: calls.append(len(scenes)) or real_render_batch(scenes, *a, **k))
    first = eval_fid(OracleModel(s), s, encoder), eval_edit(OracleModel(s), s, encoder)
    assert sum(calls) == len(s.fid) + 2 * len(s.edit)                           # real FID set, edit sources, edit targets
    calls.clear()
    again = eval_fid(OracleModel(s), s, encoder), eval_edit(OracleModel(s), s, encoder)
    assert calls == [] and again[0]['fd'] == first[0]['fd'] and again[1]['clip_t'] == first[1]['clip_t']
    other = ToyViT(cfg.encoder).eval()                                             # another encoder: computed again
    eval_fid(OracleModel(s), s, other)
    assert sum(calls) == len(s.fid)


def test_scene_batches_and_pil_images_give_the_same_features(suite, encoder):
    scenes = [it['scene'] for it in suite.fid[:5]]
    from illume_ref.toyworld import render_batch
    a = encoder_tokens(encoder, render_batch(scenes, suite.image_size, suite.antialias), batch_size=2)
    b = encoder_tokens(encoder, [suite.render(sc) for sc in scenes], batch_size=3)
    assert a.shape == b.shape and np.abs(a - b).max() < 1e-5
    with pytest.raises(ValueError, match='at least one image'): encoder_tokens(encoder, [])


def test_evaluate_toy_refuses_what_it_cannot_run(cfg, suite):
    with pytest.raises(ValueError, match=r"unknown sections \['ocr'\]"): evaluate_toy(BlankModel(), suite, cfg, sections=['pope', 'ocr'])
    with pytest.raises(ValueError, match=r"unknown suite 'real': expected 'toy' or a ToySuite"): evaluate_toy(BlankModel(), 'real', cfg)
    m = evaluate_toy(BlankModel(), suite, cfg, sections=['vqa'], records=True)
    assert 'records' in m['vqa'] and 'records' not in evaluate_toy(BlankModel(), suite, cfg, sections=['vqa'])['vqa']
    assert m['headline']['VQA'] == 0 and m['headline']['POPE'] is None            # a section that did not run: None


def test_sampling_settings_are_the_ones_the_config_has(cfg):
    from types import SimpleNamespace
    assert E.sampling_settings(cfg.eval.replace(cfg_scale=2.5)) == {'cfg_scale': 2.5}
    assert E.sampling_settings(cfg.eval.replace(cfg_scale=None)) == {}            # None: the model's own guidance
    assert E.sampling_settings(SimpleNamespace(cfg_scale=2.0, temperature=0.7, top_k=5, seed=1, batch_size=8)) == \
        {'cfg_scale': 2.0, 'temperature': 0.7, 'top_k': 5}


def test_first_prompt_goes_only_to_a_method_that_names_it():
    class Kw:   # takes anything through **kw but would ignore first_prompt: it must get distinct seeds per batch
        def __init__(self): self.calls = []
        def generate(self, prompts, num_images=1, seed=0, **kw):
            self.calls.append((seed, dict(kw))); return [[seed]] * len(prompts)
    m = Kw()
    call_generate(m, list('abcd'), 1, seed=10, batch_size=2, cfg_scale=3.0)
    assert m.calls == [(10, {'cfg_scale': 3.0}), (12, {'cfg_scale': 3.0})]
