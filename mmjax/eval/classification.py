"""Classification with frozen embeddings: zero-shot (class names x prompt templates) and a
few-shot linear probe (closed-form ridge regression).

Zero-shot follows CLIP: each class is embedded through every template ("a picture of a {}."),
the L2-normalised prompt embeddings are averaged and the mean re-normalised; an image's class is
the one whose embedding scores highest. Ranks are pessimistic on ties (as in
`mmjax.eval.metrics`), so a collapsed model gets no better than chance.

The demo task (`demo_single_objects`) renders one-object demo scenes and asks for the object's
shape (8 classes) or colour (10 classes), attributes the captions name.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from mmjax.data import demo
from mmjax.eval import metrics as metrics_lib

# Prompt ensembles per demo attribute; '{}' is the class name.
DEMO_TEMPLATES = {
    'shape': ('a picture of a {}.', 'a scene with a {}.', 'an image showing a {}.',
              'a large {} in the center.', 'a small {}.'),
    'colour': ('a picture of a {} shape.', 'a scene with a {} object.', 'something {}.',
               'an image showing a large {} shape.', 'a small {} shape.'),
}
DEMO_CLASSES = {'shape': demo.SHAPES, 'colour': tuple(demo.COLOURS)}


def _normalise(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_embeddings(embed_texts: Callable[[list[str]], np.ndarray], class_names: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
  """[C, D]: per class, the re-normalised mean of its normalised prompt embeddings."""
  if not templates or any('{}' not in t for t in templates):
    raise ValueError(f'templates must be non-empty and each hold "{{}}", got {templates!r}.')
  prompts = [t.format(c) for c in class_names for t in templates]
  z = _normalise(np.asarray(embed_texts(prompts), np.float64))
  return _normalise(z.reshape(len(class_names), len(templates), -1).mean(axis=1))


def accuracy_metrics(scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                     ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """top-k accuracy, mean per-class accuracy and 'per_class/<name>' top-1 accuracy."""
  labels = np.asarray(labels)
  ranks = metrics_lib.ranks_of_true(scores, labels)
  out = {f'top{k}': float(np.mean(ranks <= k)) for k in ks if k <= len(class_names)}
  per_class = {}
  for c, name in enumerate(class_names):
    if (labels == c).any():
      per_class[name] = float(np.mean(ranks[labels == c] == 1))
  out['mean_per_class'] = float(np.mean(list(per_class.values())))
  out.update({f'per_class/{name}': v for name, v in per_class.items()})
  return out


def zero_shot_metrics(image_emb: np.ndarray, labels: np.ndarray, class_emb: np.ndarray,
                      class_names: Sequence[str], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  return accuracy_metrics(np.asarray(image_emb) @ class_emb.T, labels, class_names, ks)


def ridge_fit(x: np.ndarray, labels: np.ndarray, num_classes: int,
              l2: float = 1e-2) -> np.ndarray:
  """Closed-form ridge regression onto one-hot targets (+1/-1 coded, with a bias row):
  W = (X^T X + l2 N I)^-1 X^T Y, the bias not penalised. Returns [D + 1, C]."""
  x = np.concatenate([np.asarray(x, np.float64), np.ones((len(x), 1))], axis=1)
  y = 2.0 * np.eye(num_classes)[np.asarray(labels)] - 1.0
  reg = l2 * len(x) * np.eye(x.shape[1])
  reg[-1, -1] = 0.0
  return np.linalg.solve(x.T @ x + reg, x.T @ y)


def ridge_scores(w: np.ndarray, x: np.ndarray) -> np.ndarray:
  return np.asarray(x, np.float64) @ w[:-1] + w[-1]


def few_shot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
  """`shots` examples of every class (all of a class that has fewer), drawn with `seed`."""
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels)
  picks = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]
  return np.sort(np.concatenate(picks))


def demo_single_objects(num: int, image_size: int, attribute: str,
                        seed: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
  """(images uint8 [num, H, W, 3], labels [num], class names): one random object per scene,
  labelled by its `attribute` ('shape' | 'colour'). Classes cycle, so they are balanced."""
  return demo_single_object_scenes(num, image_size, attribute, seed)[:3]


def demo_single_object_scenes(num: int, image_size: int, attribute: str, seed: int
                              ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], list]:
  """`demo_single_objects` plus the rendered scenes (`demo.Scene`, for their captions)."""
  if attribute not in DEMO_CLASSES:
    raise ValueError(f'attribute={attribute!r} is not one of {tuple(DEMO_CLASSES)}.')
  classes = DEMO_CLASSES[attribute]
  rng = np.random.default_rng([0x7A5, seed])
  images, labels, scenes = [], [], []
  for i in range(num):
    label = i % len(classes)
    u = rng.integers(0, 1 << 30, 5)
    obj = demo.SceneObject(shape=demo.SHAPES[u[0] % len(demo.SHAPES)],
                           colour=tuple(demo.COLOURS)[u[1] % len(demo.COLOURS)],
                           size=demo.SIZES[u[2] % len(demo.SIZES)],
                           position=demo.POSITIONS[u[3] % len(demo.POSITIONS)])
    obj = demo.SceneObject(**{**obj.__dict__, attribute: classes[label]})
    bg = tuple(demo.BACKGROUNDS)[u[4] % len(demo.BACKGROUNDS)]
    scenes.append(demo.Scene(bg, (obj,)))
    images.append(demo.render(scenes[-1], image_size, rng))
    labels.append(label)
  return np.stack(images), np.asarray(labels), tuple(classes), scenes
