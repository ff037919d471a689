"""Audio files in and out of the record format: decoding (libsndfile through `soundfile`: WAV,
FLAC, OGG/Vorbis, ...), resampling (`scipy.signal.resample_poly`), cropping/padding to the
tower's input, and the checks ingestion applies before a clip is stored.

Records store every clip as mono 16-bit FLAC at the ingestion's sample rate, so training decodes
one small, uniform format. A clip is refused (`Skip`, with the reason in the report) when the
file does not decode, its header is absurd (sample rate outside [min_rate, max_rate], a length
outside [min_seconds, max_seconds]) or the decoded data is shorter than the header says
(truncated), non-finite or silent.
"""

from __future__ import annotations

import dataclasses
import io
import math
import wave

import numpy as np
import soundfile
from scipy import signal

from mmjax.data.ingest_images import Skip

STORED_FORMAT = 'FLAC'


@dataclasses.dataclass(frozen=True)
class AudioLimits:
  """What ingestion accepts; clips longer than `crop_seconds` are stored cut to it (0: whole)."""

  sample_rate: int = 16_000  # Stored (and training) rate; every clip is resampled to it.
  min_rate: int = 4_000
  max_rate: int = 384_000
  min_seconds: float = 0.05
  max_seconds: float = 600.0
  crop_seconds: float = 0.0


def to_mono(x: np.ndarray) -> np.ndarray:
  return x.mean(axis=1) if x.ndim == 2 else x


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
  """Polyphase resampling of a mono float clip (exact rate ratio, Kaiser-windowed filter)."""
  if rate_in == rate_out:
    return x.astype(np.float32)
  g = math.gcd(int(rate_in), int(rate_out))
  return signal.resample_poly(x, rate_out // g, rate_in // g).astype(np.float32)


def decode(data: bytes, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
  """(float32 mono samples, rate) of an encoded file; resampled to `sample_rate` when given."""
  x, rate = soundfile.read(io.BytesIO(data), dtype='float32', always_2d=True)
  x = to_mono(x)
  if sample_rate and rate != sample_rate:
    return resample(x, rate, sample_rate), sample_rate
  return x, rate


def encode(x: np.ndarray, sample_rate: int) -> bytes:
  """Mono 16-bit FLAC bytes of float samples in [-1, 1] (clipped)."""
  buf = io.BytesIO()
  soundfile.write(buf, np.clip(x, -1.0, 1.0), sample_rate, format=STORED_FORMAT,
                  subtype='PCM_16')
  return buf.getvalue()


def fit(x: np.ndarray, max_samples: int, rng: np.random.Generator | None = None
        ) -> tuple[np.ndarray, int]:
  """(float32 [max_samples], valid length): zero-padded, or cropped to max_samples (at a random
  offset with `rng`, the start otherwise)."""
  n = len(x)
  if n > max_samples:
    start = int(rng.integers(0, n - max_samples + 1)) if rng is not None else 0
    return np.asarray(x[start:start + max_samples], np.float32), max_samples
  out = np.zeros(max_samples, np.float32)
  out[:n] = x
  return out, n


def declared_wav_frames(path: str) -> int | None:
  """The frame count a WAV file's data chunk declares (stdlib `wave`; None when it cannot say:
  not a PCM WAV). libsndfile derives the count from the file size instead, which hides a cut."""
  try:
    with wave.open(path, 'rb') as w:
      return w.getnframes()
  except (wave.Error, EOFError, OSError):
    return None


def read_audio(path: str, limits: AudioLimits) -> tuple[bytes, dict]:
  """(stored FLAC bytes, info) of one audio file; raises Skip naming what is wrong."""
  try:
    info = soundfile.info(path)
  except Exception as e:  # pylint: disable=broad-except  # libsndfile errors on bad headers
    raise Skip(f'corrupt audio: {type(e).__name__}: {e}') from e
  rate, frames = int(info.samplerate), int(info.frames)
  declared = declared_wav_frames(path) if info.format == 'WAV' else None
  if declared is not None and frames < declared * 0.99:
    raise Skip(f'truncated audio: the WAV header declares {declared} frames, the file holds '
               f'{frames}')
  if not limits.min_rate <= rate <= limits.max_rate:
    raise Skip(f'absurd sample rate: {rate} Hz outside [{limits.min_rate}, {limits.max_rate}]')
  seconds = frames / rate if frames > 0 else 0.0
  if not limits.min_seconds <= seconds <= limits.max_seconds:
    raise Skip(f'absurd length: {seconds:.3f} s outside [{limits.min_seconds}, '
               f'{limits.max_seconds}] s')
  try:
    x, _ = soundfile.read(path, dtype='float32', always_2d=True)
  except Exception as e:  # pylint: disable=broad-except  # truncated or damaged data
    raise Skip(f'corrupt audio: {type(e).__name__}: {e}') from e
  # libsndfile reads a truncated file up to the damage without error; the header knows better.
  if len(x) < frames * 0.99:
    raise Skip(f'truncated audio: {len(x)} of {frames} frames decode')
  x = to_mono(x)
  if not np.all(np.isfinite(x)):
    raise Skip('corrupt audio: non-finite samples')
  if not np.any(np.abs(x) > 1e-4):
    raise Skip('silent audio')
  if limits.crop_seconds:
    x = x[:int(limits.crop_seconds * rate)]
  x = resample(x, rate, limits.sample_rate)
  return encode(x, limits.sample_rate), {'format': info.format, 'sample_rate': rate,
                                         'seconds': round(seconds, 3),
                                         'channels': int(info.channels)}
