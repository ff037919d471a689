"""The run-level groups: loss, optimizer, transfer, tokenizer, parallelism, health, checkpoints
and evaluation.

Part of `mmjax.schema` (data: imports nothing of mmjax); each function adds its group to `c`.
"""

import ml_collections


def add_loss(c: ml_collections.ConfigDict) -> None:
  """config.loss: the contrastive loss and the terms beside it."""
  # --- Loss ------------------------------------------------------------------------------------
  c.loss = ml_collections.ConfigDict()
  c.loss.kind = 'sigmoid'  # 'sigmoid' (SigLIP) | 'softmax' (symmetric InfoNCE, CLIP).
  # Initial log-temperature t' (temperature = exp(t')). None: log(10) for sigmoid, log(1/0.07)
  # for softmax. The bias b (sigmoid only) starts at bias_init (SigLIP: -10).
  c.loss.temperature_init = ml_collections.config_dict.placeholder(float)
  c.loss.bias_init = -10.0
  # How the loss spans devices: 'auto' ('ring' for sigmoid, 'all_gather' for softmax, 'dense' on
  # one batch shard) | 'ring' (sigmoid: text blocks circulate, O(b^2) memory per device) |
  # 'all_gather' (each device: its rows vs the gathered other tower, O(b*B)) | 'dense' (the
  # global [B, B] logits; the reference). b = batch_size / (data x fsdp).
  c.loss.impl = 'auto'
  # Robust loss for noisy pairs: each step, this fraction of the batch whose image and caption
  # agree least (lowest positive similarity = highest positive-pair loss) is left out of the loss.
  c.loss.drop_noisy_fraction = 0.0
  # Weights of the terms on token outputs beside the contrastive loss (0: off; docs/objectives.md):
  # ITM on the positives and on one hard negative text per image and one image per text, drawn
  # ∝ softmax of the in-batch similarities over the global batch (duplicates by `group` left
  # out); CoCa's captioning NLL. Both stay exact under GradCache and across devices.
  c.loss.itm_weight = 0.0
  c.loss.caption_weight = 0.0


def add_optimizer(c: ml_collections.ConfigDict) -> None:
  """config.optimizer: AdamW, the schedule, frozen parameters."""
  # --- Optimizer -------------------------------------------------------------------------------
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3  # Peak learning rate, reached after warmup.
  c.optimizer.warmup_steps = 100  # Linear warmup from 0.
  c.optimizer.schedule = 'cosine'  # After warmup: 'cosine' (to end_lr_ratio) | 'constant'.
  c.optimizer.end_lr_ratio = 0.0  # Final learning rate as a fraction of the peak.
  c.optimizer.weight_decay = 1e-4  # Decoupled (AdamW) weight decay on matrices only.
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.grad_clip_norm = 1.0  # Global-norm gradient clipping; 0 disables it.
  # Parameters whose path ('txt/encoder/block0/attn/query/kernel') matches this regex (re.search)
  # are frozen: no update, no optimizer state. '' freezes nothing. Locked towers are added.
  c.optimizer.frozen = ''
  # (regex, multiplier) pairs: the learning rate of matching parameters is scaled (first match
  # wins), e.g. (('txt/.*', 0.1),).
  c.optimizer.lr_multipliers = ()


def add_init(c: ml_collections.ConfigDict) -> None:
  """config.init: towers started from released checkpoints."""
  # --- Transfer (docs/pretrained.md) -----------------------------------------------------------
  # Start a tower from a released checkpoint: 'hf:DIR' (config.json + model.safetensors) or
  # 'hf:pkg:MODULE/sub/dir' inside an installed package. The tower's config must match the
  # checkpoint (the error lists the fields to set). '' initialises it randomly. The LLM embedder
  # takes a CLIP/SigLIP vision tower as its ViT (init.image; no text tower: init.text is refused).
  c.init = ml_collections.ConfigDict()
  c.init.image = ''
  c.init.text = ''
  # LLM embedder: the decoder from a local Llama/Qwen2 checkpoint ('hf:DIR'); model.decoder must
  # match it (`python -m mmjax.hf DIR` prints the overrides). Its tokenizer is loaded with it.
  c.init.decoder = ''


def add_distill_multitask(c: ml_collections.ConfigDict) -> None:
  """config.distill / multitask: distillation and the balancing of several terms."""
  # --- Distillation and multi-task (docs/pretrained.md) ---------------------------------------
  c.distill = ml_collections.ConfigDict()
  c.distill.weight = 0.0  # Weight of the distillation term next to the contrastive loss; 0: off.
  # 'kl': teacher vs student in-batch similarity distributions (dimensions may differ) |
  # 'regression': 1 - cos(student, teacher) per role (equal dimensions) | 'both' (summed).
  c.distill.kind = 'kl'
  c.distill.temperature = 20.0  # KL: scale of teacher and student cosines (1/tau), > 0.
  # 'data': teacher embeddings precomputed into the data (`python -m mmjax.data.teacher_embed`)
  # | 'live': the frozen teacher runs on each batch (its own tokenizer; no gradient/state).
  c.distill.source = 'data'
  c.distill.teacher = ''  # 'hf:DIR' (a Hugging Face checkpoint) or an mmjax export / workdir.
  c.distill.embeddings = ''  # source='data': the directory teacher_embed writes (source_<i>.npz).
  c.multitask = ml_collections.ConfigDict()
  # (task, weight) pairs combined in one step, tasks from 'contrastive' (the run's loss between
  # model.contrastive_roles), 'text_text' (the same loss between 'query' and 'text': a second
  # caption of the image, or the query of text-text pairs) and 'distill'. () = contrastive
  # (+ distill.weight x distill).
  c.multitask.tasks = ()
  # 'static': sum of weight x loss | 'uncertainty': learned log-variances s (Kendall et al.),
  # sum 0.5 (exp(-s) loss + s), started at the given weights; s are trained params ('multitask')
  # | 'gradnorm': each step, weights that give every term's gradient (w.r.t. the towers' output
  # embeddings) a norm in the proportions of the given weights (GradNorm-style, closed form)
  # | 'loss_ratio': each step, weights that make every weighted loss proportional to its given
  # weight (losses divided by their own detached value). docs/training.md, "Balancing losses".
  c.multitask.weighting = 'static'
  # Log 'grad_norm/<task>' (||dL_task / d embeddings|| over the global batch) and
  # 'grad_share/<task>' (its share of the weighted sum) every step: which objective dominates.
  # Also for a single contrastive term. One extra backward pass of each loss (not the towers).
  c.multitask.log_grad_norms = False


def add_tokenizer(c: ml_collections.ConfigDict) -> None:
  """config.tokenizer."""
  # --- Tokenizer -------------------------------------------------------------------------------
  c.tokenizer = ml_collections.ConfigDict()
  # '' trains a WordPiece tokenizer on the run's captions at start-up (bitwise reproducible;
  # saved to the workdir so a resumed run uses the same one); otherwise a local tokenizer.json
  # or a directory holding one, a SentencePiece *.model, or CLIP's bpe_simple_vocab_16e6.txt.gz
  # (docs/data.md#tokenizers).
  c.tokenizer.path = ''
  c.tokenizer.vocab_size = 1024  # Size of the trained vocabulary (when path is '').


def add_parallelism(c: ml_collections.ConfigDict) -> None:
  """config.mesh, logical_axis_rules and distributed: where things run."""
  # --- Parallelism -----------------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Data-parallel axis; -1 takes all devices left over by the other axes.
  c.mesh.fsdp = 1  # Fully sharded data parallel (parameters and optimizer state sharded).
  c.mesh.tensor = 1  # Tensor parallel (attention heads / MLP hidden sharded).
  # Logical axis name -> mesh axis (or None: replicated). Parameters and activations name their
  # axes; this table decides where they live.
  c.logical_axis_rules = (
      ('batch', ('data', 'fsdp')),
      ('embed', 'fsdp'),
      ('mlp', 'tensor'),
      ('heads', 'tensor'),
      ('kv', None),
      ('vocab', 'tensor'),
      ('length', None),
      ('patch', None),
  )

  # --- Multi-process (multi-host) ---------------------------------------------------------------
  c.distributed = ml_collections.ConfigDict()
  # '' : one process. 'host:port' : address of process 0's coordinator service (every process
  # gets the same value plus its own process_id). 'auto' : let jax.distributed detect the cluster
  # (Cloud TPU, SLURM, Open MPI, Kubernetes); num_processes/process_id are then ignored.
  c.distributed.coordinator_address = ''
  c.distributed.num_processes = 1
  c.distributed.process_id = 0
  c.distributed.timeout_s = 300  # How long processes wait for each other at start-up.
  # A process that stops sending heartbeats for this long (killed, host lost) is declared dead
  # by the coordinator, and every other process then exits non-zero instead of hanging in a
  # collective (jax.distributed's heartbeat; docs/scaling.md, "Dead peers").
  c.distributed.heartbeat_timeout_s = 100
  # How long a process exiting normally waits at the shutdown barrier for the others.
  c.distributed.shutdown_timeout_s = 300
  # CPU-only runs: the cross-process collectives library ('gloo'; 'mpi' needs an MPI install).
  c.distributed.cpu_collectives = 'gloo'


def add_health(c: ml_collections.ConfigDict) -> None:
  """config.health: the training-health statistics and warnings."""
  # --- Training health (mmjax/train/health.py; docs/training.md) ------------------------------
  c.health = ml_collections.ConfigDict()
  # Alignment / uniformity (Wang & Isola), effective rank and cross-tower cosine statistics of
  # `rows` evenly spaced rows of each global batch, computed in the train step and logged as
  # train/health/...; 0 turns them off (the loss-plateau warning stays).
  c.health.rows = 256
  # A console warning when a condition holds for this many consecutive train log points:
  c.health.patience = 5
  # the loss within this fraction of its collapse value (sigmoid ~ln B + 1, InfoNCE ln B);
  c.health.plateau_tolerance = 0.1
  # a tower's effective rank below this, or its uniformity above max_uniformity (0 = one point);
  c.health.min_effective_rank = 2.0
  c.health.max_uniformity = -0.1
  # the standard deviation of the batch's cross-tower cosines below this (all pairs alike).
  c.health.min_cosine_std = 0.02


def add_checkpoint(c: ml_collections.ConfigDict) -> None:
  """config.checkpoint."""
  # --- Checkpoints -----------------------------------------------------------------------------
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 200  # Save this often (and always at the last step).
  c.checkpoint.keep = 3  # Most recent checkpoints kept.
  c.checkpoint.async_save = True  # Write in a background thread while training continues.


def add_eval(c: ml_collections.ConfigDict) -> None:
  """config.eval / evals: the evaluators."""
  # --- Evaluation ------------------------------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 500  # Retrieval eval on the validation split this often and at the end.
  c.eval.num_scenes = 1000  # Validation scenes (half of them in one-attribute near-duplicate pairs).
  c.eval.batch_size = 256  # Embedding batch (padded for the last partial batch).
  c.eval.seed = 1234  # Which validation scenes are drawn.
  # Metrics of this validation retrieval eval: recall|precision|ndcg@K, map, mrr, median_rank.
  c.eval.metrics = ('recall@1', 'recall@5', 'recall@10', 'mrr', 'median_rank')
  c.eval.num_composed = 500  # LLM embedder: composed (image + edit) queries of the eval split.
  c.eval.index_min_corpus = 100_000  # Corpora this large or larger are searched with ScaNN.
  # ScaNN index parameters; 0 derives them from the corpus size (mmjax.index.default_params).
  c.eval.index_num_leaves = 0
  c.eval.index_num_leaves_to_search = 0
  c.eval.index_reorder = 0
  # The primary evaluation: the evaluator whose results are the printed table, eval.json's
  # top-level keys (no prefix), the chance level and eval/i2t/... in metrics.jsonl. 'demo' is the
  # one of the fields above (the demo validation scenes); any other value names a config.evals
  # entry. '' chooses: 'demo' when the run trains on the demo only, else its one config.evals
  # entry on a held-out records/TFDS split ('demo' if it has none; several: set this field).
  # The demo evaluator runs beside a primary of real data only when the data includes the demo.
  c.eval.primary = ''
  # More evaluators, by name: each is `mmjax.eval.specs.spec(type, **fields)` with type
  # 'retrieval' | 'zero_shot' | 'linear_probe' | 'robustness' | 'llm_retrieval', its own
  # every_steps (0: the eval.every_steps above), dataset and metrics (docs/eval.md lists every
  # field). Their results go to metrics.jsonl / TensorBoard as eval/<name>/... and to eval.json
  # as <name>/... (the primary's also without the prefix). The name 'demo' is taken
  # (eval.primary).
  c.evals = ml_collections.ConfigDict()
