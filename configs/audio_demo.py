r"""Audio demo: a small CLAP-style audio-text dual encoder (log-mel front end + AST-style ViT,
bidirectional text transformer, InfoNCE) trained on synthetic captioned sounds, on CPU.

Run:
  python -m mmjax.main --config=configs/audio_demo.py --workdir=runs/audio_demo

The clips (mmjax.data.audio_demo) are one or two sound events in sequence, each a steady, rising
or falling tone, a burst of noise or a train of clicks, low / middle / high, short / long:
"a long high tone falling, then a short burst of low noise". The validation pairs have distinct
captions (chance R@1 = 1 / 500). Measured results: docs/modalities.md.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.batch_size = 128
  c.total_steps = 400
  c.model.kind = 'audio_text'
  c.model.embed_dim = 128

  # 8 kHz, up to 2 s: 126 frames of 32 ms (hop 16 ms) x 32 mel bins -> 16 x 4 patches of 8 x 8.
  a = c.model.audio
  a.sample_rate, a.max_seconds = 8000, 2.0
  a.n_fft, a.hop_length, a.n_mels = 256, 128, 32
  a.patch_time, a.patch_freq = 8, 8
  a.width, a.depth, a.num_heads, a.mlp_dim = 96, 3, 4, 384
  a.spec_time_masks, a.spec_time_width = 1, 8
  a.spec_freq_masks, a.spec_freq_width = 1, 4

  c.model.text.max_len = 24  # The longest caption (two events) is 15 tokens with EOS.
  c.model.text.vocab_size = 256
  c.model.text.width = 96
  c.model.text.depth = 2
  c.model.text.num_heads = 4
  c.model.text.mlp_dim = 384
  c.model.text.causal = False
  c.model.text.pool = 'mean'
  c.tokenizer.vocab_size = 256

  c.loss.kind = 'softmax'
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 40
  c.optimizer.weight_decay = 1e-4

  c.data.audio.source = 'synthetic'
  c.data.audio.num_train_clips = 50_000
  c.log_every_steps = 20
  c.checkpoint.every_steps = 100
  c.eval.every_steps = 200
  c.eval.batch_size = 250
  c.evals.zero_shot_kind = base.spec('audio_zero_shot', attribute='kind')
  c.evals.zero_shot_pitch = base.spec('audio_zero_shot', attribute='pitch')
  return c
