"""The demo recipe (configs/demo.py) leaves the contrastive collapse plateau early, on two seeds.

The loss of a collapsed model, one that scores every pair alike, is ln B for InfoNCE (ln B + 1 for
the sigmoid loss at its in-batch optimum bias): `mmjax.train.health.collapse_loss`. The sigmoid
recipe sat on that plateau for most of its 400 steps, and InfoNCE with the old initialisation
(text positions at std 1/sqrt(width), a Xavier patch kernel) still sat on it at step 60 on seed 2
(README: "What `make demo` does"). This runs the demo's own batches, model, optimizer and schedule
(the real step, compiled once) for its first steps and checks the loss is far below the plateau
by a fixed step, on seed 0 and on seed 2, the one that lagged.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs import demo
from mmjax.data import pipeline
from mmjax.parallel import mesh as mesh_lib
from mmjax.train import health, loop

# Warm-up is 40 steps. Measured (one device, the logged step-100 batch, contrastive term): the
# stem + shape-negative + text-text recipe, seed 0: 1.31 (ln 65 = 4.17); the previous recipe
# (batch 128, no stem): seeds 0, 1, 2 at 1.40, 1.38, 1.73; with the old init 3.17, 3.56, 4.48
# (commit 7378eb8), seed 2 at 4.85 on step 60.
STEPS = 100
WINDOW = 10  # The loss is judged on the mean of the last WINDOW steps (one batch is noisy).
MARGIN = 2.0  # "Far below": at least this much under ln B (4.85 - 2.0 = 2.85 at B = 128).


def first_losses(config, workdir, steps: int):
  """Losses of the first `steps` train steps of `config`."""
  run = loop.setup(config, workdir)
  columns = pipeline.train_columns(config)
  data = iter(pipeline.make_train_dataset(config, run.encoder))
  state, rng, _ = loop.init_or_restore(run, data)
  compiled = loop.compile_step(run, state, rng, columns)
  losses = []
  for _ in range(steps):
    local = pipeline.link_duplicates(next(data), 0)
    state, metrics = compiled(state, mesh_lib.global_batch({k: local[k] for k in columns},
                                                           run.mesh), rng)
    # Multi-task runs: the contrastive term is the one with a collapse value.
    losses.append(metrics.get('loss/contrastive', metrics['loss']))
  run.checkpointer.close()
  return np.asarray(jax.device_get(losses))


# ~75-130 s on 2 quiet cores (two seeds x 100 steps at batch 128 over the 8 simulated test
# devices): over the default suite's budget, so it runs in `make test-slow`.
@pytest.mark.slow
def test_demo_recipe_leaves_the_plateau_on_two_seeds(tmp_path):
  config = demo.get_config()
  # Each row's hard negatives are candidates too: ln(B + K) for InfoNCE.
  plateau = health.collapse_loss(config.loss.kind,
                                 config.batch_size + config.data.num_hard_negatives)
  for seed in (0, 2):
    config = demo.get_config()
    config.seed = seed
    losses = first_losses(config, tmp_path / f'seed{seed}', STEPS)
    assert np.all(np.isfinite(losses))
    late = float(np.mean(losses[-WINDOW:]))
    assert late < plateau - MARGIN, (
        f'seed {seed}: mean loss of steps {STEPS - WINDOW + 1}-{STEPS} is {late:.3f}, not below '
        f'the collapse value ln B = {plateau:.3f} - {MARGIN} (losses: {np.round(losses, 2)})')
