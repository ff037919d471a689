"""Edits of demo scenes, the material of the LLM embedder's composed-retrieval demo task: a
one-step edit of a scene with its instruction text (`modify`), the composed evaluation set of
validation scenes, and one-attribute mutations (the tasks' hard negatives). Pure functions of
scenes and a numpy Generator; `mmjax.data.llm_tasks` turns them into model inputs."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from mmjax.data import demo

SALT = 0x6C6C6D74  # "llmt": keeps these streams apart from the demo source's (shared with
                   # mmjax.data.llm_tasks, whose task streams use it too).


def _ref(scene: demo.Scene, obj: demo.SceneObject) -> str:
  """'red circle', or with its position when another object has the same colour and shape."""
  same = sum(o.colour == obj.colour and o.shape == obj.shape for o in scene.objects)
  base = f'{obj.colour} {obj.shape}'
  return base if same == 1 else f'{base} {demo.POSITION_PHRASES[obj.position][0]}'


def modify(scene: demo.Scene, rng: np.random.Generator) -> tuple[demo.Scene, str]:
  """A random one-step edit of `scene` and its instruction text (change an attribute of one
  object, add an object, or remove one)."""
  ops = ['colour', 'shape', 'size', 'position'] + ['add'] * (len(scene.objects) < 4) + (
      ['remove'] * (len(scene.objects) > 1))
  op = ops[int(rng.integers(len(ops)))]
  objs = scene.objects
  free = [p for p in demo.POSITIONS if p not in {o.position for o in objs}]
  if op == 'add':
    new = demo.SceneObject(shape=demo.SHAPES[int(rng.integers(len(demo.SHAPES)))],
                           colour=tuple(demo.COLOURS)[int(rng.integers(len(demo.COLOURS)))],
                           size=demo.SIZES[int(rng.integers(2))],
                           position=free[int(rng.integers(len(free)))])
    size = demo.SIZE_WORDS[new.size][0]
    text = (f'add {"an" if size[0] in "aeiou" else "a"} {size} {new.colour} {new.shape} '
            f'{demo.POSITION_PHRASES[new.position][0]}')
    return demo.Scene(scene.background, objs + (new,)), text
  i = int(rng.integers(len(objs)))
  obj, ref = objs[i], _ref(scene, objs[i])
  if op == 'remove':
    return demo.Scene(scene.background, objs[:i] + objs[i + 1:]), f'remove the {ref}'
  if op == 'colour':
    value = [c for c in demo.COLOURS if c != obj.colour][int(rng.integers(len(demo.COLOURS) - 1))]
    text = f'make the {ref} {value}'
  elif op == 'shape':
    value = [s for s in demo.SHAPES if s != obj.shape][int(rng.integers(len(demo.SHAPES) - 1))]
    text = f'turn the {ref} into a {value}'
  elif op == 'size':
    value = 'small' if obj.size == 'large' else 'large'
    text = f'make the {ref} {"smaller" if value == "small" else "bigger"}'
  else:  # At most 4 of the 9 cells are taken, so there is always a free one.
    value = free[int(rng.integers(len(free)))]
    text = f'move the {ref} to the {value}'
  new = dataclasses.replace(obj, **{op: value})
  return demo.Scene(scene.background, objs[:i] + (new,) + objs[i + 1:]), text


def scene_from_key(key: str) -> demo.Scene:
  """The inverse of `demo.Scene.key()`."""
  background, objs = key.split('|')
  return demo.Scene(background, tuple(
      demo.SceneObject(position=p, size=z, colour=c, shape=h)
      for p, z, c, h in (o.split(',') for o in objs.split(';'))))


def composed_eval_set(scene_keys: Sequence[str], image_size: int, seed: int,
                      num: int) -> dict[str, Any]:
  """Composed retrieval queries on validation scenes: the first `num` scenes of `scene_keys`
  that have a validation-split edit whose result is no other scene of the set and no other
  target. Returns 'sources' (indices into scene_keys), 'texts' (edit instructions with the image
  placeholder left to the caller) and 'targets' uint8 [n, S, S, 3]. Deterministic."""
  rng = np.random.default_rng([SALT, seed, 5])
  taken = set(scene_keys)
  sources, texts, targets = [], [], []
  for i, key in enumerate(scene_keys):
    if len(sources) == num:
      break
    pair = composed_pair(scene_from_key(key), 'validation', rng)
    if pair is None or pair[0].key() in taken:
      continue
    taken.add(pair[0].key())
    sources.append(i)
    texts.append(pair[1])
    targets.append(demo.render(pair[0], image_size, rng))
  return {'sources': np.asarray(sources, np.int64), 'texts': texts,
          'targets': np.stack(targets) if targets else np.zeros((0, image_size, image_size, 3),
                                                                 np.uint8)}


def mutations(scene: demo.Scene, split: str, rng: np.random.Generator, k: int) -> list[demo.Scene]:
  """Up to `k` distinct scenes of `split` that differ from `scene` in one attribute of one object
  (the hard negatives of the demo tasks)."""
  pool = [m for a in ('colour', 'shape', 'size', 'position')
          for m in demo._mutations(scene, a) if m.split() == split]  # pylint: disable=protected-access
  return [pool[j] for j in rng.permutation(len(pool))[:k]]


def composed_pair(scene: demo.Scene, split: str, rng: np.random.Generator):
  """(target, modification text) with the target in `split` (train and validation never share a
  scene, targets included)."""
  for _ in range(50):
    target, text = modify(scene, rng)
    if text and target.split() == split and target != scene:
      return target, text
  return None
