"""Config validation (mmjax.config), the CLI's early failures, and the optimizer schedule/mask."""

import copy
import functools
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax import config as config_lib
from mmjax.models import TwoTower
from mmjax.train import optim

REPO = config_lib.REPO_ROOT
SHIPPED = ('base', 'demo', 'tiny', 'bench_tiny', 'demo_objectives')


def load(name: str) -> ml_collections.ConfigDict:
  return config_lib.load_config_file(REPO / 'configs' / f'{name}.py')


def validate(config, num_devices=8, num_processes=1):
  config_lib.validate(config, num_devices=num_devices, num_processes=num_processes)


def with_values(config, values: dict) -> ml_collections.ConfigDict:
  """A copy with `values` ({'a.b': v}) set. ConfigDict type-checks assignments; where it refuses
  (a wrong type), the copy is rebuilt from a plain dict, which is what validate must catch."""
  c = copy.deepcopy(config)
  c.unlock()
  try:
    for dotted, value in values.items():
      *parents, leaf = dotted.split('.')
      node = c
      for p in parents:
        node = node[p]
      setattr(node, leaf, value)
    return c
  except TypeError:
    d = config.to_dict()
    for dotted, value in values.items():
      *parents, leaf = dotted.split('.')
      node = d
      for p in parents:
        node = node[p]
      node[leaf] = value
    return ml_collections.ConfigDict(d)


# ---------------------------------------------------------------------------------------------
# Shipped configs.


@pytest.mark.parametrize('name', SHIPPED)
@pytest.mark.parametrize('num_devices', [1, 8])
def test_shipped_configs_validate(name, num_devices):
  validate(load(name), num_devices=num_devices)


@pytest.mark.parametrize('name', SHIPPED)
def test_shipped_configs_give_a_model_config(name):
  cfg = config_lib.model_config(load(name))
  assert cfg.image.image_size % cfg.image.patch_size == 0
  assert config_lib.ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_bench_tiny_batch_divides_8_devices():
  assert load('bench_tiny').batch_size == 256
  validate(load('bench_tiny'), num_devices=8)


def test_temperature_default_depends_on_loss():
  c = load('tiny')
  assert config_lib.model_config(c).temperature_init == pytest.approx(math.log(10.0))
  c.loss.kind = 'softmax'
  cfg = config_lib.model_config(c)
  assert cfg.temperature_init == pytest.approx(math.log(1 / 0.07))
  assert cfg.bias_init is None


# ---------------------------------------------------------------------------------------------
# Validation failures: each message names the key and the value.

BAD = {
    # Unknown keys.
    'unknown-top-key': ({'bogus': 1}, ['config.bogus', '1']),
    'unknown-nested-key': ({'model.image.bogus': 'x'}, ['config.model.image.bogus', "'x'"]),
    # Wrong types.
    'batch-str': ({'batch_size': 'big'}, ['config.batch_size', "'big'", 'int']),
    'batch-float': ({'batch_size': 3.5}, ['config.batch_size', '3.5', 'int']),
    'batch-bool': ({'batch_size': True}, ['config.batch_size', 'True', 'int']),
    'causal-str': ({'model.text.causal': 'yes'}, ['config.model.text.causal', "'yes'", 'bool']),
    'lr-str': ({'optimizer.learning_rate': 'fast'}, ['config.optimizer.learning_rate', "'fast'"]),
    'temperature-str': ({'loss.temperature_init': 'hot'}, ['config.loss.temperature_init',
                                                           "'hot'"]),
    'group-replaced': ({'model.image': 3}, ['config.model.image', '3']),
    # Mesh / batch.
    'batch-not-divisible': ({'batch_size': 12}, ['config.batch_size=12', '8']),
    'mesh-too-big': ({'mesh.data': 16}, ['config.mesh', '16', '8']),
    'mesh-too-big-with-batch': ({'batch_size': 12, 'mesh.data': 16}, ['config.mesh', '16', '8']),
    'two-free-axes': ({'mesh.data': -1, 'mesh.fsdp': -1}, ['config.mesh', "'fsdp': -1"]),
    'fixed-axes-do-not-divide': ({'mesh.tensor': 3}, ['config.mesh', "'tensor': 3", '8']),
    'zero-axis': ({'mesh.fsdp': 0}, ['config.mesh.fsdp=0']),
    'fsdp-batch': ({'mesh.data': 1, 'mesh.fsdp': 8, 'batch_size': 20},
                   ['config.batch_size=20', '8 batch shards']),
    'unknown-mesh-axis-in-rules': ({'logical_axis_rules': (('batch', 'pod'),)},
                                   ['logical_axis_rules', "'pod'"]),
    # Model.
    'image-not-multiple-of-patch': ({'model.image.patch_size': 6},
                                    ['config.model.image.image_size=16',
                                     'config.model.image.patch_size=6']),
    'image-too-small': ({'model.image.image_size': 8}, ['config.model.image.image_size=8']),
    'image-width-heads': ({'model.image.width': 33}, ['config.model.image.width=33',
                                                      'config.model.image.num_heads=2']),
    'text-width-heads': ({'model.text.num_heads': 3}, ['config.model.text.width=32',
                                                       'config.model.text.num_heads=3']),
    'zero-depth': ({'model.image.depth': 0}, ['config.model.image.depth=0']),
    'dropout-one': ({'model.text.dropout': 1.0}, ['config.model.text.dropout=1.0']),
    'max-len-1': ({'model.text.max_len': 1}, ['config.model.text.max_len=1']),
    'image-pool': ({'model.image.pool': 'avg'}, ['config.model.image.pool', "'avg'"]),
    'text-pool': ({'model.text.pool': 'cls'}, ['config.model.text.pool', "'cls'"]),
    'posemb': ({'model.image.posemb': 'rope'}, ['config.model.image.posemb', "'rope'"]),
    'head': ({'model.head': 'conv'}, ['config.model.head', "'conv'"]),
    'loss': ({'loss.kind': 'hinge'}, ['config.loss.kind', "'hinge'"]),
    'dtype': ({'model.dtype': 'float64'}, ['config.model.dtype', "'float64'"]),
    'param-dtype': ({'model.param_dtype': 'int8'}, ['config.model.param_dtype', "'int8'"]),
    'schedule': ({'optimizer.schedule': 'linear'}, ['config.optimizer.schedule', "'linear'"]),
    'dataset': ({'data.name': 'imagenet'}, ['config.data.name', "'imagenet'"]),
    # Optimizer / run length.
    'warmup-negative': ({'optimizer.warmup_steps': -1}, ['config.optimizer.warmup_steps=-1']),
    'end-lr-ratio': ({'optimizer.end_lr_ratio': 1.5}, ['config.optimizer.end_lr_ratio=1.5']),
    'grad-clip': ({'optimizer.grad_clip_norm': -1.0}, ['config.optimizer.grad_clip_norm=-1.0']),
    'zero-lr': ({'optimizer.learning_rate': 0.0}, ['config.optimizer.learning_rate=0.0']),
    'zero-batch': ({'batch_size': 0}, ['config.batch_size=0']),
    'zero-steps': ({'total_steps': 0}, ['config.total_steps=0']),
    'negative-workers': ({'data.num_workers': -1}, ['config.data.num_workers=-1']),
    'negative-decode-cache': ({'data.decode_cache_mb': -1}, ['config.data.decode_cache_mb=-1']),
    'demo-negatives-attribute': ({'data.negatives': 'shapes', 'data.num_hard_negatives': 1},
                                 ['config.data.negatives', "'shapes'"]),
    'demo-negatives-without-k': ({'data.negatives': 'shape'},
                                 ['config.data.negatives', 'num_hard_negatives=0']),
    # Tokenizer.
    'remat-policy': ({'model.image.remat_policy': 'all'},
                     ['config.model.image.remat_policy', "'all'", 'save_attention']),
    'compile-cache-min': ({'compilation_cache_min_compile_s': -1.0},
                          ['config.compilation_cache_min_compile_s', '-1.0']),
    'tokenizer-vocab': ({'tokenizer.vocab_size': 300}, ['config.tokenizer.vocab_size=300',
                                                        'config.model.text.vocab_size=256']),
}


@pytest.mark.parametrize('case', list(BAD))
def test_validate_names_key_and_value(case, tiny_config):
  values, expected = BAD[case]
  validate(tiny_config)  # The starting point is valid ...
  bad = with_values(tiny_config, values)
  with pytest.raises(config_lib.ConfigError) as info:  # ... and the change alone breaks it.
    validate(bad)
  msg = str(info.value)
  for part in expected:
    assert part in msg, (part, msg)


@pytest.mark.parametrize('dotted,value', [('batch_size', 'big'), ('model.text.causal', 'yes'),
                                          ('loss.temperature_init', 'hot'), ('model.image', 3)])
def test_configdict_itself_refuses_wrong_types(dotted, value, tiny_config):
  """The other line of defence: a type-safe ConfigDict refuses the assignment outright."""
  *parents, leaf = dotted.split('.')
  node = tiny_config
  for p in parents:
    node = node[p]
  with pytest.raises(TypeError):
    setattr(node, leaf, value)


def test_batch_not_divisible_by_processes():
  c = load('tiny')
  with pytest.raises(config_lib.ConfigError) as info:
    validate(c, num_devices=8, num_processes=3)
  assert 'config.batch_size=16' in str(info.value) and '3 processes' in str(info.value)


def test_int_for_float_and_tokenizer_path_are_accepted(tiny_config):
  validate(with_values(tiny_config, {'optimizer.learning_rate': 1, 'loss.temperature_init': 2}))
  # With a tokenizer file the trained-vocabulary size is not used.
  validate(with_values(tiny_config, {'tokenizer.path': '/some/tokenizer.json',
                                     'tokenizer.vocab_size': 10**6}))
  validate(with_values(tiny_config, {'optimizer.warmup_steps': 0}))
  validate(with_values(tiny_config, {'optimizer.warmup_steps': 3}))  # total_steps - 1.
  validate(with_values(tiny_config, {'optimizer.warmup_steps': 10}))  # Longer than the run.


@pytest.mark.parametrize('mesh,num_devices,want', [
    ({'data': -1, 'fsdp': 1, 'tensor': 1}, 8, {'data': 8, 'fsdp': 1, 'tensor': 1}),
    ({'data': -1, 'fsdp': 2, 'tensor': 2}, 8, {'data': 2, 'fsdp': 2, 'tensor': 2}),
    ({'data': 2, 'fsdp': -1, 'tensor': 1}, 8, {'data': 2, 'fsdp': 4, 'tensor': 1}),
    ({'data': 1, 'fsdp': 1, 'tensor': 1}, 1, {'data': 1, 'fsdp': 1, 'tensor': 1}),
])
def test_mesh_shape_resolves_the_free_axis(mesh, num_devices, want):
  assert config_lib.mesh_shape(mesh, num_devices) == want


# ---------------------------------------------------------------------------------------------
# CLI: bad configs fail before any training. Both runs start together (a JAX import each).

CLI_CASES = {
    'bogus': ['--config.bogus=1'],
    'batch-and-mesh': ['--config.batch_size=12', '--config.mesh.data=16'],
}


@pytest.fixture(scope='module')
def cli_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('cli')
  env = dict(os.environ)
  env['JAX_PLATFORMS'] = 'cpu'
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'  # 8 devices, as in-process.
  procs = {}
  for name, args in CLI_CASES.items():
    workdir = root / name
    cmd = [sys.executable, '-m', 'mmjax.main', '--config=configs/tiny.py',
           f'--workdir={workdir}', *args]
    procs[name] = (workdir, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True))
  results = {}
  for name, (workdir, proc) in procs.items():
    out, err = proc.communicate(timeout=120)
    results[name] = (proc.returncode, out, err, workdir)
  return results


def _check_failed_early(result):
  rc, _, err, workdir = result
  assert rc != 0, err
  assert 'Traceback' not in err, err  # A clean message, not a crash.
  assert not (workdir / 'checkpoints').exists()
  assert not workdir.exists()  # Nothing was written: validation comes before the workdir.
  return err


def test_cli_unknown_key(cli_runs):
  err = _check_failed_early(cli_runs['bogus'])
  assert "unknown config key 'bogus'" in err
  assert '--config.bogus=1' in err


def test_cli_batch_and_mesh(cli_runs):
  err = _check_failed_early(cli_runs['batch-and-mesh'])
  assert 'Config error' in err
  # The mesh (16 devices asked, 8 available) is what fails first.
  assert "'data': 16" in err and '16 devices' in err and '8 are available' in err


# ---------------------------------------------------------------------------------------------
# Optimizer: schedule and weight-decay mask.


def opt_config(**kw):
  c = copy.deepcopy(load('base').optimizer)
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def reference_lr(step, peak, warmup, total, end_ratio, schedule):
  if warmup and step < warmup:
    return peak * step / warmup
  if schedule == 'constant':
    return peak
  frac = min(max(step - warmup, 0) / (total - warmup), 1.0)
  end = peak * end_ratio
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))


@pytest.mark.parametrize('warmup,total,end_ratio', [(10, 100, 0.1), (100, 1000, 0.0),
                                                    (1, 4, 0.5)])
def test_cosine_schedule(warmup, total, end_ratio):
  peak = 3e-3
  sched = optim.make_schedule(opt_config(learning_rate=peak, warmup_steps=warmup,
                                         end_lr_ratio=end_ratio, schedule='cosine'), total)
  assert float(sched(0)) == 0.0
  assert float(sched(warmup)) == pytest.approx(peak, rel=1e-6)
  assert float(sched(total)) == pytest.approx(end_ratio * peak, rel=1e-5, abs=1e-7 * peak)
  for step in sorted({0, warmup // 2, warmup, (warmup + total) // 2, total - 1, total}):
    want = reference_lr(step, peak, warmup, total, end_ratio, 'cosine')
    assert float(sched(step)) == pytest.approx(want, rel=1e-5, abs=1e-7 * peak), step
  assert float(sched(10 * total)) == pytest.approx(end_ratio * peak, rel=1e-5, abs=1e-7 * peak)


@pytest.mark.parametrize('warmup', [5, 1])
def test_constant_schedule(warmup):
  peak = 1e-3
  sched = optim.make_schedule(opt_config(learning_rate=peak, warmup_steps=warmup,
                                         schedule='constant'), 50)
  assert float(sched(0)) == 0.0
  for step in (warmup // 2, warmup, 20, 50, 500):
    want = reference_lr(step, peak, warmup, 50, 0.0, 'constant')
    assert float(sched(step)) == pytest.approx(want, rel=1e-6), step


def _leaf_name(path):
  return getattr(path[-1], 'key', None)


def test_decay_mask_on_model_params(tiny_config):
  cfg = config_lib.model_config(tiny_config)
  s, n = cfg.image.image_size, cfg.text.max_len
  abstract = jax.eval_shape(TwoTower(cfg).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, s, s, 3), jnp.uint8),
                            jax.ShapeDtypeStruct((1, n), jnp.int32),
                            jax.ShapeDtypeStruct((1, n), jnp.int32))
  params = nn.unbox(abstract)['params']
  mask = optim.decay_mask(params)
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  seen = set()
  for (path, decay), (_, p) in zip(jax.tree_util.tree_leaves_with_path(mask),
                                   jax.tree_util.tree_leaves_with_path(params)):
    name = _leaf_name(path)
    where = jax.tree_util.keystr(path)
    if name in ('bias', 'scale', 't_prime'):
      assert not decay, where  # Biases (also the 2-D q/k/v ones), LN, logit scalars.
    elif name in ('kernel', 'patch_kernel', 'token_embedding', 'pos_embedding'):
      assert decay, where
    seen.add((name, bool(decay), p.ndim))
  assert ('bias', False, 2) in seen  # Attention q/k/v biases are [heads, head_dim].
  assert ('kernel', True, 3) in seen
  assert not mask['t_prime'] and not mask['bias']


def test_weight_decay_shrinks_kernels_only():
  """adamw with the mask, zero gradients: only decayed leaves move, by lr * wd * value."""
  lr, wd = 0.1, 0.5
  tx, _ = optim.make_optimizer(opt_config(learning_rate=lr, warmup_steps=0, schedule='constant',
                                          weight_decay=wd, grad_clip_norm=1.0), 10)
  params = {'attn': {'query': {'kernel': jnp.ones((2, 2, 2)), 'bias': jnp.ones((2, 2))}},
            'ln': {'scale': jnp.ones(2), 'bias': jnp.ones(2)},
            'token_embedding': jnp.ones((3, 2)), 't_prime': jnp.ones(())}

  @functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})
  def step(params):
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    return jax.tree.map(lambda p, u: p + u, params, updates)

  new = jax.tree.map(np.asarray, step(params))
  np.testing.assert_allclose(new['attn']['query']['kernel'], 1 - lr * wd, rtol=1e-6)
  np.testing.assert_allclose(new['token_embedding'], 1 - lr * wd, rtol=1e-6)
  np.testing.assert_allclose(new['attn']['query']['bias'], 1.0)
  np.testing.assert_allclose(new['ln']['scale'], 1.0)
  np.testing.assert_allclose(new['ln']['bias'], 1.0)
  np.testing.assert_allclose(new['t_prime'], 1.0)


@pytest.mark.parametrize('overrides,expected', [
    ({'batch_size': 32, 'micro_batches': 3},
     'config.micro_batches=3 does not divide the 4 pairs each batch shard holds (batch_size=32 / '
     '8 shards = data=8 x fsdp=1)'),
    ({'batch_size': 32, 'micro_batches': 0}, 'config.micro_batches=0 must be > 0'),
    ({'loss.kind': 'softmax', 'loss.impl': 'ring'}, "config.loss.impl='ring' needs"),
    ({'loss.impl': 'chunked'}, "config.loss.impl='chunked' is not one of"),
    ({'distributed.coordinator_address': 'localhost'}, "must be 'host:port', '' or 'auto'"),
    ({'distributed.coordinator_address': 'h:1', 'distributed.num_processes': 2,
      'distributed.process_id': 2}, 'config.distributed.process_id=2 must be in [0, '),
    ({'distributed.cpu_collectives': 'nccl'}, "config.distributed.cpu_collectives='nccl'"),
])
def test_large_batch_and_multihost_settings_are_checked(overrides, expected, tiny_config):
  with pytest.raises(config_lib.ConfigError) as info:
    validate(with_values(tiny_config, overrides), num_devices=8, num_processes=1)
  assert expected in str(info.value)


def test_micro_batches_that_divide_are_accepted(tiny_config):
  validate(with_values(tiny_config, {'batch_size': 32, 'micro_batches': 4}), num_devices=8)
  validate(with_values(tiny_config, {'batch_size': 32, 'micro_batches': 2, 'mesh.tensor': 2}),
           num_devices=8)  # 4 batch shards of 8 rows.


@pytest.mark.parametrize('value', [-0.1, 1.0])
def test_drop_noisy_fraction_range(value, tiny_config):
  with pytest.raises(config_lib.ConfigError) as info:
    validate(with_values(tiny_config, {'loss.drop_noisy_fraction': value}), num_devices=8)
  assert f'config.loss.drop_noisy_fraction={value}' in str(info.value)
