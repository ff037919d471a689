"""The Grain pipeline and the tokenizer: determinism, resumable iterator, process sharding."""

from __future__ import annotations

import numpy as np
import pytest

from mmjax.data import demo, pipeline, tokenizer as tokenizer_lib


@pytest.fixture(scope='module')
def encoder():
  tok = tokenizer_lib.train_wordpiece(demo.caption_corpus(num_scenes=300), vocab_size=256)
  return tokenizer_lib.TextEncoder(tok, max_len=40)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_have_the_documented_layout(tiny_config, encoder):
  batch = next(iter(pipeline.make_train_dataset(tiny_config, encoder)))
  b, s, L = tiny_config.batch_size, tiny_config.model.image.image_size, 40
  assert batch['image'].shape == (b, s, s, 3) and batch['image'].dtype == np.uint8
  assert batch['tokens'].shape == (b, L) and batch['tokens'].dtype == np.int32
  assert batch['mask'].shape == (b, L)
  eos = encoder.tokenizer.token_to_id(tokenizer_lib.EOS)
  lengths = batch['mask'].sum(1)
  # Right padded, EOS at the last valid position, padding id elsewhere.
  assert (batch['tokens'][np.arange(b), lengths - 1] == eos).all()
  assert ((batch['tokens'] == encoder.pad_id) == (batch['mask'] == 0)).all()


def test_same_seed_same_batches_other_seed_other_batches(tiny_config, encoder):
  a = take(iter(pipeline.make_train_dataset(tiny_config, encoder)), 3)
  b = take(iter(pipeline.make_train_dataset(tiny_config, encoder)), 3)
  assert_batches_equal(a, b)
  tiny_config.seed = 1
  c = take(iter(pipeline.make_train_dataset(tiny_config, encoder)), 1)
  assert not np.array_equal(a[0]['image'], c[0]['image'])


def test_iterator_state_restores_the_exact_continuation(tiny_config, encoder):
  it = iter(pipeline.make_train_dataset(tiny_config, encoder))
  take(it, 2)
  state = it.get_state()
  expected = take(it, 3)
  fresh = iter(pipeline.make_train_dataset(tiny_config, encoder))
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 3), expected)


def test_process_shards_partition_the_global_batch(tiny_config, encoder):
  """Two processes' batch k together hold exactly the rows of the one-process batch k."""
  single = take(iter(pipeline.make_train_dataset(tiny_config, encoder)), 2)
  shards = [take(iter(pipeline.make_train_dataset(tiny_config, encoder, process_index=p,
                                                  process_count=2)), 2) for p in range(2)]
  for k in range(2):
    one = {bytes(r) for r in single[k]['image'].reshape(tiny_config.batch_size, -1)}
    two = [{bytes(r) for r in shards[p][k]['image'].reshape(tiny_config.batch_size // 2, -1)}
           for p in range(2)]
    assert not two[0] & two[1]
    assert two[0] | two[1] == one


def test_batch_not_divisible_by_processes_is_refused(tiny_config, encoder):
  tiny_config.batch_size = 15
  with pytest.raises(ValueError, match='batch_size=15 is not divisible by the 2 processes'):
    pipeline.make_train_dataset(tiny_config, encoder, process_count=2)


def image_rows(batches) -> set[bytes]:
  return {bytes(r) for b in batches for r in b['image'].reshape(len(b['image']), -1)}


def test_worker_processes_read_the_same_examples_and_resume_exactly(tiny_config, encoder):
  """With W workers each worker batches every W-th element (Grain's layout): W consecutive
  batches hold the same examples as without workers, and the iterator state still resumes."""
  base = take(iter(pipeline.make_train_dataset(tiny_config, encoder)), 2)
  tiny_config.data.num_workers = 2
  it = iter(pipeline.make_train_dataset(tiny_config, encoder))
  first = take(it, 2)
  assert image_rows(first) == image_rows(base)
  state = it.get_state()
  expected = take(it, 2)
  fresh = iter(pipeline.make_train_dataset(tiny_config, encoder))
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 2), expected)


def test_truncation_keeps_eos_last(encoder):
  long = ' '.join(['a large red circle at the top left and'] * 20) + '.'
  ids, mask = encoder([long, 'a small blue square.'])
  eos = encoder.tokenizer.token_to_id(tokenizer_lib.EOS)
  assert mask[0].all() and ids[0, -1] == eos
  n = int(mask[1].sum())
  assert ids[1, n - 1] == eos and not mask[1, n:].any()


def test_text_encoder_pickles(encoder):
  import pickle  # pylint: disable=import-outside-toplevel
  clone = pickle.loads(pickle.dumps(encoder))
  np.testing.assert_array_equal(clone(['a tiny pink star.'])[0], encoder(['a tiny pink star.'])[0])


def test_load_refuses_missing_tokenizer(tmp_path):
  with pytest.raises(FileNotFoundError, match='No tokenizer'):
    tokenizer_lib.load(tmp_path)
