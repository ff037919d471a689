"""The Llama/Qwen2-style decoder tower (mmjax.models.decoder): padding invariance, causality,
grouped-query attention, scan == loop, parameter counts, axis names and refusals; its Llama/Qwen2
import (mmjax.hf.llama): parity with `transformers` fixtures, round trip and refusals.

Parameters are filled from NumPy over `jax.eval_shape` shapes (no PRNG init to compile).
"""

import dataclasses
import functools
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from mmjax import hf
from mmjax.config import ConfigError, DecoderConfig
from mmjax.models import decoder as decoder_lib
from mmjax.models.decoder import Decoder

B, L, VOCAB = 3, 9, 40
LENGTHS = (3, 9, 6)
SMALL = DecoderConfig(vocab_size=VOCAB, width=32, depth=2, num_heads=4, num_kv_heads=2,
                      mlp_dim=48, max_len=16, rope_theta=500.0, qkv_bias=True)


@functools.lru_cache(maxsize=None)
def abstract(cfg: DecoderConfig):
  ids = jnp.zeros((1, 4), jnp.int32)
  return jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), ids, jnp.ones_like(ids),
                                                  method=Decoder.encode_ids))


def _run(m, ids, mask, positions):
  return m(m.embed_tokens(ids), mask, positions)


def random_params(cfg: DecoderConfig, seed: int = 0):
  rng = np.random.default_rng(seed)
  shapes = nn.unbox(abstract(cfg))['params']
  return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_cpu_use_fusion_emitters': False}


@functools.lru_cache(maxsize=None)
def jitted(cfg: DecoderConfig):
  return jax.jit(lambda p, i, m, pos: Decoder(cfg).apply({'params': p}, i, m, pos,
                                                         method=_run),
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


def test_dropout_masks_follow_rows_through_the_scan():
  """Per-example dropout: an example's output depends on its global row, not on how the batch
  is split (GradCache micro-batches, devices), and each scanned layer draws its own mask."""
  cfg = dataclasses.replace(SMALL, scan_layers=True, dropout=0.3)
  params = decoder_lib.stack_layers(random_params(SMALL), SMALL.depth)
  ids, mask, _, _ = batch()
  fn = jax.jit(lambda p, i, m, rows, seed: Decoder(cfg).apply(
      {'params': p}, i, m, train=True, rows=rows, rngs={'dropout': jax.random.key(seed)},
      method=Decoder.encode_ids), compiler_options=FAST_COMPILE)
  whole = np.asarray(fn(params, ids, mask, np.arange(B), 3))
  parts = [fn(params, ids[i:i + 1], mask[i:i + 1], np.array([i]), 3) for i in range(B)]
  np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-5, rtol=0)
  assert np.abs(whole - np.asarray(fn(params, ids, mask, np.arange(B), 4))).max() > 1e-2


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
  assert specs['layers']['attn']['key']['kernel'] == jax.sharding.PartitionSpec(
      'layers', 'embed', 'kv_heads', 'kv')
  assert specs['token_embedding'] == jax.sharding.PartitionSpec('vocab', 'embed')


def test_sharded_forward_matches():
  """Parameters placed by the base config's axis rules over fsdp=2 x tensor=4 (the 8 simulated
  devices; query heads split 4 ways, the 2 key/value heads replicated): same hidden states."""
  from mmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  from mmjax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel

  base = config_lib.base_config()
  base.mesh.fsdp, base.mesh.tensor = 2, 4
  mesh, rules = mesh_lib.make_mesh(base.mesh), mesh_lib.rules(base)
  params = random_params(SMALL)
  ids, mask, _, _ = batch()
  shardings = mesh_lib.logical_shardings(abstract(SMALL), mesh, rules)['params']
  assert shardings['layers_0']['attn']['query']['kernel'].spec == jax.sharding.PartitionSpec(
      'fsdp', 'tensor', None)
  with mesh_lib.activate(mesh, rules):
    placed = jax.device_put(params, shardings)
    out = jax.jit(lambda p, i, m: Decoder(SMALL).apply({'params': p}, i, m,
                                                       method=Decoder.encode_ids),
                  compiler_options=FAST_COMPILE)(placed, ids, mask)
  np.testing.assert_allclose(np.asarray(out), hidden(SMALL, params, ids, mask), atol=1e-5)


def test_refusals():
  with pytest.raises(ConfigError, match='num_kv_heads=3'):
    DecoderConfig(num_heads=4, num_kv_heads=3)
  with pytest.raises(ConfigError, match='remat_policy'):
    DecoderConfig(remat_policy='everything')
  params = random_params(SMALL)
  too_long = np.ones((1, SMALL.max_len + 1), np.int32)
  with pytest.raises(ValueError, match='exceeds the decoder context max_len=16'):
    hidden(SMALL, params, too_long, too_long)


# ---------------------------------------------------------------------------------------------
# Llama / Qwen2 import (mmjax.hf.llama): parity with `transformers`, round trip, refusals.
# The fixtures (tiny random LlamaForCausalLM and Qwen2Model checkpoints with the transformers
# outputs on fixed inputs) were written by tools/make_hf_fixtures.py.

FIXTURES = pathlib.Path(__file__).parent / 'fixtures' / 'hf'


def real_rows(h, mask):
  return [h[i][mask[i] == 1] for i in range(len(h))]


@pytest.mark.parametrize('name', ['llama', 'qwen2'])
def test_parity_with_transformers(name):
  ckpt = hf.load_decoder(FIXTURES / name)
  ref = np.load(FIXTURES / name / 'reference.npz')
  cfg = ckpt.config
  assert cfg.num_kv_heads < cfg.num_heads and cfg.qkv_bias == (name == 'qwen2')
  assert (ckpt.prefix, sorted(ckpt.unused)) == (
      ('model.', ['lm_head.weight']) if name == 'llama' else ('', []))
  ids, mask = ref['input_ids'].astype(np.int32), ref['attention_mask'].astype(np.int32)
  h = hidden(cfg, ckpt.params, ids, mask)
  for got, want in zip(real_rows(h, mask), real_rows(ref['last_hidden_state'], mask)):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # The left-padded batch, with positions from the mask (HF was given the same position_ids).
  ids_l, left = ref['left_input_ids'].astype(np.int32), ref['left_attention_mask'].astype(np.int32)
  np.testing.assert_array_equal(decoder_lib.positions_from_mask(left), ref['left_position_ids'])
  h_l = hidden(cfg, ckpt.params, ids_l, left)
  for got, want in zip(real_rows(h_l, left), real_rows(ref['left_last_hidden_state'], left)):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  if name == 'llama':  # Llama 3 rope scaling matters at these positions already.
    assert cfg.rope_scaling == (8.0, 1.0, 4.0, 64.0)
    unscaled = hidden(dataclasses.replace(cfg, rope_scaling=()), ckpt.params, ids, mask)
    assert np.abs(unscaled - h)[mask == 1].max() > 1e-2


@pytest.mark.parametrize('name', ['llama', 'qwen2'])
def test_round_trip_is_exact_in_both_layouts(name, tmp_path):
  ckpt = hf.load_decoder(FIXTURES / name)
  scanned = dataclasses.replace(ckpt.config, scan_layers=True)
  hf.save_decoder(tmp_path, ckpt, ckpt.params_for(scanned))
  original = load_file(FIXTURES / name / 'model.safetensors')
  written = load_file(tmp_path / 'model.safetensors')
  assert sorted(original) == sorted(written)
  for k in original:
    np.testing.assert_array_equal(original[k], written[k], err_msg=k)
  assert json.loads((tmp_path / 'config.json').read_text()) == ckpt.hf_config
  with pytest.raises(hf.CheckpointError, match='lora_a'):
    extra = {**ckpt.params, 'layers_0': {**ckpt.params['layers_0'], 'lora_a': np.zeros(2)}}
    hf.save_decoder(tmp_path, ckpt, extra)


def test_sharded_checkpoint_loads_the_same(tmp_path):
  """A checkpoint split into shards with model.safetensors.index.json (how large models ship)."""
  tensors = load_file(FIXTURES / 'llama' / 'model.safetensors')
  keys = sorted(tensors)
  shards = {'model-00001-of-00002.safetensors': keys[:len(keys) // 2],
            'model-00002-of-00002.safetensors': keys[len(keys) // 2:]}
  for shard, names in shards.items():
    save_file({k: tensors[k] for k in names}, tmp_path / shard)
  (tmp_path / 'model.safetensors.index.json').write_text(json.dumps(
      {'metadata': {}, 'weight_map': {k: s for s, names in shards.items() for k in names}}))
  shutil.copy(FIXTURES / 'llama' / 'config.json', tmp_path)
  sharded, single = hf.load_decoder(tmp_path), hf.load_decoder(FIXTURES / 'llama')
  jax.tree.map(np.testing.assert_array_equal, sharded.params, single.params)
  assert sorted(sharded.unused) == ['lm_head.weight']


def broken_copy(tmp_path, name='qwen2', tensors=None, **config):
  src = FIXTURES / name
  shutil.copytree(src, tmp_path, dirs_exist_ok=True)
  c = json.loads((src / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps({**c, **config}))
  if tensors is not None:
    save_file(tensors(load_file(src / 'model.safetensors')), tmp_path / 'model.safetensors')
  return tmp_path


def _drop_and_add(t):
  t = dict(t)
  del t['layers.1.self_attn.k_proj.bias']
  t['layers.0.self_attn.rotary_emb.extra'] = np.zeros(3, np.float32)
  t['norm.weight'] = np.zeros(5, np.float32)
  return t


@pytest.mark.parametrize('change,message', [
    (dict(tensors=_drop_and_add),
     r'missing tensors: layers.1.self_attn.k_proj.bias \| unknown tensors: '
     r'layers.0.self_attn.rotary_emb.extra \| shape mismatches: norm.weight: checkpoint \(5,\)'),
    (dict(num_key_value_heads=2), r'layers.0.self_attn.k_proj.weight: checkpoint \(8, 32\), '
                                  r'config.json implies \(16, 32\)'),
    (dict(rope_parameters={'rope_type': 'yarn', 'rope_theta': 1e4}), "rope scaling 'yarn'"),
    (dict(use_sliding_window=True), 'use_sliding_window=True'),
    (dict(partial_rotary_factor=0.5), 'partial_rotary_factor'),
    (dict(hidden_act='gelu'), "hidden_act='gelu'"),
    (dict(num_key_value_heads=3), 'num_kv_heads=3'),
    (dict(model_type='mistral'), "model_type='mistral' is not a decoder"),
])
def test_refuses_mismatched_checkpoints(tmp_path, change, message):
  with pytest.raises(hf.CheckpointError, match=message):
    hf.load_decoder(broken_copy(tmp_path, **change))


def test_describe_lists_the_run_config_fields():
  lines = hf.llama.describe(FIXTURES / 'qwen2').splitlines()
  assert '--config.model.decoder.num_kv_heads=1' in lines
  assert '--config.model.decoder.qkv_bias=True' in lines
  assert '--config.model.decoder.rope_theta=1000.0' in lines
  assert not any('scan_layers' in x or 'dropout' in x for x in lines)


def test_dual_encoder_import_points_decoders_elsewhere():
  with pytest.raises(hf.CheckpointError, match='decoder LLM.*load_decoder'):
    hf.load(FIXTURES / 'llama')


def test_no_torch_import():
  """mmjax never needs torch: importing the decoder, its import code and LoRA does not load it."""
  code = ('import sys; import mmjax.hf, mmjax.models.decoder, mmjax.models.lora; '
          'assert "torch" not in sys.modules, "torch imported"')
  subprocess.run([sys.executable, '-c', code], check=True,
                 env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, cwd=pathlib.Path(__file__).parents[1])
