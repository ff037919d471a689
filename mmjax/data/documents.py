"""Whole interleaved documents (text and images in reading order) as fixed-shape arrays.

This is the input of an LLM-style embedder that reads a document as one sequence: text tokens,
with `tokens_per_image` slots at each image's place that the model fills with that image's
embeddings. Per document (L = max_len, M = max_images, S = image size):

  doc_tokens       int32 [L]         token ids; the pad id in image slots and padding
  doc_mask         int32 [L]         1 for text tokens and image slots
  doc_image_index  int32 [L]         which image a slot holds (0..M-1), -1 for text and padding
  doc_images       uint8 [M, S, S, 3]
  doc_image_valid  int32 [M]

Segments that do not fit are dropped whole (an image is never cut), and the sequence always ends
with EOS, like `TextEncoder`'s captions, so last-token pooling reads a fixed position.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from mmjax.data import images as images_lib
from mmjax.data.tokenizer import TextEncoder


class PackDocument(grain.transforms.Map):
  """A record with `segments` -> the arrays above."""

  def __init__(self, encoder: TextEncoder, *, max_len: int, max_images: int, image_size: int,
               tokens_per_image: int = 1):
    self.encoder, self.max_len, self.max_images = encoder, max_len, max_images
    self.image_size, self.tokens_per_image = image_size, tokens_per_image
    tok = encoder.tokenizer
    self.eos_id = next(tok.token_to_id(t) for t in ('[EOS]', '[SEP]', '</s>', '<|endoftext|>')
                       if tok.token_to_id(t) is not None)

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    L, m, s = self.max_len, self.max_images, self.image_size
    tokens = np.full((L,), self.encoder.pad_id, np.int32)
    mask, index = np.zeros((L,), np.int32), np.full((L,), -1, np.int32)
    images, valid = np.zeros((m, s, s, 3), np.uint8), np.zeros((m,), np.int32)
    n, k = 0, 0  # Tokens written; images written.
    for seg in element['segments']:
      if 'image' in seg:
        if k == m or n + self.tokens_per_image > L - 1:
          continue
        try:
          images[k] = images_lib.load(seg['image'], images_lib.View(s))
        except Exception:  # pylint: disable=broad-except  # a bad image drops only itself
          continue
        index[n:n + self.tokens_per_image] = k
        mask[n:n + self.tokens_per_image] = 1
        valid[k] = 1
        n, k = n + self.tokens_per_image, k + 1
      else:
        ids = self.encoder.tokenizer.encode(seg['text'], add_special_tokens=False).ids
        ids = ids[:L - 1 - n]
        tokens[n:n + len(ids)], mask[n:n + len(ids)] = ids, 1
        n += len(ids)
    tokens[n], mask[n] = self.eos_id, 1
    return {'doc_tokens': tokens, 'doc_mask': mask, 'doc_image_index': index,
            'doc_images': images, 'doc_image_valid': valid}
