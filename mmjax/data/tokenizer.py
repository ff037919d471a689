"""Tokenizers through the Hugging Face `tokenizers` stack.

Either a WordPiece tokenizer trained on the run's captions (seconds, bitwise reproducible), any
`tokenizer.json` from a local directory, a SigLIP checkpoint's SentencePiece `spiece.model`
(converted to a `tokenizers` Unigram pipeline that reproduces `transformers`' SiglipTokenizer id
for id), any other SentencePiece `.model`, or CLIP's BPE `bpe_simple_vocab_16e6.txt.gz`
(`mmjax.data.tokenizer_files`). Every
encoding ends with an EOS token, also after truncation, so last-token pooling reads the same
position whatever the padding.
"""

from __future__ import annotations

import collections
import itertools
import json
import pathlib
import string
from typing import Iterable, Sequence

import numpy as np
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                        pre_tokenizers, processors, trainers)

from mmjax.data import tokenizer_files

PAD, UNK, EOS = '[PAD]', '[UNK]', '[EOS]'
TOKENIZER_FILE = 'tokenizer.json'
SPM_FILE = 'spiece.model'  # How HF SigLIP (and T5) checkpoints ship their SentencePiece model.
SPM_CONFIG = 'tokenizer_config.json'


def train_wordpiece(corpus: Iterable[str], vocab_size: int) -> Tokenizer:
  """A lowercasing WordPiece tokenizer with [PAD]=0, [UNK]=1, [EOS]=2 and EOS appended.

  Bitwise reproducible: the same captions (in any order) give the same `tokenizer.json`.
  `tokenizers`' own WordPieceTrainer does not (huggingface/tokenizers#1794): it numbers the
  `##x` continuation pieces in the iteration order of a Rust HashMap, randomly seeded per map,
  and those numbers break ties between merges of equal count. Here every continuation character
  is first mapped to a private-use code point, so all pieces are in the initial alphabet, which
  the trainer numbers in sorted order; the BPE merges are then a pure function of the word
  counts, and the pieces are mapped back to `x` / `##x` afterwards (the same algorithm, with
  ties broken by a fixed order).
  """
  tok = Tokenizer(models.WordPiece(unk_token=UNK))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  counts: collections.Counter[str] = collections.Counter()
  for text in corpus:
    counts.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)))
  vocab = _deterministic_wordpiece_vocab(counts, vocab_size, [PAD, UNK, EOS])
  tok.model = models.WordPiece(vocab, unk_token=UNK)
  tok.add_special_tokens([PAD, UNK, EOS])
  _append_eos(tok)
  return tok


def _deterministic_wordpiece_vocab(counts: collections.Counter[str], vocab_size: int,
                                   specials: list[str]) -> dict[str, int]:
  """WordPieceTrainer's vocabulary (BPE merges over '##'-marked continuations), reproducibly."""
  chars = sorted({c for w in counts for c in w})
  used = set(chars)
  free = (c for c in itertools.chain(range(0xF0000, 0xFFFFE), range(0x100000, 0x10FFFE))
          if chr(c) not in used)
  cont = {c: chr(next(free)) for c in chars}  # Raises StopIteration only past 131k characters.
  back = {v: k for k, v in cont.items()}
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                initial_alphabet=chars, show_progress=False)
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  marked = sorted((w[0] + ''.join(cont[c] for c in w[1:]), n) for w, n in counts.items())
  bpe.train_from_iterator((' '.join([w] * n) for w, n in marked), trainer=trainer)

  def unmark(piece: str) -> str:
    if piece in specials:
      return piece
    if piece[0] in back:
      return '##' + ''.join(back[c] for c in piece)
    return piece[0] + ''.join(back.get(c, c) for c in piece[1:])

  return {unmark(p): i for p, i in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])}


def _append_eos(tok: Tokenizer) -> None:
  eos_id = tok.token_to_id(EOS)
  tok.post_processor = processors.TemplateProcessing(
      single=f'$A {EOS}', pair=f'$A {EOS} $B {EOS}', special_tokens=[(EOS, eos_id)])


def load(path: str | pathlib.Path) -> Tokenizer:
  """The tokenizer at `path` (`config.tokenizer.path`), by what the file is:

  - `tokenizer.json`, or a directory holding one;
  - a `*.model` SentencePiece file: with a `tokenizer_config.json` beside it (a Hugging Face
    SigLIP checkpoint; a directory holding `spiece.model` works too) as that tokenizer class
    encodes, without one as `sentencepiece` itself encodes;
  - a `*.txt.gz` CLIP BPE merges file (`bpe_simple_vocab_16e6.txt.gz`), as open_clip encodes.
  """
  path = pathlib.Path(path)
  file = path / TOKENIZER_FILE if path.is_dir() else path
  if path.is_dir() and not file.is_file() and (path / SPM_FILE).is_file():
    file = path / SPM_FILE
  if not file.is_file():
    raise FileNotFoundError(f'No tokenizer at {file} (expected a tokenizer.json, a directory '
                            f'holding one or a {SPM_FILE}, a SentencePiece *.model or a CLIP '
                            '*.txt.gz BPE file).')
  if file.name.endswith('.txt.gz'):
    return tokenizer_files.from_clip_bpe(file)
  if file.suffix == '.model':
    if (file.parent / SPM_CONFIG).is_file():
      return from_sentencepiece(file)
    return tokenizer_files.from_plain_sentencepiece(file)
  tok = Tokenizer.from_file(str(file))
  if tok.token_to_id(EOS) is None and tok.token_to_id('[SEP]') is None and tok.token_to_id(
      '</s>') is None and tok.token_to_id('<|endoftext|>') is None:
    raise ValueError(f'Tokenizer {file} has no EOS-like token ([EOS], [SEP], </s>, <|endoftext|>); '
                     'last-token pooling needs one.')
  return tok


# SiglipTokenizer.canonicalize_text: lowercase, drop ASCII punctuation, collapse whitespace, strip.
_SPACE_CLASS = tokenizer_files.SPACE_CLASS
_PUNCT_CLASS = '[' + ''.join(f'\\x{{{ord(c):x}}}' for c in string.punctuation) + ']'
SPIECE_UNDERLINE = tokenizer_files.SPIECE_UNDERLINE


def _siglip_canonicalize(lowercase: bool) -> list[normalizers.Normalizer]:
  # SiglipTokenizer encodes canonicalize('▁' + text): the '▁' is prepended *before* the strip,
  # so leading whitespace survives as one space (an extra '▁' piece); mirrored here.
  return [normalizers.Replace(SPIECE_UNDERLINE, ' '),
          *([normalizers.Lowercase()] if lowercase else []),
          normalizers.Replace(Regex(_PUNCT_CLASS), ''),
          normalizers.Replace(Regex(_SPACE_CLASS + '+'), ' '),
          normalizers.Replace(Regex(' $'), ''),
          normalizers.Prepend(SPIECE_UNDERLINE)]


def from_sentencepiece(model_file: str | pathlib.Path) -> Tokenizer:
  """A SentencePiece Unigram model (a SigLIP checkpoint's `spiece.model`) as a `tokenizers`
  Tokenizer that gives `transformers`' SiglipTokenizer's ids: its text canonicalisation, the
  model's own normalisation table, '</s>' appended (kept on truncation), padded with its
  `pad_token` ('</s>' = 1 in SigLIP: big_vision pads with EOS). Settings come from the
  `tokenizer_config.json` next to the model; tokenizer classes other than SiglipTokenizer are
  refused (their conventions differ and are not verified here).
  """
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel

  model_file = pathlib.Path(model_file)
  cfg_file = model_file.parent / SPM_CONFIG
  cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
  kind = cfg.get('tokenizer_class', 'SiglipTokenizer')
  if kind != 'SiglipTokenizer':
    raise ValueError(f'{cfg_file}: tokenizer_class={kind!r}: only SiglipTokenizer is supported '
                     f'for a {SPM_FILE}; give a tokenizer.json instead.')
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_file.read_bytes())
  if proto.trainer_spec.model_type != proto.trainer_spec.UNIGRAM:
    raise ValueError(f'{model_file}: SentencePiece model_type '
                     f'{proto.trainer_spec.model_type} is not supported (only unigram).')
  vocab = [(p.piece, p.score) for p in proto.pieces]
  tok = Tokenizer(models.Unigram(vocab, proto.trainer_spec.unk_id,
                                 proto.trainer_spec.byte_fallback))
  spm_norm = proto.normalizer_spec
  steps = _siglip_canonicalize(cfg.get('do_lower_case', True))
  if spm_norm.precompiled_charsmap:
    steps.append(normalizers.Precompiled(spm_norm.precompiled_charsmap))
  if spm_norm.remove_extra_whitespaces:
    # SentencePiece collapses runs of spaces and drops trailing spaces *and* '▁'s (so an empty
    # canonical text, '▁', encodes to nothing).
    steps += [normalizers.Replace(Regex(' {2,}'), ' '),
              normalizers.Replace(Regex(f'[ {SPIECE_UNDERLINE}]+$'), '')]
  tok.normalizer = normalizers.Sequence(steps)
  tok.pre_tokenizer = pre_tokenizers.Metaspace(SPIECE_UNDERLINE, prepend_scheme='never')
  tok.decoder = decoders.Metaspace(SPIECE_UNDERLINE, prepend_scheme='always')
  eos, pad = _token(cfg.get('eos_token', '</s>')), _token(cfg.get('pad_token', '</s>'))
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t in dict.fromkeys((eos, pad, _token(cfg.get('unk_token', '<unk>'))))])
  tok.post_processor = processors.TemplateProcessing(
      single=f'$A {eos}', pair=f'$A {eos} $B {eos}', special_tokens=[(eos, tok.token_to_id(eos))])
  tok.enable_padding(pad_id=tok.token_to_id(pad), pad_token=pad)
  return tok


def _token(value) -> str:
  """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
  return value['content'] if isinstance(value, dict) else value


def json_with_pad_id(tokenizer: Tokenizer, pad_id: int) -> str:
  """`tokenizer`'s JSON, untruncated, with padding by `pad_id` recorded (so a reload knows it)."""
  tok = Tokenizer.from_str(tokenizer.to_str())
  tok.no_truncation()
  tok.enable_padding(pad_id=pad_id, pad_token=tok.id_to_token(pad_id) or PAD)
  return tok.to_str()


class TextEncoder:
  """Fixed-length encoding: ids and a mask, right padded, truncated with EOS kept last."""

  def __init__(self, tokenizer: Tokenizer, max_len: int, pad_id: int | None = None):
    # The tokenizer's own padding id when it has one (SigLIP's '</s>'=1), else [PAD], else 0.
    own = (tokenizer.padding or {}).get('pad_id') if pad_id is None else pad_id
    self.pad_id = own if own is not None else tokenizer.token_to_id(PAD) or 0
    # A copy: padding and truncation are set here, not on the caller's tokenizer.
    self.tokenizer = Tokenizer.from_str(tokenizer.to_str())
    self.max_len = max_len
    self.tokenizer.no_padding()
    self.tokenizer.enable_truncation(max_length=max_len)

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

  def to_str(self) -> str:
    """The tokenizer's JSON with its pad id (what an export or a workdir keeps)."""
    return json_with_pad_id(self.tokenizer, self.pad_id)

  def __getstate__(self):  # Data workers get it pickled: the pad id travels with it.
    return {'json': self.tokenizer.to_str(), 'max_len': self.max_len, 'pad_id': self.pad_id}

  def __setstate__(self, state):
    self.__init__(Tokenizer.from_str(state['json']), state['max_len'], state.get('pad_id'))
