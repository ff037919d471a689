"""What a model kind declares, and the data contract a run computes once.

A kind (`mmjax.kinds.KINDS`) answers every "what does this model need" question of the trainer,
the evaluators and the export: its typed config, its Flax module, its tokenizer and encoder, its
batches and their roles, its objective, its primary evaluation, its runner and export, and how
released weights are imported. Nothing outside `mmjax.kinds` branches on the kind.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from flax import traverse_util

from mmjax.types import ConfigError

Spec = dict[str, tuple[tuple[int, ...], Any]]  # Column -> (global shape, dtype).
# The tower fields a run may choose freely over an imported checkpoint (every other field is
# architecture).
RUN_FIELDS = frozenset({'dropout', 'remat', 'remat_policy', 'locked', 'max_len', 'pool'})


@dataclasses.dataclass(frozen=True)
class DataContract:
  """The run's batches, computed once per run (`ModelKind.contract`) and handed to the step,
  the teacher, the loop and the objective instead of re-opening the data sources.

  `spec`: {column: (global shape, dtype)}; `columns`: those the train step reads (the host-only
  ones left out); `roles`: (query, candidate) of the contrastive loss; `text_pairs`: the sources
  hold text-text pairs (no image column).
  """

  spec: Spec
  columns: tuple[str, ...]
  roles: tuple[str, str]
  text_pairs: bool = False


class ModelKind:
  """The interface of one model kind; see `DualEncoder` and `LLMEmbedderKind`."""

  name: str = ''
  export_format: str = ''  # model.json 'format' of its exports (mmjax.embedder).
  # The type of the evaluator whose metric keys carry no prefix (mmjax.eval.specs), built from
  # config.eval.
  primary_eval_type: str = ''

  def validate(self, config) -> None:
    """Raises ConfigError for what this kind cannot run (mmjax.config.validate calls it)."""

  def model_config(self, config) -> Any:
    """The typed model config of a run config."""
    raise NotImplementedError

  def model(self, model_config) -> Any:
    """The Flax module."""
    raise NotImplementedError

  def contract(self, config) -> DataContract:
    raise NotImplementedError

  def tokenizer_corpus(self, config):
    """Texts the run's tokenizer is trained on when none is given."""
    raise NotImplementedError

  def prepare_tokenizer(self, tokenizer, config):
    """The tokenizer with the kind's special tokens; (config key, vocabulary limit)."""
    raise NotImplementedError

  def tokenizer_dir(self, config) -> str:
    """A directory whose tokenizer.json the run must use (its imported weights'), or ''."""
    return ''

  def encoder(self, config, tokenizer) -> Any:
    """Texts (and images) -> model inputs, on the host."""
    raise NotImplementedError

  def train_dataset(self, config, encoder, contract: DataContract, *, process_index: int,
                    process_count: int, teacher_encoder=None):
    raise NotImplementedError

  def objective(self, config, loss_fn: Callable, contract: DataContract, *,
                mesh=None) -> Callable:
    """(embeddings, temperature, bias, batch) -> (loss, metrics); `mesh`: the one the batch is
    split over (terms that span it, e.g. the ITM negative sampling)."""
    raise NotImplementedError

  def embedder(self, model_config, params, encoder, config, *, mesh, batch_size: int):
    """The runner evaluators embed through (mmjax.embedder)."""
    raise NotImplementedError

  def export_parts(self, model_config, params, encoder, config):
    """(model config, params, extra model.json fields) written by `--mode=export`."""
    return model_config, params, {}

  def frozen_patterns(self, config) -> list[str]:
    """Parameter-path regexes the optimizer leaves alone because of the kind (beyond
    config.optimizer.frozen)."""
    return []

  def apply_init(self, config, state, shardings, model_config):
    """`state` with the weights of config.init put in place (with their shardings)."""
    return state


def put_params(state, shardings, flat: dict[str, np.ndarray], *,
               required: tuple[str, ...] | None = None):
  """(`state` with the parameters of `flat` ('a/b/kernel' -> array) put in place, each with its
  sharding and in the run's dtype; the keys that kept the run's initialisation).

  A key that is missing from the run or has another shape is an error when it starts with one
  of the `required` prefixes (tower parameters; every key when `required` is None), and keeps
  the run's random initialisation otherwise (a head or logit parameter of another size)."""
  params = traverse_util.flatten_dict(state.params, sep='/')
  sh = traverse_util.flatten_dict(shardings.params, sep='/')
  kept = []
  for key, value in flat.items():
    if key not in params or params[key].shape != value.shape:
      if required is None or key.startswith(required):
        raise ConfigError(f'config.init: checkpoint parameter {key} {value.shape} does not fit '
                          f'the run ({params.get(key, None)}).')
      kept.append(key)
      continue
    params[key] = jax.device_put(value.astype(params[key].dtype), sh[key])
  return state.replace(params=traverse_util.unflatten_dict(params, sep='/')), kept


def architecture_mismatch(tower: str, run_cfg, ckpt_cfg) -> list[str]:
  """'--config.model.text.width=384 (run has 256)' for every architecture field that differs."""
  out = []
  for f in dataclasses.fields(ckpt_cfg):
    if f.name in RUN_FIELDS:
      continue
    want, have = getattr(ckpt_cfg, f.name), getattr(run_cfg, f.name)
    if f.name == 'num_positions':
      want, have = ckpt_cfg.positions, run_cfg.positions
    if want != have:
      out.append(f'--config.model.{tower}.{f.name}={want!r} (run has {have!r})')
  return out
