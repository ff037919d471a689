r"""Robustness suite: retrieval under image corruptions and caption perturbations at severities
1-5, relative to clean, and a compositionality check on the demo scenes.

  python -m mmjax.cli.robustness --config=configs/demo.py --workdir=runs/demo

writes `WORKDIR/robustness/robustness.json` and `robustness.png` (metric vs severity, one line
per corruption; matplotlib from the `plot` extra) for the newest checkpoint.

- Image corruptions (queries of i2t are corrupted images): gaussian_noise, blur, jpeg,
  brightness, contrast, rotation, crop. Keys `<corruption>/s<severity>/i2t/<metric>`.
- Caption perturbations (queries of t2i are perturbed captions): typos, word_drop, shuffle,
  attribute_swap (attribute words of the same kind exchanged between objects: hard negatives
  that keep every word of the caption). Keys `<perturbation>/s<severity>/t2i/<metric>`.
- `.../<metric>_rel` is the value divided by the clean one; `<name>/mean_rel` averages the
  first metric's relative value over the severities.
- Compositionality: for demo scenes with two or more objects, how often the image scores its
  true canonical caption above the same caption with one attribute (colour, shape, size)
  swapped between two objects. Keys `compositionality/<attribute>` (chance: 0.5).

Every corruption is deterministic given (seed, corruption, severity, image index).
"""

from __future__ import annotations

import functools
import io
import pathlib
import re
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from mmjax.data import demo
from mmjax.eval import metrics as metrics_lib
from mmjax.eval import specs as specs_lib

# Severity 1..5 parameters (images are uint8 RGB; sizes relative to the image side).
NOISE_STD = (4.0, 8.0, 16.0, 28.0, 48.0)  # Gaussian noise std in pixel values.
BLUR_RADIUS = (0.02, 0.04, 0.06, 0.09, 0.12)  # Gaussian blur radius / image side.
JPEG_QUALITY = (75, 45, 25, 12, 5)
BRIGHTNESS = (1.2, 1.4, 1.7, 2.0, 2.5)  # PIL brightness factor.
CONTRAST = (0.75, 0.55, 0.4, 0.25, 0.12)  # PIL contrast factor.
ROTATION_DEG = (5.0, 10.0, 20.0, 30.0, 45.0)
CROP_KEEP = (0.9, 0.8, 0.7, 0.6, 0.5)  # Side of the central crop (resized back) / image side.
TYPO_P = (0.05, 0.1, 0.2, 0.3, 0.45)  # Per-word probability of one character edit.
DROP_P = (0.05, 0.1, 0.2, 0.3, 0.45)  # Per-word drop probability.
SHUFFLE_SWAPS = (1, 2, 4, 6, 10)  # Random word transpositions.
ATTRIBUTE_SWAPS = (1, 2, 3, 4, 5)  # Attribute-word exchanges between objects.

_ATTRIBUTE_WORDS = {'colour': tuple(demo.COLOURS), 'shape': demo.SHAPES,
                    'size': tuple(w for ws in demo.SIZE_WORDS.values() for w in ws)}


def corrupt_image(image: np.ndarray, corruption: str, severity: int,
                  rng: np.random.Generator) -> np.ndarray:
  """One uint8 [H, W, 3] image under `corruption` at `severity` (1..5)."""
  i = severity - 1
  side = image.shape[0]
  if corruption == 'gaussian_noise':
    noisy = image.astype(np.float32) + rng.normal(0, NOISE_STD[i], image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
  pil = Image.fromarray(image)
  if corruption == 'blur':
    pil = pil.filter(ImageFilter.GaussianBlur(BLUR_RADIUS[i] * side))
  elif corruption == 'jpeg':
    buf = io.BytesIO()
    pil.save(buf, format='JPEG', quality=JPEG_QUALITY[i])
    pil = Image.open(io.BytesIO(buf.getvalue())).convert('RGB')
  elif corruption == 'brightness':
    pil = ImageEnhance.Brightness(pil).enhance(BRIGHTNESS[i])
  elif corruption == 'contrast':
    pil = ImageEnhance.Contrast(pil).enhance(CONTRAST[i])
  elif corruption == 'rotation':
    angle = ROTATION_DEG[i] * rng.choice((-1.0, 1.0))
    fill = tuple(int(v) for v in np.median(image.reshape(-1, 3), axis=0))
    pil = pil.rotate(angle, resample=Image.BILINEAR, fillcolor=fill)
  elif corruption == 'crop':
    keep = max(2, round(CROP_KEEP[i] * side))
    off = (side - keep) // 2
    pil = pil.crop((off, off, off + keep, off + keep)).resize((side, side), Image.BILINEAR)
  else:
    raise ValueError(f'Unknown corruption {corruption!r}; known: {specs_lib.CORRUPTIONS}.')
  return np.asarray(pil, np.uint8)


def _typo(word: str, rng: np.random.Generator) -> str:
  if len(word) < 2:
    return word
  j = int(rng.integers(0, len(word) - 1))
  kind = rng.integers(0, 3)
  if kind == 0:  # Swap two neighbours.
    return word[:j] + word[j + 1] + word[j] + word[j + 2:]
  if kind == 1:  # Delete one.
    return word[:j] + word[j + 1:]
  return word[:j] + chr(ord('a') + int(rng.integers(0, 26))) + word[j + 1:]  # Replace one.


def perturb_caption(caption: str, perturbation: str, severity: int,
                    rng: np.random.Generator) -> str:
  """One caption under `perturbation` at `severity` (1..5)."""
  i = severity - 1
  words = caption.split()
  if perturbation == 'typos':
    words = [_typo(w, rng) if rng.random() < TYPO_P[i] else w for w in words]
  elif perturbation == 'word_drop':
    kept = [w for w in words if rng.random() >= DROP_P[i]]
    words = kept or words[:1]
  elif perturbation == 'shuffle':
    for _ in range(SHUFFLE_SWAPS[i]):
      a, b = rng.integers(0, len(words), 2)
      words[a], words[b] = words[b], words[a]
  elif perturbation == 'attribute_swap':
    return swap_attributes(caption, ATTRIBUTE_SWAPS[i], rng)
  else:
    raise ValueError(f'Unknown perturbation {perturbation!r}; known: '
                     f'{specs_lib.TEXT_PERTURBATIONS}.')
  return ' '.join(words)


def swap_attributes(caption: str, swaps: int, rng: np.random.Generator) -> str:
  """Exchanges `swaps` pairs of different attribute words of the same kind (e.g. two colours),
  so the caption keeps its words but binds them to the wrong objects."""
  tokens = re.split(r'(\W+)', caption)
  for _ in range(swaps):
    pairs = []
    for words in _ATTRIBUTE_WORDS.values():
      where = [j for j, t in enumerate(tokens) if t in words]
      pairs += [(a, b) for a in where for b in where if a < b and tokens[a] != tokens[b]]
    if not pairs:
      break
    a, b = pairs[int(rng.integers(0, len(pairs)))]
    tokens[a], tokens[b] = tokens[b], tokens[a]
  return ''.join(tokens)


def parse_scene_key(key: str) -> demo.Scene:
  """The inverse of `demo.Scene.key()`."""
  background, objs = key.split('|')
  objects = []
  for part in objs.split(';'):
    position, size, colour, shape = part.split(',')
    objects.append(demo.SceneObject(shape=shape, colour=colour, size=size, position=position))
  return demo.Scene(background, tuple(objects))


def swapped_scene(scene: demo.Scene, attribute: str) -> demo.Scene | None:
  """`scene` with `attribute` exchanged between its first two objects that differ in it."""
  objs = scene.objects
  for a in range(len(objs)):
    for b in range(a + 1, len(objs)):
      va, vb = getattr(objs[a], attribute), getattr(objs[b], attribute)
      if va != vb:
        new = list(objs)
        new[a] = demo.SceneObject(**{**objs[a].__dict__, attribute: vb})
        new[b] = demo.SceneObject(**{**objs[b].__dict__, attribute: va})
        return demo.Scene(scene.background, tuple(new))
  return None


def compositionality(zimg: np.ndarray, embed_texts, scene_keys: Sequence[str]) -> dict[str, float]:
  """Per attribute: fraction of images scoring the true canonical caption above the swapped
  one (ties count as failures)."""
  out = {}
  for attribute in ('colour', 'shape', 'size'):
    rows, true_caps, swapped_caps = [], [], []
    for i, key in enumerate(scene_keys):
      scene = parse_scene_key(key)
      other = swapped_scene(scene, attribute)
      if other is not None:
        rows.append(i)
        true_caps.append(demo.canonical_caption(scene))
        swapped_caps.append(demo.canonical_caption(other))
    if rows:
      zt, zs = embed_texts(true_caps), embed_texts(swapped_caps)
      z = zimg[rows]
      out[f'compositionality/{attribute}'] = float(np.mean((z * zt).sum(1) > (z * zs).sum(1)))
  return out


class DemoSetEvaluator:
  """An evaluator over the demo validation scenes of its spec (num_scenes, seed), built once."""

  def __init__(self, spec: dict[str, Any], image_size: int):
    self.spec = spec
    self.image_size = image_size

  @functools.cached_property
  def data(self) -> dict:
    return demo.make_eval_set(num_scenes=self.spec['num_scenes'], image_size=self.image_size,
                              seed=self.spec['seed'])


class RobustnessEvaluator(DemoSetEvaluator):
  """Retrieval on demo validation scenes: clean, corrupted, perturbed; and compositionality."""

  def _rng(self, *key) -> np.random.Generator:
    return np.random.default_rng([self.spec['seed'], *key])

  def __call__(self, embedder) -> dict[str, float]:
    s, data = self.spec, self.data
    names = s['metrics']
    images, captions = data['images'], data['captions']
    zimg, ztxt = embedder.embed_images(images), embedder.embed_texts(captions)

    def direction(queries, corpus):
      return metrics_lib.from_ranks(metrics_lib.ranks_of_true(queries @ corpus.T), names)

    clean = {'i2t': direction(zimg, ztxt), 't2i': direction(ztxt, zimg)}
    out = {f'clean/{d}/{m}': v for d, vals in clean.items() for m, v in vals.items()}
    first = names[0]
    groups = [(c, 'i2t', c_i) for c_i, c in enumerate(s['corruptions'])]
    groups += [(p, 't2i', 100 + p_i) for p_i, p in enumerate(s['text_perturbations'])]
    for name, d, tag in groups:
      rel = []
      for sev in s['severities']:
        if d == 'i2t':
          corrupted = np.stack([corrupt_image(im, name, sev, self._rng(tag, sev, j))
                                for j, im in enumerate(images)])
          values = direction(embedder.embed_images(corrupted), ztxt)
        else:
          perturbed = [perturb_caption(c, name, sev, self._rng(tag, sev, j))
                       for j, c in enumerate(captions)]
          values = direction(embedder.embed_texts(perturbed), zimg)
        for m, v in values.items():
          out[f'{name}/s{sev}/{d}/{m}'] = v
          base = clean[d][m]
          if m != 'median_rank':
            out[f'{name}/s{sev}/{d}/{m}_rel'] = v / base if base else float('nan')
        rel.append(out.get(f'{name}/s{sev}/{d}/{first}_rel', float('nan')))
      out[f'{name}/mean_rel'] = float(np.mean(rel))
    out.update(compositionality(zimg, embedder.embed_texts, data['scene_keys']))
    return out


def plot(results: dict[str, float], spec: dict[str, Any], path: str | pathlib.Path) -> None:
  """metric vs severity (0 = clean), one line per corruption / perturbation, as a PNG."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError('The robustness plot needs matplotlib (an mmjax dependency): '
                      'pip install matplotlib.') from e
  metric = spec['metrics'][0]
  sev = [0, *spec['severities']]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for ax, names, d, title in ((axes[0], spec['corruptions'], 'i2t', 'image corruptions (i2t)'),
                              (axes[1], spec['text_perturbations'], 't2i',
                               'caption perturbations (t2i)')):
    for name in names:
      ys = [results[f'clean/{d}/{metric}']] + [results[f'{name}/s{v}/{d}/{metric}']
                                               for v in spec['severities']]
      ax.plot(sev, ys, marker='o', label=name)
    ax.set_title(title)
    ax.set_xlabel('severity (0 = clean)')
    ax.set_xticks(sev)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set_ylabel(metric)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def format_report(results: dict[str, float], spec: dict[str, Any]) -> str:
  metric = spec['metrics'][0]
  lines = [f'{"":<16}' + ''.join(f'{"s" + str(v):>9}' for v in spec['severities']) + '  mean rel']
  for names, d in ((spec['corruptions'], 'i2t'), (spec['text_perturbations'], 't2i')):
    lines.append(f'{d} {metric}: clean {results[f"clean/{d}/{metric}"]:.4f}')
    for name in names:
      vals = ''.join(f'{results[f"{name}/s{v}/{d}/{metric}"]:>9.4f}' for v in spec['severities'])
      lines.append(f'{name:<16}{vals}  {results[f"{name}/mean_rel"]:8.3f}')
  lines += [f'{k}: {v:.4f} (chance 0.5)' for k, v in results.items()
            if k.startswith('compositionality/')]
  return '\n'.join(lines)


if __name__ == '__main__':  # The command moved to the CLI layer; this name still runs it.
  import runpy
  runpy.run_module('mmjax.cli.robustness', run_name='__main__')
