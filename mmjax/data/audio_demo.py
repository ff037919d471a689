"""Synthetic captioned sounds: the audio counterpart of the demo scenes, generated on the fly.

A clip is one or two sound events in sequence, each with a kind (a steady, rising or falling
tone, a burst of noise, a train of clicks), a pitch (low, middle, high: the tone's frequency, the
noise's band, the clicks' resonance) and a length (short, long), on a little background noise:
"a long high tone falling, then a short burst of low noise". Clip i of a split is a pure function
of (seed, split, i). Two-event captions make the order matter, so a bag of frequencies cannot
answer a query.
"""

from __future__ import annotations

import dataclasses

import numpy as np

KINDS = ('tone', 'rising', 'falling', 'noise', 'clicks')
PITCHES = ('low', 'middle', 'high')
LENGTHS = ('short', 'long')
# Centre frequencies of each pitch (Hz, jittered +-15%) and event durations (s, jittered +-20%).
PITCH_HZ = {'low': 300.0, 'middle': 800.0, 'high': 2000.0}
LENGTH_S = {'short': 0.25, 'long': 0.6}
SPLIT_SALT = {'train': 0, 'validation': 1, 'test': 2}
# The zero-shot classes of one-event clips, by attribute (mmjax.eval.audio).
ATTRIBUTES = {'kind': KINDS, 'pitch': PITCHES, 'length': LENGTHS}


@dataclasses.dataclass(frozen=True)
class Event:
  kind: str
  pitch: str
  length: str

  def phrase(self) -> str:
    if self.kind in ('tone', 'rising', 'falling'):
      tail = '' if self.kind == 'tone' else f' {self.kind}'
      return f'a {self.length} {self.pitch} tone{tail}'
    what = 'burst of' if self.kind == 'noise' else 'train of'
    noun = 'noise' if self.kind == 'noise' else 'clicks'
    return f'a {self.length} {what} {self.pitch} {noun}'


def caption(events: list[Event]) -> str:
  return ', then '.join(e.phrase() for e in events)


def random_events(rng: np.random.Generator, max_events: int = 2) -> list[Event]:
  n = int(rng.integers(1, max_events + 1))
  return [Event(str(rng.choice(KINDS)), str(rng.choice(PITCHES)), str(rng.choice(LENGTHS)))
          for _ in range(n)]


def render_event(e: Event, sr: int, rng: np.random.Generator) -> np.ndarray:
  dur = LENGTH_S[e.length] * rng.uniform(0.8, 1.2)
  t = np.arange(int(dur * sr)) / sr
  f0 = PITCH_HZ[e.pitch] * rng.uniform(0.85, 1.15)
  if e.kind in ('tone', 'rising', 'falling'):
    ratio = {'tone': 1.0, 'rising': 2.0, 'falling': 0.5}[e.kind]
    # Exponential sweep from f0 to f0 * ratio; its phase is the integral of the frequency.
    k = np.log(ratio) / dur
    phase = 2 * np.pi * f0 * (t if k == 0 else (np.exp(k * t) - 1) / k)
    x = np.sin(phase)
  elif e.kind == 'noise':
    spec = np.fft.rfft(rng.standard_normal(len(t)))
    freqs = np.fft.rfftfreq(len(t), 1 / sr)
    spec *= np.exp(-0.5 * (np.log(np.maximum(freqs, 1.0) / f0) / 0.25) ** 2)
    x = np.fft.irfft(spec, len(t))
    x /= np.abs(x).max() + 1e-9
  else:  # Clicks: decaying resonances at f0, ~12 per second.
    x = np.zeros(len(t))
    tail = np.arange(int(0.02 * sr)) / sr
    ping = np.sin(2 * np.pi * f0 * tail) * np.exp(-tail / 0.004)
    for start in range(0, max(len(t) - len(tail), 1), int(sr / 12)):
      x[start:start + len(tail)] += ping[:len(x) - start]
  fade = min(len(t) // 4, int(0.01 * sr))
  env = np.ones(len(t))
  env[:fade], env[len(t) - fade:] = np.linspace(0, 1, fade), np.linspace(1, 0, fade)
  return x * env * rng.uniform(0.3, 0.8)


def render(events: list[Event], sr: int, rng: np.random.Generator) -> np.ndarray:
  """float32 mono waveform: the events with short random gaps, on quiet background noise."""
  parts = [np.zeros(int(rng.uniform(0.02, 0.15) * sr))]
  for e in events:
    parts += [render_event(e, sr, rng), np.zeros(int(rng.uniform(0.05, 0.2) * sr))]
  x = np.concatenate(parts)
  return (x + 0.01 * rng.standard_normal(len(x))).astype(np.float32)


class AudioScenes:
  """Random-access synthetic clips: {'audio': float32 [n], 'sample_rate', 'captions': [str],
  'events': [Event]} (the element layout of `mmjax.data.audio_pipeline`)."""

  def __init__(self, split: str, num_examples: int, sample_rate: int, seed: int,
               max_events: int = 2):
    if split not in SPLIT_SALT:
      raise ValueError(f'split={split!r} is not one of {tuple(SPLIT_SALT)}.')
    self.split, self.num_examples, self.sample_rate = split, num_examples, sample_rate
    self.seed, self.max_events = seed, max_events

  def __len__(self) -> int:
    return self.num_examples

  def _rng(self, index: int) -> np.random.Generator:
    return np.random.default_rng([0xA0D10, self.seed, SPLIT_SALT[self.split], int(index)])

  def events(self, index: int) -> list[Event]:
    """Clip `index`'s events, without rendering it."""
    return random_events(self._rng(index), self.max_events)

  def caption(self, index: int) -> str:
    return caption(self.events(index))

  def __getitem__(self, index: int) -> dict:
    rng = self._rng(index)
    events = random_events(rng, self.max_events)
    return {'audio': render(events, self.sample_rate, rng), 'sample_rate': self.sample_rate,
            'captions': [caption(events)], 'events': events}


def single_events(num: int, sample_rate: int, attribute: str, seed: int
                  ) -> tuple[list[np.ndarray], np.ndarray, tuple[str, ...]]:
  """(clips, labels, class names) of one-event clips for zero-shot classification by attribute
  ('kind' | 'pitch' | 'length')."""
  if attribute not in ATTRIBUTES:
    raise ValueError(f'attribute={attribute!r} is not one of {tuple(ATTRIBUTES)}.')
  classes = ATTRIBUTES[attribute]
  rng = np.random.default_rng([0x5E0, seed])
  clips, labels = [], []
  for i in range(num):
    e = random_events(rng, 1)[0]
    label = i % len(classes)  # Balanced classes.
    e = dataclasses.replace(e, **{attribute: classes[label]})
    clips.append(render([e], sample_rate, rng))
    labels.append(label)
  return clips, np.asarray(labels), classes


def class_prompts(attribute: str) -> list[list[str]]:
  """Per class of `attribute`, the captions of every one-event clip of that class (the other
  attributes enumerated): the prompts whose mean embedding is the class's."""
  out = []
  for value in ATTRIBUTES[attribute]:
    prompts = []
    for kind in KINDS:
      for pitch in PITCHES:
        for length in LENGTHS:
          e = dataclasses.replace(Event(kind, pitch, length), **{attribute: value})
          prompts.append(caption([e]))
    out.append(sorted(set(prompts)))
  return out


def caption_corpus(num: int = 2000, seed: int = 0) -> list[str]:
  rng = np.random.default_rng([0xC0, seed])
  return [caption(random_events(rng)) for _ in range(num)]
