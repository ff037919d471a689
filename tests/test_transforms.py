"""Image decoding, resize modes and augmentation (mmjax.data.images, mmjax.data.augment) and
their use by the training pipeline and the evaluators."""

from __future__ import annotations

import copy
import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mmjax import config as config_lib
from mmjax.data import augment, images, pipeline, prepare, records, sources, transforms
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.data.images import View

BG = (10, 200, 30)  # Not white: a composite on the wrong background shows.


def png(pixels: np.ndarray, color_type: int, bit_depth: int = 8, trns: bytes | None = None
        ) -> bytes:
  """A PNG written byte by byte, so each mode (16-bit, tRNS keys) is exactly the one tested."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack('>I', len(data)) + kind + data
            + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF))
  h, w = pixels.shape[:2]
  rows = pixels.astype('>u2' if bit_depth == 16 else 'u1').reshape(h, -1)
  raw = b''.join(b'\x00' + r.tobytes() for r in rows)
  head = struct.pack('>IIBBBBB', w, h, bit_depth, color_type, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', head) + (chunk(b'tRNS', trns) if trns else b'')
          + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


def over(rgb, alpha) -> list[int]:
  """The expected composite of one pixel on BG."""
  a = alpha / 255
  return [round(c * a + b * (1 - a)) for c, b in zip(rgb, BG)]


def pil_png(im: Image.Image, **save) -> bytes:
  buf = io.BytesIO()
  im.save(buf, 'PNG', **save)
  return buf.getvalue()


def palette_png(transparency) -> bytes:
  p = Image.new('P', (3, 1))
  p.putpalette([200, 0, 0, 0, 0, 250])
  p.putdata([0, 1, 1])
  return pil_png(p, transparency=transparency)


# (name, file bytes, expected first row): one case per PNG mode with transparency or 16 bits.
MODES = [
    ('RGBA', pil_png(Image.fromarray(np.array([[[200, 0, 0, 255], [0, 0, 250, 0],
                                                 [100, 100, 100, 128]]], np.uint8), 'RGBA')),
     [[200, 0, 0], BG, over((100, 100, 100), 128)]),
    ('LA', pil_png(Image.fromarray(np.array([[[200, 255], [50, 0], [100, 64]]], np.uint8), 'LA')),
     [[200] * 3, BG, over((100,) * 3, 64)]),
    ('P+transparency index', palette_png(1), [[200, 0, 0], BG, BG]),
    ('P+alpha table', palette_png(bytes([255, 100])), [[200, 0, 0]] + [over((0, 0, 250), 100)] * 2),
    ('L+tRNS', png(np.array([[200, 10, 11]]), 0, trns=struct.pack('>H', 10)),
     [[200] * 3, BG, [11] * 3]),
    ('RGB+tRNS', png(np.array([[[200, 0, 0], [1, 2, 3], [1, 2, 4]]]), 2,
                     trns=struct.pack('>HHH', 1, 2, 3)), [[200, 0, 0], BG, [1, 2, 4]]),
    ('I;16', png(np.array([[65535, 32768, 0]]), 0, 16), [[255] * 3, [128] * 3, [0] * 3]),
    ('I;16+tRNS', png(np.array([[40000, 1000, 1001]]), 0, 16, trns=struct.pack('>H', 1000)),
     [[156] * 3, BG, [3] * 3]),
    ('RGB16+tRNS', png(np.array([[[50000, 0, 0], [256, 512, 768], [0, 0, 0]]]), 2, 16,
                       trns=struct.pack('>HHH', 256, 512, 768)), [[195, 0, 0], BG, [0, 0, 0]]),
    ('RGBA16', png(np.array([[[50000, 0, 0, 65535], [0, 0, 0, 0], [65535, 65535, 65535, 32768]]]),
                   6, 16), [[195, 0, 0], BG, over((255,) * 3, 128)]),
    ('LA16', png(np.array([[[50000, 65535], [0, 0], [65535, 32768]]]), 4, 16),
     [[195] * 3, BG, over((255,) * 3, 128)]),
]


@pytest.mark.parametrize('name,data,want', MODES, ids=[m[0] for m in MODES])
def test_every_png_mode_is_composited_on_the_background(name, data, want):
  got = images.decode(data, BG)
  assert got.dtype == np.uint8 and got.shape == (1, 3, 3), name
  np.testing.assert_allclose(got[0], np.array(want), atol=1, err_msg=name)


def test_records_decode_is_the_same_path_on_white():
  data = MODES[0][1]
  np.testing.assert_array_equal(records.decode_image(data), images.decode(data, (255, 255, 255)))
  assert records.decode_image(data)[0, 1].tolist() == [255, 255, 255]


def test_arrays_of_every_layout_become_rgb():
  grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
  for layout in (grey, grey[..., None], grey.astype(np.uint16) << 8):
    np.testing.assert_array_equal(np.asarray(images.open_rgb(layout)), np.stack([grey] * 3, -1))
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[0, 0] = (200, 0, 0, 255)
  got = np.asarray(images.open_rgb(rgba, BG))
  assert got[0, 0].tolist() == [200, 0, 0] and got[1, 1].tolist() == list(BG)
  with pytest.raises(ValueError, match=r'image of shape \(2, 2, 2\)'):
    images.open_rgb(np.zeros((2, 2, 2), np.uint8))
  with pytest.raises(Exception):
    images.decode(b'\x89PNG rotten')


# ----------------------------------------------------------------------------- resize modes

def old_resize_crop(image, size, rng, min_scale=0.8):
  """mmjax's resize/crop before this module (reference: the default must not change)."""
  h, w = image.shape[:2]
  side = min(h, w)
  if rng is not None:
    side = max(1, int(round(side * rng.uniform(min_scale, 1.0))))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
  else:
    top, left = (h - side) // 2, (w - side) // 2
  crop = image[top:top + side, left:left + side]
  if crop.shape[:2] != (size, size):
    crop = np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR))
  return crop


def old_light(image, size, rng):
  x = old_resize_crop(image, size, rng).astype(np.float32)
  mean = x.mean()
  x = (x - mean) * rng.uniform(0.9, 1.1) + mean * rng.uniform(0.9, 1.1)
  return np.clip(x, 0, 255).astype(np.uint8)


def noise(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize('shape', [(20, 31), (40, 17), (16, 16), (9, 12)])
def test_centre_crop_and_light_match_the_earlier_pixels(shape):
  image = noise(*shape)
  np.testing.assert_array_equal(images.load(image, View(16)), old_resize_crop(image, 16, None))
  light = augment.Augment(light=True)
  for seed in range(5):
    np.testing.assert_array_equal(
        light.image(image, View(16), np.random.default_rng(seed)),
        old_light(image, 16, np.random.default_rng(seed)))


def test_letterbox_keeps_the_whole_image_and_its_aspect():
  wide = np.zeros((20, 40, 3), np.uint8)
  wide[:, :20] = (255, 0, 0)  # Left half red, right half black.
  got = images.load(wide, View(16, 'letterbox', BG))
  assert got.shape == (16, 16, 3)
  assert (got[:4] == BG).all() and (got[12:] == BG).all()  # 16 x 8 content, centred.
  assert (got[4:12, :7] == (255, 0, 0)).all() and (got[4:12, 9:] == 0).all()
  tall = images.load(np.zeros((40, 10, 3), np.uint8), View(16, 'letterbox', BG))
  assert (tall[:, :6] == BG).all() and (tall[:, 6:10] == 0).all() and (tall[:, 10:] == BG).all()
  square = noise(16, 16)
  np.testing.assert_array_equal(images.load(square, View(16, 'letterbox')), square)
  with pytest.raises(ValueError, match="View.resize='stretch'"):
    View(16, 'stretch')


# ----------------------------------------------------------------------------- augmentation

@pytest.mark.parametrize('w,h', [(100, 100), (300, 60), (40, 200)])
def test_random_box_follows_scale_and_ratio(w, h):
  rng = np.random.default_rng(0)
  fallback = 0
  for _ in range(300):
    l, t, r, b = augment.random_box(w, h, (0.3, 1.0), (3 / 4, 4 / 3), rng)
    assert 0 <= l < r <= w and 0 <= t < b <= h
    area, aspect = (r - l) * (b - t) / (w * h), (r - l) / (b - t)
    if 0.3 - 0.05 <= area <= 1.0 and 0.7 <= aspect <= 1.4:
      continue
    fallback += 1  # Ten failed tries: the largest centred box within the ratio range.
    assert (r - l, b - t) in {(w, h), (round(h * 4 / 3), h), (w, round(w * 4 / 3))}
  assert fallback < 150


def test_random_resized_crop_at_full_scale_is_the_evaluation_view():
  image = noise(20, 50)
  rng = np.random.default_rng(0)
  # Letterbox: the ratio is relative to the image, so the box is the whole image. Crop: a
  # full-area square cannot fit, and torchvision's fallback is the centred square.
  for view in (View(16, 'letterbox', BG), View(16)):
    got = augment.random_resized_crop(Image.fromarray(image), view, (1.0, 1.0), (1.0, 1.0), rng)
    np.testing.assert_array_equal(np.asarray(got), images.load(image, view))


def test_colour_jitter():
  def jitter(x, *args):
    return np.asarray(augment.colour_jitter(Image.fromarray(x), rng, *args))
  image = noise(8, 8)
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(jitter(image, 0, 0, 0, 0), image)
  grey = np.full((4, 4, 3), 100, np.uint8)
  for _ in range(5):  # Grey has no saturation or hue, and a flat image no contrast.
    np.testing.assert_allclose(jitter(grey, 0, 0.9, 0.9, 0.5), grey, atol=1)
  means = [jitter(grey, 0.5, 0, 0, 0).mean() for _ in range(200)]
  assert 50 <= min(means) < 60 and 140 < max(means) <= 150
  mid = 100 + image % 56  # Contrast x1.5 stays in range: the std scales by the factor.
  contrast = [jitter(mid, 0, 0.5, 0, 0).std() / mid.std() for _ in range(200)]
  assert 0.45 < min(contrast) < 0.6 and 1.3 < max(contrast) < 1.55
  red = Image.fromarray(np.array([[[255, 0, 0]]], np.uint8))
  np.testing.assert_allclose(np.asarray(augment.shift_hue(red, 1 / 3)), [[[0, 255, 0]]], atol=8)


@pytest.mark.parametrize('text,want', [
    ('a cat in the top left', 'a cat in the top right'),
    ('Left of the RIGHT box', 'Right of the LEFT box'),
    ('leftover rightly bright', 'leftover rightly bright'),
    ('left-hand side, top-left', 'right-hand side, top-right'),
    ('the leftmost and the rightmost', 'the rightmost and the leftmost'),
    ('', ''),
])
def test_flip_swaps_left_and_right_as_whole_words(text, want):
  swap = augment.Augment().swap
  assert swap(text) == want and swap(want) == text


def test_flip_swap_pairs_are_configurable():
  swap = augment.Augment(flip_swap=(('gauche', 'droite'), ('links', 'rechts'))).swap
  assert swap('Le chat à gauche, der Hund rechts, left') == ('Le chat à droite, der Hund links, '
                                                             'left')


# ----------------------------------------------------------------------------- Preprocess

@pytest.fixture(scope='module')
def encoder():
  corpus = ['a red square on the left and a blue one on the right', 'what is left', 'x y z']
  return tokenizer_lib.TextEncoder(tokenizer_lib.train_wordpiece(corpus, 128), max_len=24)


def element(**kw):
  image = np.zeros((12, 24, 3), np.uint8)
  image[:, :12] = (255, 0, 0)
  out = {'image': image, 'query': None, 'captions': ['a red square on the left', 'x y z'],
         'group': '', 'weight': 1.0, 'neg_images': [image], 'neg_texts': ['what is left']}
  return out | kw


def decode(encoder, tokens):
  return encoder.tokenizer.decode(tokens.tolist())


def test_flipped_elements_swap_their_texts_and_flip_their_negatives(encoder):
  aug = augment.Augment(crop='none', flip=1.0, brightness=0, contrast=0, saturation=0)
  pre = transforms.Preprocess(encoder, view=View(8, 'letterbox', BG), augment=aug,
                              caption_sampling='first', num_negatives=1, caption_query=True)
  out = pre.random_map(element(), np.random.default_rng(0))
  plain = transforms.Preprocess(encoder, view=View(8, 'letterbox', BG), caption_sampling='first',
                                num_negatives=1).random_map(element(), np.random.default_rng(0))
  assert decode(encoder, out['tokens']) == 'a red square on the right'
  assert decode(encoder, plain['tokens']) == 'a red square on the left'
  assert decode(encoder, out['neg_tokens'][0]) == 'what is right'
  np.testing.assert_array_equal(out['image'], plain['image'][:, ::-1])
  np.testing.assert_array_equal(out['neg_image'][0], plain['neg_image'][0][:, ::-1])
  assert plain['image'][4, 0].tolist() == [255, 0, 0] and out['image'][4, 0].tolist() == [0, 0, 0]
  assert out['caption_key'] != plain['caption_key'] and out['image_key'] == plain['image_key']


def test_caption_sampling(encoder):
  caps = [f'{w}' for w in 'x y z'.split()]
  draw = {mode: {decode(encoder, transforms.Preprocess(encoder, view=View(8),
                                                       caption_sampling=mode).random_map(
      element(captions=caps), np.random.default_rng(s))['tokens']) for s in range(30)}
      for mode in augment.CAPTION_SAMPLING}
  assert draw == {'random': set(caps), 'first': {'x'}}


def test_preprocess_is_a_function_of_the_seed(encoder):
  pre = transforms.Preprocess(encoder, view=View(16, 'letterbox'), augment=augment.Augment(hue=0.1),
                              num_negatives=1)
  el = element(image=noise(30, 50), neg_images=[noise(20, 20, 1)])
  a, b = (pre.random_map(el, np.random.default_rng(7)) for _ in range(2))
  c = pre.random_map(el, np.random.default_rng(8))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert not np.array_equal(a['image'], c['image'])


# ----------------------------------------------------------------------------- config + pipeline

def ingest(root, n=24):
  root.mkdir(parents=True, exist_ok=True)
  rows = []
  for i in range(n):
    rgba = np.zeros((20, 40 + i, 4), np.uint8)
    rgba[:, : 20, :] = (255, 0, 0, 255)  # Red opaque on the left, transparent on the right.
    Image.fromarray(rgba, 'RGBA').save(root / f'{i}.png')
    rows.append({'image': str(root / f'{i}.png'),
                 'captions': [f'a red square on the left {i}', f'x y z {i}']})
  prepare.prepare(rows, [], prepare.Options(out=root / 'out', examples_per_shard=8), progress=False)
  return root / 'out'


def real_config(path):
  cfg = config_lib.load_config_file(config_lib.REPO_ROOT / 'configs' / 'real_captions.py')
  cfg.data.path = str(path)
  cfg.evals.held_out.path = str(path)
  cfg.batch_size = 8
  cfg.data.background = BG
  return cfg


def test_the_recipe_trains_on_letterboxed_augmented_records_and_resumes(encoder, tmp_path):
  cfg = real_config(ingest(tmp_path / 'd'))
  config_lib.validate(cfg, num_devices=8)
  cfg.data.aug.brightness = cfg.data.aug.contrast = cfg.data.aug.saturation = 0.0  # BG stays BG.
  it = iter(pipeline.make_train_dataset(cfg, encoder))
  first = next(it)
  state = it.get_state()
  rest = [next(it) for _ in range(2)]
  assert first['image'].shape == (8, 64, 64, 3)
  assert (first['image'] == BG).all(-1).mean() > 0.3  # Letterbox padding and transparency.
  again = iter(pipeline.make_train_dataset(cfg, encoder))
  again.set_state(state)
  for x, y in zip(rest, [next(again) for _ in range(2)]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_evaluation_uses_the_deterministic_view(tmp_path):
  path = ingest(tmp_path / 'd', 4)
  cfg = real_config(path)
  from mmjax.eval import evaluators  # pylint: disable=import-outside-toplevel
  held_out = next(e for e in evaluators.build_suite(cfg).evaluators if e.name == 'held_out')
  got = held_out.evaluator.images
  src = sources.RecordSource(path)
  want = np.stack([images.load(src[i]['image'], View(64, 'letterbox', BG)) for i in range(4)])
  np.testing.assert_array_equal(got, want)
  assert (got[:, :10] == BG).all()  # A 20 x 40 image: 32 rows of content, 16 of padding each side.


def test_decode_cache_gives_bitwise_the_same_batches_over_epochs(encoder, tmp_path):
  """The decode cache changes no pixel: three epochs of 24 records with and without it."""
  cfg = real_config(ingest(tmp_path / 'd'))
  batches = {}
  for mb in (0, 64):
    cfg.data.decode_cache_mb = mb
    it = iter(pipeline.make_train_dataset(cfg, encoder))
    batches[mb] = [next(it) for _ in range(9)]  # 72 rows: every image 3 times.
  for x, y in zip(batches[0], batches[64]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_decode_cache_is_bounded_and_pickles_empty():
  files = [pil_png(Image.fromarray(noise(10, 10 + i, i), 'RGB')) for i in range(4)]
  cache = images.DecodeCache(max_bytes=2 * 10 * 13 * 3, background=BG)
  for data in files + files[-2:]:
    np.testing.assert_array_equal(np.asarray(cache.get(data)), images.decode(data, BG))
  assert (cache.hits, cache.misses, len(cache)) == (2, 4, 2)  # The two most recent stay.
  clone = pickle.loads(pickle.dumps(cache))
  assert len(clone) == 0 and clone.max_bytes == cache.max_bytes and clone.background == BG
  with pytest.raises(Exception):
    cache.get(files[0][:40])  # Truncated: raises as a fresh decode does, caches nothing.
  assert len(cache) == 2
  off = images.DecodeCache(0)
  off.get(files[0])
  assert len(off) == 0


def base_data():
  from configs import base  # pylint: disable=import-outside-toplevel
  return base.get_config()


@pytest.mark.parametrize('key,value,match', [
    ('resize', 'stretch', "config.data.resize='stretch' is not one of 'crop', 'letterbox'"),
    ('augment', 'heavy', "config.data.augment='heavy' is not one of"),
    ('caption_sampling', 'all', "config.data.caption_sampling='all' is not one of"),
    ('aug.crop', 'centre', "config.data.aug.crop='centre' is not one of"),
    ('background', (0, 0, 256), r'config.data.background=\(0, 0, 256\) must be three integers'),
    ('background', (0, 0), r'config.data.background=\(0, 0\) must be three'),
    ('aug.crop_scale', (0.0, 1.0), r'config.data.aug.crop_scale=\(0.0, 1.0\) must satisfy'),
    ('aug.crop_scale', (0.9, 0.5), 'config.data.aug.crop_scale'),
    ('aug.crop_scale', (0.5,), r'config.data.aug.crop_scale=\(0.5,\) must be two numbers'),
    ('aug.crop_ratio', (2.0, 1.0), 'config.data.aug.crop_ratio'),
    ('aug.flip', 1.5, 'config.data.aug.flip=1.5 must be a probability'),
    ('aug.contrast', -0.1, 'config.data.aug.contrast=-0.1 must be in'),
    ('aug.hue', 0.6, 'config.data.aug.hue=0.6 must be in'),
    ('aug.flip_swap', (('left',),), 'config.data.aug.flip_swap=.* must be'),
    ('aug.flip_swap', (('top left', 'top right'),), 'config.data.aug.flip_swap=.* single words'),
    ('aug.flip_swap', (('left', 'right'), ('Left', 'x')), 'names a word twice'),
])
def test_bad_image_keys_are_named(key, value, match):
  cfg = copy.deepcopy(base_data())
  node = cfg.data
  *parents, leaf = key.split('.')
  for p in parents:
    node = node[p]
  node.unlock()
  node[leaf] = value
  with pytest.raises(ValueError, match=match):
    augment.validate_config(cfg.data)
  with pytest.raises(config_lib.ConfigError, match=match):  # Wired into config.validate.
    config_lib.validate(cfg, num_devices=8)


def test_from_config():
  data = base_data().data
  assert augment.from_config(data) is None
  assert augment.view(data, 32) == View(32, 'crop', (255, 255, 255))
  data.augment = 'light'
  assert augment.from_config(data).light
  data.augment, data.aug.flip, data.aug.flip_swap = 'custom', 0.25, (('a', 'b'),)
  aug = augment.from_config(data)
  assert (aug.flip, aug.crop, aug.flip_swap, aug.light) == (0.25, 'random_resized', (('a', 'b'),),
                                                            False)
