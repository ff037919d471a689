"""The run, without its training loop: what is built from (config, workdir) for training and for
inference alike (mesh, model kind, typed model config, encoder, parameter layout, checkpointer),
and the state, initialised or restored from the newest good checkpoint.

It never builds an optimizer: `mmjax.train.loop.setup` adds the optimizer and the sharded train
state, while `load_for_inference` restores the params alone, so `--mode=eval`, `--mode=export`
and the robustness report never pay for optimizer state.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Sequence

import jax
import ml_collections

from mmjax import config as config_lib
from mmjax import kinds
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.embedder import Embedder
from mmjax.parallel import mesh as mesh_lib
from mmjax.train import checkpoint as ckpt_lib
from mmjax.train import state as state_lib, transfer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class InferenceRun:
  """Everything built from (config, workdir) to evaluate or export a checkpoint: no optimizer."""

  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  mesh: Any
  axis_rules: Any
  kind: kinds.ModelKind
  contract: kinds.DataContract  # Computed once: the batches' columns, roles, text pairs.
  model_config: Any  # The kind's typed config (mmjax.types).
  model: Any  # The kind's Flax module.
  encoder: Any  # Texts (and images) -> model inputs (tokenizer.TextEncoder, MultimodalEncoder).
  abstract_params: Any  # Shapes, dtypes and shardings of the params: the restore target.
  checkpointer: ckpt_lib.Checkpointer
  meta: dict[str, Any]


@dataclasses.dataclass
class Run(InferenceRun):
  """Everything built from (config, workdir) before the first step."""

  tx: Any
  schedule: Any
  abstract_state: Any
  state_shardings: Any


def get_tokenizer(config, workdir: pathlib.Path):
  """The run's tokenizer, saved in the workdir so that a resumed run uses the very same one."""
  saved = workdir / tokenizer_lib.TOKENIZER_FILE
  if saved.exists():
    return tokenizer_lib.load(saved)
  kind = kinds.get(config)
  if path := transfer.tokenizer_path(config):  # config.init.text brings its tokenizer.
    tok = tokenizer_lib.load(path)
  else:
    tok = tokenizer_lib.train_wordpiece(kind.tokenizer_corpus(config), config.tokenizer.vocab_size)
  tok, (key, vocab) = kind.prepare_tokenizer(tok, config)
  if tok.get_vocab_size() > vocab:
    raise config_lib.ConfigError(
        f'The tokenizer has {tok.get_vocab_size()} tokens but config.{key}={vocab}; raise '
        f'config.{key}.')
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_suffix('.tmp')  # Other processes may be reading `saved` right now.
    tmp.write_text(tok.to_str())
    tmp.replace(saved)
  return tok


def model_parts(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                 devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
  """The InferenceRun fields that do not depend on the parameter layout, over `devices`
  (default: all; `mmjax.train.aot` passes a TPU topology's devices to compile for it)."""
  config_lib.validate(config, num_devices=None if devices is None else len(devices))
  workdir = pathlib.Path(workdir).absolute()
  mesh, axis_rules = mesh_lib.make_mesh(config.mesh, devices), mesh_lib.rules(config)
  kind = kinds.get(config)
  model_config = kind.model_config(config)
  model = kind.model(model_config)
  encoder = kind.encoder(config, get_tokenizer(config, workdir))
  return dict(config=config, workdir=workdir, mesh=mesh, axis_rules=axis_rules, kind=kind,
              contract=kind.contract(config), model_config=model_config, model=model,
              encoder=encoder)


def layout_parts(parts: dict[str, Any], abstract_params) -> dict[str, Any]:
  """The restore target, the checkpoint meta of this model and the checkpointer."""
  config = parts['config']
  meta = {'model': parts['model_config'].to_dict(),
          'param_shapes': ckpt_lib.shape_signature(abstract_params)}
  checkpointer = ckpt_lib.Checkpointer(parts['workdir'], keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.async_save)
  return dict(abstract_params=abstract_params, checkpointer=checkpointer, meta=meta)


def setup_inference(config: ml_collections.ConfigDict,
                    workdir: str | pathlib.Path) -> InferenceRun:
  """`setup` without the optimizer: the params' layout alone (evaluation, export)."""
  parts = model_parts(config, workdir)
  abstract, _ = state_lib.params_layout(parts['model'], parts['mesh'], parts['axis_rules'],
                                        jax.random.key(config.seed))
  return InferenceRun(**parts, **layout_parts(parts, abstract))


def state_tree(state, rng) -> dict[str, Any]:
  return {'params': state.params, 'opt_state': state.opt_state, 'step': state.step,
          'rng': jax.random.key_data(rng)}


def init_or_restore(run: Run, data_iter) -> tuple[Any, jax.Array, int]:
  """(state, base rng, start step): from the newest good checkpoint, or freshly initialised."""
  rng = jax.random.key(run.config.seed)
  repl = mesh_lib.replicated(run.mesh)
  key_data = jax.random.key_data(rng)
  target = state_tree(run.abstract_state, rng)
  target['rng'] = jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=repl)
  restored = run.checkpointer.restore_latest(target, data_iter, run.meta)
  if restored is not None:
    step, tree = restored
    state = run.abstract_state.replace(params=tree['params'], opt_state=tree['opt_state'],
                                       step=tree['step'])
    rng = jax.random.wrap_key_data(tree['rng'])
    log.info('Resumed from %s at step %d.', run.checkpointer.directory, step)
    return state, rng, int(step)
  init_rng, _ = jax.random.split(rng)
  state, _ = state_lib.create_train_state(run.model, run.tx, run.mesh, run.axis_rules, init_rng)
  state = transfer.apply_init(run.config, state, run.state_shardings, run.model_config)
  # Replicated over the whole mesh (not on one local device), so every process can save it.
  return state, mesh_lib.replicate(rng, run.mesh), 0


def make_embedder(run: InferenceRun, params) -> Embedder:
  """The model kind's runner over `params` (what the evaluators embed through)."""
  return run.kind.embedder(run.model_config, params, run.encoder, run.config, mesh=run.mesh,
                           batch_size=run.config.eval.batch_size)


@dataclasses.dataclass(frozen=True)
class InferenceState:
  """What `load_for_inference` restores of a train state: the params, never the optimizer's."""

  params: Any


def load_for_inference(config, workdir) -> tuple[InferenceRun, InferenceState, int]:
  """(run, state, step) of the newest readable checkpoint of `workdir`, params only (no optimizer
  is built); an error if there is none."""
  run = setup_inference(config, workdir)
  if run.checkpointer.latest_step() is None:
    raise FileNotFoundError(f'No checkpoint in {run.checkpointer.directory}.')
  restored = run.checkpointer.restore_latest({'params': run.abstract_params}, None, run.meta,
                                             partial=True)
  if restored is None:
    raise FileNotFoundError(f'No readable checkpoint in {run.checkpointer.directory} (the '
                            f'unreadable ones were moved to {run.checkpointer.corrupt_dir}).')
  step, tree = restored
  return run, InferenceState(tree['params']), int(step)
