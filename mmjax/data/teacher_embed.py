r"""Teacher embeddings precomputed into the data (config.distill.source = 'data').

  python -m mmjax.cli.teacher_embed --config=configs/distill_minilm.py [--config.xxx=...] \
      [--out=DIR]

(`mmjax.cli.teacher_embed`) embeds every example of each source of the run's `config.data` with
`config.distill.teacher`
('hf:DIR' or an mmjax export/workdir) and writes `DIR/source_<i>.npz` (DIR defaults to
`config.distill.embeddings`): 'text' [N, C, dt] per caption, 'num_captions' [N], and 'image'
[N, dt] (dual-encoder teachers) or 'query' [N, dt] (text-text pairs). The train pipeline wraps
source i in `TeacherEmbeddings`, so each batch carries `teacher_text` (the row of the caption it
sampled), `teacher_image` / `teacher_query` [B, dt] columns. Images are embedded as stored, by
the deterministic `config.data.resize`: with augmentation the student sees a jittered crop.
"""

from __future__ import annotations

import pathlib
from typing import Any

import grain
import numpy as np

FILE = 'source_{}.npz'


def distills(config) -> bool:
  """Whether the run has a distillation term (config.distill.weight or a 'distill' task)."""
  return bool(config.distill.weight or 'distill' in dict(config.multitask.tasks))


def path(directory: str | pathlib.Path, source_index: int) -> pathlib.Path:
  return pathlib.Path(directory) / FILE.format(source_index)


def fingerprint(source) -> str:
  """What the file was computed for (checked on read): the source kind, its length and the
  first caption of its first and last examples."""
  n = len(source)
  ends = [source[i]['captions'][0] for i in sorted({0, n - 1})] if n else []
  return '|'.join([type(source).__name__, str(n), *ends])


class TeacherEmbeddings(grain.sources.RandomAccessDataSource):
  """A source whose elements also carry the teacher's embeddings of their image and captions."""

  def __init__(self, source, file: str | pathlib.Path):
    file = pathlib.Path(file)
    if not file.is_file():
      raise FileNotFoundError(f'{file} not found: write it with `python -m '
                              'mmjax.data.teacher_embed --config=...` (config.distill.source='
                              "'data').")
    with np.load(file) as z:
      self.arrays = {k: z[k] for k in z.files if k != 'fingerprint'}
      stored = str(z['fingerprint']) if 'fingerprint' in z.files else ''
    if stored != fingerprint(source):
      raise ValueError(f'{file} was computed for {stored!r}, not for {fingerprint(source)!r}: '
                       'rerun `python -m mmjax.data.teacher_embed` for this data config.')
    self.source, self.file = source, file

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = dict(self.source[index])
    a, i = self.arrays, int(index)
    ex['teacher_text'] = a['text'][i, :a['num_captions'][i]]
    for name in ('image', 'query'):
      if name in a:
        ex[f'teacher_{name}'] = a[name][i]
    return ex

  def __repr__(self) -> str:
    return f'TeacherEmbeddings({self.source!r}, {self.file})'


if __name__ == '__main__':  # The command moved to the CLI layer; this name still runs it.
  import runpy
  runpy.run_module('mmjax.cli.teacher_embed', run_name='__main__')
