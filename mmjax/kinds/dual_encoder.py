"""The dual encoder (model.kind='two_tower'): ViT + text transformer, contrastive loss."""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
from flax import traverse_util

from mmjax import hf
from mmjax.data import pipeline, tokenizer as tokenizer_lib
from mmjax.embedder import EXPORT_FORMAT, Embedder
from mmjax.kinds.base import (RUN_FIELDS, DataContract, ModelKind,  # noqa: F401
                              architecture_mismatch, put_params)
from mmjax.losses import heads as heads_lib, matching, multitask, objectives
from mmjax.models.two_tower import TwoTower
from mmjax.types import (ConfigError, ModelConfig, TextConfig, ViTConfig, lists_to_tuples,
                         require)

log = logging.getLogger(__name__)

# Parameter prefixes of each tower and its head.
TOWERS = {'image': ('img', 'img_head'), 'text': ('txt', 'txt_head')}


def default_temperature_init(loss: str) -> float:
  """SigLIP starts at t' = log 10; CLIP at log(1/0.07)."""
  return math.log(10.0) if loss == 'sigmoid' else math.log(1 / 0.07)


def task_log_vars(config) -> tuple[tuple[str, float], ...]:
  """Uncertainty weighting's learned log-variances start at the static weights:
  0.5 exp(-s) = w, s = -log(2 w)."""
  if config.multitask.weighting != 'uncertainty':
    return ()
  return tuple((name, -math.log(2.0 * float(w))) for name, w in config.multitask.tasks)


def dual_encoder_config(config) -> ModelConfig:
  """The typed model config of a (validated) run config."""
  m = config.model
  t_init = config.loss.temperature_init
  if t_init is None:
    t_init = default_temperature_init(config.loss.kind)
  return ModelConfig(
      image=ViTConfig(**lists_to_tuples(m.image.to_dict())),
      text=TextConfig(**m.text.to_dict()),
      embed_dim=m.embed_dim,
      head=m.head,
      loss=config.loss.kind,
      temperature_init=float(t_init),
      bias_init=float(config.loss.bias_init) if config.loss.kind == 'sigmoid' else None,
      dtype=m.dtype,
      param_dtype=m.param_dtype,
      image_head=m.image_head,
      text_head=m.text_head,
      head_bias=m.head_bias,
      task_log_vars=task_log_vars(config),
      itm_depth=m.itm.depth, itm_heads=m.itm.num_heads, itm_mlp_dim=m.itm.mlp_dim,
      caption_depth=m.caption.depth, caption_heads=m.caption.num_heads,
      caption_mlp_dim=m.caption.mlp_dim,
  )


def tasks(config) -> dict[str, float]:
  """{task: weight} of the run: config.multitask.tasks, else contrastive (+ distill)."""
  if config.multitask.tasks:
    return {name: float(w) for name, w in config.multitask.tasks}
  out = {'contrastive': 1.0}
  if config.distill.weight:
    out['distill'] = float(config.distill.weight)
  return out


def make_objective(config, contrastive, roles: tuple[str, str]):
  """The contrastive loss alone (`contrastive(query, candidate)`), or `MultiTask` over
  config.multitask.tasks / contrastive + distill.weight x distill."""
  weights = tasks(config)
  mt = config.multitask
  if weights == {'contrastive': 1.0} and mt.weighting == 'static' and not mt.log_grad_norms:
    return contrastive(*roles)
  build = {'contrastive': lambda: contrastive(*roles),
           'text_text': lambda: contrastive('query', 'text'),
           'distill': lambda: objectives.Distill(config.distill.kind,
                                                 float(config.distill.temperature))}
  balance = mt.weighting if mt.weighting in multitask.BALANCING else ''
  return objectives.MultiTask(tuple((name, build[name]()) for name in weights),
                              tuple(weights.items()), mt.weighting == 'uncertainty', balance,
                              bool(mt.log_grad_norms))


def validate_token_heads(config) -> None:
  """config.model.itm / caption and their loss weights: a head needs its weight and back."""
  width = config.model.text.width
  for head, weight in (('itm', 'itm_weight'), ('caption', 'caption_weight')):
    h, w = config.model[head], config.loss[weight]
    require(w >= 0, f'config.loss.{weight}={w!r} must be >= 0.')
    require(h.depth >= 0 and h.mlp_dim >= 0 and h.num_heads > 0,
            f'config.model.{head}: depth={h.depth}, mlp_dim={h.mlp_dim} must be >= 0 and '
            f'num_heads={h.num_heads} > 0.')
    require(bool(h.depth) == bool(w),
            f'config.model.{head}.depth={h.depth} with config.loss.{weight}={w!r}: the head '
            'needs a loss weight > 0 and the weight needs a head of depth > 0 (set both, or '
            'neither).')
    require(not h.depth or width % h.num_heads == 0,
            f'config.model.{head}.num_heads={h.num_heads} must divide config.model.text.width='
            f'{width} (the head runs at the text width).')


def _check_rerank_evals(config) -> None:
  evals = config.get('evals', None) or {}
  for name in evals.keys():
    require(evals[name].get('type') != 'rerank' or config.model.itm.depth > 0,
            f"config.evals.{name} is a 'rerank' evaluator, which re-scores with the ITM head: "
            'set config.model.itm.depth > 0 and config.loss.itm_weight > 0.')


def with_token_heads(config, base, contract: DataContract, mesh=None):
  """`base` plus loss.itm_weight x ITM and loss.caption_weight x captioning (docs/objectives.md),
  or `base` itself when both weights are 0."""
  terms = []
  if config.loss.itm_weight:
    terms.append(('itm', float(config.loss.itm_weight),
                  heads_lib.Matching(matching.make_sampler(mesh))))
  if config.loss.caption_weight:
    terms.append(('caption', float(config.loss.caption_weight), heads_lib.Captioning()))
  if not terms:
    return base
  if contract.text_pairs:
    raise ConfigError('config.loss.itm_weight / caption_weight need image-text pairs; the run\'s '
                      'sources hold text-text pairs.')
  return heads_lib.WithHeads(base, tuple(terms))


def load_init(config, model_config: ModelConfig) -> dict[str, np.ndarray]:
  """Flat {'txt/encoder/...': array} of every tower that config.init names (heads and the logit
  scale/bias too when their shapes fit), in config.model.param_dtype whatever the file stores."""
  flat: dict[str, np.ndarray] = {}
  loaded: dict[str, hf.Pretrained] = {}
  for tower, (prefix, head) in TOWERS.items():
    spec = config.init[tower]
    if not spec:
      continue
    ckpt = loaded.get(spec) or hf.load(spec, dtype=model_config.param_dtype)
    loaded[spec] = ckpt
    ckpt_cfg = getattr(ckpt, tower)
    if ckpt_cfg is None:
      raise ConfigError(f'config.init.{tower}={spec!r}: the {ckpt.family} checkpoint has no '
                        f'{tower} tower.')
    diff = architecture_mismatch(tower, getattr(model_config, tower), ckpt_cfg)
    if diff:
      raise ConfigError(f'config.init.{tower}={spec!r} is a different architecture than '
                        f'config.model.{tower}; set: ' + ' '.join(diff))
    params = traverse_util.flatten_dict(ckpt.params, sep='/')
    flat.update({k: v for k, v in params.items() if k.startswith(f'{prefix}/')})
    flat.update({k: v for k, v in params.items() if k.startswith(f'{head}/')})
    log.info('config.init.%s: %s tower from %s (%s).', tower, ckpt.family, spec, ckpt.directory)
  if config.init.image and config.init.image == config.init.text:
    flat.update({k: v for k, v in traverse_util.flatten_dict(
        loaded[config.init.text].params, sep='/').items() if k in ('t_prime', 'bias')})
  return flat


class DualEncoder(ModelKind):
  """model.kind='two_tower'."""

  name = 'two_tower'
  export_format = EXPORT_FORMAT
  primary_eval_type = 'retrieval'

  def validate(self, config) -> None:
    validate_token_heads(config)
    _check_rerank_evals(config)

  def model_config(self, config) -> ModelConfig:
    return dual_encoder_config(config)

  def model(self, model_config: ModelConfig) -> TwoTower:
    return TwoTower(model_config)

  def contract(self, config) -> DataContract:
    text_pairs = pipeline.is_text_pairs(config)  # The one look at the sources of a run.
    spec = pipeline.batch_spec(config, text_pairs=text_pairs)
    return DataContract(spec, pipeline.train_columns(config, text_pairs=text_pairs),
                        ('query', 'text') if text_pairs else ('image', 'text'), text_pairs)

  def tokenizer_corpus(self, config):
    return pipeline.caption_corpus(config)

  def prepare_tokenizer(self, tokenizer, config):
    return tokenizer, ('model.text.vocab_size', config.model.text.vocab_size)

  def encoder(self, config, tokenizer) -> tokenizer_lib.TextEncoder:
    return tokenizer_lib.TextEncoder(tokenizer, config.model.text.max_len)

  def train_dataset(self, config, encoder, contract, *, process_index: int = 0,
                    process_count: int = 1, teacher_encoder=None):
    return pipeline.make_train_dataset(config, encoder, process_index=process_index,
                                       process_count=process_count,
                                       teacher_encoder=teacher_encoder,
                                       text_pairs=contract.text_pairs)

  def objective(self, config, loss_fn, contract: DataContract, *, mesh=None):
    def contrastive(query: str, candidate: str) -> objectives.Contrastive:
      return objectives.Contrastive(loss_fn, query, candidate, config.loss.drop_noisy_fraction)
    return with_token_heads(config, make_objective(config, contrastive, contract.roles),
                            contract, mesh)

  def embedder(self, model_config, params, encoder, config, *, mesh, batch_size: int):
    return Embedder(model_config, params, encoder, mesh=mesh, batch_size=batch_size)

  def apply_init(self, config, state, shardings, model_config):
    """Tower parameters must fit; a head or logit parameter whose shape differs from the run's
    (another embed_dim or head kind) keeps its random initialisation."""
    flat = load_init(config, model_config)
    if not flat:
      return state
    params = traverse_util.flatten_dict(state.params, sep='/')
    towers = tuple(f'{p}/' for p, _ in TOWERS.values())
    imported = {k.split('/')[0] for k in flat}
    missing = sorted(k for k in params if k.split('/')[0] in imported and k.startswith(towers)
                     and k not in flat)
    state, kept = put_params(state, shardings, flat, required=towers)
    if missing:
      raise ConfigError(f'config.init: the run has tower parameters the checkpoint lacks: '
                        f'{missing}.')
    if kept:
      log.info('config.init: kept the random initialisation of %s (shapes differ).', kept)
    return state
