"""The LLM embedder (model.kind='llm_embedder'): ViT -> projector -> visual tokens in a decoder
LLM's sequence, pooled; InfoNCE between query and candidate, averaged over Matryoshka dims."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from flax import traverse_util

from mmjax import hf
from mmjax.data import llm_encoding, llm_tasks, pipeline, sources
from mmjax.embedder import LLM_EXPORT_FORMAT, MultimodalEmbedder
from mmjax.hf import llama
from mmjax.kinds.base import DataContract, ModelKind, architecture_mismatch, put_params
from mmjax.losses import objectives
from mmjax.models import llm_embedder, lora
from mmjax.types import (LLM_TASKS, ConfigError, DecoderConfig, LLMEmbedderConfig, LoraConfig,
                         ViTConfig, lists_to_tuples, require)

log = logging.getLogger(__name__)


def llm_embedder_config(config) -> LLMEmbedderConfig:
  """The typed config of a run config with model.kind='llm_embedder'."""
  m = config.model
  llm = {k: v for k, v in lists_to_tuples(m.llm.to_dict()).items()
         if k not in ('image_token', 'eos_token')}
  image = ViTConfig(**lists_to_tuples(m.image.to_dict()))
  return LLMEmbedderConfig(image=image, decoder=DecoderConfig(**m.decoder.to_dict()),
                           lora=LoraConfig(**m.lora.to_dict()), dtype=m.dtype,
                           param_dtype=m.param_dtype, **llm)


def load_decoder_init(config) -> dict[str, np.ndarray]:
  """Flat {'llm/...': array} of config.init.decoder (a Llama/Qwen2 checkpoint), in the run's
  layer layout; the run's model.decoder must match the checkpoint's architecture."""
  spec = config.init.decoder
  if not spec:
    return {}
  ckpt = hf.load_decoder(spec)
  run = DecoderConfig(**config.model.decoder.to_dict())
  differ = [f.name for f in dataclasses.fields(run) if f.name not in llama.RUN_FIELDS
            and getattr(run, f.name) != getattr(ckpt.config, f.name)]
  if differ:
    raise ConfigError(f'config.init.decoder={spec!r}: config.model.decoder differs from the '
                      f'checkpoint in {differ}; set:\n{llama.describe(ckpt.directory)}')
  return traverse_util.flatten_dict({'llm': ckpt.params_for(run)}, sep='/')


def load_image_init(config, image: ViTConfig, run_keys) -> dict[str, np.ndarray]:
  """Flat {'img/...': array} of config.init.image (a CLIP/SigLIP checkpoint, through the same
  `mmjax.hf` import as the dual encoder's), in config.model.param_dtype, for the run whose
  parameters are `run_keys` ('img/encoder/...'). The run's model.image must be the checkpoint's
  architecture and have a CLS token exactly when it does (model.image.pool='cls'); every 'img/'
  parameter of the run must be in it. The embedder reads the tower's patch tokens, so its
  pooling head (SigLIP's MAP head) and projection are left out."""
  spec = config.init.image
  if not spec:
    return {}
  ckpt = hf.load(spec, dtype=config.model.param_dtype)
  if ckpt.image is None:
    raise ConfigError(f'config.init.image={spec!r}: the {ckpt.family} checkpoint has no image '
                      'tower.')
  diff = architecture_mismatch('image', image, ckpt.image)
  if (image.pool == 'cls') != (ckpt.image.pool == 'cls'):
    diff.append(f'--config.model.image.pool={ckpt.image.pool!r} (run has {image.pool!r}; '
                'whether a CLS token joins the sequence)')
  if diff:
    raise ConfigError(f'config.init.image={spec!r} is a different architecture than '
                      'config.model.image; set: ' + ' '.join(diff))
  flat = {k: v for k, v in traverse_util.flatten_dict(ckpt.params, sep='/').items()
          if k.startswith('img/')}
  run_keys = set(run_keys)
  missing = sorted(k for k in run_keys if k.startswith('img/') and k not in flat)
  if missing:
    raise ConfigError(f'config.init.image={spec!r}: the run has ViT parameters the checkpoint '
                      f'lacks: {missing}.')
  unused = sorted(k for k in flat if k not in run_keys)
  log.info('config.init.image: %s image tower from %s (%s)%s.', ckpt.family, spec,
           ckpt.directory, f'; not used (its pooling head): {unused}' if unused else '')
  return {k: v for k, v in flat.items() if k in run_keys}


class LLMEmbedderKind(ModelKind):
  """model.kind='llm_embedder' (docs/llm_embedder.md)."""

  name = 'llm_embedder'
  export_format = LLM_EXPORT_FORMAT
  primary_eval_type = 'llm_retrieval'  # i2t, t2i and composed queries, with instructions.

  def validate(self, config) -> None:
    """model.llm, model.decoder and data.llm (docs/llm_embedder.md); the typed config checks
    the shapes."""
    llm = config.data.llm
    require(llm.pad_side in llm_encoding.PAD_SIDES, f'config.data.llm.pad_side={llm.pad_side!r} '
            f'is not one of {", ".join(map(repr, llm_encoding.PAD_SIDES))}.')
    for group in ('weights', 'instructions'):
      keys = sorted(llm[group].keys())
      require(keys == sorted(LLM_TASKS),
              f'config.data.llm.{group} has keys {keys}; expected {sorted(LLM_TASKS)}.')
    require(all(w >= 0 for w in llm.weights.values()) and sum(llm.weights.values()) > 0,
            f'config.data.llm.weights={dict(llm.weights)} must be >= 0 and not all 0.')
    require(not (config.loss.itm_weight or config.loss.caption_weight
                 or config.model.itm.depth or config.model.caption.depth),
            'config.loss.itm_weight / caption_weight and config.model.itm / caption are heads of '
            "the dual encoder (model.kind='two_tower'); the LLM embedder has none (its "
            'next-token loss is not implemented yet: docs/objectives.md).')
    require(config.loss.kind == 'softmax',
            f"config.loss.kind={config.loss.kind!r}: the LLM embedder trains with InfoNCE at a "
            "fixed temperature; set config.loss.kind='softmax'.")
    require(not config.init.text,
            f'config.init.text={config.init.text!r}: the LLM embedder has no text tower; its '
            'decoder starts from config.init.decoder, its ViT from config.init.image.')
    if not llm_tasks.on_demo_tasks(config):
      names = ', '.join(s.name for s in sources.specs_from_config(config.data))
      require(llm.weights.composed == 0,
              f'config.data.llm.weights.composed={llm.weights.composed}: composed (image + edit) '
              f'pairs exist only in the demo tasks (config.data.name=\'demo\', no mixture); '
              f'image-caption data ({names}) gives i2t and t2i rows, so set '
              'config.data.llm.weights.composed=0.')
      require(llm.weights.i2t + llm.weights.t2i > 0,
              f'config.data.llm.weights={dict(llm.weights)}: image-caption data needs i2t or '
              't2i > 0.')
    require(not config.data.sub_batches, 'config.data.sub_batches is for the dual encoder; the '
            'LLM embedder mixes its sources row by row.')
    require(not (config.distill.weight or config.multitask.tasks
                 or config.multitask.log_grad_norms),
            "config.distill / config.multitask are for model.kind='two_tower'; the LLM embedder "
            'trains its query/candidate contrastive loss (docs/llm_embedder.md).')
    try:
      llm_embedder_config(config)
    except ValueError as e:
      raise ConfigError(str(e) if str(e).startswith('config.') else f'config.{e}') from e

  def model_config(self, config) -> LLMEmbedderConfig:
    return llm_embedder_config(config)

  def model(self, model_config: LLMEmbedderConfig) -> llm_embedder.LLMEmbedder:
    return llm_embedder.LLMEmbedder(model_config)

  def contract(self, config) -> DataContract:
    if not llm_tasks.on_demo_tasks(config) and pipeline.is_text_pairs(config):
      raise ConfigError('config.data holds text-text pairs (a query, no image): the LLM '
                        "embedder's tasks on ingested data are image-caption retrieval (i2t, "
                        't2i); train text-text pairs with the dual encoder.')
    spec = llm_tasks.batch_spec(config)
    return DataContract(spec, tuple(spec), ('query', 'candidate'))

  def tokenizer_corpus(self, config):
    return llm_tasks.corpus(config)

  def prepare_tokenizer(self, tokenizer, config):
    """The image placeholder becomes one special token, never split."""
    tokenizer = llm_encoding.add_image_token(tokenizer, config.model.llm.image_token)
    return tokenizer, ('model.decoder.vocab_size', config.model.decoder.vocab_size)

  def tokenizer_dir(self, config) -> str:
    """config.init.decoder's directory, when it brings a tokenizer.json."""
    if config.init.decoder:
      directory = hf.resolve_dir(config.init.decoder)
      if (directory / 'tokenizer.json').exists():
        return str(directory)
    return ''

  def encoder(self, config, tokenizer) -> llm_encoding.MultimodalEncoder:
    return llm_encoding.make_encoder(config, tokenizer)

  def train_dataset(self, config, encoder, contract, *, process_index: int = 0,
                    process_count: int = 1, teacher_encoder=None):
    del contract, teacher_encoder  # One batch layout; no distillation (config.validate).
    return llm_tasks.make_train_dataset(config, encoder, process_index=process_index,
                                        process_count=process_count)

  def objective(self, config, loss_fn, contract: DataContract, *, mesh=None):
    """InfoNCE between 'query' and 'candidate' (with 'neg_candidate' hard negatives), averaged
    over the Matryoshka dimensions."""
    contrastive = objectives.Contrastive(loss_fn, *contract.roles,
                                         drop_noisy_fraction=config.loss.drop_noisy_fraction)
    return objectives.matryoshka_objective(contrastive,
                                           llm_embedder_config(config).eval_dims)

  def embedder(self, model_config, params, encoder, config, *, mesh, batch_size: int):
    return MultimodalEmbedder(model_config, params, encoder,
                              llm_encoding.Instructions.from_config(config), mesh=mesh,
                              batch_size=batch_size)

  def export_parts(self, model_config, params, encoder, config):
    """LoRA merged into the base: the export is a plain model."""
    cfg, params, settings = llm_embedder.export_parts(
        model_config, params, encoder, llm_encoding.Instructions.from_config(config))
    return cfg, params, {'llm': settings}

  def frozen_patterns(self, config) -> list[str]:
    """With LoRA the decoder trains its adapters only."""
    return [lora.base_pattern('llm/')] if config.model.lora.rank else []

  def apply_init(self, config, state, shardings, model_config):
    """The decoder from config.init.decoder, the ViT from config.init.image."""
    flat = load_decoder_init(config)
    flat |= load_image_init(config, model_config.image,
                            traverse_util.flatten_dict(state.params, sep='/'))
    return put_params(state, shardings, flat)[0] if flat else state
