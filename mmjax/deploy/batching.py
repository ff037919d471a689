"""The service's query side: an LRU cache of query embeddings and the dynamic micro-batcher
(single items per modality gathered for at most a few milliseconds into padded, bucketed batch
sizes, all compiled before the service is ready, so nothing recompiles while serving)."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
from typing import Callable, Sequence

import numpy as np


class LRUCache:
  """A bounded map of query embeddings; evicts the least recently used."""

  def __init__(self, size: int):
    self.size, self.hits, self.misses = size, 0, 0
    self._data: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()

  def get(self, key: tuple) -> np.ndarray | None:
    if self.size <= 0:
      self.misses += 1
      return None
    value = self._data.get(key)
    if value is None:
      self.misses += 1
      return None
    self._data.move_to_end(key)
    self.hits += 1
    return value

  def put(self, key: tuple, value: np.ndarray) -> None:
    if self.size <= 0:
      return
    self._data[key] = value
    self._data.move_to_end(key)
    while len(self._data) > self.size:
      self._data.popitem(last=False)

  def __len__(self) -> int:
    return len(self._data)

  @property
  def hit_ratio(self) -> float:
    total = self.hits + self.misses
    return self.hits / total if total else 0.0


class Batcher:
  """Gathers single items per modality into padded bucketed batches run on one worker thread.

  `run(modality, items, batch_size)` embeds `items` (at most the largest bucket) padded to
  `batch_size` rows and returns their [len(items), D] vectors."""

  def __init__(self, run: Callable[[str, list, int], np.ndarray], buckets: Sequence[int],
               max_wait_s: float, on_batch: Callable[[str, int, int], None] | None = None):
    self.run, self.buckets, self.max_wait_s = run, tuple(sorted(buckets)), max_wait_s
    self.max_batch = self.buckets[-1]
    self.on_batch = on_batch or (lambda modality, n, padded: None)
    self._queues: dict[str, asyncio.Queue] = {}
    self._tasks: list[asyncio.Task] = []
    self._executor: concurrent.futures.ThreadPoolExecutor | None = None

  def bucket(self, n: int) -> int:
    return next(b for b in self.buckets if b >= n)

  def start(self, modalities: Sequence[str]) -> None:
    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='mmjax-embed')
    for m in modalities:
      self._queues[m] = asyncio.Queue()
      self._tasks.append(asyncio.get_running_loop().create_task(self._loop(m)))

  async def stop(self) -> None:
    for t in self._tasks:
      t.cancel()
    await asyncio.gather(*self._tasks, return_exceptions=True)
    self._tasks.clear()
    if self._executor is not None:
      self._executor.shutdown(wait=True)

  async def submit(self, modality: str, item) -> np.ndarray:
    future = asyncio.get_running_loop().create_future()
    await self._queues[modality].put((item, future))
    return await future

  async def _loop(self, modality: str) -> None:
    queue, loop = self._queues[modality], asyncio.get_running_loop()
    while True:
      batch = [await queue.get()]
      deadline = loop.time() + self.max_wait_s
      while len(batch) < self.max_batch:
        if not queue.empty():
          batch.append(queue.get_nowait())
          continue
        remaining = deadline - loop.time()
        if remaining <= 0:
          break
        try:
          batch.append(await asyncio.wait_for(queue.get(), remaining))
        except asyncio.TimeoutError:
          break
      batch = [(x, f) for x, f in batch if not f.done()]  # Callers gone: skip their items.
      if not batch:
        continue
      padded = self.bucket(len(batch))
      self.on_batch(modality, len(batch), padded)
      try:
        vectors = await loop.run_in_executor(self._executor, self.run, modality,
                                             [x for x, _ in batch], padded)
      except Exception as e:  # pylint: disable=broad-except
        for _, f in batch:
          if not f.done():
            f.set_exception(e)
        continue
      for (_, f), v in zip(batch, vectors):
        if not f.done():
          f.set_result(v)
