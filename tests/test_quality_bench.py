"""bench/quality.py's pure parts: the held-out split, the training time, the report."""

import json
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'bench'))
import quality  # noqa: E402  pylint: disable=wrong-import-position

STAMPS = pathlib.Path('/usr/share/tuxpaint/stamps')


def test_heldout_list_is_fixed_and_keeps_shared_captions_together():
  held = quality.read_heldout(REPO / 'bench' / 'tuxpaint_heldout.txt')
  assert len(held) == 133 and all(h.endswith('.png') for h in held)
  if not STAMPS.is_dir():
    pytest.skip('tuxpaint-stamps-default is not installed')
  train, val = quality.split_rows(STAMPS, held)
  assert {r['id'] for r in val} == held and not {r['id'] for r in train} & held
  caption = lambda rows: {r['captions'][0].lower() for r in rows}  # noqa: E731
  assert not caption(train) & caption(val)  # A stamp and its _mirror share a split.


def test_split_names_a_heldout_stamp_that_is_missing(tmp_path):
  (tmp_path / 'a.png').write_bytes(b'')
  (tmp_path / 'a.txt').write_text('An a.\n')
  with pytest.raises(SystemExit, match='b.png'):
    quality.split_rows(tmp_path, {'a.png', 'b.png'})


def test_train_seconds_sums_the_logged_intervals(tmp_path):
  rows = [{'step': 10, 'train/pairs_per_sec': 64.0}, {'step': 10, 'eval/x': 1.0},
          {'step': 25, 'train/pairs_per_sec': 32.0}]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  assert quality.train_seconds(tmp_path, 128) == (10 * 2.0 + 15 * 4.0, 25)


def _result(r10: float, steps: int, seconds: float) -> dict:
  out = {f'held_out/{d}/recall@{k}': r10 * k / 10 for d in quality.DIRECTIONS for k in quality.KS}
  return out | {'steps': steps, 'train_s': seconds, 'wall_s': seconds + 5, 'pipeline_s': 12.0}


def test_report_rows_and_ratios():
  results = {0: {'open_clip': _result(0.30, 100, 900.0), 'mmjax': _result(0.24, 100, 300.0),
                 'mmjax_equal_time': _result(0.45, 300, 900.0)},
             1: {'open_clip': _result(0.20, 100, 900.0), 'mmjax': _result(0.26, 100, 300.0)}}
  lines = quality.report(results, 10 / 133)
  text = '\n'.join(lines)
  assert '| open_clip 3.3.0 | 0 | 100 | 900 s (9.00) |' in text
  assert '| **mmjax, equal steps** | mean | 100 | 300 s (3.00) |' in text
  assert 'R@10 at equal steps (means over seeds): i2t 1.00x, t2i 1.00x.' in text  # 0.25 / 0.25
  assert 'R@10 at equal wall time (means over seeds): i2t 1.50x, t2i 1.50x.' in text  # Seed 0.
  assert '0.12 s per batch' in text and 'Chance R@10 on the held-out split: 7.5 %.' in text
