r"""Precomputes a distillation teacher's embeddings into the data (config.distill.source='data').

  python -m mmjax.cli.teacher_embed --config=configs/distill_minilm.py [--config.xxx=...] \
      [--out=DIR]

embeds every example of each source of the run's `config.data` with `config.distill.teacher`
('hf:DIR' or an mmjax export/workdir) and writes `DIR/source_<i>.npz` (DIR defaults to
`config.distill.embeddings`); the file format and its reader are `mmjax.data.teacher_embed`.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from absl import flags

from mmjax import cli
from mmjax.data import augment, pipeline, teacher_embed
from mmjax.train import teacher as teacher_lib


def write(config, out: str | pathlib.Path, *, batch_size: int = 256) -> list[pathlib.Path]:
  """Embeds every source of `config.data` with `config.distill.teacher`; returns the files."""

  teacher = teacher_lib.load(config.distill.teacher, max_len=config.model.text.max_len,
                             batch_size=batch_size)
  _, srcs = pipeline.make_sources(config)
  files = []
  for i, src in enumerate(srcs):
    arrays = teacher_lib.embed_source(teacher, [src[j] for j in range(len(src))],
                                      augment.view(config.data, 0))
    file = teacher_embed.path(out, i)
    file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(file, fingerprint=np.array(teacher_embed.fingerprint(src)), **arrays)
    files.append(file)
    print(f'{file}: {len(src)} examples, teacher {teacher.spec} ({teacher.dim}-d, '
          f'{", ".join(sorted(arrays))})')
  (pathlib.Path(out) / 'teacher.json').write_text(json.dumps(
      {'teacher': config.distill.teacher, 'dim': teacher.dim, 'roles': list(teacher.roles)}))
  return files


def main() -> None:
  config = flags.FLAGS.config
  if not config.distill.teacher:
    raise SystemExit('Config error: config.distill.teacher is empty (set it to hf:DIR or an '
                     'mmjax export).')
  out = flags.FLAGS.out or config.distill.embeddings
  if not out:
    raise SystemExit('Give --out=DIR or set config.distill.embeddings.')
  write(config, out, batch_size=flags.FLAGS.batch_size)


if __name__ == '__main__':
  flags.DEFINE_string('out', '', 'Output directory (default: config.distill.embeddings).')
  flags.DEFINE_integer('batch_size', 256, 'Teacher batch size.')
  cli.define_config('The run config.')
  flags.mark_flags_as_required(['config'])
  cli.run(main)
