r"""The config schema: every field mmjax reads, each commented once, with its default.

It is data (it imports nothing of mmjax), so every layer may read it; `mmjax.config` validates a
run config against it. Config files start from it through `configs/base.py`:
  python -m mmjax.main --config=configs/base.py --workdir=runs/base

Any field can be overridden on the command line, e.g. `--config.batch_size=512
--config.model.image.depth=12`. The config is locked: a key not listed here is an error.
"""

import ml_collections

from mmjax.schema import data, model, run


def get_config() -> ml_collections.ConfigDict:
  """The whole schema: the top-level fields here, each group added by its function in
  schema/model.py, schema/data.py and schema/run.py; the call order is the key order."""
  c = ml_collections.ConfigDict()

  c.seed = 0  # Seeds parameter init, dropout and the data order.
  c.batch_size = 256  # Global batch (pairs per step), summed over all devices and processes.
  # GradCache: each device's share of the batch is embedded in this many micro-batches, so the
  # activation memory is that of batch_size / (data x fsdp x micro_batches) pairs; loss and
  # gradients stay exactly those of the whole batch (costs one extra forward pass).
  c.micro_batches = 1
  c.total_steps = 1000  # Optimizer steps of the whole run.
  c.log_every_steps = 50  # Train metrics go to metrics.jsonl / TensorBoard this often.
  # Persistent XLA compilation cache, so a repeated or resumed run loads its compiled steps
  # instead of compiling them (mmjax.train.compile_cache): 'user' ($MMJAX_CACHE_DIR, else
  # $XDG_CACHE_HOME/mmjax or ~/.cache/mmjax, then jax/), 'workdir' (WORKDIR/jax_cache), a
  # directory path, or '' (off).
  c.compilation_cache = 'user'
  c.compilation_cache_min_compile_s = 1.0  # Programs compiling faster than this are not cached.
  # XLA:CPU only: schedule for memory instead of concurrency (XLA_FLAGS
  # --xla_cpu_enable_concurrency_optimized_scheduler=false, set by mmjax.main before the backend
  # starts); bench-tiny train step: 23% less temp memory, and remat then saves memory.
  c.cpu_memory_scheduler = False

  model.add_model(c)
  model.add_image_tower(c)
  model.add_text_tower(c)
  model.add_audio_tower(c)
  model.add_token_heads(c)
  model.add_llm_embedder(c)
  run.add_loss(c)
  run.add_optimizer(c)
  data.add_sources(c)
  data.add_preprocessing(c)
  data.add_kind_data(c)
  run.add_init(c)
  run.add_distill_multitask(c)
  run.add_tokenizer(c)
  run.add_parallelism(c)
  run.add_health(c)
  run.add_checkpoint(c)
  run.add_eval(c)
  return c
