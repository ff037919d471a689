r"""Mean pairwise cosine of a freshly initialised dual encoder's embeddings (issue 13).

A contrastive run starts from here: when every caption (or image) embeds to nearly the same
vector, the in-batch logits are alike and the loss sits at its collapse value (ln B for InfoNCE)
until the towers separate them. Compares mmjax's init over seeds on the demo's validation pairs.

Run:
  python bench/init_similarity.py --config=configs/demo.py --tokenizer=runs/demo/tokenizer.json \
      --seeds=0,1,2 [--num=256]
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from mmjax import config as config_lib
from mmjax.data import demo, tokenizer as tokenizer_lib
from mmjax.models import TwoTower


def mean_offdiag_cosine(z: np.ndarray) -> float:
  z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  s = z @ z.T
  n = len(z)
  return float((s.sum() - np.trace(s)) / (n * (n - 1)))


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument('--config', required=True)
  ap.add_argument('--tokenizer', required=True)
  ap.add_argument('--seeds', default='0,1,2')
  ap.add_argument('--num', type=int, default=256)
  args = ap.parse_args()
  config = config_lib.load_config_file(args.config)
  cfg = config_lib.model_config(config)
  encoder = tokenizer_lib.TextEncoder(tokenizer_lib.load(args.tokenizer), cfg.text.max_len)
  data = demo.make_eval_set(args.num, cfg.image.image_size, seed=1234)
  tokens, mask = encoder(data['captions'])
  model = TwoTower(cfg)
  out = {}
  for seed in map(int, args.seeds.split(',')):
    variables = model.init(jax.random.key(seed), data['images'][:1], tokens[:1], mask[:1])
    zi = np.asarray(model.apply(variables, data['images'], method=model.embed_images))
    zt = np.asarray(model.apply(variables, tokens, mask, method=model.embed_texts))
    out[seed] = {'text': mean_offdiag_cosine(zt), 'image': mean_offdiag_cosine(zi)}
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  main()
