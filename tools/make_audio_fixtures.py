"""Regenerates tests/fixtures/audio/mel_reference.npz: librosa's log-mel spectrogram of a few
fixed signals, the reference of mmjax's JAX front end (tests/test_audio.py).

librosa (numba, llvmlite, ...) is kept out of mmjax's installs; run this in any venv that has it:
  python -m venv /tmp/ref && /tmp/ref/bin/pip install librosa numpy
  /tmp/ref/bin/python tools/make_audio_fixtures.py
Made with librosa 0.11.0 (the version is stored in the file).
"""

import pathlib

import librosa
import numpy as np

OUT = pathlib.Path(__file__).resolve().parent.parent / 'tests' / 'fixtures' / 'audio'
# (name, sample_rate, n_fft, hop_length, win_length, n_mels, fmin, fmax, htk, norm)
SETTINGS = (
    ('demo', 8000, 256, 128, 256, 32, 0.0, 4000.0, False, 'slaney'),
    ('ast', 16000, 400, 160, 400, 64, 0.0, 8000.0, False, 'slaney'),
    ('htk', 16000, 512, 128, 400, 40, 50.0, 7000.0, True, None),
)


def signals(sr: int) -> np.ndarray:
  rng = np.random.default_rng(0)
  t = np.arange(int(0.3 * sr)) / sr
  chirp = np.sin(2 * np.pi * (200 * t + 1500 * t ** 2))
  noise = 0.3 * rng.standard_normal(len(t))
  clicks = np.zeros(len(t))
  clicks[:: sr // 20] = 1.0
  return np.stack([0.5 * chirp, noise, clicks]).astype(np.float32)


def main():
  OUT.mkdir(parents=True, exist_ok=True)
  arrays = {'librosa_version': np.array(librosa.__version__)}
  for name, sr, n_fft, hop, win, n_mels, fmin, fmax, htk, norm in SETTINGS:
    x = signals(sr)
    mel = librosa.feature.melspectrogram(y=x, sr=sr, n_fft=n_fft, hop_length=hop,
                                         win_length=win, window='hann', center=True,
                                         pad_mode='constant', power=2.0, n_mels=n_mels,
                                         fmin=fmin, fmax=fmax, htk=htk, norm=norm)
    arrays[f'{name}/wave'] = x
    arrays[f'{name}/mel_power'] = mel.transpose(0, 2, 1).astype(np.float32)  # [B, frames, mels]
    arrays[f'{name}/log_mel'] = librosa.power_to_db(mel, ref=1.0, amin=1e-10,
                                                    top_db=None).transpose(0, 2, 1)
    arrays[f'{name}/filters'] = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin,
                                                    fmax=fmax, htk=htk, norm=norm).T
  np.savez_compressed(OUT / 'mel_reference.npz', **arrays)
  print(f'Wrote {OUT / "mel_reference.npz"} (librosa {librosa.__version__}).')


if __name__ == '__main__':
  main()
