"""Ingestion (`python -m mmjax.data.prepare`): corrupt inputs reported and skipped, resume after
a kill, and the real sklearn digits / Tux Paint stamps when installed."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import grain
import numpy as np
import pytest
from PIL import Image

from mmjax.data import prepare, records


def write_png(path: pathlib.Path, value: int, size: int = 12) -> None:
  rng = np.random.default_rng(value)
  Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def make_manifest(tmp: pathlib.Path, n: int = 20) -> pathlib.Path:
  """`n` good rows plus one of each kind of bad input."""
  img = tmp / 'img'
  img.mkdir()
  rows = []
  for i in range(n):
    write_png(img / f'{i}.png', i)
    rows.append({'id': f'ex{i}', 'image': f'img/{i}.png', 'captions': [f'picture  {i}', f'alt {i}'],
                 'group': f'g{i // 2}'})
  (img / 'truncated.png').write_bytes((img / '0.png').read_bytes()[:40])
  (img / 'text.png').write_text('not an image')
  rows += [{'id': 'trunc', 'image': 'img/truncated.png', 'caption': 'x'},
           {'id': 'text', 'image': 'img/text.png', 'caption': 'x'},
           {'id': 'missing', 'image': 'img/nope.png', 'caption': 'x'},
           {'id': 'empty', 'image': 'img/1.png', 'captions': ['  ', '']},
           {'id': 'notstr', 'image': 'img/1.png', 'captions': [3]},
           {'id': 'neither', 'caption': 'x'}]
  lines = [json.dumps(r) for r in rows]
  lines.insert(5, '{broken json')
  path = tmp / 'm.jsonl'
  path.write_text('\n'.join(lines) + '\n')
  return path


def read_all(out: pathlib.Path) -> list[dict]:
  meta = json.loads((out / 'metadata.json').read_text())
  src = grain.sources.ArrayRecordDataSource([str(out / s) for s in meta['shards']])
  return [records.decode(src[i]) for i in range(len(src))]


def test_corrupt_inputs_are_reported_and_skipped_nothing_lost(tmp_path):
  manifest = make_manifest(tmp_path)
  out = tmp_path / 'out'
  meta = prepare.main([f'--manifest={manifest}', f'--out={out}', '--examples_per_shard=4',
                       '--workers=2', '--no_progress'])
  assert meta['num_examples'] == 20 and meta['num_skipped'] == 7
  skipped = json.loads((out / 'report.json').read_text())['skipped']
  reasons = {s.get('id', s.get('line')): s['reason'].split(':')[0] for s in skipped}
  assert reasons == {'trunc': 'corrupt image', 'text': 'corrupt image',
                     'missing': 'unreadable image',
                     'empty': 'bad captions', 'notstr': 'bad captions', 'neither':
                     'row has none of `image`, `audio`, `query`', 6: 'bad JSON'}
  got = read_all(out)
  assert [g['id'] for g in got] == [f'ex{i}' for i in range(20)]  # Input order, none lost.
  assert got[3]['captions'] == ['picture 3', 'alt 3'] and got[3]['group'] == 'g1'
  np.testing.assert_array_equal(records.decode_image(got[7]['image']),
                                np.asarray(Image.open(tmp_path / 'img/7.png')))
  assert meta['feature_spec'] == records.FEATURE_SPEC and len(meta['source_hash']) == 64


def test_resume_after_a_kill_rewrites_only_unfinished_shards(tmp_path):
  manifest = make_manifest(tmp_path)
  out = tmp_path / 'out'
  args = [f'--manifest={manifest}', f'--out={out}', '--examples_per_shard=3', '--workers=1',
          '--no_progress']
  prepare.main(args)
  shards = sorted(out.glob('*.array_record'))
  expected = read_all(out)
  # What a kill can leave behind: a shard renamed but without its marker, a shard never started,
  # a half-written temp file, no metadata yet.
  (out / (shards[1].name + '.done')).unlink()
  shards[4].unlink()
  (out / (shards[4].name + '.done')).unlink()
  (out / (shards[4].name + '.tmp-999')).write_bytes(b'partial')
  (out / 'metadata.json').unlink()
  untouched = {s: s.stat().st_mtime_ns for s in shards if s not in (shards[1], shards[4])}
  prepare.main(args)
  assert read_all(out) == expected
  assert {s: s.stat().st_mtime_ns for s in untouched} == untouched
  assert not list(out.glob('*.tmp-*'))


def test_resume_into_a_directory_of_other_inputs_is_refused(tmp_path):
  manifest = make_manifest(tmp_path)
  out = tmp_path / 'out'
  prepare.main([f'--manifest={manifest}', f'--out={out}', '--no_progress', '--workers=1'])
  with pytest.raises(SystemExit, match='ingestion of other inputs'):
    prepare.main([f'--manifest={manifest}', f'--out={out}', '--no_progress', '--workers=1',
                  '--examples_per_shard=2'])


def test_csv_manifest_and_text_pairs(tmp_path):
  write_png(tmp_path / 'a.png', 1)
  (tmp_path / 'm.csv').write_text('image,query,captions,label,neg_texts\n'
                                  'a.png,,a cat|a kitten,3,\n'
                                  ',what is jax,a numerical library,,a fruit|a bird\n')
  out = tmp_path / 'out'
  prepare.main([f'--manifest={tmp_path / "m.csv"}', f'--out={out}', '--no_progress'])
  a, b = read_all(out)
  assert a['captions'] == ['a cat', 'a kitten'] and a['label'] == 3 and 'image' in a
  assert b['query'] == 'what is jax' and b['neg_texts'] == ['a fruit', 'a bird']
  assert 'image' not in b and b['label'] == -1


def digits_folder(root: pathlib.Path, n: int) -> pathlib.Path:
  """The real scikit-learn digits as a folder of PNGs with caption side files."""
  spec = importlib.util.find_spec('sklearn')
  if spec is None:
    pytest.skip('scikit-learn (its digits.csv.gz) is not installed: pip install scikit-learn')
  # The CSV directly: importing sklearn.datasets costs seconds (scipy).
  raw = np.loadtxt(pathlib.Path(spec.origin).parent / 'datasets/data/digits.csv.gz', delimiter=',')
  images, targets = raw[:, :-1].reshape(-1, 8, 8), raw[:, -1].astype(int)
  words = 'zero one two three four five six seven eight nine'.split()
  root.mkdir()
  for i in range(n):
    im = (images[i] * (255 / 16)).astype(np.uint8)
    Image.fromarray(np.stack([im] * 3, -1)).resize((32, 32)).save(root / f'd{i:04d}.png')
    label = int(targets[i])
    (root / f'd{i:04d}.txt').write_text(f'A handwritten digit {words[label]}.\n'
                                        f'fr.utf8=Un chiffre manuscrit.\n'
                                        'ca@valencia.utf8=Un xifra.\npt_BR.utf8=Um digito.\n')
  return root


def test_real_digits_image_folder(tmp_path):
  root = digits_folder(tmp_path / 'digits', 60)
  write_png(root / 'orphan.png', 0)  # No side file: reported.
  write_png(root / 'd0001_mirror.png', 0)  # Tux Paint's mirrored variant: d0001.txt.
  meta = prepare.main([f'--image_dir={root}', f'--out={tmp_path / "out"}', '--no_progress',
                       '--examples_per_shard=16', '--workers=1'])
  assert meta['num_examples'] == 61 and meta['skipped_by_reason'] == {'no caption side file': 1}
  got = read_all(tmp_path / 'out')
  assert got[2]['id'] == 'd0001_mirror.png' and got[2]['captions'] == got[1]['captions']
  assert got[0]['captions'] == ['A handwritten digit zero.']  # Translations dropped.
  assert records.decode_image(got[0]['image']).shape == (32, 32, 3)


TUXPAINT = pathlib.Path('/usr/share/tuxpaint/stamps')


@pytest.mark.skipif(not TUXPAINT.is_dir(), reason='Tux Paint stamps not installed '
                    '(apt-get install tuxpaint-stamps-default)')
def test_real_tuxpaint_stamps(tmp_path):
  meta = prepare.main([f'--image_dir={TUXPAINT}', f'--out={tmp_path}', '--no_progress',
                       '--max_image_size=64', '--examples_per_shard=200', '--workers=2'])
  assert meta['num_examples'] > 700  # 796 PNGs, ~950 captions (DATA.md).
  got = read_all(tmp_path)
  assert records.decode_image(got[0]['image']).shape[2] == 3
  # English lines only: every `xx.utf8=`, `pt_BR.utf8=`, `ca@valencia.utf8=` translation dropped.
  assert not [c for g in got for c in g['captions'] if '.utf8=' in c]


def test_sigkilled_ingestion_resumes_to_the_uninterrupted_result(tmp_path):
  import os  # pylint: disable=import-outside-toplevel
  import signal  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  img = tmp_path / 'img'
  img.mkdir()
  rows = []
  for i in range(300):
    write_png(img / f'{i}.png', i, size=24)
    rows.append(json.dumps({'id': str(i), 'image': f'img/{i}.png', 'caption': f'image {i}'}))
  (tmp_path / 'm.jsonl').write_text('\n'.join(rows))
  args = [f'--manifest={tmp_path / "m.jsonl"}', '--examples_per_shard=1', '--workers=1',
          '--no_progress']
  out = tmp_path / 'killed'
  env = {**os.environ, 'PYTHONPATH': str(pathlib.Path(__file__).resolve().parents[1])}
  proc = subprocess.Popen([sys.executable, '-m', 'mmjax.data.prepare', *args, f'--out={out}'],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while len(list(out.glob('*.done'))) < 20 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done_before = len(list(out.glob('*.done')))
  assert 20 <= done_before < 300 and not (out / 'metadata.json').exists()
  prepare.main(args + [f'--out={out}'])
  prepare.main(args + [f'--out={tmp_path / "straight"}'])
  assert read_all(out) == read_all(tmp_path / 'straight')


def test_real_digits_through_the_training_pipeline(tmp_path, tiny_config):
  """Real data end to end: groups join exactly the rows whose captions (digit names) match."""
  # pylint: disable-next=import-outside-toplevel
  from mmjax.data import pipeline, tokenizer as tokenizer_lib
  root = digits_folder(tmp_path / 'digits', 48)
  prepare.main([f'--image_dir={root}', f'--out={tmp_path / "out"}', '--no_progress', '--workers=1'])
  tiny_config.data.name, tiny_config.data.path = 'records', str(tmp_path / 'out')
  corpus = pipeline.caption_corpus(tiny_config)
  encoder = tokenizer_lib.TextEncoder(tokenizer_lib.train_wordpiece(corpus, 64), 40)
  batch = next(iter(pipeline.make_train_dataset(tiny_config, encoder)))
  assert batch['image'].shape == (16, 16, 16, 3)
  same_caption = (batch['tokens'][:, None] == batch['tokens'][None]).all(-1)
  assert (same_caption == (batch['group'][:, None] == batch['group'][None])).all()
