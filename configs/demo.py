r"""Demo: a small CLIP-style (InfoNCE) dual encoder trained on the embedded procedural scenes,
on CPU.

Run:
  python -m mmjax.main --config=configs/demo.py --workdir=runs/demo
(or `make demo`; another seed: `make demo ARGS=--config.seed=1`). 800 steps at ~0.51 s/step
measured on 2 quiet CPU cores (~7 minutes of training); README shows the measured table of seeds 0-2.

The loss is the softmax (InfoNCE) one, not SigLIP's sigmoid. With the sigmoid loss at batch 128
(bias -10, temperature 10) this recipe stayed on the collapse plateau (loss ~ ln B + 1) for most
of its 400 steps in mmjax *and* in open_clip trained on bitwise the same batches
(bench/peer_openclip.py; BENCHMARKS.md): R@1 <= 0.006 in both, so the recipe was at fault, not
the implementation. With the initialisation fixed (text positions std 0.01, LeCun patch kernel)
InfoNCE leaves its plateau (ln B) by step 40-60 and reaches R@1 0.47-0.51 (i2t) and 0.40-0.45 (t2i)
on seeds 0, 1, 2; zero-shot colour 1.00, zero-shot shape 0.12-0.17, still near chance. The stem,
the shape negatives and the text-text term below lift zero-shot shape to 0.37-0.42 and R@1 to
0.60-0.77 at step 800 (README).
"""

from configs import base


def get_config():
  c = base.get_config()
  # 64 scenes + one shape-swapped copy of each (rendered: image and caption; below) = 128 images.
  c.batch_size = 64
  c.total_steps = 800

  c.model.embed_dim = 128
  c.model.image.image_size = 32
  c.model.image.patch_size = 1
  # A hybrid front end: two 3x3 convs at full resolution, each followed by a 2x2 max pool, so
  # the 1-pixel patches form an 8x8 grid as before. Max pooling after full-resolution convs is
  # what lets the tower see a 5 px shape (bench/shape_supervised.py: plain patch-4 ViT 0.135,
  # this stem 0.520 supervised shape accuracy after 300 steps; stride-2 stems 0.22-0.29).
  c.model.image.stem_channels = (32, 64)
  c.model.image.stem_downsample = 'maxpool'
  c.model.image.width = 96
  c.model.image.depth = 3
  c.model.image.num_heads = 4
  c.model.image.mlp_dim = 384
  c.model.text.max_len = 56  # The longest demo caption (4 objects) is 55 tokens with EOS.
  c.model.text.vocab_size = 512
  c.model.text.width = 96
  c.model.text.depth = 2
  c.model.text.num_heads = 4
  c.model.text.mlp_dim = 384
  # Bidirectional text with mean pooling: in one trial it left SigLIP's initial plateau (loss
  # ~5.85) before step 100, where causal last-token pooling (lr 2e-3) had not; at a budget of a
  # few hundred CPU steps that matters. Causal/last is what configs/tiny.py and the tests use.
  c.model.text.causal = False
  c.model.text.pool = 'mean'
  c.tokenizer.vocab_size = 512

  # Symmetric InfoNCE, temperature from 1/0.07 (learned). SigLIP's bias init of -10 is about
  # -ln B for B = 32k; at B = 128 neither mmjax nor open_clip left the sigmoid plateau in time.
  c.loss.kind = 'softmax'
  # Shape is learned only with both of these (README, "Why zero-shot shape now rises"):
  # - one hard negative per scene, the same scene with one object's shape changed, so shape is
  #   what tells a row from its negative (in-batch negatives differ in colour/position anyway);
  # - a text-text term (a second caption of each image against the captions, with the
  #   shape-swapped caption as its hard negative): it makes the text tower separate shape words
  #   on its own, which breaks the saddle where neither tower encodes shape because the other
  #   does not (with the negatives alone, shape stayed at chance by step 400).
  c.data.negatives = 'shape'
  c.data.num_hard_negatives = 1
  c.multitask.tasks = (('contrastive', 1.0), ('text_text', 1.0))

  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 40
  c.optimizer.weight_decay = 1e-4

  c.log_every_steps = 20
  c.checkpoint.every_steps = 100
  c.eval.every_steps = 200
  c.eval.num_scenes = 1000
  # Zero-shot shape and colour of one-object scenes, and 10-shot ridge probes (docs/eval.md).
  # The robustness report runs apart: python -m mmjax.eval.robustness --config=... --workdir=...
  c.evals.zero_shot_shape = base.spec('zero_shot', attribute='shape')
  c.evals.zero_shot_colour = base.spec('zero_shot', attribute='colour')
  c.evals.probe_shape = base.spec('linear_probe', attribute='shape', shots=10)
  c.evals.probe_colour = base.spec('linear_probe', attribute='colour', shots=10)
  # k-means of the one-object scenes' image embeddings (NMI / ARI / AMI against the labels) and
  # MMEB-style grounding: referring expression -> the object's crop among the scene's objects.
  c.evals.cluster_shape = base.spec('clustering', attribute='shape')
  c.evals.cluster_colour = base.spec('clustering', attribute='colour')
  c.evals.grounding = base.spec('grounding')
  return c
