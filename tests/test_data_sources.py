"""Sources, mixtures and transforms of the Grain pipeline on ingested (generated) data and TFDS."""

from __future__ import annotations

import collections
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from mmjax.data import pipeline, prepare, records, transforms, tokenizer as tokenizer_lib

WORDS = 'red green blue cat dog bird tree house car boat'.split()


@pytest.fixture(scope='module')
def encoder():
  corpus = [f'a {a} {b}' for a in WORDS for b in WORDS] + ['what is jax', 'a library', 'x']
  return tokenizer_lib.TextEncoder(tokenizer_lib.train_wordpiece(corpus, 128), max_len=40)


def ingest(root: pathlib.Path, n: int, *, captions_per=3, group_every=0, text=False,
           bad=(), extra=None) -> pathlib.Path:
  """`n` generated examples ingested into root/out; indices in `bad` get corrupt image bytes
  written straight into the shards (as if a file rotted after ingestion)."""
  root.mkdir(parents=True, exist_ok=True)
  rows = []
  for i in range(n):
    row = {'id': f'{root.name}{i}',
           'captions': [f'a {WORDS[i % 10]} {WORDS[(i // 10 + j) % 10]}'
                        for j in range(captions_per)]}
    if text:
      row['query'] = f'what is {WORDS[i % 10]} {i}'
    else:
      path = root / f'{i}.png'
      Image.fromarray(np.full((20, 24, 3), (i * 7) % 256, np.uint8)).save(path)
      row['image'] = str(path)
    if group_every:
      row['group'] = f'g{i // group_every}'
    rows.append(row | (extra(i) if extra else {}))
  out = root / 'out'
  prepare.prepare(rows, [], prepare.Options(out=out, examples_per_shard=16), progress=False)
  if bad:
    import shutil  # pylint: disable=import-outside-toplevel
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
    from mmjax.data import sources  # pylint: disable=import-outside-toplevel
    src = sources.RecordSource(out)._source  # pylint: disable=protected-access
    exs = [records.decode(src[i]) for i in range(n)]
    shutil.rmtree(out)
    out.mkdir()
    w = array_record_module.ArrayRecordWriter(str(out / 'x.array_record'), 'group_size:1')
    for i, ex in enumerate(exs):
      w.write(records.encode(ex | ({'image': b'\x89PNG rotten'} if i in bad else {})))
    w.close()
    (out / 'metadata.json').write_text(json.dumps({'format': records.FORMAT,
                                                    'shards': ['x.array_record']}))
  return out


def records_config(cfg, path, **kw):
  cfg.data.name, cfg.data.path = 'records', str(path)
  for k, v in kw.items():
    cfg.data[k] = v
  return cfg


def take(cfg, encoder, n, **kw):
  it = iter(pipeline.make_train_dataset(cfg, encoder, **kw))
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_records_batches_have_the_documented_columns(tiny_config, encoder, tmp_path):
  cfg = records_config(tiny_config, ingest(tmp_path / 'a', 40, group_every=4), augment='light',
                       num_hard_negatives=2)
  batch = take(cfg, encoder, 1)[0]
  spec = pipeline.batch_spec(cfg)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: (shape, np.dtype(dtype)) for k, (shape, dtype) in spec.items()}
  assert (batch['neg_image_valid'] == 0).all() and (batch['weight'] == 1).all()


def test_group_column_marks_shared_groups_and_captions(tiny_config, encoder, tmp_path):
  cfg = records_config(tiny_config, ingest(tmp_path / 'a', 32, captions_per=1, group_every=4))
  tiny_config.batch_size = 32  # The whole dataset in one batch.
  batch = take(cfg, encoder, 1)[0]
  first = encoder.tokenizer.decode_batch(batch['tokens'].tolist())
  # Expected: same group id (i // 4), or the same caption (WORDS[i % 10] WORDS[i // 10]).
  ids = [int(np.argmax(batch['image'][r, 0, 0, 0] == (np.arange(32) * 7) % 256)) for r in range(32)]
  parent = list(range(32))

  def find(i):
    while parent[i] != i:
      i = parent[i]
    return i

  for i in range(32):
    for j in range(32):
      if ids[i] // 4 == ids[j] // 4 or first[i] == first[j]:
        parent[find(i)] = find(j)
  for r in range(32):
    for q in range(32):
      assert (batch['group'][r] == batch['group'][q]) == (find(r) == find(q)), (r, q)


def test_assign_groups_is_transitive_and_distinct():
  keys = {'group_key': np.array([5, 5, -1, -1, -1]), 'caption_key': np.array([1, 2, 2, 3, 4]),
          'image_key': np.array([10, 11, 12, 13, 13]), 'tokens': np.zeros((5, 2))}
  g = transforms.assign_groups(keys)['group']
  assert g[0] == g[1] == g[2] and g[3] == g[4] and g[0] != g[3] and g.dtype == np.int32
  assert 'caption_key' not in transforms.assign_groups(keys)


def test_corrupt_images_are_skipped_and_counted_then_the_run_fails(tiny_config, encoder, tmp_path):
  out = ingest(tmp_path / 'a', 50, bad={3, 17})
  cfg = records_config(tiny_config, out, max_skip_fraction=0.1)
  batches = take(cfg, encoder, 6)  # ~2 epochs: every bad example met at least once.
  assert sum(len(b['tokens']) for b in batches) == 96
  cfg.data.max_skip_fraction = 0.01
  with pytest.raises(transforms.CorruptDataError,
                     match=r'could not be decoded .*max_skip_fraction'):
    take(cfg, encoder, 20)


def test_mixture_proportions_and_single_source_sub_batches(tiny_config, encoder, tmp_path):
  a, b = ingest(tmp_path / 'a', 30), ingest(tmp_path / 'b', 30)
  tiny_config.data.mixture = (dict(name='records', path=str(a), weight=3.0),
                              dict(name='records', path=str(b), weight=1.0))
  batches = take(tiny_config, encoder, 25)
  counts = collections.Counter(np.concatenate([x['source'] for x in batches]))
  assert abs(counts[0] / 400 - 0.75) < 0.03
  tiny_config.data.sub_batches = 4
  batches = take(tiny_config, encoder, 25)
  subs = [s for x in batches for s in x['source'].reshape(4, 4)]
  assert all(len(set(s.tolist())) == 1 for s in subs)  # Every sub-batch from one source.
  assert abs(np.mean([s[0] == 0 for s in subs]) - 0.75) < 0.1


def test_mixture_temperature_sets_the_proportions_of_the_rows(tiny_config, encoder, tmp_path):
  """Sources of 60 and 15 examples, equal weights: T = 1 samples by size (0.8), T = 2 by its
  square root (2/3); the default (0) keeps the weights (0.5)."""
  a, b = ingest(tmp_path / 'a', 60), ingest(tmp_path / 'b', 15)
  tiny_config.data.mixture = (dict(name='records', path=str(a)), dict(name='records', path=str(b)))
  for temperature, want in ((1.0, 0.8), (2.0, 2 / 3)):
    tiny_config.data.mixture_temperature = temperature
    batches = take(tiny_config, encoder, 25)
    counts = collections.Counter(np.concatenate([x['source'] for x in batches]))
    assert abs(counts[0] / 400 - want) < 0.03, (temperature, counts)


def test_mixture_order_is_deterministic_resumable_and_process_sharded(tiny_config, encoder,
                                                                      tmp_path):
  tiny_config.data.mixture = (dict(name='records', path=str(ingest(tmp_path / 'a', 40)),
                                   weight=2.0),
                              dict(name='demo', weight=1.0))
  first = take(tiny_config, encoder, 3)
  assert_same(first, take(tiny_config, encoder, 3))
  it = iter(pipeline.make_train_dataset(tiny_config, encoder))
  next(it)
  state = json.loads(json.dumps(it.get_state()))  # What the checkpoint stores.
  expected = [next(it) for _ in range(2)]
  fresh = iter(pipeline.make_train_dataset(tiny_config, encoder))
  fresh.set_state(state)
  assert_same([next(fresh) for _ in range(2)], expected)
  shards = [take(tiny_config, encoder, 3, process_index=p, process_count=2) for p in range(2)]
  for k in range(3):
    rows = lambda b: {bytes(t) + bytes(i) for t, i in zip(b['tokens'], b['image'])}
    one, two = rows(first[k]), [rows(shards[p][k]) for p in range(2)]
    assert not two[0] & two[1] and two[0] | two[1] == one


def test_every_caption_is_sampled_across_epochs(tiny_config, encoder, tmp_path):
  cfg = records_config(tiny_config, ingest(tmp_path / 'a', 16, captions_per=3))
  seen = collections.defaultdict(set)
  for batch in take(cfg, encoder, 12):
    for image, tokens in zip(batch['image'], batch['tokens']):
      seen[int(image[0, 0, 0])].add(bytes(tokens))
  assert len(seen) == 16 and all(len(s) >= 2 for s in seen.values())


def test_text_pairs_and_inline_hard_negatives(tiny_config, encoder, tmp_path):
  out = ingest(tmp_path / 't', 20, text=True,
               extra=lambda i: {'neg_texts': ['a library'] * (i % 3)})
  cfg = records_config(tiny_config, out, num_hard_negatives=2)
  batch = take(cfg, encoder, 1)[0]
  spec = pipeline.batch_spec(cfg, text_pairs=True)
  assert set(batch) == set(spec) and 'image' not in batch
  assert batch['query_tokens'].shape == (16, 40)
  lib = encoder.encode_one('a library')[0]
  for tokens, valid in zip(batch['neg_tokens'], batch['neg_text_valid']):
    assert valid.sum() <= 2 and all((t == lib).all() for t in tokens[valid == 1])


def test_mixing_text_pairs_with_images_is_refused(tiny_config, encoder, tmp_path):
  tiny_config.data.mixture = (dict(name='records', path=str(ingest(tmp_path / 't', 4, text=True))),
                              dict(name='demo'))
  with pytest.raises(ValueError, match='mixes image-text and text-text'):
    pipeline.make_train_dataset(tiny_config, encoder)


_BUILDERS: dict[str, type] = {}


def _tiny_captions_builder() -> type:
  """The builder class, defined once per process: TFDS registers a builder by its class name
  and refuses a second class of the same name (several test files build this dataset)."""
  if 'tiny_captions' in _BUILDERS:
    return _BUILDERS['tiny_captions']
  tfds = pytest.importorskip('tensorflow_datasets')

  class TinyCaptions(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          # Tensor, not Image: encoding an Image feature at build time needs TensorFlow.
          'image': tfds.features.Tensor(shape=(10, 14, 3), dtype=np.uint8),
          'image/id': tfds.features.Scalar(np.int64),
          'captions': tfds.features.Sequence({'text': tfds.features.Text()})}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i in range(24):
        yield i, {'image': np.full((10, 14, 3), i * 9, np.uint8), 'image/id': i // 2,
                  'captions': {'text': [f'a {WORDS[i % 10]} cat', f'a {WORDS[i % 10]} dog']}}

  _BUILDERS['tiny_captions'] = TinyCaptions
  return TinyCaptions


def build_tfds(data_dir: pathlib.Path) -> None:
  """A tiny coco-captions-like TFDS dataset, built locally (no download, no TensorFlow)."""
  builder = _tiny_captions_builder()(data_dir=str(data_dir), file_format='array_record')
  builder.download_and_prepare()


def test_tfds_source_with_feature_mapping(tiny_config, encoder, tmp_path):
  build_tfds(tmp_path)
  cfg = tiny_config
  cfg.data.name, cfg.data.path, cfg.data.tfds_name = 'tfds', str(tmp_path), 'tiny_captions'
  cfg.data.captions_key, cfg.data.group_key = 'captions/text', 'image/id'
  batch = take(cfg, encoder, 1)[0]
  assert batch['image'].shape == (16, 16, 16, 3)
  value = batch['image'][:, 0, 0, 0].astype(int) // 9  # Example index; group = index // 2.
  for r in range(16):
    for q in range(16):
      if value[r] // 2 == value[q] // 2:
        assert batch['group'][r] == batch['group'][q]
  cfg.data.captions_key = 'caption'
  with pytest.raises(KeyError, match="feature 'caption' not found"):
    take(cfg, encoder, 1)


@pytest.mark.parametrize('change, message', [
    (dict(mixture=(dict(name='records', weight=1.0),)), r'config.data.mixture\[0\].path is empty'),
    (dict(mixture=(dict(name='demo', wieght=1.0),)), r"unknown field\(s\) \['wieght'\]"),
    (dict(mixture=(dict(name='demo', weight=0.0),)), r'weight=0.0 must be > 0'),
    (dict(name='tfds'), 'tfds_name is empty'),
    (dict(sub_batches=3), 'sub_batches=3 does not divide config.batch_size=16'),
    (dict(augment='heavy'), "config.data.augment='heavy' is not one of"),
    (dict(max_skip_fraction=1.5), r'max_skip_fraction=1.5 must be in \[0, 1\]'),
])
def test_bad_data_config_is_refused(tiny_config, change, message):
  from mmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  for k, v in change.items():
    tiny_config.data[k] = v
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(tiny_config)


def test_checkpointed_iterator_resumes_identical_batches(tiny_config, encoder, tmp_path):
  """Through the run's own Checkpointer (Orbax + Grain), with a mixture and a records source."""
  from mmjax.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  tiny_config.data.mixture = (dict(name='records', path=str(ingest(tmp_path / 'a', 24))),
                              dict(name='demo', weight=0.5))
  it = iter(pipeline.make_train_dataset(tiny_config, encoder))
  for _ in range(3):
    next(it)
  ckpt = ckpt_lib.Checkpointer(tmp_path / 'run', keep=1, async_save=False)
  ckpt.save(3, {'x': np.zeros(2, np.float32)}, it, {'model': {}})
  ckpt.close()
  expected = [next(it) for _ in range(2)]
  fresh = iter(pipeline.make_train_dataset(tiny_config, encoder))
  ckpt = ckpt_lib.Checkpointer(tmp_path / 'run', keep=1, async_save=False)
  step, _ = ckpt.restore_latest({'x': np.zeros(2, np.float32)}, fresh, {'model': {}})
  ckpt.close()
  assert step == 3
  assert_same([next(fresh) for _ in range(2)], expected)


def test_duplicates_are_linked_across_processes(tiny_config, encoder, tmp_path):
  """Two processes' rows that share only a group id (not a caption or image) get one `group`
  value, the same as in the one-process batch; `gather` stands in for process_allgather."""
  cfg = records_config(tiny_config, ingest(tmp_path / 'a', 32, captions_per=1, group_every=4))
  cfg.batch_size = 32  # The whole dataset in one batch.
  single = take(cfg, encoder, 1)[0]
  shards = [take(cfg, encoder, 1, process_index=p, process_count=2)[0] for p in range(2)]
  assert all('group' not in b and 'caption_key' in b for b in shards)  # Keys kept for linking.

  def gather(tree):
    return {k: np.stack([b[k].astype(np.int32) for b in shards]) for k in tree}

  linked = [pipeline.link_duplicates(shards[p], p, gather) for p in range(2)]
  group_of = {bytes(i): g for i, g in zip(single['image'], single['group'])}
  across = 0
  for p in range(2):
    assert 'caption_key' not in linked[p]
    for image, group in zip(linked[p]['image'], linked[p]['group']):
      assert group == group_of[bytes(image)]
    across += len(set(linked[p]['group']) & set(linked[1 - p]['group']))
  assert across > 0  # Some group spans both processes' rows.
  one = take(cfg, encoder, 1)[0]
  assert pipeline.link_duplicates(one, 0) is one  # One process: grouped in the pipeline.


@pytest.mark.slow
def test_training_runs_on_ingested_records(tiny_config, tmp_path):
  """The loop end to end on a records source; its tokenizer is trained on that source."""
  from mmjax.train import loop  # pylint: disable=import-outside-toplevel
  cfg = records_config(tiny_config, ingest(tmp_path / 'a', 40, group_every=2))
  cfg.total_steps, cfg.eval.every_steps, cfg.checkpoint.every_steps = 2, 2, 2
  metrics = loop.train_and_evaluate(cfg, tmp_path / 'run')
  assert np.isfinite(metrics['i2t/recall@1'])
  vocab = tokenizer_lib.load(tmp_path / 'run').get_vocab()
  assert 'boat' in vocab and 'house' in vocab


def test_duplicates_in_a_batch_are_masked_out_of_the_loss(tiny_config, encoder, tmp_path):
  """The pipeline's `group` column into `losses.sigmoid_loss`: exactly the pairs of duplicate
  examples (the same image and caption twice) leave the loss; everything else counts."""
  from mmjax import losses  # pylint: disable=import-outside-toplevel
  root = tmp_path / 'd'
  root.mkdir()
  rows = []
  for i in range(16):
    Image.fromarray(np.full((16, 16, 3), 10 * (i // 2), np.uint8)).save(root / f'{i}.png')
    rows.append({'image': str(root / f'{i}.png'), 'captions': [f'a {WORDS[i // 2]} car']})
  prepare.prepare(rows, [], prepare.Options(out=root / 'out'), progress=False)
  cfg = records_config(tiny_config, root / 'out')
  batch = take(cfg, encoder, 1)[0]
  example = batch['image'][:, 0, 0, 0] // 10  # Which duplicate pair a row is.
  rng = np.random.default_rng(0)
  zimg, ztxt = (z / np.linalg.norm(z, axis=1, keepdims=True)
                for z in rng.normal(size=(2, 16, 8)).astype(np.float32))
  t, b = 10.0, -5.0
  logits = t * zimg @ ztxt.T + b
  eye = np.eye(16, dtype=bool)
  nll = -np.log(1 / (1 + np.exp(-np.where(eye, logits, -logits))))
  counted = eye | (example[:, None] != example[None, :])
  assert counted.sum() == 16 * 16 - 16  # Each row has exactly one duplicate in the batch.
  expected = (nll * counted).sum() / 16
  got = losses.sigmoid_loss(zimg, ztxt, t, b, batch['group'])
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  assert not np.isclose(float(losses.sigmoid_loss(zimg, ztxt, t, b)), expected)


def test_copies_of_one_image_stay_one_group_under_augmentation(tiny_config, encoder, tmp_path):
  root = tmp_path / 'd'
  root.mkdir()
  rows = []
  for i in range(16):  # i and i + 8: the same image file content, different captions.
    Image.fromarray(np.full((24, 24, 3), 12 * (i % 8), np.uint8)).save(root / f'{i}.png')
    rows.append({'image': str(root / f'{i}.png'), 'captions': [f'{WORDS[i % 10]} {i}']})
  prepare.prepare(rows, [], prepare.Options(out=root / 'out'), progress=False)
  batch = take(records_config(tiny_config, root / 'out', augment='light'), encoder, 1)[0]
  values, counts = np.unique(batch['group'], return_counts=True)
  assert len(values) == 8 and (counts == 2).all()


@pytest.mark.slow  # 33 s each; the query role also trains in test_objectives (text_text task)
@pytest.mark.parametrize('text', [False, True], ids=['image-text', 'text-text'])
def test_training_uses_hard_negatives_and_text_pairs(tiny_config, tmp_path, text):
  """Both kinds of batches, with hard negatives, train end to end through the CLI's loop (that
  the negatives change the loss and its gradients: tests/test_distributed.py)."""
  from mmjax.train import loop, step as step_lib  # pylint: disable=import-outside-toplevel
  root = tmp_path / 'src'

  def negatives(i):
    out = {'neg_texts': [f'a {WORDS[(i + 3) % 10]} {WORDS[(i + 5) % 10]}'] * (1 + i % 2)}
    if not text:
      out['neg_images'] = [str(root / f'{(i + 1) % 24}.png')]
    return out

  cfg = records_config(tiny_config, ingest(root, 24, text=text, extra=negatives),
                       num_hard_negatives=2)
  cfg.total_steps, cfg.eval.num_scenes = 1, 32
  assert step_lib.contrastive_roles(cfg) == (('query', 'text') if text else ('image', 'text'))
  columns = pipeline.train_columns(cfg)
  assert 'neg_tokens' in columns and ('neg_image' in columns) == (not text)
  loop.train_and_evaluate(cfg, tmp_path / 'run')
  line = json.loads((tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()[0])
  assert np.isfinite(line['train/loss'])
