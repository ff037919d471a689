r"""The base config: every field mmjax reads, each commented once. Other configs start from it.

Run:
  python -m mmjax.main --config=configs/base.py --workdir=runs/base

Any field can be overridden on the command line, e.g. `--config.batch_size=512
--config.model.image.depth=12`. The config is locked: a key not listed here is an error.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.seed = 0  # Seeds parameter init, dropout and the data order.
  c.batch_size = 256  # Global batch (pairs per step), summed over all devices and processes.
  c.total_steps = 1000  # Optimizer steps of the whole run.
  c.log_every_steps = 50  # Train metrics go to metrics.jsonl / TensorBoard this often.

  # --- Model -----------------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.embed_dim = 256  # Size of the shared, L2-normalised embedding space.
  c.model.head = 'linear'  # Projection head of both towers: 'linear' | 'mlp' | 'none'.
  c.model.dtype = 'float32'  # Compute dtype of the towers ('bfloat16' on TPU/GPU).
  c.model.param_dtype = 'float32'  # Storage dtype of the parameters and optimizer state.

  c.model.image = ml_collections.ConfigDict()
  c.model.image.image_size = 64  # Square input resolution in pixels.
  c.model.image.patch_size = 8  # Patch side; image_size must be a multiple of it.
  c.model.image.width = 256  # Transformer width.
  c.model.image.depth = 6  # Number of transformer blocks.
  c.model.image.num_heads = 4  # Attention heads; width must be a multiple of it.
  c.model.image.mlp_dim = 1024  # Hidden size of the MLP in each block.
  c.model.image.posemb = 'learn'  # Position embedding: 'learn' | 'sincos2d'.
  c.model.image.pool = 'gap'  # Pooling: 'cls' | 'gap' (mean over patches) | 'map' (attention).
  c.model.image.dropout = 0.0  # Dropout rate inside the blocks (train mode only).
  c.model.image.remat = False  # Recompute each block's activations in the backward pass.

  c.model.text = ml_collections.ConfigDict()
  c.model.text.max_len = 32  # Tokens per caption, EOS included; longer captions are truncated.
  c.model.text.vocab_size = 32_000  # Embedding rows; must be >= the tokenizer's vocabulary.
  c.model.text.width = 256
  c.model.text.depth = 6
  c.model.text.num_heads = 4
  c.model.text.mlp_dim = 1024
  c.model.text.causal = True  # Causal (GPT/CLIP-style) or bidirectional (BERT-style) attention.
  c.model.text.pool = 'last'  # 'last' (EOS token, by mask) | 'first' | 'mean' | 'map'.
  c.model.text.dropout = 0.0
  c.model.text.remat = False

  # --- Loss ------------------------------------------------------------------------------------
  c.loss = ml_collections.ConfigDict()
  c.loss.kind = 'sigmoid'  # 'sigmoid' (SigLIP) | 'softmax' (symmetric InfoNCE, CLIP).
  # Initial log-temperature t' (temperature = exp(t')). None: log(10) for sigmoid, log(1/0.07)
  # for softmax. The bias b (sigmoid only) starts at bias_init (SigLIP: -10).
  c.loss.temperature_init = ml_collections.config_dict.placeholder(float)
  c.loss.bias_init = -10.0

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

  # --- Data ------------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.name = 'demo'  # Training source: 'demo' (procedural scenes shipped with mmjax).
  c.data.num_train_examples = 200_000  # Size of one epoch of the demo source (scenes are rendered on the fly).
  c.data.num_workers = 0  # Grain worker processes (0: decode in the main process).
  c.data.worker_buffer_size = 2  # Batches each worker prepares ahead.
  c.data.read_threads = 2  # Threads reading/transforming elements per process.

  # --- Tokenizer -------------------------------------------------------------------------------
  c.tokenizer = ml_collections.ConfigDict()
  # '' trains a WordPiece tokenizer on the demo captions at start-up (saved to the workdir so a
  # resumed run uses the same one); otherwise a local tokenizer.json or a directory holding one.
  c.tokenizer.path = ''
  c.tokenizer.vocab_size = 1024  # Size of the trained vocabulary (when path is '').

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

  # --- Checkpoints -----------------------------------------------------------------------------
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 200  # Save this often (and always at the last step).
  c.checkpoint.keep = 3  # Most recent checkpoints kept.
  c.checkpoint.async_save = True  # Write in a background thread while training continues.

  # --- Evaluation ------------------------------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 500  # Retrieval eval on the validation split this often and at the end.
  c.eval.num_scenes = 1000  # Validation scenes (half of them in one-attribute near-duplicate pairs).
  c.eval.batch_size = 256  # Embedding batch (padded for the last partial batch).
  c.eval.seed = 1234  # Which validation scenes are drawn.
  # Metrics of this validation retrieval eval: recall|precision|ndcg@K, map, mrr, median_rank.
  c.eval.metrics = ('recall@1', 'recall@5', 'recall@10', 'mrr', 'median_rank')
  c.eval.index_min_corpus = 100_000  # Corpora this large or larger are searched with ScaNN.
  # ScaNN index parameters; 0 derives them from the corpus size (mmjax.index.default_params).
  c.eval.index_num_leaves = 0
  c.eval.index_num_leaves_to_search = 0
  c.eval.index_reorder = 0
  # More evaluators, by name: each is `mmjax.eval.specs.spec(type, **fields)` with type
  # 'retrieval' | 'zero_shot' | 'linear_probe' | 'robustness', its own every_steps (0: the
  # eval.every_steps above), dataset and metrics (docs/eval.md lists every field). Their results
  # go to metrics.jsonl / TensorBoard as eval/<name>/... and to eval.json as <name>/....
  c.evals = ml_collections.ConfigDict()

  return c
