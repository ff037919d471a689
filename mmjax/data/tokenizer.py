"""Tokenizers through the Hugging Face `tokenizers` stack.

Either a WordPiece tokenizer trained on the demo captions (seconds), or any `tokenizer.json`
from a local directory. Every encoding ends with an EOS token, also after truncation, so
last-token pooling reads the same position whatever the padding.
"""

from __future__ import annotations

import pathlib
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

PAD, UNK, EOS = '[PAD]', '[UNK]', '[EOS]'
TOKENIZER_FILE = 'tokenizer.json'


def train_wordpiece(corpus: Iterable[str], vocab_size: int) -> Tokenizer:
  """A lowercasing WordPiece tokenizer with [PAD]=0, [UNK]=1, [EOS]=2 and EOS appended."""
  tok = Tokenizer(models.WordPiece(unk_token=UNK))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK, EOS],
                                      show_progress=False)
  tok.train_from_iterator(corpus, trainer=trainer)
  _append_eos(tok)
  return tok


def _append_eos(tok: Tokenizer) -> None:
  eos_id = tok.token_to_id(EOS)
  tok.post_processor = processors.TemplateProcessing(
      single=f'$A {EOS}', pair=f'$A {EOS} $B {EOS}', special_tokens=[(EOS, eos_id)])


def load(path: str | pathlib.Path) -> Tokenizer:
  """Loads `tokenizer.json` (or a directory holding one) from local disk."""
  path = pathlib.Path(path)
  file = path / TOKENIZER_FILE if path.is_dir() else path
  if not file.is_file():
    raise FileNotFoundError(f'No tokenizer at {file} (expected a tokenizer.json or a directory '
                            'holding one).')
  tok = Tokenizer.from_file(str(file))
  if tok.token_to_id(EOS) is None and tok.token_to_id('[SEP]') is None and tok.token_to_id(
      '</s>') is None and tok.token_to_id('<|endoftext|>') is None:
    raise ValueError(f'Tokenizer {file} has no EOS-like token ([EOS], [SEP], </s>, <|endoftext|>); '
                     'last-token pooling needs one.')
  return tok


class TextEncoder:
  """Fixed-length encoding: ids and a mask, right padded, truncated with EOS kept last."""

  def __init__(self, tokenizer: Tokenizer, max_len: int):
    self.tokenizer = tokenizer
    self.max_len = max_len
    # The tokenizer's own padding id when it has one (SigLIP's '</s>'=1), else [PAD], else 0.
    own = (tokenizer.padding or {}).get('pad_id')
    self.pad_id = own if own is not None else tokenizer.token_to_id(PAD) or 0
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_len)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size()

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    encodings = self.tokenizer.encode_batch(list(texts))
    ids = np.full((len(texts), self.max_len), self.pad_id, np.int32)
    mask = np.zeros((len(texts), self.max_len), np.int32)
    for i, enc in enumerate(encodings):
      n = len(enc.ids)
      ids[i, :n] = enc.ids
      mask[i, :n] = 1
    return ids, mask

  def encode_one(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = self([text])
    return ids[0], mask[0]

  def __getstate__(self):
    return {'json': self.tokenizer.to_str(), 'max_len': self.max_len}

  def __setstate__(self, state):
    self.__init__(Tokenizer.from_str(state['json']), state['max_len'])
