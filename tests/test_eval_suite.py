"""Evaluators as config (config.evals.<name>): validation, cadence, every evaluator on a real
(initialised) model; slow: a training run with evaluators, --mode=eval and the robustness report
(JSON + PNG) on the tiny config."""

import json
import math

import numpy as np

import pytest

from mmjax import config as config_lib
from mmjax.cli import robustness
from mmjax.eval import evaluators, specs
from mmjax.train import loop


@pytest.mark.parametrize('entry,match', [
    ({'type': 'bogus'}, "config.evals.x: type='bogus' is not one of"),
    ({'type': 'zero_shot', 'colour': 'red'}, 'config.evals.x: unknown field colour'),
    ({'type': 'retrieval', 'metrics': ('recall@0',)}, 'Unknown metric'),
    ({'type': 'zero_shot', 'attribute': 'size'}, "attribute='size'"),
    ({'type': 'zero_shot', 'templates': ('no slot',)}, 'templates'),
    ({'type': 'linear_probe', 'shots': 0}, 'shots=0 must be >= 1'),
    ({'type': 'robustness', 'corruptions': ('fog',)}, "unknown \\['fog'\\]"),
    ({'type': 'robustness', 'severities': (0, 6)}, 'severities'),
    ({'type': 'retrieval', 'every_steps': -1}, 'every_steps=-1'),
    ({'type': 'retrieval', 'num_scenes': 'many'}, 'num_scenes'),
    ({'type': 'retrieval', 'index_reorder': -1}, 'index_reorder=-1 must be >= 0'),
])
def test_bad_evaluator_config_is_refused(tiny_config, entry, match):
  tiny_config.evals.x = entry
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(tiny_config)


def test_bad_primary_metrics_and_spec_helper(tiny_config):
  tiny_config.eval.metrics = ('recall@1', 'auc')
  with pytest.raises(config_lib.ConfigError, match="config.eval: .*Unknown metric 'auc'"):
    config_lib.validate(tiny_config)
  s = specs.spec('zero_shot', attribute='colour')
  assert s.type == 'zero_shot' and s.num_images == specs.DEFAULTS['zero_shot']['num_images']
  with pytest.raises(specs.SpecError, match='Unknown fields'):
    specs.spec('zero_shot', shots=3)


def eval_config(config):
  config.eval.every_steps = 2
  config.eval.num_scenes = 16
  config.eval.metrics = ('recall@1', 'ndcg@5', 'map')
  config.evals.zs = specs.spec('zero_shot', num_images=20, every_steps=1)
  config.evals.probe = specs.spec('linear_probe', attribute='colour', shots=2, num_test=20)
  config.evals.robust = specs.spec('robustness', num_scenes=12, corruptions=('blur', 'jpeg'),
                                   text_perturbations=('typos', 'attribute_swap'),
                                   severities=(1, 5))
  # A corpus above index_min_corpus: searched with ScaNN, parameters overridden by the config.
  config.evals.ann = specs.spec('retrieval', num_scenes=24, index_min_corpus=20,
                                index_reorder=24, metrics=('recall@1', 'mrr'))
  return config


def test_suite_cadence(tiny_config):
  suite = evaluators.build_suite(eval_config(tiny_config))
  every = ['demo', 'ann', 'probe', 'robust', 'zs']
  assert [e.name for e in suite.evaluators] == every
  assert [e.name for e in suite.select(1).evaluators] == ['zs']
  assert [e.name for e in suite.select(2).evaluators] == every
  assert [e.name for e in suite.select(3, last=True).evaluators] == every
  assert [e.name for e in suite.select(3).evaluators] == ['zs']  # Every step.
  assert not evaluators.Suite([])


def test_every_evaluator_on_an_initialised_model(tiny_config, tmp_path):
  """All evaluator types run through the real Embedder on the 8-device mesh."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  config = eval_config(tiny_config)
  config.evals.clu = specs.spec('clustering', num_images=24, n_init=2)
  config.evals.grd = specs.spec('grounding', num_scenes=8, num_distractors=2)
  run = loop.setup(config, tmp_path)
  params = nn.unbox(run.model.init(jax.random.key(0), *run.model.init_inputs())['params'])
  suite = evaluators.build_suite(config)
  m = loop.evaluate(run, params, suite)
  for key in ('i2t/recall@1', 'i2t/ndcg@5', 't2i/map', 'zs/top1', 'zs/top5', 'zs/mean_per_class',
              'zs/per_class/star', 'probe/top1', 'probe/per_class/red',
              'robust/blur/s5/i2t/recall@1', 'robust/attribute_swap/s1/t2i/recall@1_rel',
              'robust/jpeg/mean_rel', 'robust/compositionality/colour', 'ann/i2t/recall@1',
              'ann/t2i/mrr', 'ann/i2t/index_recall@10', 'clu/nmi', 'clu/ari', 'clu/ami',
              'grd/hit@1', 'grd/chance'):
    assert key in m, key
    # An untrained model may have a clean recall of 0, and then no relative value (nan).
    assert 0.0 <= m[key] <= 20.0 or (key.endswith('_rel') and math.isnan(m[key])), (key, m[key])
  assert 'i2t/recall@5' not in m  # Only the configured metrics.
  assert m['ann/i2t/index_recall@10'] == 1.0  # Reordering the whole corpus: exact.
  assert suite.evaluators[1].evaluator.index_overrides == {'reorder': 24}


@pytest.fixture(scope='module')
def suite_run(tmp_path_factory):
  from configs import tiny  # pylint: disable=import-outside-toplevel
  config = eval_config(tiny.get_config())
  config.total_steps = 2
  config.checkpoint.every_steps = 2
  workdir = tmp_path_factory.mktemp('suite')
  result = loop.train_and_evaluate(config, workdir)
  return config, workdir, result


@pytest.mark.slow
def test_evaluators_run_on_their_cadence_in_training(suite_run):
  _, workdir, result = suite_run
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  evals = {l['step']: l for l in lines if any(k.startswith('eval/') for k in l)}
  assert 'eval/zs/top1' in evals[1] and 'eval/i2t/recall@1' not in evals[1]
  for key in ('eval/zs/top1', 'eval/i2t/ndcg@5', 'eval/t2i/map', 'eval/probe/mean_per_class',
              'eval/probe/per_class/red', 'eval/robust/blur/s5/i2t/recall@1',
              'eval/robust/attribute_swap/s1/t2i/recall@1_rel',
              'eval/robust/compositionality/colour'):
    assert key in evals[2], key
  for key in ('zs/top1', 'zs/top5', 'i2t/recall@1', 'probe/top1', 'robust/jpeg/mean_rel'):
    assert 0.0 <= result[key] <= 10.0, key
  on_disk = json.loads((workdir / 'eval.json').read_text())
  assert on_disk['zs/top1'] == result['zs/top1']


@pytest.mark.slow
def test_mode_eval_runs_every_evaluator(suite_run):
  config, workdir, result = suite_run
  (workdir / 'eval.json').unlink()
  again = loop.evaluate_checkpoint(config, workdir)
  assert again['step'] == 2
  for key in ('i2t/recall@1', 'zs/top1', 'probe/top1', 'robust/clean/t2i/recall@1'):
    assert again[key] == pytest.approx(result[key]), key
  assert json.loads((workdir / 'eval.json').read_text())['zs/top1'] == again['zs/top1']


@pytest.mark.slow
def test_robustness_report_writes_json_and_png(suite_run, capsys):
  config, workdir, _ = suite_run
  results = robustness.run_report(config, workdir)
  out = workdir / 'robustness'
  assert (out / 'robustness.png').read_bytes()[:4] == b'\x89PNG'
  saved = json.loads((out / 'robustness.json').read_text())
  assert saved['step'] == 2 and saved['spec']['num_scenes'] == 12
  assert saved['results'] == pytest.approx(results)
  printed = capsys.readouterr().out
  assert 'blur' in printed and 'compositionality/colour' in printed


def test_format_results_lists_named_evaluators():
  text = evaluators.format_results({'i2t/recall@1': 0.5, 't2i/recall@1': 0.25, 'zs/top1': 0.75,
                                    'zs/per_class/red': 1.0}, title='T')
  assert text.splitlines()[0] == 'T' and 'zs: top1=0.7500' in text and 'per_class' not in text


class _OracleEmbedder:
  """Embeds solid-colour image i (pixel value 10 * i) and any caption naming 'item i' as the
  one-hot vector e_i, so every metric of a correct evaluator is exactly 1."""

  def embed_images(self, images):
    return np.eye(16, dtype=np.float32)[np.round(images[:, 0, 0, 0] / 10).astype(int)]

  def embed_texts(self, texts):
    return np.eye(16, dtype=np.float32)[[int(t.split('item ')[1].split()[0]) for t in texts]]


def _ingest_eval_set(tmp_path, text=False):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from mmjax.data import prepare  # pylint: disable=import-outside-toplevel
  rows = []
  for i in range(6):
    row = {'captions': [f'item {i} first', f'the item {i} again']}
    if text:
      row['query'] = f'which item {i}'
    else:
      Image.fromarray(np.full((20, 24, 3), 10 * i, np.uint8)).save(tmp_path / f'{i}.png')
      row['image'] = str(tmp_path / f'{i}.png')
    rows.append(row)
  prepare.prepare(rows, [], prepare.Options(out=tmp_path / 'out'), progress=False)
  return tmp_path / 'out'


@pytest.mark.parametrize('text', [False, True], ids=['image-text', 'text-text'])
def test_retrieval_on_an_ingested_dataset(tiny_config, tmp_path, text):
  """config.evals.<name> with dataset='records': every caption of each image is relevant to it."""
  tiny_config.evals.held = specs.spec('retrieval', dataset='records',
                                      path=str(_ingest_eval_set(tmp_path, text)), max_examples=5,
                                      metrics=('recall@1', 'hit@1', 'recall@5', 'mrr'))
  config_lib.validate(tiny_config)
  suite = evaluators.build_suite(tiny_config)
  held = suite.evaluators[1]
  assert len(held.evaluator.captions) == 10  # 5 examples x 2 captions
  m = held(_OracleEmbedder())
  q2t, t2q = ('q2t', 't2q') if text else ('i2t', 't2i')
  # Each image has two captions: its top 1 holds one of them (hit), half of them (recall).
  assert {k: m[f'held/{q2t}/{k}'] for k in ('hit@1', 'recall@1', 'recall@5', 'mrr')} == {
      'hit@1': 1.0, 'recall@1': 0.5, 'recall@5': 1.0, 'mrr': 1.0}
  assert m[f'held/{t2q}/recall@1'] == m[f'held/{t2q}/hit@1'] == 1.0
  # A model that confuses items 0 and 1 loses exactly their share.
  confused = _OracleEmbedder()
  base = confused.embed_texts
  confused.embed_texts = lambda t: base([s.replace('item 1 ', 'item 0 ') for s in t])
  m = held(confused)
  assert m[f'held/{t2q}/recall@1'] == pytest.approx(0.8)  # Captions of 1 now rank image 0 first.


def test_retrieval_on_records_needs_a_path(tiny_config):
  tiny_config.evals.held = {'type': 'retrieval', 'dataset': 'records'}
  with pytest.raises(config_lib.ConfigError, match="dataset='records' needs path="):
    config_lib.validate(tiny_config)


def _held(path='data/val', **kw):
  return specs.spec('retrieval', dataset='records', path=str(path), **kw)


@pytest.mark.parametrize('data, evals, primary, want, names', [
    # The demo run: the demo scenes, whatever else it evaluates.
    ('demo', {'held': _held()}, '', 'demo', ['demo', 'held']),
    # Real data: its one held-out split; the demo scenes are not evaluated at all.
    ('records', {'held': _held(), 'zs': specs.spec('zero_shot')}, '', 'held', ['held', 'zs']),
    ('tfds', {'val': specs.spec('retrieval', dataset='tfds', tfds_name='x')}, '', 'val', ['val']),
    # A mixture with the demo: the held-out split leads, the demo scenes stay an extra line.
    ('mixture', {'held': _held()}, '', 'held', ['held', 'demo']),
    # Real data without a held-out split: the demo scenes (and a warning).
    ('records', {}, '', 'demo', ['demo']),
    # Chosen by name.
    ('records', {'held': _held()}, 'demo', 'demo', ['demo', 'held']),
    ('demo', {'held': _held(), 'other': _held()}, 'other', 'other', ['other', 'demo', 'held']),
])
def test_primary_evaluator_is_chosen_by_the_config(tiny_config, data, evals, primary, want,
                                                   names):
  if data == 'mixture':
    tiny_config.data.mixture = (dict(name='records', path='data/train'), dict(name='demo'))
  elif data == 'records':
    tiny_config.data.name, tiny_config.data.path = 'records', 'data/train'
  elif data == 'tfds':
    tiny_config.data.name, tiny_config.data.tfds_name = 'tfds', 'x'
  for name, entry in evals.items():
    tiny_config.evals[name] = entry
  tiny_config.eval.primary = primary
  config_lib.validate(tiny_config)
  assert specs.primary_name(tiny_config) == want
  suite = evaluators.build_suite(tiny_config)
  assert [e.name for e in suite.evaluators] == names
  assert [e.primary for e in suite.evaluators] == [True] + [False] * (len(names) - 1)


@pytest.mark.parametrize('change, match', [
    (dict(primary='held_out'), r"config.eval.primary='held_out' is not an evaluator of this run; "
                               r"available: 'demo', 'a', 'b'"),
    (dict(), r"several held-out evaluators \('a', 'b'\); set config.eval.primary"),
    (dict(evals_demo=True), r"config.evals.demo: the name 'demo' is the evaluator built from"),
])
def test_bad_or_ambiguous_primary_is_a_config_error(tiny_config, change, match):
  tiny_config.data.name, tiny_config.data.path = 'records', 'data/train'
  tiny_config.evals.a, tiny_config.evals.b = _held(), _held('data/val2')
  tiny_config.eval.primary = change.get('primary', '')
  if change.get('evals_demo'):
    tiny_config.evals.demo = specs.spec('retrieval')
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(tiny_config)


def test_held_out_primary_gives_the_table_eval_json_keys_and_chance(tiny_config, tmp_path):
  """A records run with a held-out split: its metrics are the unprefixed keys, the title and the
  chance level describe it (5 images, 10 captions), the demo scenes are not evaluated."""
  path = _ingest_eval_set(tmp_path)
  tiny_config.data.name, tiny_config.data.path = 'records', str(path)
  tiny_config.evals.held = _held(path, max_examples=5, metrics=('recall@1', 'mrr'))
  config_lib.validate(tiny_config)
  suite = evaluators.build_suite(tiny_config)
  m = suite(_OracleEmbedder())
  assert m == {'i2t/recall@1': 0.5, 'i2t/mrr': 1.0, 't2i/recall@1': 1.0, 't2i/mrr': 1.0}
  assert suite.with_prefixed_primary(m) == {**m, **{f'held/{k}': v for k, v in m.items()}}
  head = suite.headline()
  assert head['primary'] == 'held' and head['primary_dataset'] == f'records {path}'
  assert head['num_eval_pairs'] == 10 and head['chance/recall@1'] == pytest.approx(0.1)
  assert head['chance/i2t/recall@1'] == pytest.approx(0.1)  # 10 captions to pick from
  assert head['chance/t2i/recall@1'] == pytest.approx(0.2)  # 5 images
  title = suite.title(7)
  assert title == ('held retrieval at step 7 (5 images, 10 captions, chance R@1 i2t 0.1000, '
                   't2i 0.2000):')
  table = evaluators.format_results(m, title=title).splitlines()
  assert table[0] == title and table[2].split()[0] == 'i2t' and len(table) == 4
  # The demo primary keeps its title.
  demo_suite = evaluators.build_suite(specs_demo(tiny_config))
  assert demo_suite.title(3) == 'Validation retrieval at step 3 (64 pairs, chance R@1 = 0.0156):'


def specs_demo(config):
  config.data.name, config.data.path, config.eval.primary = 'demo', '', 'demo'
  return config
