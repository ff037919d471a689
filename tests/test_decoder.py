"""The Llama/Qwen2-style decoder tower (mmjax.models.decoder): padding invariance, causality,
grouped-query attention, scan == loop, parameter counts, axis names and refusals.

Parameters are filled from NumPy over `jax.eval_shape` shapes (no PRNG init to compile).
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mmjax.config import ConfigError, DecoderConfig
from mmjax.models import decoder as decoder_lib

B, L, VOCAB = 3, 9, 40
LENGTHS = (3, 9, 6)
SMALL = DecoderConfig(vocab_size=VOCAB, width=32, depth=2, num_heads=4, num_kv_heads=2,
                      mlp_dim=48, max_len=16, rope_theta=500.0, qkv_bias=True)


@functools.lru_cache(maxsize=None)
def abstract(cfg: DecoderConfig):
  ids = jnp.zeros((1, 4), jnp.int32)
  return jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), ids, method=_run_ids))


def Decoder(cfg):  # noqa: N802 - a constructor.
  return decoder_lib.Decoder(cfg)


def _run_ids(m, ids, mask=None, positions=None):
  mask = jnp.ones_like(ids) if mask is None else mask
  positions = decoder_lib.positions_from_mask(mask) if positions is None else positions
  return m(m.embed_tokens(ids), mask, positions)


def random_params(cfg: DecoderConfig, seed: int = 0):
  rng = np.random.default_rng(seed)
  shapes = nn.unbox(abstract(cfg))['params']
  return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_cpu_use_fusion_emitters': False}


@functools.lru_cache(maxsize=None)
def jitted(cfg: DecoderConfig):
  return jax.jit(lambda p, i, m, pos: Decoder(cfg).apply({'params': p}, i, m, pos,
                                                         method=_run_ids),
                 compiler_options=FAST_COMPILE)


def hidden(cfg, params, ids, mask, positions=None):
  pos = decoder_lib.positions_from_mask(mask) if positions is None else positions
  return np.asarray(jitted(cfg)(params, ids, mask, pos))


def batch(seed: int = 0):
  """Right-padded ids/mask and the same rows left-padded."""
  ids = np.random.default_rng(seed).integers(1, VOCAB, size=(B, L)).astype(np.int32)
  right = np.zeros((B, L), np.int32)
  for i, n in enumerate(LENGTHS):
    right[i, :n] = 1
  left = right[:, ::-1].copy()
  ids_r = np.where(right == 1, ids, 0)
  ids_l = np.zeros_like(ids)
  for i, n in enumerate(LENGTHS):
    ids_l[i, L - n:] = ids_r[i, :n]
  return ids_r, right, ids_l, left


def test_positions_from_mask():
  mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(decoder_lib.positions_from_mask(mask),
                                [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]])


def test_left_and_right_padding_give_identical_hidden_states():
  params = random_params(SMALL)
  ids_r, right, ids_l, left = batch()
  h_r, h_l = hidden(SMALL, params, ids_r, right), hidden(SMALL, params, ids_l, left)
  assert np.isfinite(h_r).all() and np.isfinite(h_l).all()
  for i, n in enumerate(LENGTHS):
    np.testing.assert_allclose(h_r[i, :n], h_l[i, L - n:], atol=1e-5, rtol=0)
  # The last real token (what last-token pooling reads) of each row, both ways.
  last_r = h_r[np.arange(B), np.array(LENGTHS) - 1]
  np.testing.assert_allclose(last_r, h_l[:, -1], atol=1e-5, rtol=0)


def test_causal_and_padding_blind():
  """A real token's state depends on earlier real tokens only: not on later ones, not on what
  the padding holds."""
  params = random_params(SMALL)
  ids, mask, _, _ = batch()
  base = hidden(SMALL, params, ids, mask)
  later = ids.copy()
  later[:, 5:] = (later[:, 5:] + 7) % VOCAB
  pad = np.where(mask == 1, ids, 13)
  np.testing.assert_allclose(hidden(SMALL, params, later, mask)[:, :5], base[:, :5], atol=1e-5)
  for i, n in enumerate(LENGTHS):
    np.testing.assert_allclose(hidden(SMALL, params, pad, mask)[i, :n], base[i, :n], atol=1e-5)
  assert np.abs(hidden(SMALL, params, later, mask)[1, 5:] - base[1, 5:]).max() > 1e-3


def test_grouped_query_attention_equals_repeated_kv_heads():
  """GQA with 2 kv heads == full multi-head attention whose 4 kv heads repeat each group's."""
  gqa = dataclasses.replace(SMALL, depth=1)
  mha = dataclasses.replace(gqa, num_kv_heads=gqa.num_heads)
  params = random_params(gqa)
  flat = traverse_util.flatten_dict(params, sep='/')
  rep = gqa.num_heads // gqa.num_kv_heads
  for k in list(flat):
    if '/key/' in k or '/value/' in k:  # kernel [D, kv, hd] / bias [kv, hd]: heads axis -2.
      flat[k] = np.repeat(flat[k], rep, axis=-2)
  ids, mask, _, _ = batch()
  np.testing.assert_allclose(hidden(gqa, params, ids, mask),
                             hidden(mha, traverse_util.unflatten_dict(flat, sep='/'), ids, mask),
                             atol=1e-5, rtol=0)


def test_scan_and_remat_match_the_layer_loop():
  params = random_params(SMALL)
  scanned = dataclasses.replace(SMALL, scan_layers=True, remat=True,
                                remat_policy='dots_with_no_batch_dims_saveable')
  stacked = decoder_lib.stack_layers(params, SMALL.depth)
  assert jax.tree.map(np.shape, stacked) == jax.tree.map(np.shape,
                                                         nn.unbox(abstract(scanned))['params'])
  ids, mask, _, _ = batch()
  np.testing.assert_allclose(hidden(scanned, stacked, ids, mask), hidden(SMALL, params, ids, mask),
                             atol=1e-5, rtol=0)
  back = decoder_lib.unstack_layers(stacked)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_parameter_count_and_axis_names():
  c = SMALL
  hd = c.dim_per_head
  attn = c.width * hd * (c.num_heads + 2 * c.num_kv_heads) + c.num_heads * hd * c.width
  bias = hd * (c.num_heads + 2 * c.num_kv_heads)
  layer = attn + bias + 3 * c.width * c.mlp_dim + 2 * c.width
  want = c.vocab_size * c.width + c.depth * layer + c.width
  shapes = nn.unbox(abstract(c))['params']
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == want
  specs = nn.get_partition_spec(abstract(dataclasses.replace(c, scan_layers=True)))['params']
  assert specs['layers']['attn']['query']['kernel'] == jax.sharding.PartitionSpec(
      'layers', 'embed', 'heads', 'kv')
  assert specs['layers']['mlp']['down']['kernel'] == jax.sharding.PartitionSpec(
      'layers', 'mlp', 'embed')
  assert specs['token_embedding'] == jax.sharding.PartitionSpec('vocab', 'embed')


def test_refusals():
  with pytest.raises(ConfigError, match='num_kv_heads=3'):
    DecoderConfig(num_heads=4, num_kv_heads=3)
  with pytest.raises(ConfigError, match='remat_policy'):
    DecoderConfig(remat_policy='everything')
  params = random_params(SMALL)
  too_long = np.ones((1, SMALL.max_len + 1), np.int32)
  with pytest.raises(ValueError, match='exceeds the decoder context max_len=16'):
    hidden(SMALL, params, too_long, too_long)
