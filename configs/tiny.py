r"""Tiny: the smallest working model, for tests and smoke runs (seconds on one CPU core).

Run:
  python -m mmjax.main --config=configs/tiny.py --workdir=runs/tiny
"""

from configs import base


def get_config():
  c = base.get_config()
  c.batch_size = 16
  c.total_steps = 4
  c.log_every_steps = 2
  c.model.embed_dim = 32
  c.model.image.image_size = 16
  c.model.image.patch_size = 4
  c.model.image.width = 32
  c.model.image.depth = 1
  c.model.image.num_heads = 2
  c.model.image.mlp_dim = 64
  c.model.text.max_len = 40
  c.model.text.vocab_size = 256
  c.model.text.width = 32
  c.model.text.depth = 1
  c.model.text.num_heads = 2
  c.model.text.mlp_dim = 64
  c.tokenizer.vocab_size = 256
  c.optimizer.warmup_steps = 1
  c.data.num_train_examples = 10_000
  c.data.read_threads = 1
  c.checkpoint.every_steps = 2
  c.eval.every_steps = 4
  c.eval.num_scenes = 64
  c.eval.batch_size = 32
  return c
