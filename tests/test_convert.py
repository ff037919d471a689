"""Click logs and interleaved documents -> manifests -> records -> batches."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from mmjax.data import convert, prepare, sources, tokenizer as tokenizer_lib


@pytest.fixture(scope='module')
def encoder():
  corpus = ['red car blue boat what is it a page about cars and boats the end'] * 3
  return tokenizer_lib.TextEncoder(tokenizer_lib.train_wordpiece(corpus, 64), max_len=40)


def png(path: pathlib.Path, value: int) -> str:
  Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
  return path.name


def jsonl(path: pathlib.Path, rows) -> pathlib.Path:
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return path


def click_log(tmp: pathlib.Path):
  items = [{'item_id': f'i{k}', 'image': png(tmp / f'i{k}.png', 40 * k)} for k in range(6)]
  items.append({'item_id': 'i6', 'text': 'a page about cars'})
  log = [  # (impression, query, item, position, clicked)
      ('1', 'red car', 'i0', 1, 0), ('1', 'red car', 'i1', 2, 0), ('1', 'red car', 'i2', 3, 1),
      ('1', 'red car', 'i3', 4, 0), ('2', 'red car', 'i1', 1, 1), ('2', 'red car', 'i4', 2, 0),
      ('3', 'blue boat', 'i5', 1, 1), ('3', 'blue boat', 'i0', 2, 0),
      ('4', 'what is it', 'i6', 1, 1)]
  log = [dict(zip(('impression', 'query', 'item_id', 'position', 'clicked'), r)) for r in log]
  return jsonl(tmp / 'log.jsonl', log), jsonl(tmp / 'items.jsonl', items)


def test_clicks_become_weighted_pairs_with_shown_not_clicked_negatives(tmp_path):
  log, items = click_log(tmp_path)
  convert.main(['clicks', f'--log={log}', f'--items={items}', f'--out={tmp_path / "pairs.jsonl"}'])
  rows = {r['id']: r for r in map(json.loads, (tmp_path / 'pairs.jsonl').read_text().splitlines())}
  assert set(rows) == {'red car\ti2', 'red car\ti1', 'blue boat\ti5', 'what is it\ti6'}
  # Inverse propensity (1/k)^-1 = k: raw weights 3, 1, 1, 1, rescaled to mean 1.
  assert rows['red car\ti2']['weight'] == pytest.approx(2.0)
  assert rows['red car\ti1']['weight'] == pytest.approx(2 / 3)
  names = lambda r: [pathlib.Path(p).stem for p in r['neg_images']]
  # i1 was clicked for 'red car' in impression 2: never its negative.
  assert names(rows['red car\ti2']) == names(rows['red car\ti1']) == ['i0', 'i3', 'i4']
  assert names(rows['blue boat\ti5']) == ['i0']
  text = rows['what is it\ti6']
  assert text['query'] == 'what is it' and text['captions'] == ['a page about cars']
  assert rows['red car\ti2']['captions'] == ['red car']


def test_ctr_propensity_and_weight_clipping(tmp_path):
  log = [{'query': 'q', 'item_id': 'a', 'position': 1, 'clicked': 1},
         {'query': 'q', 'item_id': 'b', 'position': 1, 'clicked': 0},
         {'query': 'r', 'item_id': 'b', 'position': 2, 'clicked': 1},
         {'query': 'r', 'item_id': 'a', 'position': 2, 'clicked': 0},
         {'query': 'r', 'item_id': 'a', 'position': 2, 'clicked': 0},
         {'query': 'r', 'item_id': 'a', 'position': 2, 'clicked': 0}]
  assert convert.propensities(log, 'ctr', 1.0) == {1: 1.0, 2: 0.5}
  items = [{'item_id': 'a', 'text': 'A'}, {'item_id': 'b', 'text': 'B'}]
  rows = convert.clicks_to_pairs(log, items, propensity='ctr', max_weight=1.5)
  # Raw 1/p = 1 and 2, clipped to 1 and 1.5, then mean 1.
  assert [r['weight'] for r in rows] == pytest.approx([0.8, 1.2])
  with pytest.raises(ValueError, match='not in the items file'):
    convert.clicks_to_pairs(log, items[:1])


def test_click_pairs_feed_weight_and_negative_columns(tiny_config, encoder, tmp_path):
  from mmjax.data import pipeline  # pylint: disable=import-outside-toplevel
  log, items = click_log(tmp_path)
  convert.main(['clicks', f'--log={log}', f'--items={items}', f'--out={tmp_path / "p.jsonl"}'])
  rows = [r for r in map(json.loads, (tmp_path / 'p.jsonl').read_text().splitlines())
          if 'image' in r]
  jsonl(tmp_path / 'img.jsonl', rows)
  prepare.main([f'--manifest={tmp_path / "img.jsonl"}', f'--out={tmp_path / "rec"}',
                '--no_progress', '--workers=1'])
  cfg = tiny_config
  cfg.data.name, cfg.data.path, cfg.data.num_hard_negatives = 'records', str(tmp_path / 'rec'), 4
  cfg.batch_size = 6  # Two epochs of the three image pairs.
  batch = next(iter(pipeline.make_train_dataset(cfg, encoder)))
  got = sorted((round(float(w), 3), int(v.sum())) for w, v in zip(batch['weight'],
                                                                    batch['neg_image_valid']))
  # red car/i2 (w 2, 3 negatives), red car/i1 (w 2/3, 3), blue boat/i5 (w 2/3, 1); twice each.
  assert got == sorted([(2.0, 3), (0.667, 3), (0.667, 1)] * 2)
  # The two 'red car' pairs share the query caption: one group; blue boat another.
  assert len(set(batch['group'].tolist())) == 2


def test_documents_become_adjacent_pairs_and_whole_documents(tmp_path, encoder):
  docs = [{'id': 'd0', 'segments': [{'text': 'a page about cars'},
                                    {'image': png(tmp_path / 'a.png', 10)},
                                    {'text': 'red car'}, {'image': png(tmp_path / 'b.png', 20)}]},
          {'id': 'd1', 'segments': [{'image': 'a.png'}]}]
  jsonl(tmp_path / 'docs.jsonl', docs)
  convert.main(['documents', f'--docs={tmp_path / "docs.jsonl"}', f'--out={tmp_path / "p.jsonl"}',
                f'--documents_out={tmp_path / "whole.jsonl"}'])
  pairs = [json.loads(x) for x in (tmp_path / 'p.jsonl').read_text().splitlines()]
  assert [(p['id'], p['captions'], p['group']) for p in pairs] == [
      ('d0#1', ['a page about cars', 'red car'], 'doc:d0'), ('d0#3', ['red car'], 'doc:d0')]
  meta = prepare.main([f'--manifest={tmp_path / "whole.jsonl"}', f'--out={tmp_path / "rec"}',
                       '--no_progress', '--workers=1'])
  assert meta['num_documents'] == 1 and meta['skipped_by_reason'] == {'bad segments': 1}
  doc = sources.RecordSource(tmp_path / 'rec')[0]
  assert [('text' in seg, 'image' in seg) for seg in doc['segments']] == [
      (True, False), (False, True), (True, False), (False, True)]
