"""Test set-up: 8 simulated CPU devices, so sharded code paths run for real on one machine."""

import atexit
import os
import shutil
import sys
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The runs' 'user' compilation cache (mmjax.train.compile_cache) of this session, not ~/.cache.
os.environ.setdefault('MMJAX_CACHE_DIR', tempfile.mkdtemp(prefix='mmjax-test-cache-'))
# Under PYTHONDONTWRITEBYTECODE every `python -m ...` a test starts (~40 in the suite) recompiles
# the ~2,000 modules of jax, flax, orbax and mmjax from source (3-5 s each, measured). Bytecode
# then goes to a session directory instead (never into the tree or the venv), written by this
# process's imports and read by the subprocesses.
if sys.dont_write_bytecode:
  sys.pycache_prefix = os.environ['PYTHONPYCACHEPREFIX'] = tempfile.mkdtemp(prefix='mmjax-test-pyc-')
  sys.dont_write_bytecode = False
  os.environ.pop('PYTHONDONTWRITEBYTECODE', None)
  atexit.register(shutil.rmtree, sys.pycache_prefix, ignore_errors=True)

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_config():
  """The tiny config (batch 16 over the 8 test devices)."""
  from configs import tiny  # pylint: disable=import-outside-toplevel
  return tiny.get_config()


def make_params_export(directory: pathlib.Path, seed: int) -> pathlib.Path:
  """An untrained tiny model's params export (what `--mode=export` writes)."""
  # pylint: disable=import-outside-toplevel
  import flax.linen as nn
  import jax

  from configs import tiny
  from mmjax import embedder as embedder_lib, kinds
  from mmjax.data import demo, tokenizer as tokenizer_lib
  config = tiny.get_config()
  kind = kinds.get(config)
  model_config = kind.model_config(config)
  model = kind.model(model_config)
  params = nn.unbox(model.init(jax.random.key(seed), *model.init_inputs())['params'])
  tok = tokenizer_lib.train_wordpiece(demo.caption_corpus(num_scenes=200), vocab_size=256)
  encoder = tokenizer_lib.TextEncoder(tok, model_config.text.max_len)
  return embedder_lib.export(directory / 'export', model_config, params, encoder.to_str())


@pytest.fixture(scope='session')
def deploy_models(tmp_path_factory):
  """Two untrained tiny models (seeds 0, 1: model versions v1, v2) as {name: (params export,
  serving export)}; v1 is exported for cpu and tpu (TPU lowering needs no TPU), v2 for cpu.
  Shared by tests/test_deploy.py and tests/test_serve.py."""
  from mmjax.deploy import export  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('deploy_models')
  out = {}
  for seed, name in ((0, 'v1'), (1, 'v2')):
    params_dir = make_params_export(root / name, seed)
    platforms = ['cpu', 'tpu'] if name == 'v1' else ['cpu']
    out[name] = (params_dir, export.export_serving(params_dir, root / f'{name}-serving',
                                                   name=name, platforms=platforms))
  return out
