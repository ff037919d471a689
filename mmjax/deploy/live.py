"""Live updates of a served index: upserted vectors searched exactly beside the index build,
deleted ids hidden, every update durable in a write-ahead log before it is acknowledged."""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import numpy as np

from mmjax.deploy import store as store_lib


class Delta:
  """Live updates beside an index build: upserted vectors searched exactly, deleted ids hidden.

  Every update is appended to a write-ahead log (one JSON line, flushed and fsync'ed before the
  request is acknowledged) at WAL_DIR/MODEL_VERSION.jsonl and replayed at start-up, so a killed
  server restarts with every acknowledged update. A torn last line (a kill mid-write, never
  acknowledged) is dropped; a damaged line elsewhere is an error naming the file and line."""

  def __init__(self, path: pathlib.Path | None, version: str, dim: int):
    self.path, self.version, self.dim = path, version, dim
    self.vectors: dict[str, np.ndarray] = {}
    self.deleted: set[str] = set()
    self._file = None
    if path is not None:
      self._replay()
      path.parent.mkdir(parents=True, exist_ok=True)
      self._file = open(path, 'a', encoding='utf-8')  # pylint: disable=consider-using-with

  def _replay(self) -> None:
    if not self.path.is_file():
      return
    lines = self.path.read_text(encoding='utf-8').split('\n')
    for n, line in enumerate(lines, start=1):
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
      except json.JSONDecodeError as e:
        if n == len(lines):  # The torn tail of a killed write: never acknowledged.
          logging.warning('%s: dropping a torn last line.', self.path)
          break
        raise ValueError(f'{self.path} line {n}: not JSON ({e}): the log is damaged.') from e
      if entry.get('version') != self.version:
        raise store_lib.VersionMismatchError(
            f'{self.path} line {n} is of model version {entry.get("version")!r}, the index of '
            f'{self.version!r}.')
      self._apply(entry)

  def _apply(self, entry: dict[str, Any]) -> None:
    if entry['op'] == 'upsert':
      self.vectors[entry['id']] = np.asarray(entry['vector'], np.float32)
      self.deleted.discard(entry['id'])
    else:
      self.vectors.pop(entry['id'], None)
      self.deleted.add(entry['id'])

  def _log(self, entry: dict[str, Any]) -> None:
    if self._file is not None:
      self._file.write(json.dumps(entry) + '\n')
      self._file.flush()
      os.fsync(self._file.fileno())
    self._apply(entry)

  def upsert(self, item_id: str, vector: np.ndarray) -> None:
    self._log({'op': 'upsert', 'id': item_id, 'version': self.version,
               'vector': [float(x) for x in np.asarray(vector, np.float32)]})

  def delete(self, item_id: str) -> None:
    self._log({'op': 'delete', 'id': item_id, 'version': self.version})

  @property
  def hidden(self) -> set[str]:
    """Index ids not to return: deleted, or replaced by an upsert."""
    return self.deleted | set(self.vectors)

  def search(self, query: np.ndarray, k: int) -> list[tuple[float, str]]:
    if not self.vectors:
      return []
    ids = list(self.vectors)
    scores = np.stack([self.vectors[i] for i in ids]) @ np.asarray(query, np.float32)
    top = np.argsort(-scores, kind='stable')[:k]
    return [(float(scores[j]), ids[j]) for j in top]

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
