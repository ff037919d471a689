"""Host-side encoding of the LLM embedder's inputs: texts with image placeholders -> fixed-length
ids and masks, the instruction prefixes, and the image slots of a row.

Texts carry the image placeholder (`model.llm.image_token`) where an image goes; queries get their
task's instruction prefix and candidates the candidate instruction (VLM2Vec / GME style), both
from `config.data.llm`. `MultimodalEncoder` turns a text with placeholders into fixed-length ids:
each placeholder expands into the image's visual tokens, EOS is appended, and a text whose
placeholders do not match its images, or that does not fit the context, is refused here on the
host with a ValueError naming the counts (never truncated, never inside jit). The tasks that use
it are `mmjax.data.llm_tasks`; the runner is `mmjax.embedder.LLMRunner`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

from mmjax.data import tokenizer as tokenizer_lib
from mmjax.types import IMAGE_SLOT, LLM_TASKS as TASKS, ViTConfig
from mmjax.types import tokens_per_image as _tokens_per_image

PAD_SIDES = ('right', 'left')
# IMAGE_SLOT marks a visual-token slot in the ids (LLaVA's IMAGE_TOKEN_INDEX): never a vocabulary
# id. The model writes one visual token into each (mmjax.models.llm_embedder.splice).


class MultimodalEncoder:
  """Text with image placeholders -> fixed-length (ids, mask), checked on the host.

  Every placeholder token becomes `tokens_per_image` IMAGE_SLOT ids (the model writes one visual
  token into each), EOS is appended when the tokenizer did not already end with it, and
  the row is padded on `pad_side`. Refuses, with a ValueError naming the counts, a text whose
  placeholders differ from its number of images, more images than `max_images`, or a sequence
  longer than `max_len`.
  """

  def __init__(self, tokenizer: Tokenizer, *, max_len: int, image_token: str,
               tokens_per_image: int, max_images: int, pad_side: str = 'right',
               eos_token: str | None = None):
    if pad_side not in PAD_SIDES:
      raise ValueError(f'pad_side={pad_side!r} is not one of {PAD_SIDES}.')
    # A private copy: the run's TextEncoder turns truncation on for the shared tokenizer.
    self.tokenizer = Tokenizer.from_str(tokenizer.to_str())
    self.tokenizer.no_truncation()
    self.tokenizer.no_padding()
    self.image_id = self.tokenizer.token_to_id(image_token)
    if self.image_id is None:
      raise ValueError(f'The tokenizer has no image placeholder token {image_token!r}; add it with '
                       '`add_image_token(tokenizer, token)`.')
    self.eos_id = _eos_id(self.tokenizer, eos_token)
    own = (tokenizer.padding or {}).get('pad_id')
    self.pad_id = own if own is not None else self.tokenizer.token_to_id('[PAD]') or 0
    self.max_len, self.image_token, self.pad_side = max_len, image_token, pad_side
    self.tokens_per_image, self.max_images = tokens_per_image, max_images

  def to_str(self) -> str:
    """The tokenizer's JSON with its pad id (what an export keeps)."""
    return tokenizer_lib.json_with_pad_id(self.tokenizer, self.pad_id)

  def ids(self, text: str, num_images: int) -> np.ndarray:
    """The unpadded ids of `text` with placeholders expanded and EOS last; refuses bad input."""
    ids = np.asarray(self.tokenizer.encode(text).ids, np.int32)
    if not len(ids) or ids[-1] != self.eos_id:
      ids = np.append(ids, np.int32(self.eos_id))
    is_img = ids == self.image_id
    placeholders = int(is_img.sum())
    if placeholders != num_images:
      raise ValueError(f'{placeholders} image placeholder(s) {self.image_token!r} but {num_images} '
                       f'image(s) in {text!r}: each image needs exactly one placeholder.')
    if num_images > self.max_images:
      raise ValueError(f'{num_images} images in {text!r} but model.llm.max_images='
                       f'{self.max_images}.')
    ids = np.repeat(np.where(is_img, IMAGE_SLOT, ids), np.where(is_img, self.tokens_per_image, 1))
    if len(ids) > self.max_len:
      raise ValueError(
          f'{len(ids)} tokens ({num_images} image(s) x {self.tokens_per_image} visual tokens + '
          f'{len(ids) - num_images * self.tokens_per_image} text tokens with EOS) exceed the '
          f'context model.llm.max_len={self.max_len}: {text[:80]!r}.')
    return ids

  def length(self, text: str, num_images: int) -> int:
    """The number of ids `text` with `num_images` images would take (EOS included)."""
    ids = self.tokenizer.encode(text).ids
    return len(ids) + (not ids or ids[-1] != self.eos_id) + num_images * (self.tokens_per_image - 1)

  def fit(self, instruction: str, content: str, num_images: int = 0) -> str:
    """`content` cut at a word boundary (the longest prefix of its words) so that
    `format_text(instruction, content)` fits the context: real captions can be longer than
    max_len, and the dual encoder's tokenizer truncates them too. Unchanged when it fits."""
    if self.length(format_text(instruction, content), num_images) <= self.max_len:
      return content
    words = content.split()
    lo, hi = 0, len(words)  # words[:lo] fits (or lo = 0), words[:hi + 1] does not.
    while lo < hi:
      mid = (lo + hi + 1) // 2
      if self.length(format_text(instruction, ' '.join(words[:mid])), num_images) <= self.max_len:
        lo = mid
      else:
        hi = mid - 1
    return ' '.join(words[:lo])

  def __call__(self, text: str, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    ids = self.ids(text, num_images)
    out = np.full((self.max_len,), self.pad_id, np.int32)
    mask = np.zeros((self.max_len,), np.int32)
    where = slice(0, len(ids)) if self.pad_side == 'right' else slice(self.max_len - len(ids), None)
    out[where], mask[where] = ids, 1
    return out, mask

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != 'tokenizer'} | {
        'json': self.tokenizer.to_str()}

  def __setstate__(self, state):
    state = dict(state)
    self.__dict__.update(state)
    self.tokenizer = Tokenizer.from_str(state.pop('json'))
    del self.__dict__['json']


def _eos_id(tok: Tokenizer, eos_token: str | None) -> int:
  for name in ((eos_token,) if eos_token else ('[EOS]', '<|endoftext|>', '</s>', '[SEP]')):
    if (i := tok.token_to_id(name)) is not None:
      return i
  raise ValueError(f'The tokenizer has no EOS token ({eos_token or "[EOS], <|endoftext|>, </s>"}'
                   '); last-token pooling needs one.')


def add_image_token(tok: Tokenizer, image_token: str) -> Tokenizer:
  """Adds the image placeholder as a special token (one id, never split) if it is missing."""
  if tok.token_to_id(image_token) is None:
    tok.add_special_tokens([image_token])
  return tok


def format_text(instruction: str, content: str) -> str:
  """'<instruction> <content>' (no instruction: the content alone)."""
  return f'{instruction} {content}' if instruction else content


@dataclasses.dataclass(frozen=True)
class Instructions:
  """Per-task query instruction prefixes and the one candidate prefix ('' = none)."""

  query: dict[str, str]
  candidate: str = ''

  @classmethod
  def from_config(cls, config) -> Instructions:
    llm = config.data.llm
    return cls({t: llm.instructions[t] for t in TASKS}, llm.candidate_instruction)


def stack_images(images: Sequence[np.ndarray], max_images: int, size: int) -> np.ndarray:
  """uint8 [max_images, S, S, 3]: the images in placeholder order, zero slots after them."""
  out = np.zeros((max_images, size, size, 3), np.uint8)
  for i, image in enumerate(images):
    out[i] = image
  return out


def tokens_per_image(config) -> int:
  img = config.model.image
  vit = ViTConfig(image_size=img.image_size, patch_size=img.patch_size,
                  stem_channels=tuple(img.stem_channels), stem_downsample=img.stem_downsample)
  return _tokens_per_image(vit, config.model.llm.merge)


def make_encoder(config, tokenizer: Tokenizer) -> MultimodalEncoder:
  llm = config.model.llm
  return MultimodalEncoder(tokenizer, max_len=llm.max_len, image_token=llm.image_token,
                           tokens_per_image=tokens_per_image(config), max_images=llm.max_images,
                           pad_side=config.data.llm.pad_side, eos_token=llm.eos_token or None)
