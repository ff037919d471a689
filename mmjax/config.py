"""Run-config validation, early and in one place (the layer just below the trainer).

Every run goes through `validate(config)` before any compute: an unknown key (against
`mmjax.schema`), a wrong type or an impossible value stops the run with a message that names the
key and the value. Layers never see the ConfigDict: `mmjax.kinds` translates it into the frozen
dataclasses of `mmjax.types` (re-exported here for existing callers).
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import jax
import ml_collections

from mmjax import kinds, schema
from mmjax.eval import specs
from mmjax.parallel.mesh import mesh_shape
# Re-exported: the typed configs and ConfigError lived here before mmjax.types.
from mmjax.types import (ENCODER_REMAT_POLICIES, MESH_AXES, REMAT_POLICIES,  # noqa: F401
                         ConfigError, DecoderConfig, LoraConfig, ModelConfig, TextConfig, TransformerConfig, ViTConfig,
                         lists_to_tuples, require)
from mmjax.data import augment, demo

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
model_config = kinds.dual_encoder_config  # The typed config of a two_tower run config.

__all__ = [  # With the mmjax.types names re-exported for old callers.
    'REPO_ROOT', 'model_config', 'IMAGE_POOLS', 'TEXT_POOLS', 'LOSSES', 'HEADS', 'STEM_DOWNSAMPLE',
    'DTYPES', 'POSEMBS', 'SCHEDULES', 'DATASETS', 'LOSS_IMPLS', 'CPU_COLLECTIVES', 'NORMS',
    'ACTIVATIONS', 'load_config_file', 'base_config', 'SOURCE_FIELDS', 'validate_schema',
    'validate', 'DISTILL_KINDS', 'DISTILL_SOURCES', 'TASKS', 'WEIGHTINGS', 'ENCODER_REMAT_POLICIES',
    'MESH_AXES', 'REMAT_POLICIES', 'ConfigError', 'DecoderConfig', 'LoraConfig', 'ModelConfig',
    'TextConfig', 'TransformerConfig', 'ViTConfig', 'lists_to_tuples', 'require']


IMAGE_POOLS = ('cls', 'gap', 'map')
TEXT_POOLS = ('last', 'first', 'mean', 'map')
LOSSES = ('sigmoid', 'softmax')
HEADS = ('linear', 'mlp', 'none')
STEM_DOWNSAMPLE = ('', 'maxpool', 'stride')
DTYPES = ('float32', 'bfloat16', 'float16')
POSEMBS = ('learn', 'sincos2d')
SCHEDULES = ('cosine', 'constant')
DATASETS = ('demo', 'records', 'tfds')
LOSS_IMPLS = ('auto', 'dense', 'all_gather', 'ring')
CPU_COLLECTIVES = ('gloo', 'mpi')
NORMS = ('pre', 'post')
ACTIVATIONS = ('gelu_tanh', 'gelu', 'quick_gelu', 'relu')


def load_config_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
  """Loads `get_config()` from a config file, the way `config_flags` does (for notebooks/tests)."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f'_mmjax_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def base_config() -> ml_collections.ConfigDict:
  return schema.get_config()


# ---------------------------------------------------------------------------------------------
# Validation.


def _check_schema(config, schema, prefix: str = '') -> None:
  """Every key of `config` exists in the base schema, with a compatible type."""
  for key in config.keys():
    name = f'{prefix}{key}'
    if key not in schema:
      known = ', '.join(sorted(schema.keys()))
      raise ConfigError(
          f'Unknown config key config.{name}={config[key]!r}. Known keys here: {known}.')
    value, ref = config[key], schema[key]
    if name == 'evals':  # Free names; each entry is checked against its type by eval.specs.
      continue
    if isinstance(ref, ml_collections.ConfigDict):
      if not isinstance(value, (ml_collections.ConfigDict, dict)):
        raise ConfigError(f'config.{name} must be a group of fields, got {value!r}.')
      _check_schema(value, ref, prefix=f'{name}.')
      continue
    ref_type = _field_type(schema, key)
    if value is None or ref_type is None:
      continue
    ok = isinstance(value, ref_type) and not (ref_type is int and isinstance(value, bool))
    if ref_type is float and isinstance(value, int) and not isinstance(value, bool):
      ok = True
    if not ok:
      raise ConfigError(
          f'config.{name}={value!r} has type {type(value).__name__}, expected {ref_type.__name__}.')


def _field_type(schema, key):
  ref = schema[key]
  field = schema._fields[key]  # pylint: disable=protected-access
  if isinstance(field, ml_collections.FieldReference):
    return field.get_type()
  if ref is None:
    return None
  if isinstance(ref, (tuple, list)):
    return (tuple, list)
  return type(ref)


_require = require  # The one check-and-raise of every validator.

def _one_of(name: str, value, choices) -> None:
  _require(value in choices, f'config.{name}={value!r} is not one of {", ".join(map(repr, choices))}.')


def _positive(name: str, value) -> None:
  _require(value > 0, f'config.{name}={value!r} must be > 0.')


SOURCE_FIELDS = ('name', 'path', 'tfds_name', 'split', 'image_key', 'captions_key', 'group_key',
                 'keep', 'negatives', 'weight', 'temperature')


def _validate_data(config) -> None:
  """The `data` block: sources (single or mixture), sub-batches, transforms (docs/data.md)."""
  data = config.data
  augment.validate_config(data, ConfigError)  # Image and augmentation keys.
  _require(data.num_hard_negatives >= 0,
           f'config.data.num_hard_negatives={data.num_hard_negatives} must be >= 0.')
  _require(0.0 <= data.max_skip_fraction <= 1.0,
           f'config.data.max_skip_fraction={data.max_skip_fraction} must be in [0, 1].')
  _require(data.sub_batches >= 0, f'config.data.sub_batches={data.sub_batches} must be >= 0.')
  _require(not data.sub_batches or config.batch_size % data.sub_batches == 0,
           f'config.data.sub_batches={data.sub_batches} does not divide '
           f'config.batch_size={config.batch_size}.')
  _require(data.mixture_temperature >= 0,
           f'config.data.mixture_temperature={data.mixture_temperature} must be >= 0 (0: the '
           'mixture weights are the proportions).')
  temps = [dict(m).get('temperature', 0.0) or data.mixture_temperature for m in data.mixture]
  _require(all(temps) or not any(temps),
           f'config.data.mixture temperatures {temps} (a source\'s own, else '
           'data.mixture_temperature) must all be 0 or all be > 0.')
  sources = [(f'data.mixture[{i}]', dict(m)) for i, m in enumerate(data.mixture)] or [
      ('data', {k: data[k] for k in SOURCE_FIELDS if k in data})]
  for where, src in sources:
    unknown = set(src) - set(SOURCE_FIELDS)
    _require(not unknown, f'config.{where} has unknown field(s) {sorted(unknown)}; known: '
             f'{", ".join(SOURCE_FIELDS)}.')
    name = src.get('name', 'demo')
    _require(name in DATASETS, f'config.{where}.name={name!r} is not one of '
             f'{", ".join(map(repr, DATASETS))}.')
    _require(name != 'records' or src.get('path'),
             f"config.{where}.path is empty: a 'records' source needs the directory written by "
             '`python -m mmjax.data.prepare --out=...`.')
    _require(name != 'tfds' or src.get('tfds_name'),
             f"config.{where}.tfds_name is empty: a 'tfds' source needs a dataset name.")
    _require(src.get('weight', 1.0) > 0, f'config.{where}.weight={src.get("weight")} must be > 0.')
    _require(src.get('temperature', 0.0) >= 0,
             f'config.{where}.temperature={src.get("temperature")} must be >= 0 (0: '
             'config.data.mixture_temperature).')
    if name == 'demo' and src.get('negatives'):
      try:
        demo.negative_attributes(src['negatives'])
      except ValueError as e:
        raise ConfigError(f'config.{where}.{e}') from e
      _require(data.num_hard_negatives > 0,
               f'config.{where}.negatives={src["negatives"]!r} renders hard negatives, but '
               f'config.data.num_hard_negatives={data.num_hard_negatives}: set it to >= 1.')


def validate_schema(config: ml_collections.ConfigDict) -> None:
  """Keys and types only (no JAX backend needed): runs before `jax.distributed` start-up."""
  _check_schema(config, base_config())
  _validate_distributed(config.distributed)


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             num_processes: int | None = None) -> None:
  """Raises ConfigError naming the key and value of the first problem found."""
  validate_schema(config)
  _validate_evals(config)
  _validate_training(config)
  _validate_data(config)
  _validate_towers(config)
  _validate_transfer(config)
  _one_of('model.kind', config.model.kind, tuple(kinds.KINDS))
  kinds.get(config).validate(config)
  _validate_distill_multitask(config)
  _validate_image(config.model.image)
  _validate_text(config)
  _validate_axis_rules(config.logical_axis_rules)
  _validate_batch_layout(config, num_devices, num_processes)


def _validate_evals(config) -> None:
  """config.eval and config.evals (mmjax.eval.specs), as ConfigErrors."""
  try:
    specs.validate(config)
    specs.primary_name(config)
    specs.resolved({'type': 'retrieval', 'metrics': config.eval.metrics,
                    'index_min_corpus': config.eval.index_min_corpus,
                    **{k: config.eval[k] for k in specs.INDEX_FIELDS}})
  except specs.SpecError as e:
    raise ConfigError(str(e) if str(e).startswith('config.') else f'config.eval: {e}') from e


def _validate_training(config) -> None:
  """Counts, the optimizer, the loss and the model-wide choices."""
  for name in ('batch_size', 'micro_batches', 'total_steps', 'log_every_steps', 'model.embed_dim',
               'checkpoint.every_steps', 'checkpoint.keep', 'eval.every_steps', 'eval.num_scenes',
               'eval.batch_size', 'data.num_train_examples', 'data.read_threads',
               'tokenizer.vocab_size', 'optimizer.learning_rate'):
    _positive(name, _get(config, name))
  for name in ('data.num_workers', 'data.decode_cache_mb', 'compilation_cache_min_compile_s'):
    _require(_get(config, name) >= 0, f'config.{name}={_get(config, name)} must be >= 0.')
  # Warmup may exceed total_steps (short smoke runs): the rate then never reaches its peak.
  _require(config.optimizer.warmup_steps >= 0,
           f'config.optimizer.warmup_steps={config.optimizer.warmup_steps} must be >= 0.')
  _require(0.0 <= config.optimizer.end_lr_ratio <= 1.0,
           f'config.optimizer.end_lr_ratio={config.optimizer.end_lr_ratio} must be in [0, 1].')
  _require(config.optimizer.grad_clip_norm >= 0,
           f'config.optimizer.grad_clip_norm={config.optimizer.grad_clip_norm} must be >= 0.')
  _one_of('optimizer.schedule', config.optimizer.schedule, SCHEDULES)
  _one_of('loss.kind', config.loss.kind, LOSSES)
  _one_of('loss.impl', config.loss.impl, LOSS_IMPLS)
  _require(0.0 <= config.loss.drop_noisy_fraction < 1.0,
           f'config.loss.drop_noisy_fraction={config.loss.drop_noisy_fraction} must be in [0, 1).')
  _require(not (config.loss.impl == 'ring' and config.loss.kind != 'sigmoid'),
           f"config.loss.impl='ring' needs config.loss.kind='sigmoid' (got {config.loss.kind!r}); "
           "InfoNCE normalises over whole rows, use 'all_gather'.")
  _one_of('model.head', config.model.head, HEADS)
  _one_of('model.dtype', config.model.dtype, DTYPES)
  _one_of('model.param_dtype', config.model.param_dtype, DTYPES)
  _one_of('data.name', config.data.name, DATASETS)


def _validate_towers(config) -> None:
  """What the image and text towers share: sizes, norms, activations, remat, heads."""
  img = config.model.image
  _one_of('model.image.pool', img.pool, IMAGE_POOLS)
  _one_of('model.image.posemb', img.posemb, POSEMBS)
  for tower, cfg in (('image', img), ('text', config.model.text)):
    for key in ('width', 'depth', 'num_heads', 'mlp_dim'):
      _positive(f'model.{tower}.{key}', cfg[key])
    _require(cfg.width % cfg.num_heads == 0,
             f'config.model.{tower}.width={cfg.width} is not a multiple of '
             f'config.model.{tower}.num_heads={cfg.num_heads}.')
    _require(0.0 <= cfg.dropout < 1.0, f'config.model.{tower}.dropout={cfg.dropout} must be in [0, 1).')
    _one_of(f'model.{tower}.norm', cfg.norm, NORMS)
    _one_of(f'model.{tower}.act', cfg.act, ACTIVATIONS)
    _one_of(f'model.{tower}.remat_policy', cfg.remat_policy, ENCODER_REMAT_POLICIES)
    _positive(f'model.{tower}.ln_eps', cfg.ln_eps)
  _one_of('model.image_head', config.model.image_head, ('',) + HEADS)
  _one_of('model.text_head', config.model.text_head, ('',) + HEADS)


def _validate_image(img) -> None:
  """config.model.image: the patch grid, the stem and the pixel statistics."""
  _positive('model.image.patch_size', img.patch_size)
  _require(all(isinstance(ch, int) and ch > 0 for ch in img.stem_channels),
           f'config.model.image.stem_channels={tuple(img.stem_channels)} must be positive ints '
           '(output channels of each 3x3 conv), or () for none.')
  _require(len(img.pixel_mean) == len(img.pixel_std) and len(img.pixel_mean) in (0, 3)
           and all(s > 0 for s in img.pixel_std),
           f'config.model.image.pixel_mean={img.pixel_mean} / pixel_std={img.pixel_std} must be '
           'both empty or both 3 values (per RGB channel), std > 0.')
  _one_of('model.image.stem_downsample', img.stem_downsample, STEM_DOWNSAMPLE)
  reduction = img.patch_size * (2 ** len(img.stem_channels) if img.stem_downsample else 1)
  _require(img.image_size % reduction == 0,
           f'config.model.image.image_size={img.image_size} is not a multiple of '
           f'config.model.image.patch_size={img.patch_size}'
           + (f' x the stem reduction {reduction // img.patch_size}' if reduction > img.patch_size
              else '') + '.')
  _require(img.image_size >= 16, f'config.model.image.image_size={img.image_size} must be >= 16.')


def _validate_text(config) -> None:
  """config.model.text and the trained tokenizer's fit in its vocabulary."""
  txt = config.model.text
  _one_of('model.text.pool', txt.pool, TEXT_POOLS)
  _require(txt.max_len >= 2, f'config.model.text.max_len={txt.max_len} must be >= 2 (text + EOS).')
  _require(txt.num_positions == 0 or txt.num_positions >= txt.max_len,
           f'config.model.text.num_positions={txt.num_positions} must be 0 or >= '
           f'config.model.text.max_len={txt.max_len}.')
  _require(txt.type_vocab_size >= 0,
           f'config.model.text.type_vocab_size={txt.type_vocab_size} must be >= 0.')
  _positive('model.text.vocab_size', txt.vocab_size)
  if not config.tokenizer.path and not config.init.text:  # Else the tokenizer is loaded.
    _require(config.tokenizer.vocab_size <= txt.vocab_size,
             f'config.tokenizer.vocab_size={config.tokenizer.vocab_size} exceeds '
             f'config.model.text.vocab_size={txt.vocab_size}.')


def _validate_axis_rules(rules) -> None:
  """Each logical_axis_rules entry maps a name to known mesh axes."""
  for rule in rules:
    _require(isinstance(rule, (tuple, list)) and len(rule) == 2,
             f'config.logical_axis_rules entry {rule!r} must be (logical_name, mesh_axes).')
    axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    for a in axes:
      _require(a is None or a in MESH_AXES,
               f'config.logical_axis_rules maps {rule[0]!r} to unknown mesh axis {a!r} '
               f'(mesh axes: {", ".join(MESH_AXES)}).')


def _validate_batch_layout(config, num_devices: int | None, num_processes: int | None) -> None:
  """The batch splits over the mesh's batch shards, the processes and the micro-batches."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  num_processes = jax.process_count() if num_processes is None else num_processes
  shape = mesh_shape(config.mesh, num_devices)
  batch_shards = shape['data'] * shape['fsdp']
  _require(config.batch_size % batch_shards == 0,
           f'config.batch_size={config.batch_size} is not divisible by the {batch_shards} batch '
           f'shards of the mesh (data={shape["data"]} x fsdp={shape["fsdp"]}, {num_devices} '
           'devices).')
  _require(config.batch_size % num_processes == 0,
           f'config.batch_size={config.batch_size} is not divisible by the {num_processes} '
           'processes.')
  per_shard = config.batch_size // batch_shards
  _require(per_shard % config.micro_batches == 0,
           f'config.micro_batches={config.micro_batches} does not divide the {per_shard} pairs '
           f'each batch shard holds (batch_size={config.batch_size} / {batch_shards} shards = '
           f'data={shape["data"]} x fsdp={shape["fsdp"]}).')


def _validate_distributed(d) -> None:
  _one_of('distributed.cpu_collectives', d.cpu_collectives, CPU_COLLECTIVES)
  _positive('distributed.timeout_s', d.timeout_s)
  _positive('distributed.heartbeat_timeout_s', d.heartbeat_timeout_s)
  _positive('distributed.shutdown_timeout_s', d.shutdown_timeout_s)
  addr = d.coordinator_address
  if addr in ('', 'auto'):
    return
  host, sep, port = addr.rpartition(':')
  _require(bool(sep and host and port.isdigit()),
           f"config.distributed.coordinator_address={addr!r} must be 'host:port', '' or 'auto'.")
  _positive('distributed.num_processes', d.num_processes)
  _require(0 <= d.process_id < d.num_processes,
           f'config.distributed.process_id={d.process_id} must be in [0, '
           f'config.distributed.num_processes={d.num_processes}).')


def _validate_transfer(config) -> None:
  """config.init and the optimizer's frozen / lr_multipliers regexes (docs/pretrained.md)."""
  for tower in ('image', 'text'):
    spec = config.init[tower]
    _require(not spec or spec.startswith('hf:'),
             f"config.init.{tower}={spec!r} must be '' or 'hf:DIR' (a Hugging Face checkpoint "
             "directory; 'hf:pkg:MODULE/sub/dir' for one inside an installed package).")
  patterns = [('optimizer.frozen', config.optimizer.frozen)] if config.optimizer.frozen else []
  for entry in config.optimizer.lr_multipliers:
    _require(isinstance(entry, (tuple, list)) and len(entry) == 2
             and isinstance(entry[1], (int, float)) and entry[1] >= 0,
             f'config.optimizer.lr_multipliers entry {entry!r} must be (regex, multiplier >= 0).')
    patterns.append(('optimizer.lr_multipliers', entry[0]))
  for name, pattern in patterns:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(f'config.{name}: {pattern!r} is not a valid regex ({e}).') from e


DISTILL_KINDS = ('kl', 'regression', 'both')
DISTILL_SOURCES = ('data', 'live')
TASKS = ('contrastive', 'text_text', 'distill')
WEIGHTINGS = ('static', 'uncertainty', 'gradnorm', 'loss_ratio')


def _validate_distill_multitask(config) -> None:
  """config.distill and config.multitask (docs/pretrained.md)."""
  d, mt = config.distill, config.multitask
  _one_of('distill.kind', d.kind, DISTILL_KINDS)
  _one_of('distill.source', d.source, DISTILL_SOURCES)
  _one_of('multitask.weighting', mt.weighting, WEIGHTINGS)
  _require(d.weight >= 0, f'config.distill.weight={d.weight!r} must be >= 0.')
  _positive('distill.temperature', d.temperature)
  names = []
  for entry in mt.tasks:
    _require(isinstance(entry, (tuple, list)) and len(entry) == 2 and entry[0] in TASKS
             and isinstance(entry[1], (int, float)) and entry[1] > 0,
             f'config.multitask.tasks entry {entry!r} must be (task, weight > 0) with task one of '
             f'{", ".join(map(repr, TASKS))}.')
    _require(entry[0] not in names, f'config.multitask.tasks lists {entry[0]!r} twice.')
    names.append(entry[0])
  _require(not (d.weight and 'distill' in names),
           f"config.distill.weight={d.weight!r} and config.multitask.tasks both weight 'distill'; "
           'set distill.weight=0 and keep the weight in the tasks.')
  _require(mt.weighting == 'static' or names,
           f"config.multitask.weighting={mt.weighting!r} needs config.multitask.tasks (the tasks "
           'whose weights are learned or balanced).')
  _require(isinstance(mt.log_grad_norms, bool),
           f'config.multitask.log_grad_norms={mt.log_grad_norms!r} must be True or False.')
  if not (d.weight or 'distill' in names):
    return
  _require(bool(d.teacher), "config.distill.teacher is empty: distillation needs 'hf:DIR' or an "
           'mmjax export directory.')
  _require(d.source != 'data' or bool(d.embeddings),
           "config.distill.embeddings is empty: with distill.source='data' it names the directory "
           'written by `python -m mmjax.data.teacher_embed --config=...`.')


def _get(config, dotted: str):
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node
