r"""The robustness report of a trained run: JSON + PNG + a table (mmjax.eval.robustness).

  python -m mmjax.cli.robustness --config=configs/demo.py --workdir=runs/demo [--out=DIR]

writes `WORKDIR/robustness/robustness.json` and `robustness.png` for the newest checkpoint.
"""

from __future__ import annotations

import json
import pathlib

from absl import flags
from absl import logging as absl_logging

from mmjax import cli
from mmjax.eval import specs as specs_lib
from mmjax.eval.robustness import RobustnessEvaluator, format_report, plot
from mmjax.parallel import mesh as mesh_lib
from mmjax.train import run_state


def run_report(config, workdir, out_dir=None) -> dict[str, float]:
  """The robustness report of the newest checkpoint of `workdir`: JSON + PNG + a table."""
  entries = [specs_lib.resolved(e) for e in (config.get('evals', None) or {}).values()]
  spec = next((e for e in entries if e['type'] == 'robustness'),
              specs_lib.resolved({'type': 'robustness'}))
  run, state, step = run_state.load_for_inference(config, workdir)
  run.checkpointer.close()
  embedder = run_state.make_embedder(run, state.params)
  with mesh_lib.activate(run.mesh, run.axis_rules):
    results = RobustnessEvaluator(spec, config.model.image.image_size)(embedder)
  out_dir = pathlib.Path(out_dir or run.workdir / 'robustness')
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / 'robustness.json').write_text(json.dumps(
      {'step': step, 'spec': spec, 'results': results}, indent=2, sort_keys=True))
  plot(results, spec, out_dir / 'robustness.png')
  print(f'Robustness of step {step} ({spec["num_scenes"]} validation scenes); '
        f'{out_dir}/robustness.png\n' + format_report(results, spec))
  return results


def main() -> None:
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax restores log every step at INFO.
  run_report(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.out or None)


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'Run directory holding the checkpoints.')
  flags.DEFINE_string('out', '', 'Output directory (default WORKDIR/robustness).')
  cli.define_config()
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(main)
