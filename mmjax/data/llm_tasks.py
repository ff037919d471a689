"""Mixed-modality retrieval tasks for the LLM embedder, built from the demo scenes.

Each example is one (query, candidate) pair of one task, with optional hard negative candidates:

- 'i2t': query = image, candidate = its caption (negatives: captions of one-attribute mutations);
- 't2i': query = caption, candidate = the image (negatives: images of mutations);
- 'composed': query = a scene image + a modification text ("make the red circle blue"),
  candidate = the modified scene rendered (negatives: the unmodified scene, then mutations of
  the target).

Texts carry the image placeholder (`model.llm.image_token`) where an image goes; queries get their
task's instruction prefix and candidates the candidate instruction. They are encoded on the host
by `mmjax.data.llm_encoding.MultimodalEncoder` (its names are re-exported here).

Batch columns (B rows, L = model.llm.max_len, I = model.llm.max_images, S = image size, K =
data.num_hard_negatives): query_/cand_ tokens, mask [B, L] int32 and images [B, I, S, S, 3]
uint8; neg_cand_ tokens/mask [B, K, L], images [B, K, I, S, S, 3] and neg_candidate_valid
[B, K]; task, group [B] int32; weight [B] float32.
"""

from __future__ import annotations

import operator
from typing import Any, Sequence

import grain
import numpy as np

from mmjax.data import augment, demo, images as images_lib, pipeline, records, scene_edits
from mmjax.data.llm_encoding import (  # noqa: F401  (re-exported: the encoding moved there)
    PAD_SIDES, Instructions, MultimodalEncoder, add_image_token, format_text, make_encoder,
    stack_images, tokens_per_image)
from mmjax.data.scene_edits import (  # noqa: F401  (re-exported: the demo-task scene edits)
    composed_eval_set, modify, mutations, scene_from_key)
from mmjax.types import IMAGE_SLOT, LLM_TASKS as TASKS, check_batch_divides  # noqa: F401

_SALT = scene_edits.SALT

__all__ = [  # This module's names and those it re-exports (llm_encoding, scene_edits, types).
    'CAPTION_TASKS', 'CaptionTasks', 'DemoTasks', 'EncodeTask', 'batch_spec', 'corpus',
    'make_train_dataset', 'on_demo_tasks', 'task_example',
    'PAD_SIDES', 'Instructions', 'MultimodalEncoder', 'add_image_token', 'format_text',
    'make_encoder', 'stack_images', 'tokens_per_image',
    'composed_eval_set', 'modify', 'mutations', 'scene_from_key', 'IMAGE_SLOT', 'TASKS']


# --------------------------------------------------------------------------------- the tasks

def task_example(task: str, scene: demo.Scene, split: str, image_size: int, image_token: str,
                 num_negatives: int, rng: np.random.Generator) -> dict[str, Any] | None:
  """The raw (untokenised) example of `task` on `scene`; None if `scene` has no composed target
  in its split. Images are lists of uint8 [S, S, 3]."""
  def image():
    return demo.render(scene, image_size, rng)

  def caption(s):
    return demo.captions(s, rng, 1)[0]

  negs = mutations(scene, split, rng, num_negatives)
  if task == 'i2t':
    out = {'query': image_token, 'query_images': [image()], 'candidate': caption(scene),
           'cand_images': [], 'negatives': [(caption(m), []) for m in negs], 'target': scene}
  elif task == 't2i':
    out = {'query': caption(scene), 'query_images': [], 'candidate': image_token,
           'cand_images': [image()],
           'negatives': [(image_token, [demo.render(m, image_size, rng)]) for m in negs],
           'target': scene}
  else:
    pair = scene_edits.composed_pair(scene, split, rng)
    if pair is None:
      return None
    target, text = pair
    negs = [scene] + [m for m in mutations(target, split, rng, num_negatives) if m != scene]
    out = {'query': f'{image_token} {text}', 'query_images': [image()], 'candidate': image_token,
           'cand_images': [demo.render(target, image_size, rng)],
           'negatives': [(image_token, [demo.render(m, image_size, rng)])
                         for m in negs[:num_negatives]], 'target': target}
  out['task'] = task
  return out


class DemoTasks:
  """Random-access source of raw task examples (Grain compatible, picklable, deterministic).

  Example `i` draws its task (by `weights`), scene and rendering from a generator seeded with
  `(seed, split, i)`.
  """

  def __init__(self, split: str, num_examples: int, image_size: int, seed: int,
               weights: dict[str, float], image_token: str, num_negatives: int = 0):
    if split not in demo.SPLITS:
      raise ValueError(f'unknown split {split!r}; expected one of {demo.SPLITS}')
    bad = {t: w for t, w in weights.items() if t not in TASKS or w < 0}
    if bad or not sum(weights.values()) > 0:
      raise ValueError(f'task weights {weights} must be >= 0 over {TASKS}, not all 0.')
    self.split, self.num_examples, self.image_size = split, int(num_examples), int(image_size)
    self.seed, self.image_token, self.num_negatives = int(seed), image_token, int(num_negatives)
    self.tasks = [t for t in TASKS if weights.get(t, 0) > 0]
    p = np.asarray([weights[t] for t in self.tasks], np.float64)
    self.cdf = np.cumsum(p / p.sum())[:-1]

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = operator.index(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f'index {index} out of range for {self.num_examples} examples')
    rng = np.random.default_rng([_SALT, self.seed, demo.SPLITS.index(self.split), index])
    task = self.tasks[int(np.searchsorted(self.cdf, rng.random(), side='right'))]
    for _ in range(100):
      scene = demo._sample_scene_in(self.split, rng)  # pylint: disable=protected-access
      out = task_example(task, scene, self.split, self.image_size, self.image_token,
                         self.num_negatives, rng)
      if out is not None:
        return out
    raise RuntimeError(f'no {task} example found for index {index}')  # pragma: no cover


class EncodeTask(grain.transforms.Map):
  """A raw task example -> the fixed-shape columns of the module docstring."""

  def __init__(self, encoder: MultimodalEncoder, instructions: Instructions, image_size: int,
               num_negatives: int = 0):
    self.encoder, self.instructions = encoder, instructions
    self.image_size, self.num_negatives = image_size, num_negatives

  def _side(self, text: str, images: Sequence[np.ndarray], instruction: str):
    tokens, mask = self.encoder(format_text(instruction, text), len(images))
    return tokens, mask, stack_images(images, self.encoder.max_images, self.image_size)

  def map(self, ex: dict[str, Any]) -> dict[str, np.ndarray]:
    out: dict[str, Any] = {'task': np.int32(TASKS.index(ex['task'])),
                           'weight': np.float32(ex.get('weight', 1.0))}
    if 'target' in ex:  # Demo tasks: rows with one target scene are one group.
      out['group'] = np.int32(records.hash31('s:' + ex['target'].key()))
    cand = self.instructions.candidate
    for prefix, side in (('query_', self._side(ex['query'], ex['query_images'],
                                               self.instructions.query[ex['task']])),
                         ('cand_', self._side(ex['candidate'], ex['cand_images'], cand))):
      out[f'{prefix}tokens'], out[f'{prefix}mask'], out[f'{prefix}images'] = side
    if self.num_negatives:
      k, e = self.num_negatives, self.encoder
      s = self.image_size
      out['neg_cand_tokens'] = np.full((k, e.max_len), e.pad_id, np.int32)
      out['neg_cand_mask'] = np.zeros((k, e.max_len), np.int32)
      out['neg_cand_images'] = np.zeros((k, e.max_images, s, s, 3), np.uint8)
      out['neg_candidate_valid'] = np.zeros((k,), np.int32)
      for j, (text, images) in enumerate(ex['negatives'][:k]):
        (out['neg_cand_tokens'][j], out['neg_cand_mask'][j],
         out['neg_cand_images'][j]) = self._side(text, images, cand)
        out['neg_candidate_valid'][j] = 1
    return out


CAPTION_TASKS = ('i2t', 't2i')  # What an image-caption pair gives (no composed edit).


class CaptionTasks(grain.transforms.RandomMap):
  """An image-caption element of a records / TFDS / demo source (`mmjax.data.sources`) -> the
  columns of one i2t row (query: the image, candidate: a caption) or t2i row (query: the
  caption, candidate: the image), drawn by `weights`, with the instructions of `encode`.

  The image is decoded, resized and augmented, and the caption sampled, exactly as the dual
  encoder's `transforms.Preprocess` does (a flipped row's caption swaps left and right); a
  caption too long for the context is cut at a word boundary. Hard negatives: the element's
  negative captions (i2t) or images (t2i). The duplicate keys of `transforms.KEY_COLUMNS` go with
  each row, so rows that share an image, a caption or a group are one `group` of the batch
  (never each other's negatives); an undecodable image gives {'ok': False} (`SkipCorrupt`)."""

  def __init__(self, encode: EncodeTask, *, weights: dict[str, float], image_token: str, view,
               augment=None, caption_sampling: str = 'random'):
    self.encode, self.image_token, self.view, self.augment = encode, image_token, view, augment
    self.caption_sampling = caption_sampling
    self.tasks = [t for t in CAPTION_TASKS if weights.get(t, 0) > 0]
    if not self.tasks:
      raise ValueError(f'task weights {weights}: image-caption data needs i2t or t2i > 0.')
    p = np.asarray([weights[t] for t in self.tasks], np.float64)
    self.cdf = np.cumsum(p / p.sum())[:-1]

  def _image(self, image, rng: np.random.Generator, flip: bool) -> np.ndarray:
    if self.augment is None:
      return images_lib.load(image, self.view)
    return self.augment.image(image, self.view, rng, flip)

  def _caption(self, text: str, flip: bool, instruction: str) -> str:
    text = records.normalise_caption(text).replace(self.image_token, ' ').strip()
    text = self.augment.swap(text) if flip else text
    return self.encode.encoder.fit(instruction, text)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    task = self.tasks[int(np.searchsorted(self.cdf, rng.random(), side='right'))]
    captions = element['captions']
    which = int(rng.integers(len(captions))) if self.caption_sampling == 'random' else 0
    flip = self.augment is not None and self.augment.draw_flip(rng)
    ins = self.encode.instructions
    caption = self._caption(captions[which], flip,
                            ins.query['t2i'] if task == 't2i' else ins.candidate)
    try:
      image = self._image(element['image'], rng, flip)
    except Exception:  # pylint: disable=broad-except  # PIL raises many types on bad files
      return {'ok': False}
    k, token = self.encode.num_negatives, self.image_token
    if task == 'i2t':
      ex = {'query': token, 'query_images': [image], 'candidate': caption, 'cand_images': [],
            'negatives': [(self._caption(t, flip, ins.candidate), [])
                          for t in element['neg_texts'][:k]]}
    else:
      negatives = []
      for neg in element['neg_images']:
        if len(negatives) == k:
          break
        try:
          negatives.append((token, [self._image(neg, rng, flip)]))
        except Exception:  # pylint: disable=broad-except  # a bad negative is just left out
          continue
      ex = {'query': caption, 'query_images': [], 'candidate': token, 'cand_images': [image],
            'negatives': negatives}
    out = self.encode.map(ex | {'task': task, 'weight': element['weight']})
    raw = element['image']
    raw = raw if isinstance(raw, (bytes, bytearray)) else np.ascontiguousarray(raw).tobytes()
    group = element['group']
    return out | {
        'ok': True,
        'group_key': np.int64(records.hash31('g:' + group) if group else -1),
        'caption_key': np.int64(records.hash31('c:' + records.caption_key(caption))),
        # The stored image, not the augmented crop: copies stay duplicates under augmentation.
        'image_key': np.int64(records.hash31(b'i:' + raw))}


# --------------------------------------------------------------------------- config plumbing

def batch_spec(config) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{column: (shape, dtype)} of one global batch."""
  b, s, k = config.batch_size, config.model.image.image_size, config.data.num_hard_negatives
  L, n = config.model.llm.max_len, config.model.llm.max_images
  spec = {'task': ((b,), np.int32), 'group': ((b,), np.int32), 'weight': ((b,), np.float32)}
  for prefix, lead in (('query_', (b,)), ('cand_', (b,))) + ((('neg_cand_', (b, k)),) if k else ()):
    spec |= {f'{prefix}tokens': (lead + (L,), np.int32), f'{prefix}mask': (lead + (L,), np.int32),
             f'{prefix}images': (lead + (n, s, s, 3), np.uint8)}
  if k:
    spec['neg_candidate_valid'] = ((b, k), np.int32)
  return spec


def on_demo_tasks(config) -> bool:
  """Whether the run trains on the demo tasks (composed edits included), rather than on the
  image-caption pairs of its sources (records, TFDS, a mixture)."""
  return config.data.get('name', 'demo') == 'demo' and not config.data.get('mixture', ())


def corpus(config, num_scenes: int = 2000):
  """Texts to train the run's tokenizer on: the captions (the demo's, or the configured
  sources'), the instructions (so no instruction word is unknown) and, on the demo tasks, the
  modification texts."""
  demo_tasks = on_demo_tasks(config)
  if demo_tasks:
    yield from demo.caption_corpus(num_scenes=num_scenes, seed=config.seed)
  else:
    yield from pipeline.caption_corpus(config)
  llm = config.data.llm
  for text in [llm.instructions[t] for t in TASKS] + [llm.candidate_instruction]:
    if text:
      yield text
  if demo_tasks:
    rng = np.random.default_rng([_SALT, config.seed, 9])
    for _ in range(num_scenes):
      yield modify(demo.sample_scene(rng), rng)[1]


def make_train_dataset(config, encoder: MultimodalEncoder, *, process_index: int = 0,
                       process_count: int = 1) -> grain.IterDataset:
  """Infinite iterator dataset of this process's batches: the demo tasks, or the i2t / t2i
  rows of the run's image-caption sources (records, TFDS, mixtures; `CaptionTasks`) through the
  dual encoder's pipeline (seeded global shuffle, per-process shard, weighted mixture,
  `SkipCorrupt`, duplicate groups)."""
  data = config.data
  instructions = Instructions.from_config(config)
  size = config.model.image.image_size
  if not on_demo_tasks(config):
    encode = EncodeTask(encoder, instructions, size, data.num_hard_negatives)

    def transform(i: int) -> CaptionTasks:
      del i  # Every source gives image-caption elements.
      return CaptionTasks(encode, weights=dict(data.llm.weights),
                          image_token=config.model.llm.image_token,
                          view=augment.view(data, size), augment=augment.from_config(data),
                          caption_sampling=data.caption_sampling)
    return pipeline.make_train_dataset(config, None, process_index=process_index,
                                       process_count=process_count, text_pairs=False,
                                       transform=transform)
  check_batch_divides(config.batch_size, process_count)
  src = DemoTasks('train', data.num_train_examples, config.model.image.image_size, config.seed,
                  dict(data.llm.weights), config.model.llm.image_token, data.num_hard_negatives)
  ds = grain.MapDataset.source(src).seed(int(np.random.SeedSequence([config.seed, 7])
                                             .generate_state(1)[0]))
  ds = ds.shuffle().repeat(None).map(EncodeTask(encoder, instructions, size,
                                                data.num_hard_negatives))
  read = grain.ReadOptions(num_threads=data.read_threads,
                           prefetch_buffer_size=2 * config.batch_size // process_count)
  it = ds[process_index::process_count].to_iter_dataset(read)
  return pipeline.prefetch(it.batch(config.batch_size // process_count, drop_remainder=True), data)
