"""The training loop: everything stateful (checkpoints, logging, data order) lives here, around
the pure `train_step`. The run's parts and its checkpoint restore are `mmjax.train.run_state`
(re-exported here); `setup` adds the optimizer and the sharded train state to them.

`train_and_evaluate(config, workdir)` trains, evaluates periodically and at the end, checkpoints,
and resumes automatically when `workdir` already holds a checkpoint of the same model.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import sys
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import tqdm

from mmjax.data import pipeline
from mmjax.embedder import Embedder, export
from mmjax.eval.evaluators import Suite, build_suite, format_results
from mmjax.parallel import mesh as mesh_lib
from mmjax.train import checkpoint as ckpt_lib
from mmjax.train import optim, state as state_lib, step as step_lib, teacher as teacher_lib
from mmjax.train import compile_cache, health, preemption, report, run_state, transfer
from mmjax.train.run_state import (  # noqa: F401  (re-exported: they lived here)
    InferenceRun, InferenceState, Run, get_tokenizer, init_or_restore, load_for_inference,
    make_embedder, setup_inference)
from mmjax.train.writer import MetricWriter

log = logging.getLogger(__name__)

__all__ = [  # This module's names and those it re-exports from run_state.
    'setup', 'step_inputs', 'lower_step', 'compile_step', 'step_flops', 'make_evaluator',
    'evaluate', 'train_and_evaluate', 'evaluate_checkpoint', 'export_checkpoint',
    'InferenceRun', 'InferenceState', 'Run', 'get_tokenizer', 'init_or_restore',
    'load_for_inference', 'make_embedder', 'setup_inference']


def setup(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
          devices: Sequence[jax.Device] | None = None) -> Run:
  """The run's mesh, model, optimizer and abstract sharded state over `devices` (default: all)."""
  parts = run_state.model_parts(config, workdir, devices)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps,
                                      frozen=transfer.frozen_pattern(config))
  abstract, shardings = state_lib.state_layout(parts['model'], tx, parts['mesh'],
                                               parts['axis_rules'], jax.random.key(config.seed))
  return Run(**parts, **run_state.layout_parts(parts, abstract.params), tx=tx, schedule=schedule,
             abstract_state=abstract, state_shardings=shardings)


def step_inputs(run: Run, teacher) -> tuple[tuple[str, ...], dict[str, Any] | None]:
  """(columns, extra spec) of the train step's batch: the contract's columns, plus the teacher's
  embeddings when the run distils."""
  if not teacher:
    return run.contract.columns, None
  return run.contract.columns + tuple(teacher.step_spec), teacher.step_spec


def lower_step(run: Run, state, rng, columns: tuple[str, ...], extra_spec=None):
  """The jitted train step lowered for batches of `columns` (`extra_spec`: shapes of columns
  beyond the pipeline's, e.g. the teacher's). `state` and `rng` may be concrete arrays or
  ShapeDtypeStructs carrying their shardings (`run.abstract_state`): nothing is allocated."""
  batch_sh = mesh_lib.batch_sharding(run.mesh)
  repl = mesh_lib.replicated(run.mesh)
  spec = {**run.contract.spec, **(extra_spec or {})}
  batch_spec = {k: jax.ShapeDtypeStruct(*spec[k], sharding=batch_sh) for k in columns}
  jitted = step_lib.jit_train_step(run.state_shardings, batch_sh, repl,
                                   step_lib.make_options(run.config, run.mesh, run.contract))
  with mesh_lib.activate(run.mesh, run.axis_rules):
    return jitted.lower(state, batch_spec, rng)


def compile_step(run: Run, state, rng, columns: tuple[str, ...], extra_spec=None):
  """The compiled train step (`lower_step`); logs its FLOPs and memory analysis."""
  t0 = time.perf_counter()
  with mesh_lib.activate(run.mesh, run.axis_rules):
    compiled = lower_step(run, state, rng, columns, extra_spec).compile()
  log.info('Train step compiled in %.1f s.', time.perf_counter() - t0)  # bench/startup.py reads it.
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


def make_evaluator(config) -> Suite:
  """The primary evaluator (config.eval.primary) + the others (mmjax.eval.evaluators)."""
  return build_suite(config)


def evaluate(run: InferenceRun, params, evaluator: Suite,
             embedder: Embedder | None = None) -> dict[str, float]:
  """Eval metrics of `params`; pass the same `embedder` each time to compile only once."""
  if embedder is None:
    embedder = make_embedder(run, params)
  embedder.params = params
  with mesh_lib.activate(run.mesh, run.axis_rules):
    return evaluator(embedder)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains `config` into `workdir` (resuming if possible); returns the final eval metrics."""
  compile_cache.for_run(config, workdir)
  run = setup(config, workdir)
  monitor = health.Monitor.for_run(config)  # Plateau / collapse warnings on the console.
  # Distillation: the teacher's columns (precomputed, or its tokens for the live teacher).
  teacher = teacher_lib.for_run(config, run.mesh, text_pairs=run.contract.text_pairs)
  # On the abstract state, before anything else is traced: fresh and resumed runs share it.
  compiled = compile_step(run, run.abstract_state, state_lib.abstract_key(run.mesh),
                          *step_inputs(run, teacher))
  data_iter, state, rng, start = _resume(run, teacher)
  writer = MetricWriter(run.workdir)
  host_columns = run.contract.columns + (teacher.host_columns if teacher else ())
  evaluator = make_evaluator(config)
  embedder = make_embedder(run, state.params)

  eval_metrics: dict[str, float] = {}
  bar = _progress_bar(config, start)
  logger = _StepLog(run, bar, writer, monitor)
  step = start
  preempt = preemption.Preemption()
  preempted = False
  try:
    while step < config.total_steps:
      local = pipeline.link_duplicates(next(data_iter), jax.process_index())
      batch = mesh_lib.global_batch({k: local[k] for k in host_columns}, run.mesh)
      if teacher:
        batch = teacher(batch)
      state, metrics = compiled(state, batch, rng)
      step += 1
      if step == start + 1:  # bench/startup.py times start-to-first-step by this line.
        log.info('First step done (loss %.4f).', float(metrics['loss']))
      last = step == config.total_steps
      logger.after_step(step, metrics, last)

      if due := evaluator.select(step, last):
        eval_metrics.update(_evaluate_due(run, state.params, due, embedder, writer, bar, step))
        logger.restart_clock()  # Eval time is not training throughput.

      preempted = preempt.reached(step)
      if step % config.checkpoint.every_steps == 0 or last or preempted:
        run.checkpointer.save(step, run_state.state_tree(state, rng), data_iter,
                              {**run.meta, 'step': step})
      if preempted:
        bar.write(f'Preempted (SIGTERM): checkpoint of step {step} saved in '
                  f'{run.checkpointer.directory}; rerun the same command to resume.')
        break
  finally:
    preempt.close()
    bar.close()
    run.checkpointer.close()
    writer.close()
    if jax.process_index() == 0:  # report.png / report.json, also of a failed run.
      report.write_safely(run.workdir)

  if preempted:  # No final evaluation: the machine is going away.
    return {'preempted_at_step': step}
  if not eval_metrics:  # Resumed a finished run: evaluate what is there.
    eval_metrics = evaluate(run, state.params, evaluator, embedder)
  return _write_result(run, eval_metrics, evaluator, step)


class _StepLog:
  """The progress bar and the train metrics of every `log_every_steps` steps: a step's metrics
  are read back only once the next one is queued, so logging never stalls the device."""

  def __init__(self, run: Run, bar, writer: MetricWriter, monitor: health.Monitor):
    self.run, self.bar, self.writer, self.monitor = run, bar, writer, monitor
    self.pending: list[dict[str, jax.Array]] = []
    self.restart_clock()

  def restart_clock(self) -> None:
    self.t0, self.steps = time.perf_counter(), 0

  def after_step(self, step: int, metrics: dict[str, jax.Array], last: bool) -> None:
    config = self.run.config
    self.steps += 1
    if self.pending:
      # Wait for the previous step (this one is queued behind it): the bar follows finished steps.
      jax.block_until_ready(self.pending[-1]['loss'])
      self.bar.update(config.batch_size)
    self.pending.append(metrics)
    if step % config.log_every_steps == 0 or last:
      host = jax.device_get(self.pending)
      self.bar.update(config.batch_size)
      summary = _train_summary(self.run, host, step, self.steps, time.perf_counter() - self.t0)
      self.writer.write(step, summary)
      self.monitor.observe(step, summary, echo=self.bar.write)
      self.bar.set_postfix(loss=f'{summary["train/loss"]:.4f}')
      self.pending = []
      self.restart_clock()


def _resume(run: Run, teacher) -> tuple[Any, Any, jax.Array, int]:
  """(data iterator, state, base rng, start step): the run's data and its state, restored from
  the newest good checkpoint (or fresh); config.json is written only once the workdir was
  accepted (an incompatible one is refused before anything is written into it)."""
  config = run.config
  data_iter = iter(run.kind.train_dataset(
      config, run.encoder, run.contract, process_index=jax.process_index(),
      process_count=jax.process_count(), teacher_encoder=teacher.encoder if teacher else None))
  state, rng, start = init_or_restore(run, data_iter)
  if jax.process_index() == 0:
    ckpt_lib.write_json(run.workdir / 'config.json', json.loads(config.to_json_best_effort()))
  log.info('Model: %s parameters. Mesh: %s. Start step %d of %d.',
           f'{state_lib.param_count(state.params):,}', dict(run.mesh.shape), start,
           config.total_steps)
  return data_iter, state, rng, start


def _evaluate_due(run: Run, params, due: Suite, embedder: Embedder, writer: MetricWriter, bar,
                  step: int) -> dict[str, float]:
  """The evaluators due at `step`: logged, and their headline numbers under the progress bar."""
  t0 = time.perf_counter()
  new = evaluate(run, params, due, embedder)
  log.info('Evaluated at step %d in %.1f s.', step, time.perf_counter() - t0)
  writer.write(step, {f'eval/{k}': v for k, v in new.items()})
  bar.write(f'step {step}: ' + ', '.join(
      f'{k}={new[k]:.4f}' for k in ('i2t/recall@1', 't2i/recall@1', 'i2t/mrr') if k in new))
  return new


def _progress_bar(config, start: int) -> tqdm.tqdm:
  """Pairs trained so far, on process 0's stdout."""
  return tqdm.tqdm(total=config.total_steps * config.batch_size,
                   initial=start * config.batch_size, unit='pair', unit_scale=True,
                   dynamic_ncols=True, file=sys.stdout, disable=jax.process_index() != 0,
                   mininterval=1.0,
                   bar_format='{l_bar}{bar}| {n_fmt}/{total_fmt} pairs [{elapsed}<{remaining}, '
                              '{rate_fmt}{postfix}]')


def _train_summary(run: Run, host: list[dict[str, Any]], step: int, steps: int,
                   seconds: float) -> dict[str, float]:
  """The logged train/* values of the `steps` steps since the last log (their host metrics);
  a non-finite loss stops the run."""
  summary = {f'train/{k}': float(np.mean([m[k] for m in host])) for k in host[0]}
  summary.update(health.logged_values(host))  # Computed on the log step only.
  summary['train/pairs_per_sec'] = steps * run.config.batch_size / seconds
  summary['train/learning_rate'] = float(run.schedule(step - 1))
  if not math.isfinite(summary['train/loss']):
    raise FloatingPointError(f'Loss is {summary["train/loss"]} at step {step}.')
  return summary


def _write_result(run: InferenceRun, metrics: dict[str, float], evaluator: Suite,
                  step: int) -> dict:
  """eval.json (process 0: the primary evaluator's metrics at the top level, its chance levels
  and set sizes) and the printed table of the primary evaluation."""
  result = {**evaluator.with_prefixed_primary(metrics), 'step': step, **evaluator.headline()}
  if jax.process_index() == 0:
    ckpt_lib.write_json(run.workdir / 'eval.json', result)
    print(format_results(metrics, title=evaluator.title(step)))
  return result


def evaluate_checkpoint(config, workdir) -> dict:
  """`--mode=eval`: the retrieval evaluation of the newest checkpoint, into eval.json."""
  compile_cache.for_run(config, workdir)
  run, state, step = load_for_inference(config, workdir)
  evaluator = make_evaluator(config)
  metrics = evaluate(run, state.params, evaluator)
  run.checkpointer.close()
  if jax.process_index() == 0:
    MetricWriter(run.workdir).write(step, {f'eval/{k}': v for k, v in metrics.items()})
  return _write_result(run, metrics, evaluator, step)


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
