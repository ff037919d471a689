"""Test set-up: 8 simulated CPU devices, so sharded code paths run for real on one machine."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_config():
  """The tiny config (batch 16 over the 8 test devices)."""
  from configs import tiny  # pylint: disable=import-outside-toplevel
  return tiny.get_config()
