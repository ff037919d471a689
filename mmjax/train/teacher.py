"""The distillation teacher: a frozen encoder from 'hf:DIR' or an mmjax export (or its workdir).

Either way it is an `Embedder` (params, model config, its own tokenizer) plus the roles it can
embed: ('image', 'text') for a dual encoder, ('text',) for a BERT-family text encoder. It serves
both distillation sources (config.distill.source):

- 'data': `python -m mmjax.data.teacher_embed` embeds every example once (`embed_source`) and
  the pipeline reads the rows back as `teacher_image` / `teacher_text` [B, dt] columns;
- 'live': `embed_fn` is a pure function of (teacher params, batch) run on the device each step
  with the teacher's own tokens (`teacher_tokens` / `teacher_mask` columns); no gradient, no
  optimizer state. Both give the same columns, so the objective does not know which it got.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import hf
from mmjax.data import images as images_lib, records, teacher_embed, tokenizer as tokenizer_lib
from mmjax.embedder import Embedder, load_embedder
from mmjax.models.two_tower import TwoTower
from mmjax.models.two_tower import normalize_images
from mmjax.parallel import mesh as mesh_lib


@dataclasses.dataclass
class Teacher:
  spec: str
  embedder: Embedder
  roles: tuple[str, ...]

  @property
  def dim(self) -> int:
    return self.embedder.embed_dim

  @property
  def params(self) -> Any:
    return self.embedder.params

  @property
  def encoder(self) -> tokenizer_lib.TextEncoder:
    return self.embedder.encoder


def load(spec: str, *, max_len: int, batch_size: int = 256, mesh=None) -> Teacher:
  """'hf:DIR' (a Hugging Face checkpoint, its tokenizer too) or an mmjax export/workdir.

  Texts are tokenised to `max_len` (the student's; capped by the teacher's position table)."""
  if spec.startswith('hf:'):
    ckpt = hf.load(spec)
    cfg = ckpt.model_config()
    max_len = min(max_len, cfg.text.positions)
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, max_len=max_len))
    encoder = tokenizer_lib.TextEncoder(ckpt.tokenizer(), max_len)
    roles = ('image', 'text') if ckpt.image is not None else ('text',)
    # A text-only checkpoint has no logit scale/bias; TwoTower declares them (never used here).
    params = {'t_prime': np.zeros((), np.float32), 'bias': np.zeros((), np.float32),
              **ckpt.params}
    return Teacher(spec, Embedder(cfg, params, encoder, mesh=mesh, batch_size=batch_size), roles)
  return Teacher(spec, load_embedder(spec, batch_size=batch_size, mesh=mesh), ('image', 'text'))


def embed_fn(teacher: Teacher, image_size: int):
  """(params, batch) -> {'teacher_image', 'teacher_text'[, 'teacher_query']} [B, dt], float32,
  under stop_gradient: the live teacher. Student images are resized to the teacher's size."""
  model, cfg = TwoTower(teacher.embedder.config), teacher.embedder.config

  def fn(params, batch):
    out = {}
    if 'image' in teacher.roles and 'image' in batch:
      images = batch['image']
      size = cfg.image.image_size
      if image_size != size:  # Normalised first: float images are taken as given.
        images = normalize_images(images, jnp.float32, tuple(cfg.image.pixel_mean),
                                  tuple(cfg.image.pixel_std))
        images = jax.image.resize(images, images.shape[:1] + (size, size, 3), 'bilinear')
      out['teacher_image'] = model.apply({'params': params}, images,
                                         method=TwoTower.embed_images)
    for role, prefix in (('text', 'teacher_'), ('query', 'teacher_query_')):
      if f'{prefix}tokens' in batch:
        out[f'teacher_{role}'] = model.apply({'params': params}, batch[f'{prefix}tokens'],
                                             batch[f'{prefix}mask'], method=TwoTower.embed_texts)
    return jax.tree.map(lambda x: jax.lax.stop_gradient(x.astype(jnp.float32)), out)

  return fn


def embed_source(teacher: Teacher, elements: Sequence[dict[str, Any]],
                 view: images_lib.View | None = None) -> dict[str, np.ndarray]:
  """The 'data' teacher: every example of a source embedded once.

  'image' [N, dt] (the stored image by the run's deterministic `view` at the teacher's size:
  the un-augmented view), 'text' [N, C, dt] for each of an example's C captions (zero rows past
  its own count; the pipeline picks the row of the caption it sampled), 'num_captions' [N], and
  'query' [N, dt] for text-text pairs."""
  emb, n = teacher.embedder, len(elements)
  counts = np.array([len(e['captions']) for e in elements], np.int32)
  flat = [records.normalise_caption(c) for e in elements for c in e['captions']]
  ztxt = emb.embed_texts(flat)
  text = np.zeros((n, int(counts.max(initial=1)), teacher.dim), np.float32)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  for i, (s, c) in enumerate(zip(starts, counts)):
    text[i, :c] = ztxt[s:s + c]
  out = {'text': text, 'num_captions': counts}
  if elements and elements[0]['query'] is not None:
    out['query'] = emb.embed_texts([records.normalise_caption(e['query']) for e in elements])
  elif 'image' in teacher.roles:
    view = dataclasses.replace(view or images_lib.View(0), size=emb.config.image.image_size)
    out['image'] = np.concatenate([emb.embed_images(np.stack([
        images_lib.load(e['image'], view) for e in elements[s:s + 512]]))
        for s in range(0, n, 512)])
  return out


@dataclasses.dataclass
class RunTeacher:
  """A distilling run's teacher side.

  `host_columns`: what the input pipeline adds to each batch (the precomputed teacher columns,
  or the live teacher's tokens); `step_spec`: the teacher columns the step reads, {name: (global
  shape, dtype)}; for 'live', `encoder` (the teacher's tokenizer, for the pipeline) and the
  jitted teacher that turns the tokens into the columns on the device (`__call__`), its params
  a separate argument: not in the train state, no gradient, no optimizer state.
  """

  host_columns: tuple[str, ...]
  step_spec: dict[str, tuple[tuple[int, ...], Any]]
  encoder: tokenizer_lib.TextEncoder | None = None
  apply: Any = None
  params: Any = None

  def __call__(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    if self.apply is None:
      return batch
    out = {k: v for k, v in batch.items() if k not in self.host_columns}
    return {**out, **self.apply(self.params, batch)}


def _step_columns(roles, text_pairs: bool) -> tuple[str, ...]:
  cols = ['teacher_text']
  if text_pairs:
    cols.append('teacher_query')
  elif 'image' in roles:
    cols.append('teacher_image')
  return tuple(cols)


def for_run(config, mesh, *, text_pairs: bool) -> RunTeacher | None:
  """The run's teacher side (None when it does not distil)."""
  if not teacher_embed.distills(config):
    return None
  b = config.batch_size
  if config.distill.source == 'data':
    info_file = pathlib.Path(config.distill.embeddings) / 'teacher.json'
    if not info_file.is_file():
      raise FileNotFoundError(f'{info_file} not found: write the teacher embeddings with `python '
                              '-m mmjax.data.teacher_embed --config=...` first.')
    info = json.loads(info_file.read_text())
    cols = _step_columns(info['roles'], text_pairs)
    return RunTeacher(cols, {c: ((b, info['dim']), np.float32) for c in cols})
  teacher = load(config.distill.teacher, max_len=config.model.text.max_len, mesh=mesh)
  cols = _step_columns(teacher.roles, text_pairs)
  host = ('teacher_tokens', 'teacher_mask') + (
      ('teacher_query_tokens', 'teacher_query_mask') if text_pairs else ())
  batch_sh, repl = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
  apply = jax.jit(embed_fn(teacher, config.model.image.image_size),
                  in_shardings=(repl, batch_sh), out_shardings=batch_sh)
  return RunTeacher(host, {c: ((b, teacher.dim), np.float32) for c in cols}, teacher.encoder,
                    apply, jax.device_put(teacher.params, repl))
