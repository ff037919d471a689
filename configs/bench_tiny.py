r"""bench_tiny: the reference workload of bench/train_step.py (about 17.9M parameters, ~0.73 TFLOP
per step at batch 256). ViT 64 px / patch 8 / width 256 / depth 6; causal text 32 tokens, vocab 32k.

Run:
  python bench/train_step.py --config=configs/bench_tiny.py
  python -m mmjax.main --config=configs/bench_tiny.py --workdir=runs/bench_tiny
"""

from configs import base


def get_config():
  c = base.get_config()
  c.batch_size = 256
  c.model.embed_dim = 256
  c.model.image.image_size = 64
  c.model.image.patch_size = 8
  c.model.image.width = 256
  c.model.image.depth = 6
  c.model.image.num_heads = 4
  c.model.image.mlp_dim = 1024
  c.model.image.pool = 'gap'
  c.model.image.posemb = 'learn'
  c.model.text.max_len = 32
  c.model.text.vocab_size = 32_000
  c.model.text.width = 256
  c.model.text.depth = 6
  c.model.text.num_heads = 4
  c.model.text.mlp_dim = 1024
  c.model.text.causal = True
  c.model.text.pool = 'last'
  c.loss.kind = 'sigmoid'
  c.model.dtype = 'float32'
  c.model.param_dtype = 'float32'
  return c
