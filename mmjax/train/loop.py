"""The training loop: everything stateful (checkpoints, logging, data order) lives here, around
the pure `train_step`.

`train_and_evaluate(config, workdir)` trains, evaluates periodically and at the end, checkpoints,
and resumes automatically when `workdir` already holds a checkpoint of the same model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from mmjax import config as config_lib
from mmjax import kinds
from mmjax.data import pipeline, tokenizer as tokenizer_lib
from mmjax.embedder import Embedder, export
from mmjax.eval.evaluators import Suite, build_suite, format_results
from mmjax.parallel import mesh as mesh_lib
from mmjax.train import checkpoint as ckpt_lib
from mmjax.train import optim, state as state_lib, step as step_lib, teacher as teacher_lib
from mmjax.train import health, report, transfer
from mmjax.train.writer import MetricWriter

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
  """Everything built from (config, workdir) before the first step."""

  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  mesh: Any
  axis_rules: Any
  kind: kinds.ModelKind
  contract: kinds.DataContract  # Computed once: the batches' columns, roles, text pairs.
  model_config: Any  # The kind's typed config (mmjax.types).
  model: Any  # The kind's Flax module.
  tx: Any
  schedule: Any
  encoder: Any  # Texts (and images) -> model inputs (tokenizer.TextEncoder, MultimodalEncoder).
  abstract_state: Any
  state_shardings: Any
  checkpointer: ckpt_lib.Checkpointer
  meta: dict[str, Any]


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


def setup(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Run:
  config_lib.validate(config)
  workdir = pathlib.Path(workdir).absolute()
  mesh = mesh_lib.make_mesh(config.mesh)
  axis_rules = mesh_lib.rules(config)
  kind = kinds.get(config)
  model_config = kind.model_config(config)
  model = kind.model(model_config)
  encoder = kind.encoder(config, get_tokenizer(config, workdir))
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps,
                                      frozen=transfer.frozen_pattern(config))
  abstract, shardings = state_lib.state_layout(model, tx, mesh, axis_rules,
                                               jax.random.key(config.seed))
  meta = {'model': model_config.to_dict(),
          'param_shapes': ckpt_lib.shape_signature(abstract.params)}
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.async_save)
  return Run(config, workdir, mesh, axis_rules, kind, kind.contract(config), model_config, model,
             tx, schedule, encoder, abstract, shardings, checkpointer, meta)


def _state_tree(state, rng) -> dict[str, Any]:
  return {'params': state.params, 'opt_state': state.opt_state, 'step': state.step,
          'rng': jax.random.key_data(rng)}


def init_or_restore(run: Run, data_iter) -> tuple[Any, jax.Array, int]:
  """(state, base rng, start step): from the newest good checkpoint, or freshly initialised."""
  rng = jax.random.key(run.config.seed)
  repl = mesh_lib.replicated(run.mesh)
  key_data = jax.random.key_data(rng)
  target = _state_tree(run.abstract_state, rng)
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


def compile_step(run: Run, state, rng, columns: tuple[str, ...], extra_spec=None):
  """The jitted, lowered and compiled train step on batches of `columns` (`extra_spec`: shapes
  of columns beyond the pipeline's, e.g. the teacher's); logs its FLOPs and memory analysis."""
  batch_sh = mesh_lib.batch_sharding(run.mesh)
  repl = mesh_lib.replicated(run.mesh)
  spec = {**run.contract.spec, **(extra_spec or {})}
  batch_spec = {k: jax.ShapeDtypeStruct(*spec[k], sharding=batch_sh) for k in columns}
  jitted = step_lib.jit_train_step(run.state_shardings, batch_sh, repl,
                                   step_lib.make_options(run.config, run.mesh, run.contract))
  with mesh_lib.activate(run.mesh, run.axis_rules):
    compiled = jitted.lower(state, batch_spec, rng).compile()
  flops = step_flops(compiled)
  mem = compiled.memory_analysis()
  if mem is not None:
    log.info('Train step memory per device: arguments %.1f MiB, outputs %.1f MiB, temp %.1f MiB.',
             mem.argument_size_in_bytes / 2**20, mem.output_size_in_bytes / 2**20,
             mem.temp_size_in_bytes / 2**20)
  if flops:
    log.info('Train step: %.3f TFLOP per step (XLA cost analysis).', flops / 1e12)
  return compiled


def step_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def make_embedder(run: Run, params) -> Embedder:
  """The model kind's runner over `params` (what the evaluators embed through)."""
  return run.kind.embedder(run.model_config, params, run.encoder, run.config, mesh=run.mesh,
                           batch_size=run.config.eval.batch_size)


def make_evaluator(config) -> Suite:
  """The primary evaluator (config.eval.primary) + the others (mmjax.eval.evaluators)."""
  return build_suite(config)


def evaluate(run: Run, params, evaluator: Suite,
             embedder: Embedder | None = None) -> dict[str, float]:
  """Eval metrics of `params`; pass the same `embedder` each time to compile only once."""
  if embedder is None:
    embedder = make_embedder(run, params)
  embedder.params = params
  with mesh_lib.activate(run.mesh, run.axis_rules):
    return evaluator(embedder)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains `config` into `workdir` (resuming if possible); returns the final eval metrics."""
  run = setup(config, workdir)
  monitor = health.Monitor.for_run(config)  # Plateau / collapse warnings on the console.
  # Distillation: the teacher's columns (precomputed, or its tokens for the live teacher).
  teacher = teacher_lib.for_run(config, run.mesh, text_pairs=run.contract.text_pairs)
  data_iter = iter(run.kind.train_dataset(
      config, run.encoder, run.contract, process_index=jax.process_index(),
      process_count=jax.process_count(), teacher_encoder=teacher.encoder if teacher else None))
  # Restore (or refuse an incompatible workdir) before writing anything into the workdir.
  state, rng, start = init_or_restore(run, data_iter)
  writer = MetricWriter(run.workdir)
  if jax.process_index() == 0:
    ckpt_lib.write_json(run.workdir / 'config.json', json.loads(config.to_json_best_effort()))
  log.info('Model: %s parameters. Mesh: %s. Start step %d of %d.',
           f'{state_lib.param_count(state.params):,}', dict(run.mesh.shape), start,
           config.total_steps)
  columns = run.contract.columns
  host_columns = columns + (teacher.host_columns if teacher else ())
  compiled = compile_step(run, state, rng, columns + tuple(teacher.step_spec if teacher else ()),
                          teacher.step_spec if teacher else None)
  evaluator = make_evaluator(config)
  embedder = make_embedder(run, state.params)

  eval_metrics: dict[str, float] = {}
  pending: list[dict[str, jax.Array]] = []
  bar = tqdm.tqdm(total=config.total_steps * config.batch_size, initial=start * config.batch_size,
                  unit='pair', unit_scale=True, dynamic_ncols=True, file=sys.stdout,
                  disable=jax.process_index() != 0, mininterval=1.0,
                  bar_format='{l_bar}{bar}| {n_fmt}/{total_fmt} pairs [{elapsed}<{remaining}, '
                             '{rate_fmt}{postfix}]')
  t_log, steps_since_log = time.perf_counter(), 0
  step = start
  try:
    while step < config.total_steps:
      local = pipeline.link_duplicates(next(data_iter), jax.process_index())
      batch = mesh_lib.global_batch({k: local[k] for k in host_columns}, run.mesh)
      if teacher:
        batch = teacher(batch)
      state, metrics = compiled(state, batch, rng)
      step += 1
      steps_since_log += 1
      if pending:
        # Wait for the previous step (this one is already queued behind it), so the bar's rate
        # and ETA follow finished steps rather than dispatches, without stalling the device.
        jax.block_until_ready(pending[-1]['loss'])
        bar.update(config.batch_size)
      pending.append(metrics)
      last = step == config.total_steps

      if step % config.log_every_steps == 0 or last:
        host = jax.device_get(pending)
        bar.update(config.batch_size)
        summary = {f'train/{k}': float(np.mean([m[k] for m in host])) for k in host[0]}
        summary.update(health.logged_values(host))  # Computed on the log step only.
        dt = time.perf_counter() - t_log
        summary['train/pairs_per_sec'] = steps_since_log * config.batch_size / dt
        summary['train/learning_rate'] = float(run.schedule(step - 1))
        if not math.isfinite(summary['train/loss']):
          raise FloatingPointError(f'Loss is {summary["train/loss"]} at step {step}.')
        writer.write(step, summary)
        monitor.observe(step, summary, echo=bar.write)
        bar.set_postfix(loss=f'{summary["train/loss"]:.4f}')
        pending, t_log, steps_since_log = [], time.perf_counter(), 0

      due = evaluator.select(step, last)
      if due:
        new = evaluate(run, state.params, due, embedder)
        eval_metrics.update(new)
        writer.write(step, {f'eval/{k}': v for k, v in new.items()})
        bar.write(f'step {step}: ' + ', '.join(
            f'{k}={new[k]:.4f}' for k in ('i2t/recall@1', 't2i/recall@1', 'i2t/mrr') if k in new))
        t_log = time.perf_counter()  # Eval time is not training throughput.

      if step % config.checkpoint.every_steps == 0 or last:
        run.checkpointer.save(step, _state_tree(state, rng), data_iter,
                              {**run.meta, 'step': step})
  finally:
    bar.close()
    run.checkpointer.close()
    writer.close()
    if jax.process_index() == 0:  # report.png / report.json, also of a failed run.
      report.write_safely(run.workdir)

  if not eval_metrics:  # Resumed a finished run: evaluate what is there.
    eval_metrics = evaluate(run, state.params, evaluator, embedder)
  result = {**evaluator.with_prefixed_primary(eval_metrics), 'step': step,
            **evaluator.headline()}
  if jax.process_index() == 0:
    ckpt_lib.write_json(run.workdir / 'eval.json', result)
    print(format_results(eval_metrics, title=evaluator.title(step)))
  return result


def load_for_inference(config, workdir):
  """(run, state) from the newest checkpoint of `workdir`; an error if there is none."""
  run = setup(config, workdir)
  if run.checkpointer.latest_step() is None:
    raise FileNotFoundError(f'No checkpoint in {run.checkpointer.directory}.')
  state, _, step = init_or_restore(run, None)
  return run, state, step


def evaluate_checkpoint(config, workdir) -> dict:
  """`--mode=eval`: the retrieval evaluation of the newest checkpoint, into eval.json."""
  run, state, step = load_for_inference(config, workdir)
  evaluator = make_evaluator(config)
  metrics = evaluate(run, state.params, evaluator)
  run.checkpointer.close()
  result = {**evaluator.with_prefixed_primary(metrics), 'step': step, **evaluator.headline()}
  if jax.process_index() == 0:
    MetricWriter(run.workdir).write(step, {f'eval/{k}': v for k, v in metrics.items()})
    ckpt_lib.write_json(run.workdir / 'eval.json', result)
    print(format_results(metrics, title=evaluator.title(step)))
  return result


def export_checkpoint(config, workdir) -> pathlib.Path:
  """`--mode=export`: params only + config + tokenizer into DIR/export."""
  run, state, step = load_for_inference(config, workdir)
  run.checkpointer.close()
  model_config, params, extra = run.kind.export_parts(run.model_config, state.params, run.encoder,
                                                      config)
  out = export(run.workdir / 'export', model_config, params, run.encoder.to_str(),
               extra={'step': step, **extra}, fmt=run.kind.export_format)
  log.info('Exported step %d to %s.', step, out)
  return out
