r"""SigLIP B/16 at 256 px, 32k global batch, ring sigmoid loss, on a v5e-256 slice (16x16).

Compile it for the slice on any machine (needs the `tpu` extra, libtpu; no TPU):
  python -m mmjax.main --config=configs/siglip_b16_256.py --workdir=runs/siglip_b16 \
      --mode=compile --compile_topology=v5e:16x16
Train (on the slice, every host):
  python -m mmjax.main --config=configs/siglip_b16_256.py --workdir=gs://.../siglip_b16

The architecture is big_vision's SigLIP B/16 (ViT-B/16 with a MAP head, 256 px = 256 patches;
a bidirectional 12-layer text tower pooled at the last token, 64 tokens, 32k vocabulary; 768-d
embeddings). The batch is split over all 256 chips (128 pairs each); the sigmoid loss runs as a
ring of collective-permutes, so no chip holds more than [128, 128] logits. bf16 compute, f32
parameters and Adam state; both towers rematerialise their blocks.

Compiled figures (v5e:16x16): see docs/scaling.md (regenerate with the command above).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.batch_size = 32_768
  c.total_steps = 100_000
  c.mesh.data = -1

  c.model.dtype = 'bfloat16'
  c.model.param_dtype = 'float32'
  c.model.embed_dim = 768
  c.model.head = 'linear'

  i = c.model.image
  i.image_size, i.patch_size = 256, 16
  i.width, i.depth, i.num_heads, i.mlp_dim = 768, 12, 12, 3072
  i.pool, i.posemb = 'map', 'learn'
  i.remat = True

  t = c.model.text
  t.max_len, t.vocab_size = 64, 32_000
  t.width, t.depth, t.num_heads, t.mlp_dim = 768, 12, 12, 3072
  t.causal, t.pool = False, 'last'
  t.remat = True

  c.loss.kind, c.loss.impl = 'sigmoid', 'ring'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 2_000
  c.eval.batch_size = 4_096
  return c
