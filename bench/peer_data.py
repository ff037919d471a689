r"""Dump exactly what an mmjax run trains and evaluates on, for a peer implementation (open_clip).

Run (mmjax's venv):
  python bench/peer_data.py --config=configs/demo.py --workdir=runs/peer/demo --out=runs/peer/demo.npz

A side-by-side run is only a comparison if both systems see bitwise the same data. This writes
one .npz holding, from mmjax's own pipeline and tokenizer:

- `train_image` uint8 [steps, B, S, S, 3], `train_tokens` / `train_mask` int32 [steps, B, L],
  `train_group` int32 [steps, B]: the first `--steps` batches `train_and_evaluate` takes, in
  order (the same `pipeline.make_train_dataset` call, the same seed);
- `val_image`, `val_tokens`, `val_mask`: the validation pairs of `config.eval` (caption i
  belongs to image i), when the run trains on the demo scenes;
- per retrieval evaluator NAME of `config.evals` on ingested data (`dataset='records'`, TFDS):
  `ret/NAME/image` (as mmjax's evaluator resizes them), `ret/NAME/tokens`, `ret/NAME/mask`
  (every caption) and `ret/NAME/owner` (the image of each caption);
- per zero-shot evaluator NAME of `config.evals`: `zs/NAME/image`, `zs/NAME/label`,
  `zs/NAME/tokens`, `zs/NAME/mask` (the prompts, class-major: C classes x T templates) and
  `zs/NAME/classes`;
- `recipe`: a JSON string with every config field the peer must copy (towers, loss, optimizer,
  schedule, batch, steps, seed, image normalisation).

The tokenizer is the workdir's (`loop.get_tokenizer` trains and saves one when there is none), so
an mmjax run into the same workdir afterwards uses the very same token ids. Run the mmjax
training into that workdir *after* dumping, or dump from a workdir that already has its
`tokenizer.json`.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from mmjax import config as config_lib  # noqa: E402
from mmjax.data import augment, pipeline, tokenizer as tokenizer_lib  # noqa: E402
from mmjax.eval import classification as cls_lib, evaluators, retrieval  # noqa: E402
from mmjax.eval import specs as specs_lib  # noqa: E402
from mmjax.train import loop  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Run config.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The run workdir whose tokenizer is used.')
_OUT = flags.DEFINE_string('out', None, 'Output .npz path.')
_STEPS = flags.DEFINE_integer('steps', 0, 'Batches to dump (0: config.total_steps).')


def recipe(config) -> dict:
  """The fields of `config` a peer needs to train the same model the same way."""
  mc = config_lib.model_config(config)
  opt = config.optimizer
  return {
      'seed': config.seed, 'batch_size': config.batch_size, 'total_steps': config.total_steps,
      'model': mc.to_dict(),
      'optimizer': {k: opt[k] for k in ('learning_rate', 'warmup_steps', 'schedule',
                                        'end_lr_ratio', 'weight_decay', 'b1', 'b2', 'eps',
                                        'grad_clip_norm')},
  }


def train_batches(config, encoder: tokenizer_lib.TextEncoder, steps: int) -> dict[str, np.ndarray]:
  """The first `steps` batches of the run's training stream, as `train_and_evaluate` reads it."""
  it = iter(pipeline.make_train_dataset(config, encoder))
  cols = {'image': [], 'tokens': [], 'mask': [], 'group': []}
  for _ in range(steps):
    batch = pipeline.link_duplicates(next(it), 0)
    for k, v in cols.items():
      v.append(np.asarray(batch[k]))
  return {f'train_{k}': np.stack(v) for k, v in cols.items()}


def eval_arrays(config, encoder: tokenizer_lib.TextEncoder) -> dict[str, np.ndarray]:
  """The validation pairs (demo data only), every zero-shot task and every retrieval evaluator
  on ingested data of the run's evaluation suite."""
  size = config.model.image.image_size
  out = {}
  if config.data.name == 'demo':
    val = retrieval.RetrievalEvaluator.demo_validation(config.eval.num_scenes, size,
                                                       config.eval.seed)
    tokens, mask = encoder(val.captions)
    out |= {'val_image': np.asarray(val.images), 'val_tokens': tokens, 'val_mask': mask}
  for name, spec in config.evals.items():
    spec = specs_lib.resolved(spec)
    if spec['type'] == 'retrieval' and spec['dataset'] != 'demo_validation':
      out |= retrieval_arrays(config, encoder, name, spec)
    if spec['type'] != 'zero_shot':
      continue
    images, labels, classes = cls_lib.demo_single_objects(spec['num_images'], size,
                                                          spec['attribute'], spec['seed'])
    templates = tuple(spec['templates']) or cls_lib.DEMO_TEMPLATES[spec['attribute']]
    tokens, mask = encoder([t.format(c) for c in classes for t in templates])
    out |= {f'zs/{name}/image': images, f'zs/{name}/label': labels,
            f'zs/{name}/tokens': tokens, f'zs/{name}/mask': mask,
            f'zs/{name}/classes': np.asarray(classes)}
  return out


def retrieval_arrays(config, encoder: tokenizer_lib.TextEncoder, name: str,
                     spec: dict) -> dict[str, np.ndarray]:
  """`ret/NAME/image`, `/tokens`, `/mask` and `/owner` (the image of each caption) of a retrieval
  evaluator on ingested data: its images exactly as mmjax's evaluator sees them (the run's
  deterministic view) and every caption of each."""
  size = config.model.image.image_size
  ev = evaluators.retrieval_evaluator(spec, size, augment.view(config.data, size))
  if ev.images is None:
    raise ValueError(f'config.evals.{name}: text-text retrieval has no peer counterpart here.')
  tokens, mask = encoder(ev.captions)
  owner = np.arange(len(ev.captions)) if ev.owners is None else np.asarray(ev.owners)
  return {f'ret/{name}/image': np.asarray(ev.images), f'ret/{name}/tokens': tokens,
          f'ret/{name}/mask': mask, f'ret/{name}/owner': owner.astype(np.int32)}


def dump(config, workdir: str | pathlib.Path, out: str | pathlib.Path, steps: int = 0) -> dict:
  """Writes the .npz described in the module docstring; returns the recipe."""
  config_lib.validate(config)
  workdir = pathlib.Path(workdir).absolute()
  encoder = tokenizer_lib.TextEncoder(loop.get_tokenizer(config, workdir),
                                      config.model.text.max_len)
  t0 = time.perf_counter()
  arrays = train_batches(config, encoder, steps or config.total_steps)
  pipeline_s = time.perf_counter() - t0  # mmjax's input pipeline alone, in this process.
  arrays |= eval_arrays(config, encoder)
  rec = recipe(config) | {'pad_id': encoder.pad_id, 'pipeline_s': pipeline_s}
  pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
  np.savez(out, recipe=np.asarray(json.dumps(rec)), **arrays)
  return rec


def main(argv):
  del argv
  rec = dump(_CONFIG.value, _WORKDIR.value, _OUT.value, _STEPS.value)
  print(f'Wrote {_OUT.value}: {rec["total_steps"]} steps of batch {rec["batch_size"]}.')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir', 'out'])
  app.run(main)
