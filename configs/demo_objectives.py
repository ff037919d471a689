r"""The demo dual encoder with every objective of docs/objectives.md: contrastive (InfoNCE) +
image-text matching on sampled hard negatives (ITM, ALBEF/BLIP) + captioning (CoCa), and the
two-stage retrieval evaluation (embedding top-10 re-scored by the ITM head).

Run:
  python -m mmjax.main --config=configs/demo_objectives.py --workdir=runs/demo_objectives
Off/on comparisons (what bench/objectives.py runs): --config.loss.itm_weight=0
--config.model.itm.depth=0 (and drop the rerank evaluator: --config.evals=...), or
--config.loss.caption_weight=0 --config.model.caption.depth=0. Measured in BENCHMARKS.md,
"Objectives: contrastive / +ITM / +captioning".
"""

from configs import base, demo


def get_config():
  c = demo.get_config()
  c.model.itm.depth = 1  # Fusion blocks at the text width (96); ALBEF has 6, 1 fits a CPU budget.
  c.model.itm.num_heads = 4
  c.model.caption.depth = 1  # Causal decoder blocks cross-attending to the 8x8 image tokens.
  c.model.caption.num_heads = 4
  c.loss.itm_weight = 1.0
  c.loss.caption_weight = 1.0  # CoCa: 2 x caption + 1 x contrastive at scale; 1 here.
  c.evals.rerank = base.spec('rerank', k=10)
  return c
