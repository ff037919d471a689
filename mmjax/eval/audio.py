"""Audio evaluators (model.kind='audio_text'): audio->text and text->audio retrieval (a2t, t2a)
and zero-shot classification of one-event synthetic clips, through an embedder with
`embed_audio` / `embed_texts` (mmjax.embedder.AudioEmbedder).

Retrieval pairs are one clip and its caption with every caption distinct in the set, so each
query has exactly one relevant item and chance R@1 is 1 / the number of pairs. Clips are built
on first use at the embedder's sample rate.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from mmjax.data import audio_demo, audio_pipeline, records
from mmjax.eval import classification as cls_lib
from mmjax.eval.retrieval import retrieval_metrics


def _sample_rate(embedder) -> int:
  audio = getattr(getattr(embedder, 'config', None), 'audio', None)
  if audio is None:
    raise TypeError(f'{type(embedder).__name__} has no audio tower: audio evaluators need an '
                    "audio-text model (model.kind='audio_text').")
  return audio.sample_rate


class AudioRetrievalEvaluator:
  """a2t / t2a retrieval on `num_clips` synthetic validation clips with distinct captions
  (dataset='synthetic'), or on the first `max_examples` ingested clips (dataset='records', the
  first clip of each distinct caption)."""

  def __init__(self, spec: dict[str, Any]):
    self.spec = spec
    self.skipped = 0

  @functools.cached_property
  def _selection(self) -> tuple[list[Any], list[str]]:
    """(clip handles, captions): indices of synthetic clips or stored clip bytes."""
    s, seen, handles, captions = self.spec, set(), [], []
    if s['dataset'] == 'synthetic':
      scenes = audio_demo.AudioScenes('validation', 50 * s['num_clips'], 8000, s['seed'],
                                      s['max_events'])
      for i in range(len(scenes)):
        c = scenes.caption(i)
        if c not in seen:
          seen.add(c)
          handles.append(i)
          captions.append(c)
        if len(captions) == s['num_clips']:
          break
      return handles, captions
    src = audio_pipeline.AudioRecordSource(s['path'])
    for i in range(min(s['max_examples'], len(src))):
      ex = src[i]
      c = records.normalise_caption(ex['captions'][0])
      if c not in seen:
        seen.add(c)
        handles.append(ex['audio'])
        captions.append(c)
    return handles, captions

  @property
  def captions(self) -> list[str]:
    return self._selection[1]

  @property
  def chance(self) -> dict[str, float]:
    return {'a2t/recall@1': 1.0 / len(self.captions), 't2a/recall@1': 1.0 / len(self.captions)}

  @property
  def chance_recall_at_1(self) -> float:
    return 1.0 / len(self.captions)

  @property
  def size_description(self) -> str:
    return f'{len(self.captions)} pairs'

  @property
  def description(self) -> str:
    s = self.spec
    return (f'synthetic validation sounds (seed {s["seed"]})' if s['dataset'] == 'synthetic'
            else f'records {s["path"]}')

  @functools.lru_cache(maxsize=2)
  def clips(self, sample_rate: int) -> tuple[list[np.ndarray], list[str]]:
    handles, captions = self._selection
    if self.spec['dataset'] == 'synthetic':
      scenes = audio_demo.AudioScenes('validation', 50 * self.spec['num_clips'], sample_rate,
                                      self.spec['seed'], self.spec['max_events'])
      return [scenes[i]['audio'] for i in handles], captions
    clips, kept = [], []
    for data, caption in zip(handles, captions):
      try:
        clips.append(audio_pipeline.load_clip(data, sample_rate))
        kept.append(caption)
      except Exception:  # pylint: disable=broad-except  # libsndfile raises several types
        self.skipped += 1
    return clips, kept

  @functools.cached_property
  def swapped(self) -> tuple[np.ndarray, list[str]]:
    """(indices, captions with the two events in the other order) of the synthetic two-event
    clips whose events differ: does the model hear the order? (chance 0.5)"""
    if self.spec['dataset'] != 'synthetic':
      return np.zeros(0, int), []
    scenes = audio_demo.AudioScenes('validation', 50 * self.spec['num_clips'], 8000,
                                    self.spec['seed'], self.spec['max_events'])
    idx, out = [], []
    for j, i in enumerate(self._selection[0]):
      events = scenes.events(i)
      if len(events) == 2 and events[0] != events[1]:
        idx.append(j)
        out.append(audio_demo.caption(events[::-1]))
    return np.asarray(idx, int), out

  def __call__(self, embedder) -> dict[str, float]:
    clips, captions = self.clips(_sample_rate(embedder))
    za, zt = embedder.embed_audio(clips), embedder.embed_texts(captions)
    out = retrieval_metrics(za, zt, names=self.spec['metrics'])
    out = {k.replace('i2t/', 'a2t/').replace('t2i/', 't2a/'): v for k, v in out.items()}
    idx, swapped = self.swapped
    if len(idx):
      zs = embedder.embed_texts(swapped)
      true = np.sum(za[idx] * zt[idx], axis=1)
      out['a2t/order_accuracy'] = float(np.mean(true > np.sum(za[idx] * zs, axis=1)))
    if self.skipped:
      out['skipped_clips'] = float(self.skipped)
    return out


class AudioZeroShotEvaluator:
  """Zero-shot accuracy on one-event synthetic clips by `attribute` (kind | pitch | length): a
  class's embedding is the mean of the captions of every one-event clip of that class."""

  def __init__(self, spec: dict[str, Any]):
    self.spec = spec

  @functools.lru_cache(maxsize=2)
  def data(self, sample_rate: int):
    s = self.spec
    return audio_demo.single_events(s['num_clips'], sample_rate, s['attribute'], s['seed'])

  def __call__(self, embedder) -> dict[str, float]:
    clips, labels, names = self.data(_sample_rate(embedder))
    prompts = audio_demo.class_prompts(self.spec['attribute'])
    z = embedder.embed_texts([p for ps in prompts for p in ps])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    class_emb, start = [], 0
    for ps in prompts:
      class_emb.append(z[start:start + len(ps)].mean(0))
      start += len(ps)
    class_emb = np.stack(class_emb)
    class_emb /= np.linalg.norm(class_emb, axis=1, keepdims=True)
    out = cls_lib.zero_shot_metrics(embedder.embed_audio(clips), labels, class_emb, names)
    wanted = self.spec['metrics']
    return {k: v for k, v in out.items()
            if k in wanted or ('per_class' in wanted and k.startswith('per_class/'))}
