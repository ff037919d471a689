"""mmjax.deploy: serving export, embedding store, backfill, index builds, gate, rollback.

The default tests use two untrained tiny models (random parameters, seeds 0 and 1: two model
versions) exported in seconds; the slow ones train (the issue's end to end), SIGKILL a backfill
at random points and run it on two processes.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

import mmjax
from mmjax.data import demo
from mmjax.deploy import backfill, drift, export, index, serving, store

REPO = pathlib.Path(__file__).resolve().parents[1]


def _env(devices: int = 8) -> dict[str, str]:
  flags = re.sub(r'--xla_force_host_platform_device_count=\S+', '', os.environ.get('XLA_FLAGS', ''))
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(REPO),
          'XLA_FLAGS': f'{flags} --xla_force_host_platform_device_count={devices}'.strip()}


@pytest.fixture(scope='module')
def models(deploy_models):
  """Two serving exports (model versions v1, v2) and their params exports (tests/conftest.py)."""
  return deploy_models


@pytest.fixture(scope='module')
def served(models):
  return {name: serving.load(path, batch_size=16, devices=jax.local_devices())
          for name, (_, path) in models.items()}


# --- Serving export ------------------------------------------------------------------------------

LOADER = textwrap.dedent('''
    import json, sys
    import numpy as np
    from mmjax.deploy import serving
    model = serving.load(sys.argv[1], batch_size=4)
    x = np.load(sys.argv[2])
    texts = json.loads(open(sys.argv[3]).read())
    np.save(sys.argv[4], model.embed_images(x))
    np.save(sys.argv[5], model.embed_texts(texts))
    assert 'mmjax.models' not in sys.modules, sorted(m for m in sys.modules if 'mmjax' in m)
    print(model.version)
''')


def test_serving_export_matches_load_embedder_without_model_code(models, tmp_path):
  params_dir, serving_dir = models['v1']
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
  texts = ['a big red star at the top left.', 'a small cyan ring', 'x', '']
  np.save(tmp_path / 'x.npy', images)
  (tmp_path / 't.json').write_text(json.dumps(texts))
  (tmp_path / 'load.py').write_text(LOADER)
  proc = subprocess.run([sys.executable, str(tmp_path / 'load.py'), str(serving_dir),
                         str(tmp_path / 'x.npy'), str(tmp_path / 't.json'),
                         str(tmp_path / 'zi.npy'), str(tmp_path / 'zt.npy')],
                        cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = json.loads((serving_dir / 'serving.json').read_text())
  assert proc.stdout.split()[-1] == info['version']['id'] and info['version']['name'] == 'v1'
  emb = mmjax.load_embedder(params_dir, batch_size=8)
  np.testing.assert_allclose(np.load(tmp_path / 'zi.npy'), emb.embed_images(images), atol=1e-5)
  np.testing.assert_allclose(np.load(tmp_path / 'zt.npy'), emb.embed_texts(texts), atol=1e-5)
  assert info['platforms'] == ['cpu', 'tpu']
  assert {'image.tpu.jax_exported', 'text.cpu.jax_exported'} <= set(info['files'])
  assert info['preprocessing']['image_size'] == 16 and info['preprocessing']['max_text_len'] == 40
  exported = jax.export.deserialize((serving_dir / 'image.cpu.jax_exported').read_bytes())
  assert str(exported.in_avals[-1].shape[0]) == 'b'  # The symbolic batch dimension.


def test_model_version_is_a_content_fingerprint(models, tmp_path):
  v1 = json.loads((models['v1'][1] / 'serving.json').read_text())['version']
  v2 = json.loads((models['v2'][1] / 'serving.json').read_text())['version']
  again = export.export_serving(models['v1'][0], tmp_path / 'again', name='v1')
  assert json.loads((again / 'serving.json').read_text())['version'] == v1
  assert v1['fingerprint'] != v2['fingerprint'] and v1['id'] == f'v1-{v1["fingerprint"][:12]}'


def test_serving_export_refuses_damage_and_bad_requests(models, tmp_path):
  copy = shutil.copytree(models['v1'][1], tmp_path / 'copy')
  with open(copy / 'params.npz', 'r+b') as f:
    f.seek(200)
    f.write(b'\xff\xff')
  with pytest.raises(serving.ServingExportError, match='params.npz.*altered'):
    serving.load(copy)
  with pytest.raises(serving.ServingExportError, match='not a serving export'):
    serving.load(tmp_path)
  with pytest.raises(ValueError, match='platforms'):
    export.export_serving(models['v1'][0], tmp_path / 'x', platforms=['rocm'])


# --- Backfill and the store ----------------------------------------------------------------------

def _files(directory: pathlib.Path) -> dict[str, bytes]:
  """The store's committed content (reports hold timings; they are not part of it)."""
  return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob('*'))
          if p.is_file() and p.parent.name != 'reports'}


def test_backfill_writes_a_checksummed_store_equal_to_direct_embedding(served, tmp_path):
  model = served['v1']
  report = backfill.backfill(model, 'demo:40', tmp_path / 'store', shard_size=16, progress=False)
  assert report['count'] == 40 and report['shards'] == 3 and report['bad'] == []
  data = store.load(tmp_path / 'store')
  assert data.version == model.version and data.manifest['dim'] == 32
  scenes = demo.DemoScenes('validation', 40, image_size=16)
  want = model.embed_images(np.stack([scenes[i]['image'] for i in range(40)]))
  assert list(data.ids) == [f'demo-validation-{i:07d}' for i in range(40)]
  np.testing.assert_array_equal(data.vectors, want)
  text = backfill.backfill(model, 'demo:40', tmp_path / 'text', modality='text',
                           dtype='int8', shard_size=16, progress=False)
  assert text['count'] == 40
  texts = store.load(tmp_path / 'text')
  np.testing.assert_allclose(texts.vectors, model.embed_texts(
      [scenes[i]['captions'][0] for i in range(40)]), atol=0.02)


def test_backfill_is_incremental_and_records_deletions(served, tmp_path):
  model, out = served['v1'], tmp_path / 'store'
  backfill.backfill(model, 'demo:30', out, shard_size=8, progress=False)
  grown = backfill.backfill(model, 'demo:45', out, shard_size=8, progress=False)
  assert (grown['to_embed'], grown['unchanged'], grown['deleted']) == (15, 30, 0)
  shrunk = backfill.backfill(model, 'demo:20', out, shard_size=8, progress=False)
  assert (shrunk['to_embed'], shrunk['deleted'], shrunk['count']) == (0, 25, 20)
  again = backfill.backfill(model, 'demo:20', out, shard_size=8, progress=False)
  assert again['up_to_date'] and again['to_embed'] == 0
  fresh = backfill.backfill(model, 'demo:20', tmp_path / 'fresh', shard_size=8, progress=False)
  assert fresh['count'] == 20
  a, b = store.load(out), store.load(tmp_path / 'fresh')
  assert list(a.ids) == list(b.ids)
  np.testing.assert_array_equal(a.vectors, b.vectors)
  assert len(a.manifest['generations']) == 3 and a.manifest['generations'][2]['deleted'][0] == \
      'demo-validation-0000020'


def test_backfill_resumes_after_a_crash_to_the_same_bytes(served, tmp_path):
  model = served['v1']

  def crash_after(k):
    def hook(shard):
      if shard == k:
        raise KeyboardInterrupt(f'stopped after shard {shard}')
    return hook

  whole = tmp_path / 'whole'
  backfill.backfill(model, 'demo:50', whole, shard_size=8, progress=False)
  part = tmp_path / 'part'
  for k in (1, 3, 4):
    with pytest.raises(KeyboardInterrupt):
      backfill.backfill(model, 'demo:50', part, shard_size=8, progress=False,
                        after_shard=crash_after(k))
  (part / model.version / 'shards' / 'g0000-s00005.npz.tmp').write_bytes(b'half a shard')
  before = {p.name: p.stat().st_mtime_ns for p in (part / model.version / 'shards').glob('*.npz')}
  backfill.backfill(model, 'demo:50', part, shard_size=8, progress=False)
  after = {p.name: p.stat().st_mtime_ns for p in (part / model.version / 'shards').glob('*.npz')}
  assert all(after[name] == t for name, t in before.items())  # Committed shards untouched.
  assert _files(part) == _files(whole)
  with pytest.raises(store.StoreError, match='pending'):  # An unfinished run of another corpus.
    (part / model.version / 'plans' / 'g0001.json').write_text(json.dumps(
        {'corpus_fingerprint': 'x', 'settings': {}, 'corpus_spec': 'demo:9'}))
    backfill.backfill(model, 'demo:51', part, shard_size=8, progress=False)


def _png_bomb(side: int = 12_000) -> bytes:
  """A valid 1-bit PNG of side x side pixels: ~40 kB on disk, 144 M pixels decoded."""
  def chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + tag + data + struct.pack(
        '>I', zlib.crc32(tag + data) & 0xffffffff)
  row = b'\x00' + bytes(side // 8)
  ihdr = struct.pack('>IIBBBBB', side, side, 1, 0, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) +
          chunk(b'IDAT', zlib.compress(row * side, 9)) + chunk(b'IEND', b''))


def test_bad_inputs_are_skipped_counted_and_reported_by_id(served, tmp_path):
  rng = np.random.default_rng(0)
  rows, bad_images, bad_texts = [], {}, {}
  for i in range(60):
    path = tmp_path / f'img{i}.png'
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
    rows.append({'id': f'item-{i}', 'image': path.name, 'text': f'a red circle number {i}'})
  good_png = (tmp_path / 'img0.png').read_bytes()
  (tmp_path / 'img7.png').write_bytes(good_png[:len(good_png) // 2])  # Truncated.
  bad_images['item-7'] = 'truncated'
  (tmp_path / 'img21.png').write_bytes(_png_bomb())
  bad_images['item-21'] = 'decompression bomb'
  rows[40]['image'] = 'missing.png'
  bad_images['item-40'] = 'No such file'
  rows[3]['text'], rows[33]['text'], rows[50]['text'] = '', '   ', 'word ' * 3000
  bad_texts.update({'item-3': 'empty text', 'item-33': 'empty text', 'item-50': 'over-long'})
  manifest = tmp_path / 'corpus.jsonl'
  manifest.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  for modality, planted in (('image', bad_images), ('text', bad_texts)):
    out = tmp_path / f'store-{modality}'
    report = backfill.backfill(served['v1'], f'manifest:{manifest}', out, modality=modality,
                               shard_size=16, progress=False)
    got = {b['id']: b['reason'] for b in report['bad']}
    assert sorted(got) == sorted(planted), got
    for item_id, reason in planted.items():
      assert reason in got[item_id], (item_id, got[item_id])
    data = store.load(out)
    assert len(data.ids) == 60 - len(planted) and not set(planted) & set(data.ids)
    assert data.manifest['bad'] == report['bad']


# --- Versions side by side, index builds, gate, rollback -----------------------------------------

def test_versions_side_by_side_and_cross_version_refusals(served, models, tmp_path):
  out = tmp_path / 'store'
  v1, v2 = served['v1'], served['v2']
  backfill.backfill(v1, 'demo:40', out, shard_size=16, progress=False)
  backfill.backfill(v2, 'demo:40', out, shard_size=16, progress=False)
  assert store.versions(out) == sorted([v1.version, v2.version])
  with pytest.raises(store.StoreError, match='2 model versions'):
    store.load(out)
  # The drift report reads a store version like backfill wrote it (mode B: v1 vs v2 by id).
  a, b = drift.load_embeddings(out / v1.version), drift.load_embeddings(out / v2.version)
  np.testing.assert_array_equal(a.vectors, store.load(out, v1.version).vectors)
  assert a.model_version == v1.version and list(a.ids) == list(b.ids)
  with pytest.raises(store.VersionMismatchError, match=f'{v1.version}.*{v2.version}'):
    backfill.backfill(v2, 'demo:40', out / v1.version, progress=False)
  index.build(out, tmp_path / 'index', version=v1.version, name='b1', held_out=20)
  searcher = index.Searcher(tmp_path / 'index', 'b1')
  with pytest.raises(store.VersionMismatchError,
                     match=f'query embeddings is of model version {v2.version!r}.*{v1.version!r}'):
    searcher.search_texts(v2, ['a red star'])
  scores, ids = searcher.search_texts(v1, ['a red star'], k=5)
  assert ids.shape == (1, 5) and str(ids[0, 0]).startswith('demo-validation-')
  # A shard of another version smuggled into a store is refused on load.
  v1_dir, v2_dir = out / v1.version, out / v2.version
  m1 = json.loads((v1_dir / 'manifest.json').read_text())
  shutil.copy(v2_dir / 'shards' / 'g0000-s00000.npz', v1_dir / 'shards' / 'g0000-s00000.npz')
  m1['generations'][0]['shards'][0].update(
      json.loads((v2_dir / 'manifest.json').read_text())['generations'][0]['shards'][0])
  (v1_dir / 'manifest.json').write_text(json.dumps(m1))
  with pytest.raises(store.VersionMismatchError, match='must not be mixed'):
    store.load(out, v1.version)


def test_index_build_gate_promote_and_rollback(served, tmp_path):
  v1, v2 = served['v1'], served['v2']
  out, root = tmp_path / 'store', tmp_path / 'index'
  for model in (v1, v2):
    backfill.backfill(model, 'demo:120', out, shard_size=64, progress=False)
  b1 = index.build(out, root, version=v1.version, name='b1', held_out=50)
  b2 = index.build(out, root, version=v2.version, name='b2', held_out=50)
  assert b1['size'] == 120 and b1['held_out'] == 50 and 0.9 <= b1['recall@10'] <= 1.0
  assert b1['model_version'] == v1.version and b2['model_version'] == v2.version
  with pytest.raises(index.GateError, match='min_recall'):
    index.promote(root, 'b1', min_recall=1.01)
  assert index.alias(root, 'current') is None
  # An evaluation set on which v1 is perfect by construction: v1's own top hit per query.
  queries = [f'a {c} {s} in the center.' for c in ('red', 'blue', 'green', 'yellow')
             for s in ('star', 'circle', 'square')]
  _, top = index.Searcher(root, 'b1').search_texts(v1, queries, k=1)
  eval_file = tmp_path / 'eval.jsonl'
  eval_file.write_text(''.join(json.dumps({'query': q, 'relevant': [str(t[0])]}) + '\n'
                               for q, t in zip(queries, top)))
  gate = index.promote(root, 'b1', min_recall=0.9, eval_set=eval_file)
  assert gate['quality'] == 1.0 and index.alias(root, 'current') == 'b1'
  with pytest.raises(index.GateError, match='hit rate@10 .* under the current build b1'):
    index.promote(root, 'b2', min_recall=0.9, eval_set=eval_file, tolerance=0.01)
  assert index.alias(root, 'current') == 'b1'
  gate = index.promote(root, 'b2', min_recall=0.9, eval_set=eval_file, tolerance=1.0)
  assert gate['current_quality'] == 1.0 and gate['quality'] < 1.0
  assert (index.alias(root, 'current'), index.alias(root, 'previous')) == ('b2', 'b1')
  assert index.Searcher(root).version == v2.version
  index.rollback(root)
  assert (index.alias(root, 'current'), index.alias(root, 'previous')) == ('b1', 'b2')
  assert index.Searcher(root).version == v1.version
  history = [json.loads(x) for x in (root / 'history.jsonl').read_text().splitlines()]
  assert [h['event'] for h in history] == ['promote', 'promote', 'rollback']


# --- Slow: SIGKILL and resume, two processes, the end to end -----------------------------

def _backfill_cmd(model_dir, out, *extra):
  return [sys.executable, '-m', 'mmjax.deploy.backfill', f'--model={model_dir}', f'--out={out}',
          *extra]


def _committed(out: pathlib.Path) -> int:
  return len(list(out.glob('*/shards/*.npz')))


@pytest.mark.slow
def test_backfill_sigkill_at_random_points_then_resume_is_bitwise_identical(models, tmp_path):
  model_dir = models['v1'][1]
  args = ['--data=demo:400', '--shard_size=8', '--batch_size=8', '--progress=false']
  whole, part = tmp_path / 'whole', tmp_path / 'part'
  subprocess.run(_backfill_cmd(model_dir, whole, *args), cwd=REPO, env=_env(2), check=True,
                 capture_output=True, timeout=600)
  rng = random.Random(14)
  kills, log = 0, []
  while kills < 3:
    target = _committed(part) + rng.randint(1, 8)
    proc = subprocess.Popen(_backfill_cmd(model_dir, part, *args), cwd=REPO, env=_env(2),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and _committed(part) < target:
      time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.03))  # Lands anywhere: mid-shard, mid-rename, between shards.
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      kills += 1
      log.append(_committed(part))
    assert not list(part.glob('*/manifest.json')), f'finished before 3 kills ({log})'
  subprocess.run(_backfill_cmd(model_dir, part, *args), cwd=REPO, env=_env(2), check=True,
                 capture_output=True, timeout=600)
  assert _files(part) == _files(whole), log
  data = store.load(part)
  assert len(data.ids) == len(set(data.ids)) == 400


@pytest.mark.slow
def test_backfill_on_two_processes_matches_one_process(models, tmp_path):
  model_dir = models['v1'][1]
  args = ['--data=demo:100', '--shard_size=8', '--batch_size=8', '--progress=false']
  one, two = tmp_path / 'one', tmp_path / 'two'
  subprocess.run(_backfill_cmd(model_dir, one, *args), cwd=REPO, env=_env(2), check=True,
                 capture_output=True, timeout=600)
  port = 20000 + os.getpid() % 20000
  procs = [subprocess.Popen(_backfill_cmd(model_dir, two, *args,
                                          f'--coordinator_address=127.0.0.1:{port}',
                                          '--num_processes=2', f'--process_id={i}'),
                            cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
  report = json.loads(next(x for x in outs[0][0].splitlines() if x.startswith('{')))
  assert report['processes'] == 2 and report['items_embedded_here'] < 100
  assert _files(two) == _files(one)


def _train(workdir: pathlib.Path, seed: int):
  from configs import tiny  # pylint: disable=import-outside-toplevel
  from mmjax.train import loop  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  config.seed = seed
  config.total_steps = 8
  loop.train_and_evaluate(config, workdir)
  return loop.export_checkpoint(config, workdir)


def _cli(module: str, *args, check=True):
  proc = subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=_env(8),
                        capture_output=True, text=True, timeout=600)
  assert not check or proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.mark.slow
def test_end_to_end_two_versions_blue_green(tmp_path):
  """Train, export, backfill, build + promote, search; v2 beside v1, cross-version search
  refused, v2 promoted through the gate, rolled back."""
  store_dir, root = tmp_path / 'store', tmp_path / 'index'
  scenes = demo.DemoScenes('validation', 60, image_size=16)
  eval_file = tmp_path / 'eval.jsonl'
  eval_file.write_text(''.join(json.dumps({'query': scenes[i]['captions'][0],
                                           'relevant': [f'demo-validation-{i:07d}']}) + '\n'
                               for i in range(60)))
  served_dirs = []
  for seed, name in ((0, 'v1'), (1, 'v2')):
    params_dir = _train(tmp_path / name, seed)
    served_dir = tmp_path / f'{name}-serving'
    _cli('mmjax.deploy.export', f'--model={params_dir}', f'--out={served_dir}', f'--name={name}')
    out = _cli('mmjax.deploy.backfill', f'--model={served_dir}', '--data=demo:60',
               f'--out={store_dir}', '--shard_size=16')
    assert '0 bad input(s)' in out.stdout
    version = serving.read_info(served_dir)[1]['version']['id']
    _cli('mmjax.deploy.index', 'build', f'--store={store_dir}', f'--version={version}',
         f'--out={root}', f'--name={name}', '--held_out=30')
    served_dirs.append(served_dir)
    if name == 'v1':
      _cli('mmjax.deploy.index', 'promote', f'--out={root}', '--build=v1', '--min_recall=0.9',
           f'--eval={eval_file}')
      hits = _cli('mmjax.deploy.index', 'search', f'--out={root}', f'--model={served_dir}',
                  '--text=a big red star at the top left.').stdout
      assert len(json.loads(hits.splitlines()[-1])['ids']) == 10
  assert len(store.versions(store_dir)) == 2
  refused = _cli('mmjax.deploy.index', 'search', f'--out={root}', f'--model={served_dirs[1]}',
                 '--text=a red star', check=False)
  assert refused.returncode == 1 and 'Refused' in refused.stderr and 'v2-' in refused.stderr \
      and 'v1-' in refused.stderr
  # Tiny 8-step models are near chance on the eval set, so the tolerance is wide; the gate's
  # refusal itself is tested on constructed data above.
  promoted = _cli('mmjax.deploy.index', 'promote', f'--out={root}', '--build=v2',
                  '--min_recall=0.9', f'--eval={eval_file}', '--tolerance=0.5')
  assert 'Promoted v2' in promoted.stdout
  assert (index.alias(root), index.alias(root, 'previous')) == ('v2', 'v1')
  _cli('mmjax.deploy.index', 'rollback', f'--out={root}')
  assert index.alias(root) == 'v1' and index.Searcher(root).version.startswith('v1-')


def test_backfill_of_a_tfds_corpus(served, tmp_path):
  from test_data_sources import build_tfds  # pylint: disable=import-outside-toplevel
  build_tfds(tmp_path / 'tfds')
  spec = f'tfds:tiny_captions?path={tmp_path / "tfds"}&captions_key=captions/text'
  report = backfill.backfill(served['v1'], spec, tmp_path / 'store', modality='text',
                             shard_size=10, progress=False)
  assert report['count'] == 24 and report['bad'] == []
  data = store.load(tmp_path / 'store')
  from mmjax.data import sources  # pylint: disable=import-outside-toplevel
  source = sources.TfdsSource(sources.SourceSpec(name='tfds', tfds_name='tiny_captions',
                                                 path=str(tmp_path / 'tfds'),
                                                 captions_key='captions/text'))
  want = served['v1'].embed_texts([source[i]['captions'][0] for i in range(24)])
  np.testing.assert_array_equal(data.vectors, want)
  with pytest.raises(ValueError, match='Unknown source field'):
    backfill.backfill(served['v1'], 'tfds:tiny_captions?colour=red', tmp_path / 'x',
                      progress=False)
