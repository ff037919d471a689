"""Tokenizers from the files other projects ship, as `tokenizers` pipelines with their ids.

- CLIP's BPE vocabulary (`bpe_simple_vocab_16e6.txt.gz`, what OpenAI CLIP and open_clip ship):
  the ids of open_clip's `SimpleTokenizer` (clean='lower'), `<|startoftext|>` ... `<|endoftext|>`,
  truncation keeping `<|endoftext|>` last, padding with 0. Of open_clip's `ftfy.fix_text` the
  character-level fixes are reproduced (Latin ligatures, full/half-width forms, curly quotes,
  control characters, NFC); not its mojibake repair, nor the HTML-entity unescaping (`&amp;`):
  text with those gets other ids than open_clip's (as with Hugging Face's CLIPTokenizerFast).
- A plain SentencePiece model (`*.model`, unigram or BPE), as `sentencepiece` encodes: its
  normalisation table, whitespace handling and dummy prefix, then its `</s>` appended.

Both are chosen by `config.tokenizer.path` (see `mmjax.data.tokenizer.load`, docs/data.md).
"""

from __future__ import annotations

import gzip
import itertools
import pathlib
import sys
import unicodedata

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors

# Python's notion of whitespace (str.isspace / str.split), spelled out so the regex engines agree.
PY_SPACE = ''.join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())
SPACE_CLASS = '[' + ''.join(f'\\x{{{ord(c):x}}}' for c in PY_SPACE) + ']'  # A regex class.
SPIECE_UNDERLINE = '\u2581'

CLIP_SOT, CLIP_EOT = '<|startoftext|>', '<|endoftext|>'
CLIP_NUM_MERGES = 49152 - 256 - 2  # What open_clip reads of the file: 48,894 merges.
# open_clip's SimpleTokenizer pattern (its own special tokens are added tokens here).
CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _char_class(chars: str) -> str:
  return '[' + ''.join(f'\\x{{{ord(c):x}}}' for c in chars) + ']'


def _ftfy_character_fixes() -> list[normalizers.Normalizer]:
  """ftfy.fix_text's character-level steps, in its order (its tables, built the same way)."""
  ligatures = [0x132, 0x133, 0x149, *range(0x1C4, 0x1CD), *range(0x1F1, 0x1F4),
               *range(0xFB00, 0xFB07)]
  fixes = {chr(c): unicodedata.normalize('NFKC', chr(c)) for c in ligatures}
  fixes['\ufb05'] = '\u017ft'  # ftfy keeps the long s.
  fixes['\u0149'] = '\u02bcn'
  width = {'\u3000': ' '} | {chr(c): unicodedata.normalize('NFKC', chr(c))
                              for c in range(0xFF01, 0xFFF0)}
  width = {k: v for k, v in width.items() if k != v}
  control = ''.join(chr(c) for c in itertools.chain(
      range(0x00, 0x09), [0x0B], range(0x0E, 0x20), [0x7F], range(0x206A, 0x2070), [0xFEFF],
      range(0xFFF9, 0xFFFD)))
  return ([normalizers.Replace(k, v) for k, v in fixes.items()]
          + [normalizers.Replace(k, v) for k, v in width.items()]
          + [normalizers.Replace(Regex('[\u02bc\u2018-\u201b]'), "'"),
             normalizers.Replace(Regex('[\u201c-\u201f]'), '"'),
             normalizers.Replace(Regex(_char_class(control)), ''), normalizers.NFC()])


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible byte -> printable character table (the first 256 vocabulary ids)."""
  bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('\xa1'), ord('\xac') + 1)) + list(
      range(ord('\xae'), ord('\xff') + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def from_clip_bpe(path: str | pathlib.Path) -> Tokenizer:
  """CLIP's BPE merges file (gzipped text: a header line, then one `a b` merge a line)."""
  path = pathlib.Path(path)
  try:
    lines = gzip.decompress(path.read_bytes()).decode('utf-8').split('\n')
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: not a gzipped CLIP BPE merges file ({e}).') from e
  merges = [tuple(line.split()) for line in lines[1:CLIP_NUM_MERGES + 1] if line.strip()]
  bad = next((m for m in merges if len(m) != 2), None)
  if bad is not None or not merges:
    raise ValueError(f'{path}: expected lines of two space-separated symbols after the header '
                     f'(CLIP bpe_simple_vocab format), got {bad!r}.')
  chars = list(bytes_to_unicode().values())
  tokens = chars + [c + '</w>' for c in chars] + [a + b for a, b in merges] + [CLIP_SOT, CLIP_EOT]
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError(f'{path}: merges produce duplicate tokens; not a CLIP BPE file.')
  tok = Tokenizer(models.BPE(vocab, merges, end_of_word_suffix='</w>', fuse_unk=False))
  # open_clip's clean='lower': whitespace runs (Python's) collapsed, stripped, lowercased.
  tok.normalizer = normalizers.Sequence(_ftfy_character_fixes() + [
      normalizers.Replace(Regex(SPACE_CLASS + '+'), ' '), normalizers.Strip(),
      normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior='removed', invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.Sequence([decoders.BPEDecoder(suffix='</w>'), decoders.ByteLevel()])
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t in (CLIP_SOT, CLIP_EOT)])
  tok.post_processor = processors.TemplateProcessing(
      single=f'{CLIP_SOT} $A {CLIP_EOT}', pair=f'{CLIP_SOT} $A {CLIP_EOT} $B {CLIP_EOT}',
      special_tokens=[(CLIP_SOT, vocab[CLIP_SOT]), (CLIP_EOT, vocab[CLIP_EOT])])
  tok.enable_padding(pad_id=0, pad_token=tokens[0])  # open_clip pads with 0.
  return tok


def from_plain_sentencepiece(model_file: str | pathlib.Path) -> Tokenizer:
  """A SentencePiece model as `SentencePieceProcessor.encode` tokenises, with its EOS appended
  (kept on truncation) and its pad id (or EOS when it has none) for padding."""
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel  # optional dependency

  model_file = pathlib.Path(model_file)
  proto = sentencepiece_model_pb2.ModelProto()
  try:
    proto.ParseFromString(model_file.read_bytes())
  except Exception as e:  # pylint: disable=broad-except  # protobuf's DecodeError and friends
    raise ValueError(f'{model_file}: not a SentencePiece model ({e}).') from e
  spec, norm = proto.trainer_spec, proto.normalizer_spec
  pieces = [p.piece for p in proto.pieces]
  if spec.model_type == spec.UNIGRAM:
    model = models.Unigram([(p.piece, p.score) for p in proto.pieces], spec.unk_id,
                           spec.byte_fallback)
  elif spec.model_type == spec.BPE:
    vocab = {p: i for i, p in enumerate(pieces)}
    model = models.BPE(vocab, _spm_merges(proto), unk_token=pieces[spec.unk_id], fuse_unk=True,
                       byte_fallback=spec.byte_fallback)
  else:
    raise ValueError(f'{model_file}: SentencePiece model_type {spec.model_type} is not supported '
                     '(unigram or BPE).')
  tok = Tokenizer(model)
  steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
  if norm.remove_extra_whitespaces:
    steps += [normalizers.Strip(), normalizers.Replace(Regex(' {2,}'), ' ')]
  steps.append(normalizers.Replace(' ', SPIECE_UNDERLINE))
  if norm.add_dummy_prefix:
    steps.append(normalizers.Prepend(SPIECE_UNDERLINE))
  tok.normalizer = normalizers.Sequence(steps)
  tok.pre_tokenizer = pre_tokenizers.Metaspace(SPIECE_UNDERLINE, prepend_scheme='never',
                                               split=spec.split_by_whitespace)
  tok.decoder = decoders.Metaspace(SPIECE_UNDERLINE, prepend_scheme='always')
  if spec.eos_id < 0:
    raise ValueError(f'{model_file}: the model has no EOS piece (eos_id=-1); last-token pooling '
                     'needs one.')
  eos = pieces[spec.eos_id]
  pad = pieces[spec.pad_id] if spec.pad_id >= 0 else eos
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t in dict.fromkeys((eos, pad, pieces[spec.unk_id]))])
  tok.post_processor = processors.TemplateProcessing(
      single=f'$A {eos}', pair=f'$A {eos} $B {eos}', special_tokens=[(eos, spec.eos_id)])
  tok.enable_padding(pad_id=tok.token_to_id(pad), pad_token=pad)
  return tok


def _spm_merges(proto) -> list[tuple[str, str]]:
  """BPE merges of a SentencePiece BPE model: every split of each piece into two pieces, ranked
  by the merged piece's position (SentencePiece merges the highest-scored piece first)."""
  vocab = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == p.NORMAL}
  out = []
  for piece, rank in vocab.items():
    for i in range(1, len(piece)):
      left, right = piece[:i], piece[i:]
      if left in vocab and right in vocab:
        out.append((rank, vocab[left], vocab[right], left, right))
  return [(left, right) for *_, left, right in sorted(out)]
