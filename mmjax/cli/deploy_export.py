r"""The serving export (mmjax.deploy.export): StableHLO towers + params + tokenizer + spec.

  python -m mmjax.deploy.export --model=runs/demo/export --out=runs/demo/serving \
      [--name=demo] [--platforms=cpu,cuda,tpu] [--resize=crop]
"""

from __future__ import annotations

import json
import sys

from absl import flags

from mmjax import cli
from mmjax.deploy import export

flags.DEFINE_string('model', None, 'A params export (`--mode=export`: WORKDIR/export) or its '
                    'workdir.')
flags.DEFINE_string('out', None, 'Directory of the serving export.')
flags.DEFINE_string('name', '', 'Human name of the model version (default: the workdir name).')
flags.DEFINE_list('platforms', ['cpu'], f'Platforms to serialize for, of {export.PLATFORMS}.')
flags.DEFINE_enum('resize', 'crop', ['crop', 'letterbox'],
                  'How stored images become the square model input (recorded in the spec).')
flags.mark_flags_as_required(['model', 'out'])
FLAGS = flags.FLAGS


def main() -> None:
  try:
    out = export.export_serving(FLAGS.model, FLAGS.out, name=FLAGS.name,
                                platforms=FLAGS.platforms, resize=FLAGS.resize)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'Refused: {e}')
  info = json.loads((out / 'serving.json').read_text())
  print(f'Serving export of model version {info["version"]["id"]} in {out} '
        f'(platforms {", ".join(info["platforms"])}).')


if __name__ == '__main__':
  cli.run(main)
