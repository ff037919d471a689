"""Tokenizers: bitwise-reproducible WordPiece training, CLIP's BPE file with open_clip's ids, and
plain SentencePiece models with sentencepiece's ids (all loaded through config.tokenizer.path)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest

from mmjax.data import demo, tokenizer as tokenizer_lib, tokenizer_files

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / 'tests' / 'fixtures' / 'tokenizers'


def tie_heavy_corpus(n: int = 3000) -> list[str]:
  """Random words: many pairs with equal counts, where a trainer's tie-breaking shows."""
  rng = random.Random(0)
  words = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz\u00e9\u65e5') for _ in
                   range(rng.randint(2, 9))) for _ in range(2000)]
  return [' '.join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def _digest(corpus: list[str], vocab_size: int) -> str:
  return hashlib.sha256(tokenizer_lib.train_wordpiece(corpus, vocab_size).to_str().encode()
                        ).hexdigest()


def test_wordpiece_training_is_bitwise_reproducible_in_one_process():
  corpus = tie_heavy_corpus()
  first = _digest(corpus, 800)
  assert all(_digest(corpus, 800) == first for _ in range(3))
  shuffled = corpus[:]
  random.Random(1).shuffle(shuffled)
  assert _digest(shuffled, 800) == first  # Word counts decide, not the caption order.


def test_wordpiece_training_is_bitwise_reproducible_across_processes():
  """Rust's HashMap seeds differ per process: two fresh interpreters give the same bytes."""
  code = ('import sys; sys.path.insert(0, "tests"); import test_tokenizer as t; '
          'print(t._digest(t.tie_heavy_corpus(), 800))')
  env = {**os.environ, 'PYTHONPATH': str(ROOT)}
  runs = {subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout.strip() for _ in range(2)}
  assert runs == {_digest(tie_heavy_corpus(), 800)}


def test_trained_wordpiece_is_a_proper_wordpiece():
  corpus = list(demo.caption_corpus(num_scenes=200, seed=0)) + ['caf\u00e9 \u65e5\u672c \U000f0001x']
  tok = tokenizer_lib.train_wordpiece(corpus, 300)
  vocab = tok.get_vocab()
  assert [vocab[t] for t in (tokenizer_lib.PAD, tokenizer_lib.UNK, tokenizer_lib.EOS)] == [0, 1, 2]
  assert sorted(vocab.values()) == list(range(len(vocab)))
  # The private-use characters used while training never leak into the vocabulary.
  assert not [t for t in vocab if any(0xF0000 <= ord(c) for c in t) and '\U000f0001' not in t]
  unk = vocab[tokenizer_lib.UNK]
  for text in corpus[:300]:
    enc = tok.encode(text)
    assert unk not in enc.ids and enc.ids[-1] == vocab[tokenizer_lib.EOS]
    assert all(t.startswith('##') or not t.startswith('#') for t in enc.tokens)
  assert tok.decode(tok.encode('A big red star.').ids) == 'a big red star.'


def test_clip_bpe_file_gives_open_clip_ids():
  """The tiny fixture (header + 3,000 merges of open_clip's file, same format) against ids that
  open_clip's SimpleTokenizer produced (tests/fixtures/tokenizers/make_clip_reference.py)."""
  ref = json.loads((FIXTURES / 'clip_reference.json').read_text())
  tok = tokenizer_lib.load(FIXTURES / 'clip_bpe_tiny.txt.gz')
  assert tok.get_vocab_size() == ref['tiny_vocab_size']
  encoder = tokenizer_lib.TextEncoder(tok, ref['context_length'])
  ids, mask = encoder(ref['texts'])
  assert encoder.pad_id == 0
  for i, text in enumerate(ref['texts']):
    assert ids[i].tolist() == ref['tiny'][i], text
    assert mask[i].sum() == np.count_nonzero(ref['tiny'][i]), text
  assert tok.decode(tok.encode('A photo of a cat.').ids).split() == ['a', 'photo', 'of', 'a', 'cat', '.']


def _full_clip_file() -> pathlib.Path | None:
  if os.environ.get('MMJAX_CLIP_BPE'):
    return pathlib.Path(os.environ['MMJAX_CLIP_BPE'])
  spec = importlib.util.find_spec('open_clip')
  if spec and spec.submodule_search_locations:
    return pathlib.Path(spec.submodule_search_locations[0]) / 'bpe_simple_vocab_16e6.txt.gz'
  return None


@pytest.mark.skipif(_full_clip_file() is None, reason='the full CLIP BPE file: pip install '
                    'open_clip_torch, or MMJAX_CLIP_BPE=/path/to/bpe_simple_vocab_16e6.txt.gz')
def test_full_clip_bpe_file_gives_open_clip_ids():
  ref = json.loads((FIXTURES / 'clip_reference.json').read_text())
  tok = tokenizer_lib.load(_full_clip_file())
  assert tok.get_vocab_size() == 49408 == ref['full_vocab_size']
  ids, _ = tokenizer_lib.TextEncoder(tok, ref['context_length'])(ref['texts'])
  for i, text in enumerate(ref['texts']):
    assert ids[i].tolist() == ref['full'][i], text


def test_bad_clip_file_is_refused_with_its_name(tmp_path):
  bad = tmp_path / 'vocab.txt.gz'
  bad.write_bytes(b'not gzip')
  with pytest.raises(ValueError, match='vocab.txt.gz: not a gzipped CLIP BPE'):
    tokenizer_lib.load(bad)


@pytest.fixture(name='spm_models', scope='module')
def fixture_spm_models(tmp_path_factory):
  spm = pytest.importorskip('sentencepiece')
  root = tmp_path_factory.mktemp('spm')
  corpus = root / 'corpus.txt'
  corpus.write_text('\n'.join(demo.caption_corpus(num_scenes=300, seed=0)) +
                    '\nCaf\u00e9 \u00fcber alles.\n\uff21\uff42 fine \ufb01ne  spaces\n')
  out = {}
  for kind in ('unigram', 'bpe'):
    prefix = root / kind
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), vocab_size=90,
                                   model_type=kind, character_coverage=1.0, pad_id=3,
                                   minloglevel=2)
    out[kind] = pathlib.Path(str(prefix) + '.model')
  return out


@pytest.mark.parametrize('kind', ['unigram', 'bpe'])
def test_plain_sentencepiece_model_gives_sentencepiece_ids(spm_models, kind):
  spm = pytest.importorskip('sentencepiece')
  theirs = spm.SentencePieceProcessor(model_file=str(spm_models[kind]))
  ours = tokenizer_lib.TextEncoder(tokenizer_lib.load(spm_models[kind]), 24)
  assert ours.pad_id == 3
  rng = np.random.default_rng(0)
  words = ('A', 'big', 'red', 'star', 'two', 'blue', 'circles', 'Caf\u00e9', '\ufb01ne', '\uff21b',
           '12', '\u00fcber', 'zebra', 'x', 'of')
  seps = (' ', '  ', '\t', '\u3000', '\xa0', ', ', '. ', ' - ')
  texts = [''.join(rng.choice(seps) * (rng.random() < 0.3)) + ''.join(
      str(rng.choice(words)) + str(rng.choice(seps)) for _ in range(rng.integers(0, 8)))
           for _ in range(200)]
  ids, mask = ours(texts)
  for i, text in enumerate(texts):
    want = theirs.encode(text)[:23] + [theirs.eos_id()]  # Truncated, EOS kept last.
    assert ids[i][:mask[i].sum()].tolist() == want, (text, theirs.encode(text, out_type=str))


def test_sentencepiece_with_a_hf_config_stays_siglip(tmp_path):
  """A .model with tokenizer_config.json beside it follows that config (SigLIP's canonical
  text); without one it is plain SentencePiece: the two differ on punctuation and case."""
  siglip = ROOT / 'tests' / 'fixtures' / 'hf' / 'siglip'
  bare = tmp_path / 'spiece.model'
  bare.write_bytes((siglip / 'spiece.model').read_bytes())
  text = 'A Red, Star!'
  with_config = tokenizer_lib.load(siglip / 'spiece.model').encode(text).ids
  plain = tokenizer_lib.load(bare).encode(text).ids
  assert with_config == tokenizer_lib.load(siglip).encode(text).ids
  assert with_config != plain


def test_tokenizer_files_through_the_training_setup(tmp_path, tiny_config):
  """config.tokenizer.path pointing at a CLIP .txt.gz gives the run that tokenizer."""
  from mmjax.train import loop  # pylint: disable=import-outside-toplevel
  tiny_config.tokenizer.path = str(FIXTURES / 'clip_bpe_tiny.txt.gz')
  tiny_config.model.text.vocab_size = 4096
  tok = loop.get_tokenizer(tiny_config, tmp_path)
  assert tok.token_to_id(tokenizer_files.CLIP_EOT) == 3513
  assert tokenizer_lib.load(tmp_path / 'tokenizer.json').encode('a cat').ids == tok.encode(
      'a cat').ids
