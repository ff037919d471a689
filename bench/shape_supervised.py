r"""Can the demo's image tower learn shape at all? A supervised upper bound (issue 13).

Trains the config's ViT (plus a linear head) with softmax cross-entropy to classify the shape of
one-object demo scenes (the zero-shot evaluator's images: `demo_single_objects`), then reports
held-out accuracy. If this reaches high accuracy in a few hundred steps while the contrastive run
stays at chance on the same images, the contrastive signal is at fault, not the tower.

`--model=plain_vit` trains an independent ViT of the same size written here with stock flax
layers (patch conv, learned positions, pre-LN blocks, GAP), `--model=cnn` a 3-layer CNN: the
independent references that tell a defect of mmjax's ViT from what a ViT of this size can learn.

Run:
  python bench/shape_supervised.py --config=configs/demo.py [--steps=300] [--batch=128] \
      [--lr=3e-3] [--model=mmjax|plain_vit|cnn] [--override model.image.stem_channels='(32, 32)']
"""

from __future__ import annotations

import argparse
import ast
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax import config as config_lib
from mmjax.eval import classification as cls_lib
from mmjax.models import ViT


class CNN(nn.Module):
  """Three 3x3 conv + GELU + 2x2 max-pool stages, global average pool, linear head."""
  num_classes: int

  @nn.compact
  def __call__(self, x):
    for ch in (32, 64, 96):
      x = nn.max_pool(nn.gelu(nn.Conv(ch, (3, 3))(x)), (2, 2), (2, 2))
    return nn.Dense(self.num_classes)(x.mean((1, 2)))


class PlainViT(nn.Module):
  """A ViT from stock flax layers with the config's width/depth/heads/mlp/patch (GAP pooling)."""
  cfg: object
  num_classes: int

  @nn.compact
  def __call__(self, x):
    c, p = self.cfg, self.cfg.patch_size
    x = nn.Conv(c.width, (p, p), (p, p), padding='VALID')(x)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d) + self.param('pos', nn.initializers.normal(0.02), (1, h * w, d))
    for _ in range(c.depth):
      y = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(c.num_heads)(y, y)
      y = nn.LayerNorm()(x)
      x = x + nn.Dense(d)(nn.gelu(nn.Dense(c.mlp_dim)(y)))
    return nn.Dense(self.num_classes)(nn.LayerNorm()(x).mean(1))


class Classifier(nn.Module):
  vit: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes)(self.vit(x))


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument('--config', default='configs/demo.py')
  ap.add_argument('--steps', type=int, default=300)
  ap.add_argument('--batch', type=int, default=128)
  ap.add_argument('--lr', type=float, default=3e-3)
  ap.add_argument('--num_train', type=int, default=8192)
  ap.add_argument('--num_test', type=int, default=800)
  ap.add_argument('--model', choices=('mmjax', 'plain_vit', 'cnn'), default='mmjax')
  ap.add_argument('--override', action='append', default=[],
                  help="model.image.KEY=PYTHON_LITERAL, e.g. model.image.stem_channels='(32, 32)'")
  args = ap.parse_args()
  c = config_lib.load_config_file(args.config)
  for o in args.override:
    key, value = o.split('=', 1)
    node = c
    *path, last = key.split('.')
    for p in path:
      node = node[p]
    node[last] = ast.literal_eval(value)
  cfg = config_lib.model_config(c).image
  s = cfg.image_size
  xtr, ytr, names = cls_lib.demo_single_objects(args.num_train, s, 'shape', seed=1)
  xte, yte, _ = cls_lib.demo_single_objects(args.num_test, s, 'shape', seed=2)
  prep = lambda x: jnp.asarray(x, jnp.float32) / 127.5 - 1.0
  model = {'mmjax': lambda: Classifier(ViT(cfg), len(names)),
           'plain_vit': lambda: PlainViT(cfg, len(names)),
           'cnn': lambda: CNN(len(names))}[args.model]()
  params = nn.unbox(model.init(jax.random.key(0), prep(xtr[:2]))['params'])
  sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 10), args.steps)
  tx = optax.adamw(sched, weight_decay=1e-4)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, y):
    def loss_fn(p):
      logits = model.apply({'params': p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, g = jax.value_and_grad(loss_fn)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss

  predict = jax.jit(lambda p, x: jnp.argmax(model.apply({'params': p}, x), -1))
  rng = np.random.default_rng(0)
  t0, curve = time.time(), []
  for i in range(1, args.steps + 1):
    idx = rng.integers(0, len(xtr), args.batch)
    params, opt, loss = step(params, opt, prep(xtr[idx]), jnp.asarray(ytr[idx]))
    if i % max(1, args.steps // 6) == 0 or i == args.steps:
      acc = float(np.mean(np.asarray(predict(params, prep(xte))) == yte))
      curve.append({'step': i, 'loss': round(float(loss), 4), 'test_acc': round(acc, 4)})
      print(json.dumps(curve[-1]), flush=True)
  print(json.dumps({'config': args.config, 'model': args.model, 'overrides': args.override, 'steps': args.steps,
                    'batch': args.batch, 'lr': args.lr, 'final_test_acc': curve[-1]['test_acc'],
                    'chance': 1 / len(names), 'wall_s': round(time.time() - t0, 1)}))


if __name__ == '__main__':
  main()
