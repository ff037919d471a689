"""The record format of ingested datasets, and the small helpers every data tool shares.

One ArrayRecord record is one example, a msgpack map (no pickle: readable from any language):

  id         str         unique within the dataset
  image      bytes       the encoded image file (PNG/JPEG/...), absent for text-only examples
  audio      bytes       an audio clip (mono 16-bit FLAC, mmjax.data.audio_io), absent but for
                         audio-text examples
  query      str         the query side of a text-text pair (absent for image-text examples)
  captions   list[str]   one or more texts that describe the image / answer the query
  label      int         class label, -1 when none
  group      str         examples sharing a non-empty group are duplicates of each other
  weight     float       per-pair loss weight (e.g. inverse propensity of a click), 1.0 default
  neg_images list[bytes] hard-negative images for the captions (e.g. shown but not clicked)
  neg_texts  list[str]   hard-negative texts for the image / query
  segments   list[map]   interleaved documents only: {'text': str} | {'image': bytes}, in order
                         (captions then holds the text segments)

`FEATURE_SPEC` is written into every dataset's metadata so a reader can check what it holds.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

import msgpack
import numpy as np
from PIL import Image

from mmjax.data import images

FORMAT = 'mmjax.records.v1'
FEATURE_SPEC: dict[str, str] = {
    'id': 'str', 'image': 'bytes (encoded image file) | absent', 'query': 'str | absent',
    'audio': 'bytes (mono FLAC) | absent',
    'captions': 'list[str], >= 1', 'label': 'int (-1: none)', 'group': "str ('': none)",
    'weight': 'float', 'neg_images': 'list[bytes]', 'neg_texts': 'list[str]',
    'segments': "list[{'text': str} | {'image': bytes}] | absent",
}
DEFAULTS: dict[str, Any] = {'label': -1, 'group': '', 'weight': 1.0, 'neg_images': [],
                            'neg_texts': []}


def encode(example: dict[str, Any]) -> bytes:
  return msgpack.packb(example, use_bin_type=True)


def decode(record: bytes) -> dict[str, Any]:
  return {**DEFAULTS, **msgpack.unpackb(record, raw=False)}


_SPACE = re.compile(r'\s+')


def normalise_caption(text: str) -> str:
  """NFKC, whitespace collapsed and stripped: what is stored and tokenised."""
  return _SPACE.sub(' ', unicodedata.normalize('NFKC', text)).strip()


def caption_key(text: str) -> str:
  """What two captions must share to count as duplicates: case and punctuation ignored."""
  return re.sub(r'[^\w ]', '', normalise_caption(text).casefold()).strip()


def hash31(data: str | bytes) -> int:
  """A stable non-negative int32 hash (Python's `hash` is salted per process)."""
  if isinstance(data, str):
    data = data.encode()
  return int.from_bytes(hashlib.blake2b(data, digest_size=4).digest(), 'big') & 0x7FFFFFFF


def decode_image(data: bytes) -> np.ndarray:
  """uint8 [H, W, 3], transparency on white (`images.decode`); raises on unreadable files."""
  return images.decode(data)


def dhash(image: np.ndarray, size: int = 8) -> int:
  """64-bit difference hash: near-duplicate images (re-encoded, resized) differ in few bits."""
  grey = Image.fromarray(image).convert('L').resize((size + 1, size), Image.Resampling.BILINEAR)
  px = np.asarray(grey, np.int16)
  bits = (px[:, 1:] > px[:, :-1]).reshape(-1)
  return int(np.packbits(bits).view('>u8')[0])
