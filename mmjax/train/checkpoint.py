"""Orbax checkpoints holding everything a run needs to continue exactly.

Each step directory holds three items:
- `state`: params, optimizer state, step and the base RNG key (sharded arrays, Orbax standard;
  evaluation and export restore the params alone);
- `data`: the Grain iterator state (one file per process);
- `meta`: JSON with the model config and every parameter's shape, checked before any restore so a
  workdir that holds a different model is refused instead of overwritten.

A checkpoint that fails to restore (truncated, missing files) is reported, moved aside to
`checkpoints_corrupt/` (never deleted) and the previous good one is used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mmjax.types import ConfigError, ModelConfig, TextConfig, ViTConfig

log = logging.getLogger(__name__)


class IncompatibleCheckpointError(ConfigError):
  """The workdir holds a checkpoint of another model."""


def shape_signature(params) -> dict[str, list[int]]:
  """{'img/encoder/block0/attn/query/kernel': [..], ...} of a params tree (arrays or abstract)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {'/'.join(_key_name(k) for k in path): list(np.shape(leaf)) for path, leaf in flat}


def _key_name(k) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _model_defaults() -> dict[str, Any]:
  """'model.text.norm' -> default, JSON-shaped: the model fields' defaults."""
  out = {}
  for prefix, cls in (('model.', ModelConfig), ('model.image.', ViTConfig),
                      ('model.text.', TextConfig)):
    for f in dataclasses.fields(cls):
      if f.default is not dataclasses.MISSING:
        out[prefix + f.name] = json.loads(json.dumps(f.default))
  return out


def compare_meta(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """Human-readable differences between a checkpoint's meta and the current run's.

  A model field the checkpoint predates is no difference while the run keeps its default (the
  model is then the same one).
  """
  diffs = []
  defaults = _model_defaults()

  def walk(a, b, prefix):
    if isinstance(a, dict) and isinstance(b, dict):
      for k in sorted(set(a) | set(b)):
        walk(a.get(k, '<missing>'), b.get(k, '<missing>'), f'{prefix}{k}.' if prefix or k else k)
    elif a == '<missing>' and defaults.get(prefix.rstrip('.'), '<no default>') == b:
      return
    elif a != b:
      diffs.append(f'{prefix.rstrip(".")}: checkpoint {a!r} vs config {b!r}')

  walk(saved.get('model', {}), current.get('model', {}), 'model.')
  if not diffs:
    a, b = saved.get('param_shapes', {}), current.get('param_shapes', {})
    for k in sorted(set(a) | set(b)):
      if a.get(k) != b.get(k):
        diffs.append(f'param {k}: checkpoint {a.get(k)} vs model {b.get(k)}')
  return diffs


class Checkpointer:
  """Thin policy layer over `ocp.CheckpointManager`: save, validated restore, fallback."""

  def __init__(self, workdir: str | pathlib.Path, *, keep: int, async_save: bool = True):
    self.directory = pathlib.Path(workdir).absolute() / 'checkpoints'
    self.corrupt_dir = pathlib.Path(workdir).absolute() / 'checkpoints_corrupt'
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self.manager = self._make_manager()

  def _make_manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.directory, options=self._options,
                                 item_names=('state', 'data', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state_tree: Any, data_iter: Any, meta: dict[str, Any]) -> None:
    args = {'state': ocp.args.StandardSave(state_tree), 'meta': ocp.args.JsonSave(meta)}
    if data_iter is not None:
      args['data'] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def read_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore_latest(self, abstract_state_tree: Any, data_iter: Any, current_meta: dict[str, Any],
                     *, partial: bool = False):
    """Restores the newest readable checkpoint into (state_tree, data_iter); None if there is none.

    `partial`: `abstract_state_tree` names a part of the state (evaluation and export restore
    `{'params': ...}` alone, so they never build the optimizer state; this manager then no longer
    saves, so only inference restores partially). Raises
    IncompatibleCheckpointError when the checkpoint's model differs from the config's.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = self.read_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        self._quarantine(step, e)
        continue
      diffs = compare_meta(meta, current_meta)
      if diffs:
        raise IncompatibleCheckpointError(
            f'{self.directory} holds a checkpoint (step {step}) of a different model; refusing '
            'to overwrite it. Use another --workdir or the same model config. Differences:\n  '
            + '\n  '.join(diffs[:20]))
      args = {'state': _restore_args(abstract_state_tree, partial)}
      if data_iter is not None:
        args['data'] = grain.checkpoint.CheckpointRestore(data_iter)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
      except Exception as e:  # pylint: disable=broad-except
        self._quarantine(step, e)
        continue
      return step, restored['state']
    return None

  def _quarantine(self, step: int, error: Exception) -> None:
    """Moves an unreadable checkpoint aside (kept for inspection) and reloads the manager."""
    src = self.directory / str(step)
    dst = self.corrupt_dir / f'{step}-{time.strftime("%Y%m%d-%H%M%S")}'
    msg = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
    log.error('Checkpoint step %d at %s is unreadable (%s: %s); moved to %s, falling back to the '
              'previous one.', step, src, type(error).__name__, msg, dst)
    if jax.process_index() == 0 and src.exists():
      dst.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(src), str(dst))
    if jax.process_count() > 1:  # Nobody reloads before the move is done.
      multihost_utils.sync_global_devices(f'mmjax_quarantine_{step}')
    self.manager.close()
    self.manager = self._make_manager()


def _restore_args(abstract_tree: Any, partial: bool):
  if not partial:
    return ocp.args.StandardRestore(abstract_tree)
  # StandardRestore has no partial restore; PyTree reads what was saved by StandardSave.
  return ocp.args.PyTreeRestore(item=abstract_tree, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(
                                    abstract_tree))


def write_json(path: pathlib.Path, obj: Any) -> None:
  tmp = path.with_suffix(path.suffix + '.tmp')
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
  tmp.replace(path)
