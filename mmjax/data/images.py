"""Image decoding and the deterministic resize modes: the one path from a stored image to the
model's square uint8 input.

Every caller that needs an un-augmented image goes through `load` with a `View`: training
without crop augmentation, every evaluator, the teacher's embeddings and negative mining. So a
run's evaluation sees its images exactly as its training's deterministic mode does.

Transparency is composited on `View.background` for every PNG mode Pillow produces: RGBA, LA,
P with a transparent palette, L/RGB/16-bit grey with a tRNS key colour, premultiplied 'La' and
'RGBa'. 16-bit grey ('I;16', 'I') is scaled to 8 bits here, because Pillow's own conversion
saturates everything above 255 to white. Pillow keeps only the high byte of 16-bit RGB, so a
16-bit RGB tRNS key is matched on high bytes.

Imports nothing of mmjax: `records`, the transforms and the evaluators all build on it.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import threading
from typing import Union

import numpy as np
from PIL import Image

RESIZES = ('crop', 'letterbox')
WHITE = (255, 255, 255)
_PNG = b'\x89PNG\r\n\x1a\n'
_GREY16 = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')

ImageLike = Union[bytes, bytearray, np.ndarray, Image.Image]


@dataclasses.dataclass(frozen=True)
class View:
  """How a stored image becomes the square model input, with no randomness.

  resize: 'crop' (the centred square of the shorter side; loses the ends of long images) or
  'letterbox' (the whole image, aspect kept, the rest of the square filled with background).
  background: RGB under transparent pixels and in the letterbox padding."""
  size: int
  resize: str = 'crop'
  background: tuple[int, int, int] = WHITE

  def __post_init__(self):
    if self.resize not in RESIZES:
      raise ValueError(f'View.resize={self.resize!r} is not one of {RESIZES}.')


def _png_bit_depth(data: bytes) -> int:
  """The IHDR bit depth (IHDR is always the first chunk; byte 24), 8 for non-PNG data."""
  return data[24] if data[:8] == _PNG and len(data) > 24 else 8


def _composite(im: Image.Image, alpha: Image.Image, background) -> Image.Image:
  """`im`'s colours over background, weighted by alpha (mode 'L'); all in Pillow's C code."""
  canvas = Image.new('RGB', im.size, tuple(background))
  canvas.paste(im if im.mode in ('RGB', 'RGBA') else im.convert('RGB'), mask=alpha)
  return canvas


def _key_alpha(pixels: np.ndarray, key) -> Image.Image:
  """0 where a pixel equals the tRNS key colour, else 255."""
  match = pixels == np.asarray(key, pixels.dtype)
  if match.ndim == 3:
    match = match.all(-1)
  return Image.fromarray(np.where(match, 0, 255).astype(np.uint8), 'L')


def _grey16(im: Image.Image, background) -> Image.Image:
  """16-bit grey (optionally with a tRNS key, in 16-bit units) -> RGB, high byte kept."""
  raw = np.asarray(im).astype(np.int64)
  grey = Image.fromarray((np.clip(raw, 0, 65535) >> 8).astype(np.uint8), 'L')
  if 'transparency' in im.info:
    return _composite(grey, _key_alpha(raw, im.info['transparency']), background)
  return grey.convert('RGB')


def to_rgb(im: Image.Image, background=WHITE, *, bit_depth: int = 8) -> Image.Image:
  """Any Pillow image -> RGB, transparency composited on `background`. `bit_depth`: of the
  PNG file the image came from (a 16-bit RGB file's tRNS key is in 16-bit units)."""
  if im.mode in _GREY16:
    return _grey16(im, background)
  key = im.info.get('transparency')
  if key is not None and im.mode in ('L', 'RGB'):
    pixels = np.asarray(im)
    if bit_depth == 16:  # Pillow has dropped the low bytes of the pixels; drop the key's too.
      key = np.asarray(key) >> 8
    return _composite(im, _key_alpha(pixels, key), background)
  if im.mode in ('RGBA', 'LA', 'PA', 'La', 'RGBa') or (im.mode == 'P' and key is not None):
    rgba = im if im.mode == 'RGBA' else im.convert('RGBA')
    return _composite(rgba, rgba.getchannel('A'), background)
  if im.mode == 'F':
    return Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8)).convert('RGB')
  return im if im.mode == 'RGB' else im.convert('RGB')


def open_rgb(image: ImageLike, background=WHITE) -> Image.Image:
  """Encoded bytes, a uint8 array ([H, W], [H, W, 1|3|4]) or a Pillow image -> an RGB Pillow
  image. Raises on truncated or unreadable files (Pillow's lazy decode is forced)."""
  if isinstance(image, Image.Image):
    return to_rgb(image, background)
  if isinstance(image, (bytes, bytearray)):
    data = bytes(image)
    im = Image.open(io.BytesIO(data))  # In memory: nothing to close.
    im.load()
    return to_rgb(im, background, bit_depth=_png_bit_depth(data))
  array = np.asarray(image)
  if array.dtype == np.uint16:
    array = (array >> 8).astype(np.uint8)
  array = np.ascontiguousarray(array, np.uint8)
  if array.ndim == 3 and array.shape[2] == 1:
    array = array[..., 0]
  if array.ndim == 2:
    array = np.repeat(array[..., None], 3, -1)
  if array.ndim != 3 or array.shape[2] not in (3, 4):
    raise ValueError(f'image of shape {array.shape}: expected [H, W], [H, W, 1], [H, W, 3] or '
                     '[H, W, 4].')
  if array.shape[2] == 4:
    rgba = Image.fromarray(array, 'RGBA')
    return _composite(rgba, rgba.getchannel('A'), background)
  return Image.fromarray(array, 'RGB')


def decode(data: bytes, background=WHITE) -> np.ndarray:
  """Encoded image file -> uint8 [H, W, 3], transparency composited on `background`."""
  return np.asarray(open_rgb(data, background))


def resize_box(im: Image.Image, box: tuple[int, int, int, int], size: tuple[int, int]
               ) -> Image.Image:
  """The pixels in box (left, top, right, bottom) resized (bilinear, antialiased) to size.
  Cropped first, so a box's result does not depend on the pixels around it."""
  if box != (0, 0) + im.size:
    im = im.crop(box)
  return im if im.size == size else im.resize(size, Image.Resampling.BILINEAR)


def pad_square(im: Image.Image, size: int, background) -> Image.Image:
  """`im` (longest side <= size) centred on a size x size canvas of background."""
  if im.size == (size, size):
    return im
  canvas = Image.new('RGB', (size, size), tuple(background))
  canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
  return canvas


def letterbox(im: Image.Image, size: int, background=WHITE,
              box: tuple[int, int, int, int] | None = None) -> Image.Image:
  """The box (default: the whole image) scaled so its longer side is `size`, aspect kept,
  centred on a square of background."""
  box = box or (0, 0) + im.size
  w, h = box[2] - box[0], box[3] - box[1]
  scale = size / max(w, h)
  fitted = (max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale))))
  return pad_square(resize_box(im, box, fitted), size, background)


def centre_box(w: int, h: int) -> tuple[int, int, int, int]:
  """The centred square of the shorter side (mmjax's original crop, offsets rounded down)."""
  side = min(w, h)
  left, top = (w - side) // 2, (h - side) // 2
  return left, top, left + side, top + side


def fit(im: Image.Image, view: View) -> Image.Image:
  """An RGB Pillow image -> S x S by the view's deterministic resize."""
  if view.resize == 'letterbox':
    return letterbox(im, view.size, view.background)
  return resize_box(im, centre_box(*im.size), (view.size, view.size))


def load(image: ImageLike, view: View) -> np.ndarray:
  """Stored image (encoded bytes, array or Pillow image) -> the model's uint8 [S, S, 3]."""
  return np.asarray(fit(open_rgb(image, view.background), view))


class DecodeCache:
  """Decoded RGB images of stored files (transparency already composited on `background`),
  least recently used dropped first once they hold more than `max_bytes` of pixels.

  Decoding is deterministic, so a cached image is the very image a fresh decode gives: only the
  time changes. A small corpus revisited every few steps (an epoch of the Tux Paint stamps is 5
  steps at batch 128) is then decoded once per process instead of once per visit; augmentation
  still runs on every visit. Thread-safe (Grain's read threads share it); a pickled copy (a Grain
  worker process) starts empty. Keys are BLAKE2b digests of the encoded bytes, so the encoded
  files are not kept alive."""

  def __init__(self, max_bytes: int, background=WHITE):
    self.max_bytes, self.background = int(max_bytes), tuple(background)
    self._items: collections.OrderedDict[bytes, Image.Image] = collections.OrderedDict()
    self._bytes = 0
    self._lock = threading.Lock()
    self.hits = self.misses = 0

  def __getstate__(self):
    return {'max_bytes': self.max_bytes, 'background': self.background}

  def __setstate__(self, state):
    self.__init__(state['max_bytes'], state['background'])

  def __len__(self) -> int:
    return len(self._items)

  def get(self, image: ImageLike) -> Image.Image:
    """`open_rgb(image, background)`, from the cache when these bytes were decoded before.
    Arrays and Pillow images are converted, not cached. Do not modify the returned image."""
    if self.max_bytes <= 0 or not isinstance(image, (bytes, bytearray)):
      return open_rgb(image, self.background)
    key = hashlib.blake2b(image, digest_size=16).digest()
    with self._lock:
      im = self._items.get(key)
      if im is not None:
        self._items.move_to_end(key)
        self.hits += 1
        return im
    im = open_rgb(image, self.background)  # Raises on a corrupt file: nothing is cached.
    size = im.width * im.height * 3
    with self._lock:
      self.misses += 1
      if size <= self.max_bytes and key not in self._items:
        self._items[key] = im
        self._bytes += size
        while self._bytes > self.max_bytes:
          _, old = self._items.popitem(last=False)
          self._bytes -= old.width * old.height * 3
    return im
