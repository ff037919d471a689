r"""Ahead-of-time compilation for a TPU topology, on a machine without TPUs.

  python -m mmjax.main --config=configs/tiny.py --workdir=runs/aot --mode=compile \
      --compile_topology=v5e:2x2

With the `libtpu` wheel installed (`pip install -e '.[tpu]'`), XLA's TPU compiler runs on any
CPU: `jax.experimental.topologies.get_topology_desc` gives the devices of a pod slice, and the
run's real train step (the state layout and shardings of `loop.setup`, the cross-device loss,
GradCache) and the evaluator's embedding steps are lowered over a mesh of them with abstract
inputs (ShapeDtypeStructs carrying their shardings) and compiled. Nothing is allocated.

The report (`compile_<topology>.json` in the workdir, and a table on stdout) gives per chip: the
memory of the compiled program (`memory_analysis()`) against the chip's HBM, the FLOPs and bytes
of `cost_analysis()`, the collectives in the compiled HLO (count and bytes, loops unrolled by
their trip counts), and a roofline step time: an *estimate* from the chip table below, not a
measurement. A program that does not fit raises `DoesNotFit` with the per-chip figure and the
largest buffers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import topologies

from mmjax.data import teacher_embed
from mmjax.parallel import mesh as mesh_lib
from mmjax.train import loop
from mmjax.train.hlo import COLLECTIVES, parse_hlo
from mmjax.train import teacher as teacher_lib
from mmjax.types import ConfigError

log = logging.getLogger(__name__)

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip figures of one TPU generation (dense bf16 peak; bandwidths in bytes/s)."""

  name: str
  peak_flops: float  # bf16 FLOP/s.
  hbm_bandwidth: float  # Bytes/s.
  ici_bandwidth: float  # Bytes/s, all of the chip's ICI links together (one direction summed).
  hbm_bytes: int


# Sources: Google Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p,
# /v6e: "Peak compute per chip (bf16)", "HBM capacity/bandwidth per chip", "Interchip
# Interconnect BW"; the ICI figures there are in Gbit/s per chip: v4 2400, v5e 1600, v5p 4800,
# v6e 3584), cross-checked with "How to Scale Your Model" (jax-ml.github.io/scaling-book/tpus).
CHIPS = {
    'v4': Chip('v4', 275e12, 1200e9, 2400e9 / 8, 32 * GiB),
    'v5e': Chip('v5e', 197e12, 819e9, 1600e9 / 8, 16 * GiB),
    'v5p': Chip('v5p', 459e12, 2765e9, 4800e9 / 8, 95 * GiB),
    'v6e': Chip('v6e', 918e12, 1640e9, 3584e9 / 8, 32 * GiB),
}
# jax's device_kind of each generation's chips.
DEVICE_KINDS = {'TPU v4': 'v4', 'TPU v5 lite': 'v5e', 'TPU v5e': 'v5e', 'TPU v5': 'v5p',
                'TPU v5p': 'v5p', 'TPU v6 lite': 'v6e', 'TPU v6e': 'v6e'}



class DoesNotFit(ConfigError):
  """The compiled program needs more memory per chip than the chip's HBM."""


def _libtpu_environment() -> None:
  """Compile-only use of libtpu: no TPU runtime to find or to share between processes."""
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # Concurrent compiles (tests, CI).
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')


def topology(name: str) -> tuple[list[Any], Chip]:
  """(devices, chip) of a TPU topology such as 'v5e:2x2' or 'v5p:4x4x8'."""
  if importlib.util.find_spec('libtpu') is None:  # The `tpu` extra: XLA's TPU compiler.
    raise ConfigError(f"--compile_topology={name}: compiling for TPU needs the libtpu wheel "
                      "(pip install -e '.[tpu]', or `make test-tpu-compile`).")
  _libtpu_environment()
  try:
    desc = topologies.get_topology_desc(topology_name=name, platform='tpu')
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"--compile_topology={name!r} is not a TPU topology libtpu knows "
                      f"(e.g. v5e:2x2, v5e:16x16, v5p:4x4x8, v4:2x2x4, v6e:8x8): {e}") from e
  devices = list(desc.devices)
  kind = devices[0].device_kind
  chip = CHIPS.get(DEVICE_KINDS.get(kind, name.split(':')[0].split('-')[0].lower()))
  if chip is None:
    raise ConfigError(f'--compile_topology={name!r}: no chip figures for device kind {kind!r} '
                      f'(known: {", ".join(CHIPS)}; add it to mmjax.train.aot.CHIPS).')
  return devices, chip


# --- Compile and report --------------------------------------------------------------------------

def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return dict(cost or {})


def _largest_arguments(abstract_state, n: int = 8) -> list[dict[str, Any]]:
  """The biggest per-chip shards of the train state (parameters, optimizer state), by path."""
  rows = []
  for path, x in jax.tree_util.tree_leaves_with_path(abstract_state):
    if not hasattr(x, 'sharding') or x.sharding is None:
      continue
    shard = x.sharding.shard_shape(x.shape)
    rows.append({'name': jax.tree_util.keystr(path), 'shape': list(x.shape),
                 'per_chip_shape': list(shard),
                 'bytes': int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize})
  return sorted(rows, key=lambda r: -r['bytes'])[:n]


def analyse(compiled, chip: Chip) -> dict[str, Any]:
  """Memory, cost, collectives and the roofline estimate of one compiled program, per chip."""
  mem = compiled.memory_analysis()
  memory = {
      'arguments': mem.argument_size_in_bytes, 'outputs': mem.output_size_in_bytes,
      'aliased': mem.alias_size_in_bytes, 'temporaries': mem.temp_size_in_bytes,
      'generated_code': mem.generated_code_size_in_bytes}
  # Donated arguments share their buffers with the outputs they alias.
  memory['total'] = (memory['arguments'] + memory['outputs'] - memory['aliased'] +
                     memory['temporaries'] + memory['generated_code'])
  memory['hbm'] = chip.hbm_bytes
  memory['fraction_of_hbm'] = memory['total'] / chip.hbm_bytes
  cost = _cost(compiled)
  hlo = parse_hlo(compiled.as_text())
  flops = float(cost.get('flops', 0.0))
  bytes_accessed = float(cost.get('bytes accessed', 0.0))
  coll_bytes = sum(v['bytes'] for v in hlo['collectives'].values())
  times = {'compute_s': flops / chip.peak_flops, 'hbm_s': bytes_accessed / chip.hbm_bandwidth,
           'ici_s': coll_bytes / chip.ici_bandwidth}
  bound = max(times, key=times.get)
  roofline = {**times, 'step_s': times[bound], 'bound': bound.removesuffix('_s'),
              'note': 'ESTIMATE: max(FLOPs / peak bf16, bytes accessed / HBM bandwidth, '
                      'collective bytes / ICI bandwidth) from mmjax.train.aot.CHIPS, assuming '
                      'perfect overlap; not a measurement.'}
  if 'optimal_seconds' in cost:
    roofline['xla_optimal_s'] = float(cost['optimal_seconds'])
  return {'memory': memory, 'flops': flops, 'bytes_accessed': bytes_accessed,
          'collectives': hlo['collectives'], 'collective_bytes': coll_bytes,
          'conditional_collectives': hlo['conditional_collectives'],
          'loops_without_trip_count': hlo['loops_without_trip_count'],
          'largest_values': hlo['largest_values'], 'roofline': roofline}


def _abstract_rng(seed: int, mesh) -> jax.ShapeDtypeStruct:
  key = jax.eval_shape(lambda: jax.random.key(seed))
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=mesh_lib.replicated(mesh))


def compile_programs(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                     topology_name: str, *, embedding: bool = True
                     ) -> tuple[loop.Run, Chip, dict[str, Any]]:
  """(run, chip, {program name: compiled}) of the run's train step and (with `embedding`) the
  evaluator's embedding steps compiled for `topology_name`, from the same set-up as training
  (`loop.setup`, `loop.lower_step`, `loop.make_embedder`)."""
  devices, chip = topology(topology_name)
  run = loop.setup(config, workdir, devices=devices)
  if teacher_embed.distills(config) and config.distill.source != 'data':
    raise ConfigError('--mode=compile compiles distillation from precomputed teacher embeddings '
                      "only (config.distill.source='data'); the live teacher is not compiled.")
  teacher = teacher_lib.for_run(config, run.mesh, text_pairs=run.contract.text_pairs)
  rng = _abstract_rng(config.seed, run.mesh)
  compiled = {}
  with mesh_lib.activate(run.mesh, run.axis_rules):
    lowered = {'train_step': loop.lower_step(run, run.abstract_state, rng,
                                             *loop.step_inputs(run, teacher))}
    if embedding:
      embedder = loop.make_embedder(run, run.abstract_state.params)
      for name, (fn, args) in embedder.embedding_steps().items():
        lowered[name] = fn.lower(*args)
    for name, program in lowered.items():
      try:
        compiled[name] = program.compile()
      except jax.errors.JaxRuntimeError as e:
        if 'RESOURCE_EXHAUSTED' not in str(e):
          raise
        raise DoesNotFit(_compiler_oom_message(name, e, run, chip, topology_name)) from e
  return run, chip, compiled


def _batch_bytes(run: loop.Run) -> int:
  """Bytes of one global batch of the train step's columns."""
  return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
             for col, (shape, dtype) in run.contract.spec.items() if col in run.contract.columns)


def _compiler_oom_message(name: str, error: Exception, run: loop.Run, chip: Chip,
                          topology_name: str) -> str:
  """XLA:TPU refuses a program whose temporaries exceed HBM while compiling it (no executable,
  no memory analysis): its figure, plus the per-chip state from the shardings."""
  state = _largest_arguments(run.abstract_state, n=10**9)
  shards = run.mesh.shape['data'] * run.mesh.shape['fsdp']
  lines = [f'{name} does not fit a {chip.name} chip ({chip.hbm_bytes / GiB:.0f} GiB HBM) on '
           f'{topology_name}, mesh {dict(run.mesh.shape)}, batch {run.config.batch_size}: XLA: '
           f'{str(error).strip()}',
           f'Per chip: train state {human_bytes(sum(r["bytes"] for r in state))}, batch '
           f'{human_bytes(_batch_bytes(run) / shards)} ({run.config.batch_size // shards} rows). '
           'Largest state buffers per chip:']
  lines += [f'  {r["bytes"] / 2**20:10.1f} MiB  {r["name"]}  {r["per_chip_shape"]}'
            for r in state[:8]]
  lines.append('Shard the state (config.mesh.fsdp), use micro-batches (config.micro_batches), '
               'bf16 compute (config.model.dtype) or a smaller batch.')
  return '\n'.join(lines)


def compile_for_topology(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                         topology_name: str, *, check_fit: bool = True) -> dict[str, Any]:
  """`--mode=compile`: compiles the run for `topology_name`, writes
  `workdir/compile_<topology>.json`, prints the table and returns the report. Raises
  `DoesNotFit` (after writing the report) when a program exceeds the chip's HBM."""
  run, chip, compiled = compile_programs(config, workdir, topology_name)
  programs = {name: analyse(c, chip) for name, c in compiled.items()}
  train = programs['train_step']
  train['largest_arguments'] = _largest_arguments(run.abstract_state)
  report = {
      'topology': topology_name, 'chip': dataclasses.asdict(chip), 'num_chips': run.mesh.size,
      'mesh': dict(run.mesh.shape), 'batch_size': config.batch_size,
      'micro_batches': config.micro_batches, 'loss': f'{config.loss.kind}/{config.loss.impl}',
      'dtype': config.model.dtype, 'param_dtype': config.model.param_dtype,
      'train_pairs_per_s_estimate': config.batch_size / max(train['roofline']['step_s'], 1e-12),
      'programs': programs}
  path = pathlib.Path(workdir).absolute() / f'compile_{topology_name.replace(":", "_")}.json'
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(report, indent=2, sort_keys=True))
  print(format_report(report))
  log.info('Compile report: %s', path)
  if check_fit:
    check_fits(report)
  return report


def check_fits(report: dict[str, Any]) -> None:
  """Raises DoesNotFit naming the program, its per-chip memory and its largest buffers."""
  for name, prog in report['programs'].items():
    mem = prog['memory']
    if mem['total'] <= mem['hbm']:
      continue
    lines = [f'{name} needs {mem["total"] / GiB:.2f} GiB per chip but a {report["chip"]["name"]} '
             f'chip has {mem["hbm"] / GiB:.0f} GiB of HBM ({report["topology"]}, mesh '
             f'{report["mesh"]}, batch {report["batch_size"]}): arguments '
             f'{mem["arguments"] / GiB:.2f} GiB, temporaries {mem["temporaries"] / GiB:.2f} GiB.',
             'Largest buffers per chip:']
    rows = prog.get('largest_arguments', []) + prog['largest_values']
    for r in sorted(rows, key=lambda r: -r['bytes'])[:8]:
      lines.append(f'  {r["bytes"] / 2**20:10.1f} MiB  {r["name"]}  '
                   f'{r.get("per_chip_shape", r["shape"])}')
    lines.append('Shard the state (config.mesh.fsdp), use micro-batches (config.micro_batches), '
                 'bf16 compute (config.model.dtype) or a smaller batch.')
    raise DoesNotFit('\n'.join(lines))


def human_bytes(n: float) -> str:
  for unit, size in (('GiB', GiB), ('MiB', 2**20), ('KiB', 2**10)):
    if abs(n) >= size:
      return f'{n / size:,.1f} {unit}'
  return f'{n:.0f} B'


def human_flops(n: float) -> str:
  for unit, size in (('PFLOP', 1e15), ('TFLOP', 1e12), ('GFLOP', 1e9), ('MFLOP', 1e6)):
    if n >= size:
      return f'{n / size:,.2f} {unit}'
  return f'{n:,.0f} FLOP'


def human_seconds(s: float) -> str:
  return f'{s * 1e3:,.2f} ms' if s >= 1e-3 else f'{s * 1e6:,.1f} us'


def format_report(report: dict[str, Any]) -> str:
  """The report as a table (per chip)."""
  chip = report['chip']
  out = [f'Compiled for {report["topology"]}: {report["num_chips"]} x {chip["name"]} '
         f'({chip["hbm_bytes"] / GiB:.0f} GiB HBM each), mesh {report["mesh"]}, global batch '
         f'{report["batch_size"]} (micro-batches {report["micro_batches"]}), loss '
         f'{report["loss"]}, compute {report["dtype"]} / params {report["param_dtype"]}.',
         'Per chip:']
  names = list(report['programs'])
  progs = [report['programs'][n] for n in names]
  row = lambda label, cells: f'  {label:<30}' + ''.join(f'{c:>22}' for c in cells)  # noqa: E731
  out.append(row('', names))
  for key in ('arguments', 'outputs', 'aliased', 'temporaries', 'generated_code', 'total'):
    out.append(row(f'memory: {key}', [human_bytes(p['memory'][key]) for p in progs]))
  out.append(row('memory: share of HBM', [f'{p["memory"]["fraction_of_hbm"]:.1%}' for p in progs]))
  out.append(row('FLOPs per step', [human_flops(p['flops']) for p in progs]))
  out.append(row('bytes accessed', [human_bytes(p['bytes_accessed']) for p in progs]))
  for op in COLLECTIVES:
    out.append(row(f'{op}: n, bytes', [f'{p["collectives"][op]["count"]}, '
                                       f'{human_bytes(p["collectives"][op]["bytes"])}' for p in progs]))
  out.append(row('collectives in conditionals', [
      str(sum(v['count'] for v in p['conditional_collectives'].values())) for p in progs]))
  for key in ('compute_s', 'hbm_s', 'ici_s'):
    out.append(row(f'ESTIMATE {key.removesuffix("_s")} time',
                   [human_seconds(p['roofline'][key]) for p in progs]))
  out.append(row('ESTIMATE step time', [f'{human_seconds(p["roofline"]["step_s"])} '
                                        f'({p["roofline"]["bound"]})' for p in progs]))
  out.append(f'  ESTIMATED training throughput: {report["train_pairs_per_s_estimate"]:,.0f} '
             'pairs/s (roofline: the max of compute, HBM and ICI time from the chip table, '
             'perfect overlap; not a measurement).')
  return '\n'.join(out)
