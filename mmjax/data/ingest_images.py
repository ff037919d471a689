"""One input image of an ingestion: its size checked from the header, decoded small, stored small.

Real corpora hold decompression bombs (hundreds of megapixels in a small file) and scans far
larger than any training resolution. Three rules keep ingestion and every later epoch cheap:

- The pixel limit is ingestion's own (`max_pixels`), checked on the size in the file header
  (PIL's `Image.open` reads the header only) before anything is decoded, and reported as
  `too large: WxH px > limit N px`. Pillow's own DecompressionBomb warning/error is switched off
  inside ingestion (`configure_pillow`), so its limits (89M px warns, 179M px fails, reported as a
  generic decode error) never decide (`read_image` switches it off while it runs and restores it,
  so the rest of the process keeps Pillow's default).
- An image whose longest side exceeds `max_size` is stored downscaled (aspect kept): JPEGs are
  decoded at a reduced DCT scale (`Image.draft`), everything else is reduced while decoding
  (`Image.thumbnail`'s reducing gap). Training then never decodes the huge original.
- Smaller images keep their original file bytes, so nothing is re-encoded without need.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import signal
from typing import Any, Callable, ContextManager, Iterator

import numpy as np
from PIL import Image

from mmjax.data import records

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_IMAGE_SIZE = 512
# Formats stored as they are when small enough; anything else (TIFF, ICO, ...) is re-encoded.
KEPT_FORMATS = frozenset({'PNG', 'JPEG', 'WEBP', 'GIF', 'BMP'})
# A test hook, read in worker processes only: the worker processing an input whose file name
# equals this SIGKILLs itself, as the out-of-memory killer would (tests/test_prepare.py).
KILL_HOOK = 'MMJAX_PREPARE_TEST_KILL_ON'


class Skip(Exception):
  """This example cannot be ingested; the message is the reason in the report."""


@contextlib.contextmanager
def pillow_bomb_check_off() -> Iterator[None]:
  """Ingestion decides sizes itself (from the header, before decoding): Pillow's check is off."""
  saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
  try:
    yield
  finally:
    Image.MAX_IMAGE_PIXELS = saved


def no_budget(pixels: int) -> ContextManager[None]:
  """No shared budget: one process decoding one image at a time."""
  del pixels
  return contextlib.nullcontext()


def _maybe_test_kill(path: str) -> None:
  name = os.environ.get(KILL_HOOK)
  if name and os.environ.get('MMJAX_PREPARE_WORKER') and pathlib.Path(path).name == name:
    os.kill(os.getpid(), signal.SIGKILL)


def read_image(path: str, max_pixels: int, max_size: int,
               budget: Callable[[int], ContextManager[None]] = no_budget
               ) -> tuple[bytes, np.ndarray, dict[str, Any]]:
  """(stored bytes, decoded uint8 [H, W, 3] pixels, info) of one image file; raises Skip.

  `budget(pixels)` is held while the image is decoded: the shared in-flight pixel budget of the
  worker processes (`mmjax.data.ingest_workers`), which bounds their memory together.
  """
  _maybe_test_kill(path)
  with pillow_bomb_check_off():
    return _read(path, max_pixels, max_size, budget)


def _read(path: str, max_pixels: int, max_size: int, budget
          ) -> tuple[bytes, np.ndarray, dict[str, Any]]:
  try:
    f = open(path, 'rb')  # pylint: disable=consider-using-with  # closed below
  except OSError as e:
    raise Skip(f'unreadable image: {e.strerror or e}') from e
  with f:
    try:
      im = Image.open(f)  # Reads the header only.
    except Exception as e:  # pylint: disable=broad-except  # PIL raises many types on bad files
      raise Skip(f'corrupt image: {type(e).__name__}: {e}') from e
    w, h = im.size
    if max_pixels and w * h > max_pixels:
      raise Skip(f'too large: {w}x{h} px > limit {max_pixels} px (--max_pixels)')
    info: dict[str, Any] = {'size': [w, h]}
    try:
      if (not max_size or max(w, h) <= max_size) and im.format in KEPT_FORMATS:
        with budget(w * h):
          f.seek(0)
          data = f.read()
          return data, records.decode_image(data), info
      if im.format == 'JPEG':
        im.draft(im.mode, (max_size or w, max_size or h))  # DCT scaling: 1/2, 1/4 or 1/8.
      with budget(im.size[0] * im.size[1]):
        data = _shrink(im, max_size)
    except Skip:
      raise
    except Exception as e:  # pylint: disable=broad-except  # truncated data, bad chunks, ...
      raise Skip(f'corrupt image: {type(e).__name__}: {e}') from e
  info['stored_size'] = list(Image.open(io.BytesIO(data)).size)
  return data, records.decode_image(data), info


def _shrink(im: Image.Image, max_size: int) -> bytes:
  """`im` with its longest side at most `max_size` (aspect kept), as PNG, or JPEG for a JPEG."""
  fmt = im.format
  im.load()
  wide = im.mode.startswith('I') or im.mode == 'F'
  # 16/32-bit greys are resized as they are (a full-size 8-bit copy would cost more memory);
  # palette and bilevel images are converted first (Pillow resizes them by nearest neighbour).
  im = im if wide else _eight_bit(im)
  if max_size:
    im.thumbnail((max_size, max_size), Image.Resampling.BICUBIC, reducing_gap=3.0)
  im = _eight_bit(im) if wide else im
  buf = io.BytesIO()
  if fmt == 'JPEG' and im.mode in ('RGB', 'L'):
    im.save(buf, format='JPEG', quality=95)
  else:
    im.save(buf, format='PNG')
  return buf.getvalue()


def _eight_bit(im: Image.Image) -> Image.Image:
  """A mode that resizes well and keeps transparency: L, LA, RGB or RGBA."""
  if im.mode in ('L', 'LA', 'RGB', 'RGBA'):
    return im
  if im.mode in ('P', 'PA'):
    transparent = 'transparency' in im.info or im.mode == 'PA'
    return im.convert('RGBA' if transparent else 'RGB')
  if im.mode.startswith('I'):  # 16-bit greys (PNG): scaled to 8 bits, not clipped at 255.
    px = np.asarray(im, np.float64) / 257.0
    return Image.fromarray(px.clip(0, 255).round().astype(np.uint8), 'L')
  if im.mode == 'F':
    return Image.fromarray(np.asarray(im).clip(0, 255).astype(np.uint8), 'L')
  if im.mode == '1':
    return im.convert('L')
  return im.convert('RGBA' if 'transparency' in im.info or 'A' in im.mode else 'RGB')
