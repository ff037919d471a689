"""The worker processes of an ingestion: bounded memory, and a killed worker fails the run.

`multiprocessing.Pool` loses the task of a worker the OS kills (out of memory, SIGKILL) and waits
for its result forever. Here the parent owns its processes and watches them:

- Each worker writes what it is processing (shard, row, input path) into its slot of a shared
  array before each input; when a worker dies, the parent reads the slot, stops the others and
  raises `WorkerDied` naming that input. Results are small messages (`PIPE_BUF`-sized, written
  atomically), so a death mid-send cannot leave the parent blocked on half a message.
- At most `2 * workers` shards are queued at a time (rows are sent as they are needed).
- Decoding holds a share of a pixel budget common to all workers (`PixelBudget`): the pixels
  decoded at once, whatever the worker count, stay under `max_pixels_in_flight` (an image larger
  than the budget is decoded alone). Together with the per-image limit and the stored size this
  bounds the memory of the whole run (docs/data.md gives the measured bound).
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import queue
import resource
import signal
from typing import Any, Callable, Iterable, Iterator

SLOT_BYTES = 1024
# Smaller images do not take the budget's lock: their decode costs less than the lock round trip.
SMALL_PIXELS = 1 << 20
POLL_S = 0.2


class WorkerDied(RuntimeError):
  """A worker process ended without finishing its shard; `doing` is what it was processing."""

  def __init__(self, pid: int | None, exitcode: int | None, doing: str):
    self.pid, self.exitcode, self.doing = pid, exitcode, doing
    self.how = _describe_exit(exitcode)
    super().__init__(f'worker {pid} {self.how} while processing {doing}')


class PixelBudget:
  """Megapixels being decoded by all workers together, shared through a lock and a counter."""

  def __init__(self, ctx, limit: int):
    self.limit = limit
    self._used = ctx.RawValue('q', 0)
    self._cond = ctx.Condition()

  @contextlib.contextmanager
  def hold(self, pixels: int) -> Iterator[None]:
    if not self.limit or pixels < SMALL_PIXELS:
      yield
      return
    n = min(pixels, self.limit)
    with self._cond:
      while self._used.value and self._used.value + n > self.limit:
        self._cond.wait(1.0)
      self._used.value += n
    try:
      yield
    finally:
      with self._cond:
        self._used.value -= n
        self._cond.notify_all()


@dataclasses.dataclass
class WorkerContext:
  """What a task function gets inside a worker: where to say what it does, and the budget."""
  slots: Any = None
  slot: int = 0
  budget: PixelBudget | None = None

  def doing(self, text: str) -> None:
    """Records the input about to be processed (read by the parent if this process dies)."""
    if self.slots is None:
      return
    data = text.encode('utf-8', 'replace')[:SLOT_BYTES - 1] + b'\0'
    start = self.slot * SLOT_BYTES
    self.slots[start:start + len(data)] = data

  def hold(self, pixels: int):
    return self.budget.hold(pixels) if self.budget else contextlib.nullcontext()


def _worker(slot: int, fn, tasks, results, slots, budget) -> None:
  os.environ['MMJAX_PREPARE_WORKER'] = '1'  # Enables the test kill hook in this process only.
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle.
  ctx = WorkerContext(slots, slot, budget)
  while (task := tasks.get()) is not None:
    ctx.doing(f'task {task[0]}')
    summary = fn(task, ctx)
    results.put((slot, summary, peak_rss_mib()))
    ctx.doing('')


def peak_rss_mib() -> float:
  """This process's peak resident memory. /proc's VmHWM where there is one: `ru_maxrss` carries
  over the peak of the process that exec'd this one (a large parent would be counted)."""
  try:
    with open('/proc/self/status', encoding='ascii') as f:
      return next(int(ln.split()[1]) for ln in f if ln.startswith('VmHWM:')) / 1024
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _describe_exit(code: int | None) -> str:
  if code is not None and code < 0:
    name = signal.Signals(-code).name
    hint = ' (what the out-of-memory killer sends)' if -code == signal.SIGKILL else ''
    return f'was killed by {name}{hint}'
  return f'exited with code {code}'


def run(fn: Callable[[Any, WorkerContext], Any], tasks: Iterable[Any], workers: int, *,
        max_pixels_in_flight: int) -> Iterator[tuple[Any, float]]:
  """Yields (fn(task, ctx), the worker's peak RSS in MiB) for every task, in completion order.

  Each task is a tuple whose first item names it. Raises WorkerDied if a worker dies; the other
  workers are stopped first, so nothing keeps running (or hangs) behind the error.
  """
  ctx = multiprocessing.get_context('spawn')
  task_q, result_q = ctx.Queue(), ctx.Queue()
  slots = ctx.RawArray('c', workers * SLOT_BYTES)
  budget = PixelBudget(ctx, max_pixels_in_flight)
  procs = [ctx.Process(target=_worker, args=(i, fn, task_q, result_q, slots, budget),
                       daemon=True, name=f'prepare-worker-{i}') for i in range(workers)]
  for p in procs:
    p.start()
  pending, it = 0, iter(tasks)
  try:
    for task in it:  # Keep at most 2 tasks per worker queued.
      task_q.put(task)
      pending += 1
      while pending >= 2 * workers:
        yield _next_result(result_q, procs, slots)
        pending -= 1
    while pending:
      yield _next_result(result_q, procs, slots)
      pending -= 1
    for _ in procs:
      task_q.put(None)
    for p in procs:
      p.join(30)
  finally:
    for p in procs:
      if p.is_alive():
        p.terminate()
    for p in procs:
      p.join(5)


def _next_result(result_q, procs, slots) -> tuple[Any, float]:
  while True:
    try:
      _, summary, rss_mb = result_q.get(timeout=POLL_S)
    except queue.Empty:
      summary = None
    _check_alive(procs, slots)
    if summary is not None:
      return summary, rss_mb


def _check_alive(procs, slots) -> None:
  """Raises WorkerDied for the first worker that ended (workers end only when told to)."""
  for i, p in enumerate(procs):
    if p.exitcode is not None:
      raw = bytes(slots[i * SLOT_BYTES:(i + 1) * SLOT_BYTES]).split(b'\0')[0]
      doing = raw.decode('utf-8', 'replace') or 'no input (between tasks)'
      raise WorkerDied(p.pid, p.exitcode, doing)
