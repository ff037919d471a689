r"""quality_tuxpaint: the recipe of bench/quality.py, mmjax vs open_clip on the Tux Paint stamps.

Run (bench/quality.py ingests both splits into runs/quality/corpus and passes the paths):
  python bench/quality.py --steps=120 --seeds=0,1
  python -m mmjax.main --config=configs/quality_tuxpaint.py --workdir=runs/tux \
      --config.data.path=runs/quality/corpus/train --config.evals.held_out.path=runs/quality/corpus/val

configs/real_captions.py (letterbox on white, random resized crop, caption-aware flip, colour
jitter, InfoNCE) with towers small enough for a few minutes per run on two CPU cores: ViT 64 px /
patch 8 / width 128 / depth 3 and a causal text tower of 16 tokens (the stamp captions are
"A rainbow lorikeet." short), 1.52M parameters. The towers stay inside what
bench/peer_openclip.py can copy into open_clip (gap image pooling, EOS text pooling, linear
heads). The stamps' 663 training images make an epoch of about 5 steps at batch 128.
"""

from configs import real_captions


def get_config():
  c = real_captions.get_config()
  c.total_steps = 120  # bench/quality.py --steps overrides it.
  c.optimizer.warmup_steps = 15
  c.model.embed_dim = 128
  for tower in (c.model.image, c.model.text):
    tower.width = 128
    tower.depth = 3
    tower.num_heads = 2
    tower.mlp_dim = 512
  c.model.text.max_len = 16
  c.model.text.vocab_size = 2048
  c.tokenizer.vocab_size = 2048

  c.log_every_steps = 10
  c.checkpoint.every_steps = 1000
  # The held-out split is what counts (`held_out/...`); the primary (demo scenes) is kept small.
  c.eval.every_steps = 1000
  c.eval.num_scenes = 100
  return c
