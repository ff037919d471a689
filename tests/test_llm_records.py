"""The LLM embedder on real data: i2t / t2i rows of ingested records and TFDS, its held-out
evaluation, and its ViT imported from CLIP / SigLIP through config.init.image."""

import copy
import dataclasses
import json
import pathlib

import flax
import jax
import numpy as np
import pytest
from PIL import Image

from mmjax import config as config_lib, hf, kinds
from mmjax.kinds import llm as llm_kind
from mmjax.data import llm_tasks, prepare
from mmjax.eval import evaluators, specs
from mmjax.types import IMAGE_SLOT

FIXTURES = pathlib.Path(__file__).parent / 'fixtures' / 'hf'
COLOURS = 'red green blue yellow purple orange pink brown grey black'.split()


def ingest(root: pathlib.Path, n: int, offset: int = 0) -> pathlib.Path:
  """n solid-colour images (pixel value 10 * i) with two captions each naming 'item i'."""
  root.mkdir(parents=True, exist_ok=True)
  rows = []
  for i in range(offset, offset + n):
    Image.fromarray(np.full((20, 24, 3), 10 * i, np.uint8)).save(root / f'{i}.png')
    rows.append({'image': str(root / f'{i}.png'),
                 'captions': [f'item {i} a {COLOURS[i % 10]} square on the left',
                              f'the item {i} again']})
  prepare.prepare(rows, [], prepare.Options(out=root / 'out', examples_per_shard=16),
                  progress=False)
  return root / 'out'


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('llm_records')
  return ingest(root / 'train', 24), ingest(root / 'val', 6, offset=10)


def records_config(train, val=None):
  from configs import llm_embed_records  # pylint: disable=import-outside-toplevel
  c = llm_embed_records.get_config()
  c.batch_size, c.total_steps, c.log_every_steps = 16, 2, 1
  c.model.image.image_size, c.model.image.patch_size = 16, 4
  c.model.image.width, c.model.image.depth, c.model.image.mlp_dim = 32, 1, 64
  c.model.decoder.width, c.model.decoder.depth, c.model.decoder.mlp_dim = 32, 1, 64
  c.model.decoder.vocab_size, c.tokenizer.vocab_size = 264, 256
  c.model.llm.matryoshka_dims = (16,)
  c.data.path = str(train)
  c.data.read_threads = 1
  c.evals.held_out.path = str(val or train)
  c.eval.batch_size = 16
  c.checkpoint.every_steps = c.eval.every_steps = 2
  return c


@pytest.fixture(scope='module')
def run_parts(corpus, tmp_path_factory):
  """(config, encoder, contract) of a records run (tokenizer trained on the records)."""
  from mmjax.train import loop  # pylint: disable=import-outside-toplevel
  config = records_config(*corpus)
  # Plain resize, no augmentation: each row's pixels name its image (10 * index).
  config.data.augment, config.data.resize = 'none', 'crop'
  config_lib.validate(config)
  tok = loop.get_tokenizer(config, tmp_path_factory.mktemp('tok'))
  kind = kinds.get(config)
  return config, kind.encoder(config, tok), kind.contract(config)


def batches(config, encoder, contract, n=2, **kw):
  it = iter(kinds.get(config).train_dataset(config, encoder, contract, **kw))
  return [next(it) for _ in range(n)]


def test_records_give_i2t_and_t2i_rows_with_instructions(run_parts):
  config, enc, contract = run_parts
  assert 'item' in enc.tokenizer.get_vocab() and 'square' in enc.tokenizer.get_vocab()
  two = batches(config, enc, contract, 2)
  batch = two[0]
  assert {k: v.shape for k, v in batch.items()} == {k: s for k, (s, _) in contract.spec.items()}
  tasks = batch['task']
  i2t, t2i = tasks == llm_tasks.TASKS.index('i2t'), tasks == llm_tasks.TASKS.index('t2i')
  assert i2t.any() and t2i.any() and (i2t | t2i).all()  # No composed rows.
  slots = enc.tokens_per_image
  q_slots, c_slots = ((batch[f'{p}tokens'] == IMAGE_SLOT).sum(1) for p in ('query_', 'cand_'))
  np.testing.assert_array_equal(q_slots, np.where(i2t, slots, 0))
  np.testing.assert_array_equal(c_slots, np.where(t2i, slots, 0))
  # The image sits in the query of i2t rows and in the candidate of t2i rows.
  assert (batch['query_images'][i2t].reshape(i2t.sum(), -1).max(1) > 0).all()
  assert not batch['query_images'][t2i].any() and not batch['cand_images'][i2t].any()
  # Instructions as configured (VLM2Vec: per task on queries; none on candidates here).
  for row in np.flatnonzero(t2i)[:2]:
    text = enc.tokenizer.decode([int(t) for t in batch['query_tokens'][row][
        batch['query_mask'][row] > 0]])
    assert text.startswith('find an image that matches this caption') and 'item' in text
  # Rows of one image (an i2t and a t2i row, or two epochs) share a group, others do not; the
  # second batch crosses into the second epoch (24 examples), so it repeats images.
  shared = 0
  for b in two:
    is_i2t = b['task'] == llm_tasks.TASKS.index('i2t')
    value = np.where(is_i2t, b['query_images'][:, 0, 0, 0, 0], b['cand_images'][:, 0, 0, 0, 0])
    for r in range(len(value)):
      for q in range(r + 1, len(value)):
        assert (b['group'][r] == b['group'][q]) == (value[r] == value[q])
        shared += int(value[r] == value[q])
  assert shared


def test_records_batches_are_deterministic_and_process_sharded(run_parts):
  config, enc, contract = run_parts
  a, b = batches(config, enc, contract), batches(config, enc, contract)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  halves = [batches(config, enc, contract, 1, process_index=i, process_count=2)[0]
            for i in range(2)]
  assert len(halves[0]['task']) == 8
  whole = sorted(map(bytes, a[0]['query_tokens']))
  assert sorted(map(bytes, np.concatenate([h['query_tokens'] for h in halves]))) == whole


def test_tfds_and_hard_negatives(tmp_path, run_parts):
  """A TFDS split trains the same way; records' inline negatives become i2t caption and t2i
  image negatives."""
  from test_data_sources import build_tfds  # pylint: disable=import-outside-toplevel
  config, enc, _ = run_parts
  build_tfds(tmp_path)
  c = copy.deepcopy(config)
  c.data.name, c.data.path, c.data.tfds_name = 'tfds', str(tmp_path), 'tiny_captions'
  c.data.captions_key = 'captions/text'
  c.data.num_hard_negatives = 1
  contract = kinds.get(c).contract(c)
  batch = batches(c, enc, contract, 1)[0]
  assert batch['query_tokens'].shape == (16, c.model.llm.max_len)
  assert not batch['neg_candidate_valid'].any()  # TFDS has no negatives.

  rows = [{'image': str(tmp_path / f'{i}.png'), 'captions': [f'item {i}'],
           'neg_texts': [f'not item {i}'], 'neg_images': [str(tmp_path / f'{i + 1}.png')]}
          for i in range(16)]
  for i in range(17):
    Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(tmp_path / f'{i}.png')
  prepare.prepare(rows, [], prepare.Options(out=tmp_path / 'neg'), progress=False)
  c.data.name, c.data.path = 'records', str(tmp_path / 'neg')
  batch = batches(c, enc, kinds.get(c).contract(c), 1)[0]
  assert batch['neg_candidate_valid'].all()
  t2i = batch['task'] == llm_tasks.TASKS.index('t2i')
  neg_slots = (batch['neg_cand_tokens'][:, 0] == IMAGE_SLOT).sum(1)
  np.testing.assert_array_equal(neg_slots, np.where(t2i, enc.tokens_per_image, 0))


def test_a_mixture_with_the_demo_source(run_parts, corpus):
  """Records mixed with the demo scenes (as image-caption pairs): i2t / t2i rows of both; the
  held-out split stays primary, the demo scenes are evaluated beside it."""
  config, enc, _ = run_parts
  c = copy.deepcopy(config)
  c.data.mixture = (dict(name='records', path=str(corpus[0])), dict(name='demo', weight=1.0))
  config_lib.validate(c)
  batch = batches(c, enc, kinds.get(c).contract(c), 1)[0]
  assert set(batch['task'].tolist()) <= {0, 1} and len(batch['task']) == 16
  assert [e.name for e in evaluators.build_suite(c).evaluators] == ['held_out', 'demo']


def test_long_captions_are_cut_at_a_word_boundary(run_parts):
  _, enc, _ = run_parts
  caption = ' '.join(['item'] * 200)
  cut = enc.fit('find an image that matches this caption:', caption)
  assert caption.startswith(cut) and 0 < len(cut.split()) < 200
  assert enc.length(f'find an image that matches this caption: {cut}', 0) <= enc.max_len
  assert enc.length(f'find an image that matches this caption: {cut} item', 0) > enc.max_len
  assert enc.fit('', 'item 3') == 'item 3'


@pytest.mark.parametrize('change, match', [
    (dict(composed=1.0), r'config.data.llm.weights.composed=1.0: composed .* set '
                         r'config.data.llm.weights.composed=0'),
    (dict(init_text='hf:x'), r"config.init.text='hf:x': the LLM embedder has no text tower"),
    (dict(held_out_path=''), r"config.evals.held_out: dataset='records' needs path="),
    (dict(sub_batches=2), r'config.data.sub_batches is for the dual encoder'),
])
def test_bad_llm_records_configs_are_refused(corpus, change, match):
  config = records_config(*corpus)
  config.data.llm.weights.composed = change.get('composed', 0.0)
  config.init.text = change.get('init_text', '')
  config.evals.held_out.path = change.get('held_out_path', config.evals.held_out.path)
  config.data.sub_batches = change.get('sub_batches', 0)
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(config)


def test_text_pairs_are_refused(tmp_path, corpus):
  rows = [{'query': f'what is {i}', 'captions': [f'item {i}']} for i in range(4)]
  prepare.prepare(rows, [], prepare.Options(out=tmp_path / 'text'), progress=False)
  config = records_config(*corpus)
  config.data.path = str(tmp_path / 'text')
  with pytest.raises(config_lib.ConfigError, match='text-text pairs'):
    kinds.get(config).contract(config)


class _OracleEmbedder:
  """Embeds image i (pixel value 10 * i) and any text naming 'item i' as e_i, whatever the
  instruction; the interface of mmjax.embedder.MultimodalEmbedder that the evaluator uses."""

  def __init__(self, enc):
    self.encoder, self.instructions = enc, llm_tasks.Instructions(
        {'i2t': 'i2t:', 't2i': 't2i:', 'composed': ''}, 'cand:')
    self.config = type('C', (), {'embed_dim': 32, 'eval_dims': (16, 32)})()

  def _embed(self, texts, images):
    ids = [int(ims[0][8, 8, 0]) // 10 if ims else int(t.split('item ')[1].split()[0])
           for t, ims in zip(texts, images)]
    return np.eye(32, dtype=np.float32)[ids]

  embed_queries = lambda self, task, texts, images: self._embed(texts, images)  # noqa: E731
  embed_candidates = _embed


def test_llm_retrieval_on_held_out_records_is_the_primary(run_parts, corpus):
  """eval.primary picks the held-out split; every caption of an image is relevant to it."""
  config, enc, _ = run_parts
  suite = evaluators.build_suite(config)
  assert [e.name for e in suite.evaluators] == ['held_out'] and suite.evaluators[0].primary
  m = suite(_OracleEmbedder(enc))
  assert m['i2t/recall@1'] == 0.5 and m['i2t/mrr'] == 1.0  # Two captions per image.
  assert m['t2i/recall@1'] == 1.0 and m['dim16/t2i/recall@1'] == 1.0
  assert not any(k.startswith('composed') for k in m)
  assert suite.headline()['chance/i2t/recall@1'] == pytest.approx(1 / 12)
  assert suite.headline()['chance/t2i/recall@1'] == pytest.approx(1 / 6)
  assert suite.title(2).startswith('held_out retrieval at step 2 (6 images, 12 captions')


def vit_fields(ckpt) -> dict:
  return {f.name: getattr(ckpt.image, f.name) for f in dataclasses.fields(ckpt.image)
          if f.name not in ('dropout', 'remat', 'locked')}


@pytest.mark.parametrize('name', ['siglip', 'clip'])
def test_vit_starts_from_a_clip_or_siglip_import(corpus, name):
  """config.init.image gives the checkpoint's ViT (the dual encoder's mmjax.hf import) for every
  'img/' parameter of the run; the embedder reads its patch tokens: for SigLIP, its MAP head on
  them gives transformers' pooled image output. (The import into a real train state: the slow
  end-to-end test below.)"""
  from mmjax.models import layers  # pylint: disable=import-outside-toplevel
  from mmjax.models.llm_embedder import LLMEmbedder  # pylint: disable=import-outside-toplevel
  from mmjax.models.two_tower import normalize_images  # pylint: disable=import-outside-toplevel
  ckpt = hf.load(FIXTURES / name)
  config = records_config(*corpus)
  config.init.image = f'hf:{FIXTURES / name}'
  config.model.image.update(vit_fields(ckpt))
  config_lib.validate(config)
  cfg = kinds.llm_embedder_config(config)
  model = LLMEmbedder(cfg)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *model.init_inputs()))
  run_keys = set(flax.traverse_util.flatten_dict(flax.linen.unbox(shapes['params']), sep='/'))
  got = llm_kind.load_image_init(config, cfg.image, run_keys)
  want = flax.traverse_util.flatten_dict(ckpt.params['img'], sep='/')
  assert set(got) == {k for k in run_keys if k.startswith('img/')}
  assert set(got) == {f'img/{k}' for k in want if not k.startswith('map_head/')}
  for k, v in got.items():
    np.testing.assert_array_equal(v, want[k[len('img/'):]], err_msg=k)
  if name == 'siglip':
    ref = np.load(FIXTURES / name / 'reference.npz')
    params = flax.traverse_util.unflatten_dict(got, sep='/')
    tokens = jax.jit(lambda p, x: model.apply(
        {'params': p}, normalize_images(x, np.float32), patch_tokens=True,
        method=lambda m, x, **kw: m.img(x, **kw)))(params, ref['pixel_values'])
    assert tokens.shape == (4, 16, 32)
    head = layers.MAPHead(ckpt.image.num_heads, ckpt.image.mlp_dim, np.float32, np.float32,
                          ckpt.image.act, ckpt.image.ln_eps)
    pooled = head.apply({'params': ckpt.params['img']['map_head']}, tokens)
    np.testing.assert_allclose(np.asarray(pooled), ref['image_pooled'], atol=1e-4, rtol=0)
  # Another architecture is refused with the fields to set; so is a CLS token mismatch.
  want_pool = ckpt.image.pool
  other = dataclasses.replace(cfg.image, pool='gap' if name == 'clip' else 'cls')
  with pytest.raises(config_lib.ConfigError, match=rf"--config.model.image.pool='{want_pool}'"):
    llm_kind.load_image_init(config, other, run_keys)
  with pytest.raises(config_lib.ConfigError, match=r'--config.model.image.mlp_dim='):
    llm_kind.load_image_init(config, dataclasses.replace(cfg.image, mlp_dim=8), run_keys)
  with pytest.raises(config_lib.ConfigError, match=r"ViT parameters the checkpoint lacks: "
                                                   r"\['img/extra'\]"):
    llm_kind.load_image_init(config, cfg.image, run_keys | {'img/extra'})


@pytest.mark.slow  # Compiles the LLM step and evaluator (a minute on 2 loaded cores).
def test_training_on_records_from_a_siglip_vit(corpus, tmp_path, capsys):
  """End to end: an LLM embedder from a SigLIP ViT trains on records; eval.json and the printed
  table describe the held-out split."""
  from mmjax.train import loop  # pylint: disable=import-outside-toplevel
  config = records_config(*corpus)
  ckpt = hf.load(FIXTURES / 'siglip')
  config.init.image = f'hf:{FIXTURES / "siglip"}'
  config.model.image.update(vit_fields(ckpt))
  out = loop.train_and_evaluate(config, tmp_path)
  saved = json.loads((tmp_path / 'eval.json').read_text())
  assert saved['primary'] == 'held_out' and saved['step'] == 2
  for key in ('i2t/recall@1', 't2i/recall@10', 'dim16/i2t/mrr'):
    assert 0.0 <= saved[key] <= 1.0 and saved[key] == out[key]
  assert saved['chance/t2i/recall@1'] == pytest.approx(1 / 6)
  assert not any(k.startswith(('demo/', 'composed')) for k in saved)
  assert saved['held_out/t2i/recall@10'] == saved['t2i/recall@10']  # The named copy.
  printed = capsys.readouterr().out
  assert 'held_out retrieval at step 2 (6 images, 12 captions' in printed
