r"""LLM embedder, tiny: a 2-layer GQA decoder reading ViT tokens, trained on the demo tasks on CPU
(image->text, text->image and composed image+edit->image retrieval): 300 steps of 64 took 36 min
on 2 CPU cores shared with other jobs (BENCHMARKS.md has its retrieval beside the dual encoder's).

Run:
  python -m mmjax.main --config=configs/llm_embed_tiny.py --workdir=runs/llm_embed_tiny
"""

from configs import base


def get_config():
  c = base.get_config()
  c.batch_size = 64
  c.total_steps = 300
  c.model.kind = 'llm_embedder'
  c.loss.kind = 'softmax'  # InfoNCE at the fixed model.llm.temperature (0.02).

  c.model.image.image_size = 32
  c.model.image.patch_size = 4
  c.model.image.width = 96
  c.model.image.depth = 2
  c.model.image.num_heads = 4
  c.model.image.mlp_dim = 256
  c.model.llm.merge = 2  # 8x8 patches -> 16 visual tokens per image.
  c.model.llm.max_len = 80  # The longest t2i query (instruction + 4-object caption) is ~64.
  c.model.llm.matryoshka_dims = (32, 64)

  c.model.decoder.vocab_size = 512
  c.model.decoder.width = 128
  c.model.decoder.depth = 2
  c.model.decoder.num_heads = 4
  c.model.decoder.num_kv_heads = 2  # Grouped-query attention.
  c.model.decoder.mlp_dim = 384
  c.model.decoder.max_len = 128
  c.tokenizer.vocab_size = 500  # + the image placeholder token.

  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 30
  c.data.num_hard_negatives = 0
  c.log_every_steps = 20
  c.checkpoint.every_steps = 100
  c.eval.every_steps = 150
  c.eval.num_scenes = 500
  c.eval.num_composed = 250
  c.eval.batch_size = 128
  return c
