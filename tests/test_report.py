"""The report (notebook 09b): `evaluate` writes metrics.json, report.md and the plots, the paper's numbers beside ours."""
import json

import pytest

from illume_ref.evaluate import AlwaysYesModel, OracleModel, RandomModel, evaluate_toy
from illume_ref.report import PAPER_RESULTS, evaluate, report_markdown

# the toy-suite fixtures of test_evaluate and the POPE files of test_benchmarks, shared rather than copied
from test_benchmarks import _pope_files
from test_evaluate import cfg, encoder, suite  # noqa: F401  (pytest fixtures)


def test_evaluate_writes_metrics_report_and_plots(tmp_path, cfg, suite, encoder):
    m = evaluate(OracleModel(suite), suite, cfg, out_dir=tmp_path, encoder=encoder)
    h = m['headline']
    assert (h['POPE'], h['MMBench'], h['VQA'], h['GenEval overall'], h['edit success']) == (100, 100, 100, 1, 1)
    assert {'metrics.json', 'report.md', 'categories.png'} <= {p.name for p in tmp_path.iterdir()}
    saved = json.loads((tmp_path / 'metrics.json').read_text())
    assert saved['headline']['POPE'] == 100 and saved['paper']['table3']['POPE'] == 88.5
    md = (tmp_path / 'report.md').read_text()
    for s in ('Table 3', 'Table 4', 'Table 6', '88.5', '75.1', '0.61', '7.76', '0.879', 'toy world', 'real benchmarks'):
        assert s in md


def test_evaluate_reports_skipped_sections(tmp_path, cfg, suite, encoder):
    class UnderstandOnly:
        def answer(self, images, questions): return ['yes'] * len(questions)
        def generate(self, prompts, num_images=1, seed=0): raise NotImplementedError('no image head')
    m = evaluate(UnderstandOnly(), suite, cfg, out_dir=tmp_path, encoder=encoder)
    assert 'pope' in m and 'geneval' not in m
    assert list(m['skipped']['geneval'].values()) == [len(suite.geneval)]
    assert 'has no edit() method' in next(iter(m['skipped']['edit']))
    assert 'geneval' in (tmp_path / 'report.md').read_text().split('Skipped')[1]


def test_evaluate_real_suite(tmp_path):
    q, img = _pope_files(tmp_path, missing=())
    m = evaluate(AlwaysYesModel(), 'real', out_dir=tmp_path / 'run', pope=(q, img))
    assert m['suite'] == 'real' and m['pope']['average']['accuracy'] == 0.5
    assert (tmp_path / 'run' / 'metrics.json').exists() and 'POPE' in (tmp_path / 'run' / 'report.md').read_text()
    with pytest.raises(ValueError, match='needs at least one'):
        evaluate(AlwaysYesModel(), 'real', out_dir=tmp_path / 'run2')



def test_evaluate_is_evaluate_toy_plus_the_paper(tmp_path, cfg, suite, encoder):
    m = evaluate(RandomModel(seed=2), suite, cfg, encoder=encoder, sections=['pope', 'geneval'])
    t = evaluate_toy(RandomModel(seed=2), suite, cfg, encoder=encoder, sections=['pope', 'geneval'])
    assert {k: v for k, v in m.items() if k != 'paper'} == t and m['paper']['table4'] == PAPER_RESULTS['table4']
    m = evaluate(RandomModel(seed=2), suite, cfg, out_dir=tmp_path, encoder=encoder, sections=['geneval'])
    saved = json.loads((tmp_path / 'metrics.json').read_text())
    assert 'records' not in saved['geneval'] and 'records' not in m['geneval']    # images never reach the JSON
    assert (tmp_path / 'geneval_failures.png').exists()
    with pytest.raises(TypeError, match='unexpected arguments for the toy suite: pope'): evaluate(RandomModel(), suite, cfg, pope=('q', 'i'))


def test_report_puts_the_paper_row_above_ours(cfg, suite, encoder):
    md = report_markdown(evaluate(AlwaysYesModel(), suite, cfg, encoder=encoder, model_name='yes-man'))
    und = md.split('## Understanding')[1].split('##')[0]
    paper_row, ours_row = [l for l in und.splitlines() if l.startswith('| ILLUME') or l.startswith('| yes-man')]
    assert paper_row.startswith('| ILLUME') and '88.5' in paper_row and '75.1' in paper_row
    assert ours_row.startswith('| yes-man') and '66.7' in ours_row               # always-yes POPE F1 = 2/3
