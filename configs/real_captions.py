r"""real_captions: a dual encoder on an ingested image-caption corpus, on CPU, with the
preprocessing real images need (letterbox, alpha on white, augmentation).

Run (ingest a train and a held-out split first, docs/data.md):
  python -m mmjax.data.prepare --manifest=train.jsonl --out=data/train --max_image_size=256
  python -m mmjax.data.prepare --manifest=val.jsonl --out=data/val --max_image_size=256
  python -m mmjax.main --config=configs/real_captions.py --workdir=runs/real \
      --config.data.path=data/train --config.evals.held_out.path=data/val

Both paths are required (the error names the one missing). Drawings, icons and stamps are
often far from square (half of the Tux Paint stamps have an aspect above 1.25), so images are
letterboxed on white rather than centre-cropped, in training and in every evaluation. Training
draws a random resized crop relative to each image's own aspect, a caption-aware horizontal
flip ("left" <-> "right") and mild colour jitter (no hue shift: captions name colours), and a
fresh caption of each image every epoch. The towers are sized for a few hundred steps on two
CPU cores (4.5M parameters at 64 px).
"""

from configs import base
from mmjax.eval import specs


def real_image_preprocessing(data) -> None:
  """The preprocessing of real drawings and photos (the module docstring), on `config.data`;
  shared by the recipes that train on ingested image-caption records."""
  data.resize = 'letterbox'
  data.background = (255, 255, 255)
  data.caption_sampling = 'random'
  data.augment = 'custom'
  data.aug.crop = 'random_resized'
  data.aug.crop_scale = (0.6, 1.0)
  data.aug.flip = 0.5
  data.aug.brightness = 0.2
  data.aug.contrast = 0.2
  data.aug.saturation = 0.2
  data.aug.hue = 0.0  # No hue shift: captions name colours.


def get_config():
  c = base.get_config()
  c.batch_size = 128
  c.total_steps = 1000

  c.model.embed_dim = 192
  c.model.image.image_size = 64
  c.model.image.patch_size = 8  # 64 patches.
  c.model.image.width = 192
  c.model.image.depth = 4
  c.model.image.num_heads = 3
  c.model.image.mlp_dim = 768
  c.model.text.max_len = 32
  c.model.text.vocab_size = 4096
  c.model.text.width = 192
  c.model.text.depth = 4
  c.model.text.num_heads = 3
  c.model.text.mlp_dim = 768
  c.tokenizer.vocab_size = 4096  # Trained on the corpus's captions at start-up.

  # InfoNCE: at batch 128 SigLIP's bias of -10 (about -ln of a 32k batch) sits far from
  # -ln(128); the softmax loss has no bias to move.
  c.loss.kind = 'softmax'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100

  c.data.name = 'records'
  c.data.path = ''  # --config.data.path=<the training split's prepare --out>
  real_image_preprocessing(c.data)

  c.log_every_steps = 25
  c.checkpoint.every_steps = 250
  c.eval.every_steps = 250
  # The held-out split, every caption of each image: the primary evaluation (config.eval.primary
  # '' picks the run's one held-out evaluator when it trains on real data).
  c.evals.held_out = specs.spec('retrieval', dataset='records', path='', max_examples=5000)
  return c
