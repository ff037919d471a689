"""Imported first by the multi-device benchmarks: sets the simulated CPU device count.

`--devices=N` must reach XLA before JAX starts, so it is read from argv here (and defined as a
flag for --help); the benchmark then imports jax.
"""

import os
import sys

from absl import flags

DEFAULT = 8
flags.DEFINE_integer('devices', DEFAULT, 'Simulated CPU devices (XLA host platform).')

DEVICES = next((int(a.split('=', 1)[1]) for a in sys.argv if a.startswith('--devices=')),
               DEFAULT)
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           f' --xla_force_host_platform_device_count={DEVICES}').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
