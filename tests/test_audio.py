"""The audio tower and its data: the log-mel front end against librosa (fixture from
tools/make_audio_fixtures.py), masks (a padded clip embeds as the clip alone), parameter count,
SpecAugment, ingestion of planted bad files, and a tiny run through train -> export ->
load_embedder().embed_audio. (8 devices / GradCache: tests/test_distributed.py.)"""

from __future__ import annotations

import io
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile

from mmjax import kinds
from mmjax.data import audio_demo, audio_io, audio_pipeline, prepare
from mmjax.models import audio as audio_lib
from mmjax.types import AudioConfig, ConfigError

FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'audio' / 'mel_reference.npz'
# name -> the AudioConfig of tools/make_audio_fixtures.py's SETTINGS row.
SETTINGS = {
    'demo': dict(sample_rate=8000, n_fft=256, hop_length=128, win_length=256, n_mels=32,
                 fmin=0.0, fmax=4000.0, mel_scale='slaney', mel_norm=True),
    'ast': dict(sample_rate=16000, n_fft=400, hop_length=160, win_length=400, n_mels=64,
                fmin=0.0, fmax=8000.0, mel_scale='slaney', mel_norm=True),
    'htk': dict(sample_rate=16000, n_fft=512, hop_length=128, win_length=400, n_mels=40,
                fmin=50.0, fmax=7000.0, mel_scale='htk', mel_norm=False),
}


def _tiny_audio_config(**kw) -> AudioConfig:
  base = dict(sample_rate=8000, max_seconds=0.5, n_fft=256, hop_length=128, n_mels=16,
              patch_time=4, patch_freq=8, width=32, depth=1, num_heads=2, mlp_dim=64)
  return AudioConfig(**{**base, **kw})


@pytest.mark.parametrize('name', sorted(SETTINGS))
def test_log_mel_matches_librosa(name):
  ref = np.load(FIXTURE)
  cfg = AudioConfig(max_seconds=1.0, patch_freq=8, **SETTINGS[name])
  np.testing.assert_allclose(audio_lib.mel_filterbank(cfg), ref[f'{name}/filters'], atol=1e-7)
  wave = jnp.asarray(ref[f'{name}/wave'])
  power = np.asarray(audio_lib.power_spectrogram(wave, cfg) @ audio_lib.mel_filterbank(cfg))
  want = ref[f'{name}/mel_power']
  assert power.shape == want.shape
  peak = want.max(axis=(1, 2), keepdims=True)
  assert np.max(np.abs(power - want) / peak) < 1e-4  # float32 here: ~2e-7 measured.
  # In dB: 1e-4 relative to the clip's range (10 log10 is ill-conditioned at the amin floor).
  db, want_db = np.asarray(audio_lib.log_mel(wave, cfg)), ref[f'{name}/log_mel']
  loud = want_db > want_db.max(axis=(1, 2), keepdims=True) - 80.0
  assert np.max(np.abs(db - want_db)[loud]) < 80.0 * 1e-4


def _tower(cfg: AudioConfig):
  model = audio_lib.AudioViT(cfg)
  x = jnp.zeros((1, cfg.max_samples), jnp.float32)
  params = model.init(jax.random.key(0), x, jnp.array([cfg.max_samples]))['params']
  return model, nn.unbox(params)


@pytest.mark.parametrize('pool', ['gap', 'map'])
def test_padded_clip_embeds_as_the_clip_alone(pool):
  cfg = _tiny_audio_config(pool=pool)
  model, params = _tower(cfg)
  rng = np.random.default_rng(0)
  for n in (700, 1283, cfg.max_samples):
    clip = (0.3 * rng.standard_normal(n)).astype(np.float32)
    alone = model.apply({'params': params}, clip[None], jnp.array([n]))
    padded, _ = audio_io.fit(clip, cfg.max_samples)  # Zeros after the clip.
    got = model.apply({'params': params}, padded[None], jnp.array([n]))
    np.testing.assert_allclose(np.asarray(got), np.asarray(alone), atol=2e-5, rtol=1e-4)
  # And the mask matters: the same clip read with another length embeds differently.
  full = model.apply({'params': params}, padded[None], jnp.array([cfg.max_samples]))
  short = model.apply({'params': params}, padded[None], jnp.array([700]))
  assert float(jnp.max(jnp.abs(full - short))) > 1e-3


def test_audio_tower_shapes_and_parameter_count():
  cfg = _tiny_audio_config()
  model, params = _tower(cfg)
  assert cfg.max_frames == 32 and cfg.time_patches == 8 and cfg.freq_patches == 2
  w, pt, pf = cfg.width, cfg.patch_time, cfg.patch_freq
  block = 2 * 2 * w + 4 * (w * w + w) + (w * cfg.mlp_dim + cfg.mlp_dim) + (cfg.mlp_dim * w + w)
  want = pt * pf * w + w + cfg.time_patches * cfg.freq_patches * w + block + 2 * w
  assert sum(x.size for x in jax.tree.leaves(params)) == want
  tokens, mask = model.apply({'params': params}, jnp.zeros((3, 1000)), jnp.array([1000, 500, 1]),
                             patch_tokens=True)
  # 1 + 1000 // 128 = 8 frames -> 2 time patches of 4 frames x 2 frequency patches.
  assert tokens.shape == (3, 2 * 2, w)
  # Valid: 8 frames -> 2 time patches; 1 + 500 // 128 = 4 frames -> 1; 1 frame -> 1.
  np.testing.assert_array_equal(np.asarray(mask).sum(1), [4, 2, 2])


def test_spec_augment_masks_per_row_and_only_in_training():
  cfg = _tiny_audio_config(spec_time_masks=2, spec_time_width=6, spec_freq_masks=1,
                           spec_freq_width=4)
  spec = jnp.ones((4, 32, 16))
  frames = jnp.array([32, 32, 10, 32])
  key = jax.random.key(1)
  a = audio_lib.spec_augment(spec, frames, cfg, key, jnp.arange(4))
  b = audio_lib.spec_augment(spec[2:], frames[2:], cfg, key, jnp.arange(2, 4))
  np.testing.assert_array_equal(np.asarray(a[2:]), np.asarray(b))  # A row's masks are its own.
  masked = 1.0 - np.asarray(a)
  assert masked.sum() > 0 and masked.mean() < 0.6
  assert (masked.all(axis=2).sum(axis=1) <= 12).all()  # <= 2 time masks of <= 6 frames.
  model, params = _tower(cfg)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, cfg.max_samples)), jnp.float32)
  n = jnp.array([cfg.max_samples] * 2)
  eval1 = model.apply({'params': params}, x, n)
  train = model.apply({'params': params}, x, n, train=True, rngs={'dropout': key})
  again = model.apply({'params': params}, x, n)
  np.testing.assert_array_equal(np.asarray(eval1), np.asarray(again))
  assert float(jnp.max(jnp.abs(train - eval1))) > 1e-4


def test_bad_audio_config_names_the_field():
  with pytest.raises(ConfigError, match='patch_freq=5 must divide n_mels=16'):
    _tiny_audio_config(patch_freq=5)
  with pytest.raises(ConfigError, match='mel_scale'):
    _tiny_audio_config(mel_scale='bark')


def _write(path: pathlib.Path, x: np.ndarray, rate: int, fmt: str | None = None) -> None:
  soundfile.write(str(path), x, rate, format=fmt)
  path.with_name(path.name.rsplit('.', 1)[0] + '.txt').write_text(f'Clip {path.stem}.\n'
                                                                   'fr.utf8=Un clip.\n')


def test_ingestion_skips_and_reports_planted_bad_audio(tmp_path):
  d = tmp_path / 'in'
  d.mkdir()
  rng = np.random.default_rng(0)
  tone = (0.3 * np.sin(np.arange(24000) * 0.05)).astype(np.float32)
  _write(d / 'good.wav', tone, 16000)
  _write(d / 'good48k.flac', np.stack([tone, tone], 1), 48000)  # Stereo, resampled to 16 kHz.
  _write(d / 'good.ogg', 0.2 * rng.standard_normal(8000).astype(np.float32), 8000)
  _write(d / 'good_desc.ogg', tone[:8000], 16000)  # A Tux Paint spoken description: good.txt.
  _write(d / 'good_desc_fr.ogg', tone[:8000], 16000)  # Another language: not scanned.
  for name, rate, x in (('rate.wav', 2000, tone), ('long.wav', 16000, np.tile(tone, 3)),
                        ('blip.wav', 16000, tone[:100]), ('silent.wav', 16000, 0 * tone)):
    _write(d / name, x, rate)
  cut = io.BytesIO()
  soundfile.write(cut, tone, 16000, format='WAV')
  (d / 'cut.wav').write_bytes(cut.getvalue()[:20000])
  (d / 'cut.txt').write_text('A cut clip.')
  flac = io.BytesIO()
  soundfile.write(flac, tone, 16000, format='FLAC')
  (d / 'cut.flac').write_bytes(flac.getvalue()[:len(flac.getvalue()) // 2])
  (d / 'garbage.ogg').write_bytes(b'OggS' + bytes(300))
  (d / 'garbage.txt').write_text('Garbage.')
  (d / 'nocaption.wav').write_bytes(cut.getvalue())
  meta = prepare.main([f'--audio_dir={d}', f'--out={tmp_path / "out"}', '--workers=1',
                       '--no_progress', '--audio_max_seconds=2.0', '--audio_min_seconds=0.05'])
  assert meta['num_examples'] == meta['num_audio'] == 4
  report = {s['id']: s['reason'] for s in json.loads(
      (tmp_path / 'out' / 'report.json').read_text())['skipped']}
  assert report['rate.wav'].startswith('absurd sample rate: 2000 Hz')
  assert report['long.wav'].startswith('absurd length: 4.500 s')
  assert report['blip.wav'].startswith('absurd length: 0.006 s')
  assert report['silent.wav'] == 'silent audio'
  assert report['cut.wav'].startswith('truncated audio')
  assert report['cut.flac'].startswith('corrupt audio')
  assert report['garbage.ogg'].startswith('corrupt audio')
  assert report['nocaption.wav'] == 'no caption side file'
  assert len(report) == 8
  src = audio_pipeline.AudioRecordSource(tmp_path / 'out')
  clips = {src[i]['id']: src[i] for i in range(len(src))}
  assert clips['good_desc.ogg']['captions'] == ['Clip good.']
  x, rate = audio_io.decode(clips['good48k.flac']['audio'])
  assert rate == 16000 and x.shape == (8000,)


def test_records_without_audio_are_refused(tmp_path):
  (tmp_path / 'metadata.json').write_text(json.dumps({'format': 'mmjax.records.v1',
                                                      'num_audio': 0, 'shards': []}))
  with pytest.raises(ValueError, match='holds no audio clips'):
    audio_pipeline.AudioRecordSource(tmp_path)


def test_synthetic_sounds_are_deterministic_and_captioned():
  a = audio_demo.AudioScenes('train', 10, 8000, seed=3)
  b = audio_demo.AudioScenes('train', 10, 8000, seed=3)
  np.testing.assert_array_equal(a[4]['audio'], b[4]['audio'])
  assert a.caption(4) == a[4]['captions'][0]
  v = audio_demo.AudioScenes('validation', 10, 8000, seed=3)
  assert not np.array_equal(a[0]['audio'][:100], v[0]['audio'][:100])
  assert max(len(a[i]['audio']) for i in range(10)) <= 2 * 8000


def test_audio_kind_trains_exports_and_embeds(tmp_path):
  """A few steps of configs/audio_tiny.py through the CLI, then load_embedder().embed_audio."""
  from configs import audio_tiny, base  # pylint: disable=import-outside-toplevel
  from mmjax.embedder import load_embedder  # pylint: disable=import-outside-toplevel
  from mmjax.train import loop  # pylint: disable=import-outside-toplevel
  config = audio_tiny.get_config()
  config.total_steps, config.eval.every_steps = 2, 2
  config.evals.zero_shot_kind.num_clips = config.evals.zero_shot_pitch.num_clips = 12
  config.evals.retrieval = base.spec('audio_retrieval', num_clips=20)
  config.eval.primary = 'retrieval'
  metrics = loop.train_and_evaluate(config, tmp_path)
  assert 0.0 <= metrics['a2t/recall@1'] <= 1.0 and 'zero_shot_kind/top1' in metrics
  assert 0.0 <= metrics['a2t/order_accuracy'] <= 1.0
  assert kinds.get(config).name == 'audio_text'
  loop.export_checkpoint(config, tmp_path)
  emb = load_embedder(tmp_path)
  clips = [audio_demo.AudioScenes('test', 3, 8000, 0)[i]['audio'] for i in range(3)]
  za = emb.embed_audio(clips + [np.zeros(20_000, np.float32) + 0.1])  # Longer: cropped.
  zt = emb.embed_texts(['a short low tone', 'a long train of high clicks'])
  assert za.shape == (4, 32) and zt.shape == (2, 32)
  np.testing.assert_allclose(np.linalg.norm(za, axis=1), 1.0, rtol=1e-5)
  with pytest.raises(TypeError, match='list of clips'):
    emb.embed_audio(clips[0])


@pytest.mark.parametrize('name', ['audio_demo', 'audio_tiny'])
@pytest.mark.parametrize('num_devices', [1, 8])
def test_audio_configs_validate_and_refuse_bad_values(name, num_devices):
  from mmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(__file__).parents[1] / 'configs' / f'{name}.py'
  config = config_lib.load_config_file(path)
  config_lib.validate(config, num_devices=num_devices)
  cfg = kinds.get(config).model_config(config)
  assert type(cfg).from_dict(cfg.to_dict()) == cfg
  config.data.audio.source = 'records'
  with pytest.raises(ConfigError, match='config.data.audio.path is empty'):
    config_lib.validate(config, num_devices=num_devices)
  config.data.audio.source, config.model.audio.patch_freq = 'synthetic', 7
  with pytest.raises(ConfigError, match='config.model.audio: patch_freq=7 must divide'):
    config_lib.validate(config, num_devices=num_devices)
