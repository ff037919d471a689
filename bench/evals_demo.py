r"""The clustering and grounding evaluators (issue 16) on a trained demo model, in several settings.

Loads the newest checkpoint of a workdir trained with configs/demo.py and runs clustering
(image and text modality, shape and colour) and grounding (zoomed cells and isolated objects,
with 0 and 8 distractor crops); prints one JSON object per setting and writes them all.

Run:
  python -m mmjax.main --config=configs/demo.py --workdir=runs/demo          # train first
  python bench/evals_demo.py --config=configs/demo.py --workdir=runs/demo [--out=evals.json]
"""

from __future__ import annotations

import argparse
import json
import time

from mmjax import config as config_lib
from mmjax.eval import evaluators, specs
from mmjax.train import loop

SETTINGS = {
    'cluster_shape_image': specs.spec('clustering', attribute='shape'),
    'cluster_colour_image': specs.spec('clustering', attribute='colour'),
    'cluster_shape_text': specs.spec('clustering', attribute='shape', modality='text'),
    'cluster_colour_text': specs.spec('clustering', attribute='colour', modality='text'),
    'grounding_zoom': specs.spec('grounding'),
    'grounding_zoom_8_distractors': specs.spec('grounding', num_distractors=8),
    'grounding_isolate': specs.spec('grounding', crop='isolate'),
    'grounding_isolate_8_distractors': specs.spec('grounding', crop='isolate', num_distractors=8),
}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument('--config', required=True)
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--out', default='')
  args = ap.parse_args()
  config = config_lib.load_config_file(args.config)
  run, state, step = loop.load_for_inference(config, args.workdir)
  embedder = loop.make_embedder(run, state.params)
  size = config.model.image.image_size
  results = {'step': step}
  for name, spec in SETTINGS.items():
    t = time.time()
    out = loop.evaluate(run, state.params,
                        evaluators.Suite([evaluators.Named(name, 1, specs.resolved(spec), size)]),
                        embedder)
    results[name] = {k.split('/', 1)[1]: round(v, 4) for k, v in out.items()}
    results[name]['seconds'] = round(time.time() - t, 1)
    print(json.dumps({name: results[name]}), flush=True)
  run.checkpointer.close()
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
