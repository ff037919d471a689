"""Duplicate removal, noisy-pair filtering and offline hard-negative mining."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mmjax.cli import mine_negatives
from mmjax.data import filter as filter_lib, pipeline, prepare, sources


def test_near_duplicates_match_brute_force():
  rng = np.random.default_rng(0)
  base = [int(x) for x in rng.integers(0, 2**63, 60, dtype=np.int64)]
  # Copies with 0-5 flipped bits.
  hashes = base + [b ^ sum(1 << int(j) for j in rng.choice(64, f, replace=False))
                   for b, f in zip(base, rng.integers(0, 6, 60))]
  for bits in (0, 3):
    kept, expected = [], set()
    for i, h in enumerate(hashes):
      if any(bin(h ^ hashes[j]).count('1') <= bits for j in kept):
        expected.add(i)
      else:
        kept.append(i)
    assert filter_lib.near_duplicates(hashes, bits) == expected


def test_select_dedupes_and_keeps_the_best_scored_fraction():
  index = [{'sha256': 'a', 'dhash': 0, 'captions': ['x']},
           {'sha256': 'a', 'dhash': 0, 'captions': ['y']},  # Exact image duplicate.
           {'sha256': 'b', 'dhash': 0b11, 'captions': ['z']},  # 2 bits from 0.
           {'sha256': 'c', 'dhash': 2**40 - 1, 'captions': ['x']},  # Caption seen.
           {'sha256': 'd', 'dhash': 2**50 - 1, 'captions': ['w', 'x']},
           {'sha256': 'e', 'dhash': 2**60 - 1, 'captions': ['v']}]
  keep, report = filter_lib.select(index, dedupe_images=True, near_bits=2, dedupe_captions=True,
                                   scores=np.array([5., 0, 0, 0, 1., 9.]), keep_fraction=0.6)
  assert report == {'exact_image_duplicates': 1, 'near_image_duplicates': 1,
                    'caption_duplicates': 1, 'low_score': 1, 'kept': 2}
  assert keep.tolist() == [0, 5]  # Of 0, 4, 5 the best 60% (2): scores 5 and 9.


def test_mine_returns_exact_top_k_without_false_negatives():
  rng = np.random.default_rng(1)
  q = rng.normal(size=(50, 8))
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  keys = q + 0.3 * rng.normal(size=q.shape)
  keys /= np.linalg.norm(keys, axis=1, keepdims=True)
  dup = np.arange(50) // 2  # Pairs of rows are duplicates.
  got = mine_negatives.mine(q, keys, dup, k=4, max_similarity=0.8, chunk=16)
  sims = q @ keys.T
  for i in range(50):
    ok = [j for j in np.argsort(-sims[i], kind='stable') if dup[j] != dup[i] and sims[i, j] <= 0.8]
    want = ok[:4] + [-1] * (4 - len(ok[:4]))
    assert got[i].tolist() == want


def ingest_colours(tmp_path):
  """24 examples, 8 groups of 3; examples i and i + 20 share their image and caption."""
  rows = []
  for i in range(24):
    Image.fromarray(np.full((16, 16, 3), (i % 20) * 12, np.uint8)).save(tmp_path / f'{i}.png')
    rows.append({'image': f'{i}.png', 'captions': [f'colour {i % 20}'], 'group': f'g{i // 3}'})
  (tmp_path / 'm.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  data = tmp_path / 'data'
  prepare.main([f'--manifest={tmp_path / "m.jsonl"}', f'--out={data}', '--no_progress',
                '--workers=1'])
  return data, [r['captions'][0] for r in rows]


def assert_no_false_negatives(neg):
  for i in range(len(neg)):  # Never itself, its group, or its duplicate image/caption (i +- 20).
    assert all(j // 3 != i // 3 and j % 20 != i % 20 for j in neg[i] if j >= 0)


def test_filter_and_mined_negatives_reach_the_batches(tiny_config, tmp_path):
  data, captions = ingest_colours(tmp_path)
  index = json.loads((data / 'index.json').read_text())
  z = np.random.default_rng(0).normal(size=(24, 8))
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  neg = mine_negatives.mine(z, z, mine_negatives.duplicate_ids(index), k=3, max_similarity=1.0)
  assert (neg >= 0).all()
  assert_no_false_negatives(neg)
  np.save(data / 'negatives.npy', neg)
  np.save(data / 'scores.npy', np.arange(24, dtype=np.float32))
  report = filter_lib.main([f'--data={data}', '--dedupe_images', f'--scores={data / "scores.npy"}',
                            '--keep_fraction=0.5'])
  assert report['exact_image_duplicates'] == 4 and report['kept'] == 10
  kept = sources.RecordSource(data, keep='keep.npy')
  assert len(kept) == 10 and kept.keep.tolist() == list(range(10, 20))  # The best scores.
  cfg = tiny_config
  cfg.data.name, cfg.data.path = 'records', str(data)
  cfg.data.negatives, cfg.data.num_hard_negatives = 'negatives.npy', 3
  batch = next(iter(pipeline.make_train_dataset(cfg, tok_encoder(captions))))
  assert batch['neg_image_valid'].all() and batch['neg_text_valid'].all()
  with pytest.raises(FileNotFoundError, match='nope.npy'):
    sources.RecordSource(data, keep='nope.npy')


@pytest.mark.slow
def test_mine_negatives_cli_with_an_exported_model(tiny_config, tmp_path):
  """The CLI end to end with a (randomly initialised) exported model."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from mmjax import config as config_lib, embedder  # pylint: disable=import-outside-toplevel
  from mmjax.models import TwoTower  # pylint: disable=import-outside-toplevel
  data, captions = ingest_colours(tmp_path)
  model_config = config_lib.model_config(tiny_config)
  params = nn.unbox(TwoTower(model_config).init(jax.random.key(0),
                                                *TwoTower(model_config).init_inputs())['params'])
  embedder.export(tmp_path / 'export', model_config, params,
                  tok_encoder(captions).tokenizer.to_str())
  neg = mine_negatives.main([f'--data={data}', f'--model={tmp_path / "export"}', '--k=3',
                             '--max_similarity=1.0', '--scores_out=scores.npy'])
  assert neg.shape == (24, 3) and (neg >= 0).all()
  assert_no_false_negatives(neg)
  assert np.load(data / 'scores.npy').shape == (24,)


def tok_encoder(captions):
  from mmjax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  return tokenizer_lib.TextEncoder(tokenizer_lib.train_wordpiece(captions, 64), 40)
