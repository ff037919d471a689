r"""LLM embedder on ingested records: the tiny decoder embedder of llm_embed_tiny.py trained on an
image-caption corpus ingested by `python -m mmjax.data.prepare`, evaluated on its held-out split,
on CPU.

Run (ingest a train and a held-out split first, docs/data.md):
  python -m mmjax.data.prepare --manifest=train.jsonl --out=data/train --max_image_size=256
  python -m mmjax.data.prepare --manifest=val.jsonl --out=data/val --max_image_size=256
  python -m mmjax.main --config=configs/llm_embed_records.py --workdir=runs/llm_records \
      --config.data.path=data/train --config.evals.held_out.path=data/val

Both paths are required (the error names the one missing). Each training row is one task of an
image-caption pair, VLM2Vec style: i2t (query: the image after the i2t instruction, candidate:
a caption) or t2i (query: the caption after the t2i instruction, candidate: the image), half
and half; there are no composed (edit) pairs in such data. Images get real_captions.py's
preprocessing (letterbox on white, random resized crop, caption-aware flip, colour jitter
without hue). The primary evaluation is the held-out split (`llm_retrieval` on records: i2t
and t2i with instructions, every caption of an image relevant to it, at each Matryoshka
dimension).

The ViT can start from a CLIP or SigLIP checkpoint (docs/llm_embedder.md): set the image tower
to the checkpoint's architecture (`python -m mmjax.hf DIR` prints it) and
  --config.init.image=hf:DIR
"""

from configs import base, real_captions
from mmjax.eval import specs


def get_config():
  c = base.get_config()
  c.batch_size = 64
  c.total_steps = 300
  c.model.kind = 'llm_embedder'
  c.loss.kind = 'softmax'  # InfoNCE at the fixed model.llm.temperature (0.02).

  c.model.image.image_size = 64
  c.model.image.patch_size = 8  # 8x8 patches -> merged 2x2 -> 16 visual tokens per image.
  c.model.image.width = 96
  c.model.image.depth = 2
  c.model.image.num_heads = 4
  c.model.image.mlp_dim = 256
  c.model.llm.merge = 2
  c.model.llm.max_len = 64  # Longer captions are cut at a word boundary.
  c.model.llm.matryoshka_dims = (32, 64)

  c.model.decoder.vocab_size = 4104  # The 4096-token tokenizer + the image placeholder.
  c.model.decoder.width = 128
  c.model.decoder.depth = 2
  c.model.decoder.num_heads = 4
  c.model.decoder.num_kv_heads = 2  # Grouped-query attention.
  c.model.decoder.mlp_dim = 384
  c.model.decoder.max_len = 128
  c.tokenizer.vocab_size = 4096  # Trained on the corpus's captions and the instructions.

  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 30

  c.data.name = 'records'
  c.data.path = ''  # --config.data.path=<the training split's prepare --out>
  c.data.llm.weights.i2t = 1.0
  c.data.llm.weights.t2i = 1.0
  c.data.llm.weights.composed = 0.0  # Image-caption data has no edit pairs.
  c.data.num_hard_negatives = 0
  real_captions.real_image_preprocessing(c.data)  # Letterbox, augmentation.

  c.log_every_steps = 20
  c.checkpoint.every_steps = 100
  c.eval.every_steps = 150
  c.eval.batch_size = 128
  # The held-out split: the primary evaluation (config.eval.primary='' picks the run's one
  # held-out evaluator when it trains on real data).
  c.evals.held_out = specs.spec('llm_retrieval', dataset='records', path='', max_examples=5000)
  return c
