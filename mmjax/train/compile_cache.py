"""The persistent XLA compilation cache (`jax_compilation_cache_dir`) of a run.

A repeated or resumed run of the same config loads its compiled train and embedding steps from
disk instead of compiling them again (jax's own cache: the key covers the program, the devices,
the jax/XLA versions and flags, so a changed config or machine simply misses). `config.
compilation_cache` picks the directory:

- 'user' (the default): `$MMJAX_CACHE_DIR`, else `$XDG_CACHE_HOME/mmjax`, else `~/.cache/mmjax`,
  then `jax/` below it: shared by every run of this user;
- 'workdir': `WORKDIR/jax_cache`, kept with the run (and removed with it);
- '' : off;
- anything else: that directory.

Programs that compile in less than `config.compilation_cache_min_compile_s` are not written.

`cpu_schedule(config)` sets the XLA:CPU flags of the run (`config.cpu_memory_scheduler`): XLA
reads them once, when the backend starts, so it runs before anything touches a JAX backend
(`mmjax.main` calls it first); `lowered.compile(compiler_options=...)` does not reach the CPU
scheduler (measured: the same temp bytes either way).
"""

from __future__ import annotations

import logging
import os
import pathlib

import jax
from jax._src import xla_bridge  # backends_are_initialized: no public equivalent.
from jax.experimental.compilation_cache import compilation_cache as jax_cache

log = logging.getLogger(__name__)

USER = 'user'
WORKDIR = 'workdir'
WORKDIR_SUBDIR = 'jax_cache'


def user_cache_root() -> pathlib.Path:
  """mmjax's per-user cache directory (the compilation cache lives in its `jax/`)."""
  if root := os.environ.get('MMJAX_CACHE_DIR'):
    return pathlib.Path(root).expanduser()
  xdg = os.environ.get('XDG_CACHE_HOME')
  return (pathlib.Path(xdg) if xdg else pathlib.Path.home() / '.cache') / 'mmjax'


def cache_dir(setting: str, workdir: str | pathlib.Path) -> pathlib.Path | None:
  """The directory `setting` (config.compilation_cache) names for a run in `workdir`."""
  if not setting:
    return None
  if setting == USER:
    return user_cache_root() / 'jax'
  if setting == WORKDIR:
    return pathlib.Path(workdir).absolute() / WORKDIR_SUBDIR
  return pathlib.Path(setting).expanduser().absolute()


def enable(setting: str, workdir: str | pathlib.Path,
           min_compile_s: float = 1.0) -> pathlib.Path | None:
  """Points jax's persistent cache at the run's directory (or switches it off); returns it.

  jax reads the directory once, at the first compilation, so a change of directory within one
  process (a second run in a notebook or a test) resets its cache object.
  """
  path = cache_dir(setting, workdir)
  current = jax.config.jax_compilation_cache_dir
  wanted = None if path is None else str(path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', float(min_compile_s))
  if path is not None and jax.default_backend() == 'cpu':
    # By default jax also keeps XLA's GPU autotuning cache inside the cache directory, and that
    # path becomes part of every cache key, so a copied or moved workdir cache never hit. On CPU
    # those XLA caches do nothing: off, the keys no longer name the directory.
    jax.config.update('jax_persistent_cache_enable_xla_caches', 'none')
  if wanted != current:
    if path is not None:
      path.mkdir(parents=True, exist_ok=True)
    jax_cache.set_cache_dir(wanted)
    jax_cache.reset_cache()
  if path is not None:
    log.info('Compilation cache: %s.', path)
  return path


def for_run(config, workdir: str | pathlib.Path) -> pathlib.Path | None:
  """The run's cache (config.compilation_cache), set before anything compiles."""
  return enable(config.compilation_cache, workdir, config.compilation_cache_min_compile_s)


CPU_MEMORY_SCHEDULER_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler=false'


def cpu_schedule(config) -> bool:
  """Adds the memory-optimised XLA:CPU schedule to XLA_FLAGS when the config asks for it (before
  the backend starts); returns whether the flag is set for this process."""
  flags = os.environ.get('XLA_FLAGS', '')
  if config.cpu_memory_scheduler and CPU_MEMORY_SCHEDULER_FLAG not in flags:
    if xla_bridge.backends_are_initialized():
      log.warning('config.cpu_memory_scheduler=True has no effect: the JAX backend already '
                  'started; set XLA_FLAGS=%s before it does.', CPU_MEMORY_SCHEDULER_FLAG)
      return False
    os.environ['XLA_FLAGS'] = f'{flags} {CPU_MEMORY_SCHEDULER_FLAG}'.strip()
  return CPU_MEMORY_SCHEDULER_FLAG in os.environ.get('XLA_FLAGS', '')


def entries(path: str | pathlib.Path | None) -> list[pathlib.Path]:
  """The cached executables under `path`: one `<program name>-<key>-cache` file per program."""
  if path is None or not pathlib.Path(path).is_dir():
    return []
  return sorted(pathlib.Path(path).glob('*-cache'))
