"""Training-time image augmentation and the validation of the data section's image keys.

Every random draw comes from the generator Grain hands `Preprocess.random_map` for that
element (seeded by the run seed and the element's global index), so a run is reproducible and
a resumed one draws the same crops, flips and colours as an uninterrupted one. The number of
draws per image is fixed whatever the parameters, so changing one knob does not reshuffle the
others.

- random resized crop (`crop='random_resized'`, Inception / torchvision `RandomResizedCrop`):
  a box of `crop_scale` of the area and `crop_ratio` aspect, ten tries, else the largest
  centred box within the ratio range. With `data.resize='letterbox'` the ratio is relative to
  the image's own aspect and the box is letterboxed, not stretched: scale 1, ratio 1 is then the
  evaluation view, and a long drawing is never cut to a square.
- horizontal flip with probability `flip`; the element's texts swap 'left' and 'right' (and the
  other `flip_swap` pairs) so a flipped "dog on the left" is still described truly.
- colour jitter as torchvision's `ColorJitter` on Pillow images (the same `ImageEnhance` and
  HSV operations, in C on uint8): brightness, contrast and saturation factors uniform in
  [1 - x, 1 + x], hue shifted by up to `hue` of the colour circle, in random order.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageEnhance

from mmjax.data import images
from mmjax.data.images import View

AUGMENTS = ('none', 'light', 'custom')
CROPS = ('none', 'random_resized')
CAPTION_SAMPLING = ('random', 'first')
FLIP_SWAP = (('left', 'right'), ('leftmost', 'rightmost'), ('leftward', 'rightward'),
             ('leftwards', 'rightwards'))


@dataclasses.dataclass(frozen=True)
class Augment:
  """`config.data.aug` (augment='custom'), or the fixed 'light' preset (`light=True`)."""
  crop: str = 'random_resized'
  crop_scale: tuple[float, float] = (0.5, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: float = 0.5
  flip_swap: tuple[tuple[str, str], ...] = FLIP_SWAP
  brightness: float = 0.2
  contrast: float = 0.2
  saturation: float = 0.2
  hue: float = 0.0
  light: bool = False  # mmjax's earlier preset, kept draw for draw so old runs replay.

  @functools.cached_property
  def swap(self) -> WordSwap:
    """The caption rewrite of a flipped element."""
    return WordSwap(self.flip_swap)

  def draw_flip(self, rng: np.random.Generator) -> bool:
    """One draw per element: its image, hard-negative images and texts flip together."""
    return not self.light and bool(rng.random() < self.flip)

  def image(self, image: images.ImageLike, view: View, rng: np.random.Generator,
            flip: bool = False) -> np.ndarray:
    """A stored image -> an augmented uint8 [S, S, 3]."""
    im = images.open_rgb(image, view.background)
    if self.light:
      return _light(im, view, rng)
    if self.crop == 'random_resized':
      im = random_resized_crop(im, view, self.crop_scale, self.crop_ratio, rng)
    else:
      im = images.fit(im, view)
    if flip:
      im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(colour_jitter(im, rng, self.brightness, self.contrast, self.saturation,
                                    self.hue))


class WordSwap:
  """text -> text with each word of a pair replaced by the other: whole words only
  ('leftover' stays), case kept ('Left' -> 'Right', 'LEFT' -> 'RIGHT'). Picklable, so Grain
  worker processes can hold it."""

  def __init__(self, pairs: Sequence[tuple[str, str]]):
    self.table = {}
    for a, b in pairs:
      self.table[a.casefold()], self.table[b.casefold()] = b.casefold(), a.casefold()
    words = sorted(self.table, key=len, reverse=True)
    self.pattern = re.compile(r'\b(' + '|'.join(map(re.escape, words)) + r')\b',
                              re.IGNORECASE) if words else None

  def _one(self, match: re.Match) -> str:
    word = match.group(0)
    new = self.table[word.casefold()]
    if word.isupper() and len(word) > 1:
      return new.upper()
    return new[:1].upper() + new[1:] if word[:1].isupper() else new

  def __call__(self, text: str) -> str:
    return self.pattern.sub(self._one, text) if self.pattern else text


def random_box(w: int, h: int, scale, ratio, rng: np.random.Generator
               ) -> tuple[int, int, int, int]:
  """torchvision's `RandomResizedCrop.get_params`, its ten tries drawn at once (fixed draws)."""
  area = w * h
  targets = area * rng.uniform(scale[0], scale[1], 10)
  aspects = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), 10))
  offsets = rng.random((10, 2))
  ws = np.round(np.sqrt(targets * aspects)).astype(int)
  hs = np.round(np.sqrt(targets / aspects)).astype(int)
  ok = np.flatnonzero((ws > 0) & (ws <= w) & (hs > 0) & (hs <= h))
  if len(ok):
    i = ok[0]
    cw, ch = int(ws[i]), int(hs[i])
    left = int(offsets[i, 0] * (w - cw + 1))
    top = int(offsets[i, 1] * (h - ch + 1))
    return left, top, left + cw, top + ch
  aspect = w / h  # Fallback: the largest centred box whose aspect is within the range.
  cw, ch = w, h
  if aspect < ratio[0]:
    ch = max(1, min(h, round(w / ratio[0])))
  elif aspect > ratio[1]:
    cw = max(1, min(w, round(h * ratio[1])))
  left, top = (w - cw) // 2, (h - ch) // 2
  return left, top, left + cw, top + ch


def random_resized_crop(im: Image.Image, view: View, scale, ratio, rng: np.random.Generator
                        ) -> Image.Image:
  """A random box of `im` -> S x S: stretched ('crop' views, as torchvision) or, for
  'letterbox' views, with the ratio taken relative to the image's aspect and letterboxed."""
  w, h = im.size
  if view.resize == 'letterbox':
    rel = w / h
    box = random_box(w, h, scale, (ratio[0] * rel, ratio[1] * rel), rng)
    return images.letterbox(im, view.size, view.background, box)
  return images.resize_box(im, random_box(w, h, scale, ratio, rng), (view.size, view.size))


def colour_jitter(im: Image.Image, rng: np.random.Generator, brightness: float, contrast: float,
                  saturation: float, hue: float) -> Image.Image:
  """torchvision ColorJitter's four operations on an RGB image, in a random order, each rounded
  and clipped to uint8 as there. Always five draws (the order and four factors)."""
  order = rng.permutation(4)
  factors = [rng.uniform(max(0.0, 1 - v), 1 + v) for v in (brightness, contrast, saturation)]
  shift = rng.uniform(-hue, hue)
  for op in order:
    if op == 0 and brightness:
      im = ImageEnhance.Brightness(im).enhance(factors[0])
    elif op == 1 and contrast:  # Blended with the mean of its greyscale (L) image.
      im = ImageEnhance.Contrast(im).enhance(factors[1])
    elif op == 2 and saturation:  # Blended with its greyscale image.
      im = ImageEnhance.Color(im).enhance(factors[2])
    elif op == 3 and hue:
      im = shift_hue(im, shift)
  return im


def shift_hue(im: Image.Image, shift: float) -> Image.Image:
  """The hue rotated by `shift` of the colour circle (HSV, as torchvision's PIL path)."""
  hsv = np.array(im.convert('HSV'))
  hsv[..., 0] += np.uint8(round(shift * 255) % 256)  # uint8 wraps round the circle.
  return Image.fromarray(hsv, 'HSV').convert('RGB')


def _light(im: Image.Image, view: View, rng: np.random.Generator) -> np.ndarray:
  """The 'light' preset: a random crop of >= 80% of the side(s), +-10% brightness and contrast
  (for 'crop' views the same draws and pixels as mmjax before `data.aug` existed)."""
  w, h = im.size
  if view.resize == 'letterbox':
    s = rng.uniform(0.8, 1.0)
    cw, ch = max(1, round(w * s)), max(1, round(h * s))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    x = np.asarray(images.letterbox(im, view.size, view.background,
                                    (left, top, left + cw, top + ch)))
  else:
    side = max(1, int(round(min(w, h) * rng.uniform(0.8, 1.0))))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    x = np.asarray(images.resize_box(im, (left, top, left + side, top + side),
                                     (view.size, view.size)))
  y = x.astype(np.float32)
  mean = y.mean()
  y = (y - mean) * rng.uniform(0.9, 1.1) + mean * rng.uniform(0.9, 1.1)
  return np.clip(y, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- from the config

def view(data: Any, image_size: int) -> View:
  """The deterministic view of `config.data` at the model's input size."""
  return View(int(image_size), data.resize, tuple(int(v) for v in data.background))


def from_config(data: Any) -> Augment | None:
  """`config.data` -> the training augmentation (None: none)."""
  if data.augment == 'none':
    return None
  if data.augment == 'light':
    return Augment(light=True)
  a = data.aug
  return Augment(crop=a.crop, crop_scale=tuple(map(float, a.crop_scale)),
                 crop_ratio=tuple(map(float, a.crop_ratio)), flip=float(a.flip),
                 flip_swap=tuple((str(x), str(y)) for x, y in a.flip_swap),
                 brightness=float(a.brightness), contrast=float(a.contrast),
                 saturation=float(a.saturation), hue=float(a.hue))


def _range(name: str, value, lo_min: float, hi_max: float) -> str | None:
  if len(value) != 2 or not all(isinstance(v, (int, float)) for v in value):
    return f'config.data.{name}={value!r} must be two numbers (min, max).'
  if not lo_min < value[0] <= value[1] <= hi_max:
    return f'config.data.{name}={tuple(value)!r} must satisfy {lo_min} < min <= max <= {hi_max}.'
  return None


def _problems(data: Any):
  """Yields a message per bad image/augmentation key of `config.data`."""
  for key, value, choices in (('resize', data.resize, images.RESIZES),
                              ('augment', data.augment, AUGMENTS),
                              ('caption_sampling', data.caption_sampling, CAPTION_SAMPLING),
                              ('aug.crop', data.aug.crop, CROPS)):
    if value not in choices:
      yield f'config.data.{key}={value!r} is not one of {", ".join(map(repr, choices))}.'
  bg = tuple(data.background)
  if len(bg) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in bg):
    yield f'config.data.background={bg!r} must be three integers in [0, 255] (R, G, B).'
  a = data.aug
  yield _range('aug.crop_scale', tuple(a.crop_scale), 0.0, 1.0)
  yield _range('aug.crop_ratio', tuple(a.crop_ratio), 0.0, math.inf)
  if not 0.0 <= a.flip <= 1.0:
    yield f'config.data.aug.flip={a.flip!r} must be a probability in [0, 1].'
  for key in ('brightness', 'contrast', 'saturation'):
    if not 0.0 <= a[key] <= 1.0:
      yield f'config.data.aug.{key}={a[key]!r} must be in [0, 1] (factors 1 -/+ it).'
  if not 0.0 <= a.hue <= 0.5:
    yield f'config.data.aug.hue={a.hue!r} must be in [0, 0.5] (a fraction of the colour circle).'
  pairs = tuple(a.flip_swap)
  if not all(len(p) == 2 and all(isinstance(w, str) and re.fullmatch(r'\w+', w) for w in p)
             for p in pairs):
    yield (f'config.data.aug.flip_swap={pairs!r} must be (word, word) pairs of single words, '
           "e.g. (('left', 'right'),).")
  elif len({w.casefold() for p in pairs for w in p}) != 2 * len(pairs):
    yield f'config.data.aug.flip_swap={pairs!r} names a word twice.'


def validate_config(data: Any, error: type[Exception] = ValueError) -> None:
  """Raises `error` (config.py passes its ConfigError) naming the first bad key and value."""
  for problem in _problems(data):
    if problem:
      raise error(problem)
