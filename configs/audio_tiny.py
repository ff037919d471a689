r"""Audio tiny: the smallest audio-text model, for tests and smoke runs (seconds on one core).

Run:
  python -m mmjax.main --config=configs/audio_tiny.py --workdir=runs/audio_tiny
"""

from configs import audio_demo


def get_config():
  c = audio_demo.get_config()
  c.batch_size = 16
  c.total_steps = 4
  c.log_every_steps = 2
  c.model.embed_dim = 32
  a = c.model.audio
  a.max_seconds, a.n_mels, a.patch_freq = 1.0, 16, 8
  a.width, a.depth, a.num_heads, a.mlp_dim = 32, 1, 2, 64
  c.model.text.width, c.model.text.depth = 32, 1
  c.model.text.num_heads, c.model.text.mlp_dim = 2, 64
  c.optimizer.warmup_steps = 1
  c.data.audio.num_train_clips = 1000
  c.data.read_threads = 1
  c.checkpoint.every_steps = 2
  c.eval.every_steps = 4
  c.eval.batch_size = 32
  c.evals.zero_shot_kind.num_clips = 20
  c.evals.zero_shot_pitch.num_clips = 20
  return c
