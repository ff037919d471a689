"""mmjax.train.compile_cache: where the persistent compilation cache goes, that a compile fills it
and that a later compile of the same program is served from it (no timings)."""

import os

import jax
import jax.numpy as jnp
import pytest

from configs import tiny
from mmjax.train import compile_cache


def test_cache_dir_settings(tmp_path, monkeypatch):
  monkeypatch.setenv('MMJAX_CACHE_DIR', str(tmp_path / 'user'))
  assert compile_cache.cache_dir('user', 'w') == tmp_path / 'user' / 'jax'
  monkeypatch.delenv('MMJAX_CACHE_DIR')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert compile_cache.cache_dir('user', 'w') == tmp_path / 'xdg' / 'mmjax' / 'jax'
  assert compile_cache.cache_dir('workdir', tmp_path / 'run') == tmp_path / 'run' / 'jax_cache'
  assert compile_cache.cache_dir('', tmp_path) is None
  assert compile_cache.cache_dir(str(tmp_path / 'c'), 'w') == tmp_path / 'c'


@pytest.fixture
def restore_cache():
  before = jax.config.jax_compilation_cache_dir
  min_s = jax.config.jax_persistent_cache_min_compile_time_secs
  yield
  compile_cache.enable(before or '', '.', min_s)


def test_cache_is_populated_then_reused(tmp_path, restore_cache):  # pylint: disable=unused-argument
  events = []
  jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
  path = compile_cache.enable(str(tmp_path / 'cache'), tmp_path, min_compile_s=0.0)
  f = jax.jit(lambda x: jnp.tanh(x) @ x.T + 1.2345)
  x = jnp.ones((16, 16))
  f(x).block_until_ready()
  cached = compile_cache.entries(path)
  assert any(p.name.startswith('jit__lambda-') for p in cached), cached
  jax.clear_caches()  # A new process would start like this: nothing compiled in memory.
  events.clear()
  f(x).block_until_ready()
  assert '/jax/compilation_cache/cache_hits' in events
  assert compile_cache.entries(path) == cached  # Served from the cache, nothing new written.
  assert compile_cache.enable('', tmp_path) is None
  assert not jax.config.jax_compilation_cache_dir


def test_cpu_memory_scheduler_sets_xla_flags_before_the_backend(monkeypatch):
  config = tiny.get_config()
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  assert not compile_cache.cpu_schedule(config)  # Off by default: XLA_FLAGS untouched.
  config.cpu_memory_scheduler = True
  jax.devices()
  assert not compile_cache.cpu_schedule(config)  # The backend started: too late, a warning.
  assert os.environ['XLA_FLAGS'] == '--xla_force_host_platform_device_count=8'
  monkeypatch.setattr(compile_cache.xla_bridge, 'backends_are_initialized', lambda: False)
  assert compile_cache.cpu_schedule(config)  # As mmjax.main calls it, before the backend.
  assert os.environ['XLA_FLAGS'].split() == ['--xla_force_host_platform_device_count=8',
                                             compile_cache.CPU_MEMORY_SCHEDULER_FLAG]
