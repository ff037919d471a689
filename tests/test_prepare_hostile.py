"""Ingestion of hostile real-world files: decompression bombs (checked from the header, never
decoded), images between Pillow's warning and error limits, truncated files, huge originals
stored small, and a worker killed by the OS mid-run (fails fast, naming the input)."""

from __future__ import annotations

import io
import json
import os
import pathlib
import struct
import subprocess
import sys
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from mmjax.data import ingest_images, prepare, records

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def png_with_header(w: int, h: int, idat: bytes = b'', bit_depth: int = 8,
                    color_type: int = 2) -> bytes:
  """A PNG whose IHDR says w x h; the pixel data (IDAT) is whatever is given (may be truncated)."""
  ihdr = struct.pack('>IIBBBBB', w, h, bit_depth, color_type, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + _chunk(b'IHDR', ihdr) + _chunk(b'IDAT', idat)
          + _chunk(b'IEND', b''))


def full_bilevel_png(w: int, h: int) -> bytes:
  """A complete, valid 1-bit w x h PNG (all black): tiny on disk, w*h bytes once decoded."""
  raw = (b'\x00' + b'\x00' * ((w + 7) // 8)) * h
  return png_with_header(w, h, zlib.compress(raw, 9), bit_depth=1, color_type=0)


def jpeg_with_header(w: int, h: int) -> bytes:
  """A small real JPEG whose SOF0 marker is rewritten to say w x h."""
  buf = io.BytesIO()
  Image.new('RGB', (16, 16), (200, 10, 10)).save(buf, format='JPEG')
  data = bytearray(buf.getvalue())
  sof = data.index(b'\xff\xc0')
  data[sof + 5:sof + 9] = struct.pack('>HH', h, w)
  return bytes(data)


def test_header_size_is_read_without_decoding():
  """The crafted files say what the tests rely on: PIL reports their size from the header (once
  its own bomb check is off, which ingestion does only while it reads an image)."""
  png, jpeg = png_with_header(12000, 10000, b'x'), jpeg_with_header(20000, 15000)
  with pytest.warns(Image.DecompressionBombWarning):  # 120M px: between Pillow's two limits.
    Image.open(io.BytesIO(png))
  with pytest.raises(Image.DecompressionBombError):  # 300M px: above its error limit.
    Image.open(io.BytesIO(jpeg))
  for data, size in ((png, (12000, 10000)), (jpeg, (20000, 15000))):
    with ingest_images.pillow_bomb_check_off(), Image.open(io.BytesIO(data)) as im:
      assert im.size == size
  assert Image.MAX_IMAGE_PIXELS == 89478485  # Restored.


def hostile_corpus(tmp: pathlib.Path) -> tuple[pathlib.Path, dict[str, str]]:
  """Good images plus one of each hostile kind; returns the manifest and the expected reasons."""
  img = tmp / 'img'
  img.mkdir()
  rows, expected = [], {}
  rng = np.random.default_rng(0)
  for i in range(12):
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(img / f'ok{i}.png')
    rows.append({'id': f'ok{i}', 'image': f'img/ok{i}.png', 'caption': f'picture {i}'})
  bad = {
      'bomb_png': ('bomb.png', png_with_header(12000, 10000, zlib.compress(b'\x00' * 100)),
                   'too large: 12000x10000 px > limit 64000000 px'),
      'bomb_jpeg': ('bomb.jpg', jpeg_with_header(25000, 25000),
                    'too large: 25000x25000 px > limit 64000000 px'),
      # Between Pillow's warning (89M px) and error (179M px) limits: Pillow would decode it.
      'between': ('between.png', full_bilevel_png(10000, 10000),
                  'too large: 10000x10000 px > limit 64000000 px'),
      'truncated': ('trunc.png', None, 'corrupt image'),
      'header_only': ('header_only.png', png_with_header(300, 200, b'\x78\x9c'), 'corrupt image'),
  }
  good = (img / 'ok0.png').read_bytes()
  for key, (name, data, reason) in bad.items():
    (img / name).write_bytes(good[:len(good) // 2] if data is None else data)
    rows.insert(len(rows) // 2, {'id': key, 'image': f'img/{name}', 'caption': key})
    expected[key] = reason
  manifest = tmp / 'm.jsonl'
  manifest.write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
  return manifest, expected


def _reasons(out: pathlib.Path) -> dict[str, str]:
  return {s['id']: s['reason'] for s in json.loads((out / 'report.json').read_text())['skipped']}


def test_bombs_and_broken_files_each_get_their_own_reason(tmp_path):
  manifest, expected = hostile_corpus(tmp_path)
  out = tmp_path / 'out'
  with warnings.catch_warnings():
    warnings.simplefilter('error', Image.DecompressionBombWarning)
    started = time.perf_counter()
    meta = prepare.main([f'--manifest={manifest}', f'--out={out}', '--workers=1',
                         '--examples_per_shard=5', '--no_progress'])
    seconds = time.perf_counter() - started
  reasons = _reasons(out)
  assert set(reasons) == set(expected)
  for key, want in expected.items():
    assert reasons[key].startswith(want), (key, reasons[key])
  assert meta['num_examples'] == 12
  assert meta['skipped_by_reason'] == {'too large': 3, 'corrupt image': 2}
  assert seconds < 10  # Nothing was decoded at full size (a 100M px decode alone takes seconds).


def test_pillow_limits_do_not_decide_and_large_images_are_stored_small(tmp_path):
  """With the limit raised above Pillow's warning threshold, a real 100M px image is ingested
  without Pillow's DecompressionBomb warning and stored at the default longest side of 512."""
  (tmp_path / 'big.png').write_bytes(full_bilevel_png(10000, 10000))
  rng = np.random.default_rng(1)
  Image.fromarray(rng.integers(0, 255, (1200, 1600, 3), dtype=np.uint8)).save(
      tmp_path / 'photo.jpg', quality=90)
  rows = [{'id': 'big', 'image': 'big.png', 'caption': 'a big black image'},
          {'id': 'photo', 'image': 'photo.jpg', 'caption': 'a photo'}]
  (tmp_path / 'm.jsonl').write_text('\n'.join(json.dumps(r) for r in rows))
  with warnings.catch_warnings():
    warnings.simplefilter('error', Image.DecompressionBombWarning)
    meta = prepare.main([f'--manifest={tmp_path / "m.jsonl"}', f'--out={tmp_path / "out"}',
                         '--max_pixels=150000000', '--workers=1', '--no_progress'])
  assert meta['num_examples'] == 2 and meta['num_resized'] == 2
  big, photo = [records.decode(r) for r in _records(tmp_path / 'out')]
  assert Image.open(io.BytesIO(big['image'])).size == (512, 512)
  with Image.open(io.BytesIO(photo['image'])) as im:
    assert im.format == 'JPEG' and im.size == (512, 384)  # Aspect kept; JPEG stays JPEG.
  assert (records.decode_image(big['image']) == 0).all()
  index = json.loads((tmp_path / 'out' / 'index.json').read_text())
  assert [e['original_size'] for e in index] == [[10000, 10000], [1600, 1200]]


def _records(out: pathlib.Path) -> list[bytes]:
  import grain  # pylint: disable=import-outside-toplevel
  meta = json.loads((out / 'metadata.json').read_text())
  src = grain.sources.ArrayRecordDataSource([str(out / s) for s in meta['shards']])
  return [src[i] for i in range(len(src))]


def test_jpeg_is_decoded_at_reduced_scale():
  """`Image.draft`: an 8000x6000 JPEG is decoded at 1/8 scale (1000x750) before the resize."""
  buf = io.BytesIO()
  Image.new('RGB', (8000, 6000), (10, 120, 30)).save(buf, format='JPEG')
  path = pathlib.Path('/tmp') / f'mmjax-draft-{os.getpid()}.jpg'
  path.write_bytes(buf.getvalue())
  seen = []
  try:
    data, pixels, info = ingest_images.read_image(str(path), 64_000_000, 512,
                                                  budget=lambda px: _record(seen, px))
  finally:
    path.unlink()
  assert seen == [1000 * 750] and info == {'size': [8000, 6000], 'stored_size': [512, 384]}
  assert pixels.shape == (384, 512, 3) and abs(int(pixels[..., 1].mean()) - 120) < 4
  assert data[:2] == b'\xff\xd8'


def _record(seen, pixels):
  import contextlib  # pylint: disable=import-outside-toplevel
  seen.append(pixels)
  return contextlib.nullcontext()


def test_alpha_and_16_bit_survive_the_downscale(tmp_path):
  rgba = np.zeros((1000, 800, 4), np.uint8)
  rgba[..., 0] = 255
  rgba[:, :400, 3] = 255  # Left half opaque red, right half transparent.
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 'a.png')
  grey16 = np.full((900, 900), 40000, np.uint16)
  Image.fromarray(grey16).save(tmp_path / 'g.png')
  data, pixels, _ = ingest_images.read_image(str(tmp_path / 'a.png'), 0, 256)
  assert Image.open(io.BytesIO(data)).mode == 'RGBA' and pixels.shape == (256, 205, 3)
  assert tuple(pixels[128, 10]) == (255, 0, 0) and tuple(pixels[128, 200]) == (255, 255, 255)
  _, pixels, _ = ingest_images.read_image(str(tmp_path / 'g.png'), 0, 256)
  assert pixels.shape == (256, 256, 3) and abs(int(pixels.mean()) - 40000 // 257) <= 1


def test_killed_worker_fails_the_run_naming_the_input_then_resumes(tmp_path):
  """A worker SIGKILLed (what the OOM killer does) on one input: the run exits non-zero within
  seconds naming that file; finished shards stay; no metadata.json (incomplete.json instead).
  A rerun with --skip_killed reports it with its own reason next to every other bad input."""
  manifest, expected = hostile_corpus(tmp_path)
  rows = manifest.read_text().splitlines()
  Image.new('RGB', (8, 8)).save(tmp_path / 'img' / 'killer.png')
  rows.insert(3, json.dumps({'id': 'killer', 'image': 'img/killer.png', 'caption': 'boom'}))
  manifest.write_text('\n'.join(rows) + '\n')
  out = tmp_path / 'out'
  cmd = [sys.executable, '-m', 'mmjax.data.prepare', f'--manifest={manifest}', f'--out={out}',
         '--workers=2', '--examples_per_shard=2', '--no_progress']
  env = {**os.environ, 'PYTHONPATH': str(ROOT), ingest_images.KILL_HOOK: 'killer.png'}
  started = time.perf_counter()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode != 0 and time.perf_counter() - started < 60
  assert 'killer.png' in proc.stderr and 'SIGKILL' in proc.stderr, proc.stderr[-2000:]
  assert 'row 3' in proc.stderr and '--skip_killed' in proc.stderr
  assert not (out / 'metadata.json').exists()
  assert 'killer.png' in json.loads((out / 'incomplete.json').read_text())['error']
  done = sorted(out.glob('*.done'))
  shard_bytes = {p: (out / p.name[:-len('.done')]).read_bytes() for p in done}
  # Retrying dies again on the same input; --skip_killed reports it and finishes.
  proc = subprocess.run(cmd + ['--skip_killed'], env=env, capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert not (out / 'incomplete.json').exists()
  reasons = _reasons(out)
  assert reasons.pop('killer').startswith('worker killed:')
  assert {k: v[:len(expected[k])] for k, v in reasons.items()} == expected
  meta = json.loads((out / 'metadata.json').read_text())
  assert meta['num_examples'] == 12 and meta['num_skipped'] == 6
  for marker, data in shard_bytes.items():  # What was written before the kill is untouched.
    assert (out / marker.name[:-len('.done')]).read_bytes() == data


def _tree_rss_mib(pid: int) -> float:
  """Resident memory of `pid` and all its descendants, from /proc."""
  total, todo = 0, [pid]
  while todo:
    p = todo.pop()
    try:
      with open(f'/proc/{p}/status', encoding='ascii') as f:
        total += next(int(ln.split()[1]) for ln in f if ln.startswith('VmRSS:'))
      for task in os.listdir(f'/proc/{p}/task'):
        with open(f'/proc/{p}/task/{task}/children', encoding='ascii') as f:
          todo += [int(c) for c in f.read().split()]
    except (OSError, StopIteration):
      pass
  return total / 1024


@pytest.mark.slow
@pytest.mark.skipif(not pathlib.Path('/proc/self/task').is_dir(), reason='needs Linux /proc')
def test_memory_of_all_workers_stays_within_the_stated_bound(tmp_path):
  """docs/data.md's bound: main + workers x base + 4.5 B x max(--max_pixels_in_flight, largest
  image). Four workers, eight 16M px images, a 16M px budget: one large decode at a time."""
  rng = np.random.default_rng(0)
  rows = []
  for i in range(8):
    small = rng.integers(0, 255, (41, 41, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((4000, 4000), Image.Resampling.BILINEAR)
    name = f'{i}.jpg' if i % 2 else f'{i}.png'
    im.save(tmp_path / name, **({'quality': 90} if i % 2 else {'compress_level': 1}))
    rows.append(json.dumps({'image': name, 'caption': f'image {i}'}))
  (tmp_path / 'm.jsonl').write_text('\n'.join(rows))
  workers, budget = 4, 16_000_000
  cmd = [sys.executable, '-m', 'mmjax.data.prepare', f'--manifest={tmp_path / "m.jsonl"}',
         f'--out={tmp_path / "out"}', f'--workers={workers}', '--examples_per_shard=1',
         f'--max_pixels_in_flight={budget}', '--no_progress']
  proc = subprocess.Popen(cmd, env={**os.environ, 'PYTHONPATH': str(ROOT)},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  peak = 0.0
  while proc.poll() is None:
    peak = max(peak, _tree_rss_mib(proc.pid))
    time.sleep(0.01)
  stdout, stderr = proc.communicate()
  assert proc.returncode == 0, stderr[-2000:]
  assert '8 downscaled' in stdout
  bound = 120 + workers * 100 + 4.5 * budget / 2**20
  print(f"peak tree RSS {peak:.0f} MiB, bound {bound:.0f} MiB; {stdout.strip()}")
  assert 0 < peak < bound, (peak, bound, stdout)
