"""LoRA (mmjax.models.lora) on the decoder: the exact trainable parameter count, an adapted model
that starts at its base, a merged export that reproduces the adapted outputs (layer loop and
scanned stack), and a frozen base with no optimizer state."""

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from mmjax import config as config_lib
from mmjax.config import ConfigError, DecoderConfig, LoraConfig
from mmjax.models import layers, lora
from mmjax.models.decoder import Decoder
from mmjax.train import optim

DEC = DecoderConfig(vocab_size=40, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                    max_len=16, qkv_bias=True)
LORA = LoraConfig(rank=3, alpha=6.0, targets=r'attn/(query|value|out)$|mlp/down$')
B, L = 3, 7


class Embedder(nn.Module):
  """What an LLM embedder does: the decoder under its adapters, then a trainable head."""

  dec: DecoderConfig
  lora: LoraConfig
  freeze: bool = False

  @nn.compact
  def __call__(self, ids, mask):
    decoder = lora.freeze_base(Decoder) if self.freeze else Decoder
    with lora.adapters(self.lora):
      h = decoder(self.dec, name='llm').encode_ids(ids, mask)
    return layers.DenseND((8,), ('embed', None), name='head')(h[:, -1])


def inputs():
  ids = np.random.default_rng(0).integers(1, 40, size=(B, L)).astype(np.int32)
  mask = (np.arange(L)[None] >= np.array([[0], [2], [4]])).astype(np.int32)  # Left padded.
  return ids, mask


FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_cpu_use_fusion_emitters': False}


@functools.lru_cache(maxsize=None)
def init(dec: DecoderConfig, cfg: LoraConfig):
  ids, mask = inputs()
  fn = jax.jit(lambda: nn.unbox(Embedder(dec, cfg).init(jax.random.key(1), ids, mask)),
               compiler_options=FAST_COMPILE)
  return jax.device_get(fn()['params'])


@functools.lru_cache(maxsize=None)
def jitted(dec: DecoderConfig, cfg: LoraConfig):
  return jax.jit(Embedder(dec, cfg).apply, compiler_options=FAST_COMPILE)


def run(dec, cfg, params):
  return np.asarray(jitted(dec, cfg)({'params': params}, *inputs()))


def perturbed(params, seed=0):
  rng = np.random.default_rng(seed)
  return traverse_util.unflatten_dict({
      k: (v + 0.2 * rng.standard_normal(v.shape).astype(np.float32)) if lora.is_adapter(
          '/'.join(k)) else v for k, v in traverse_util.flatten_dict(params).items()})


def expected_count(c: DecoderConfig, r: int) -> int:
  hd = c.dim_per_head
  per_layer = ((c.width + c.num_heads * hd) + (c.width + c.num_kv_heads * hd)  # query, value
               + (c.num_heads * hd + c.width) + (c.mlp_dim + c.width))  # out, mlp/down
  return c.depth * r * per_layer


@pytest.mark.parametrize('scan', [False, True])
def test_count_init_and_merge(scan):
  dec = dataclasses.replace(DEC, scan_layers=scan, remat=scan)
  params = init(dec, LORA)
  assert lora.adapter_count(params) == expected_count(dec, LORA.rank)
  flat = traverse_util.flatten_dict(params, sep='/')
  assert not any(lora.is_adapter(k) for k in flat if not k.startswith('llm/'))
  # B = 0 at init: the adapted model is its base (the base model: no adapters at all).
  base = lora.merge(params, LORA)
  assert lora.adapter_count(base) == 0
  plain = LoraConfig(rank=0)
  np.testing.assert_allclose(run(dec, LORA, params), run(dec, plain, base), atol=1e-6, rtol=0)
  # Trained adapters, merged for export: the plain model reproduces the adapted outputs.
  trained = perturbed(params)
  adapted = run(dec, LORA, trained)
  assert np.abs(adapted - run(dec, LORA, params)).max() > 1e-2
  np.testing.assert_allclose(run(dec, plain, lora.merge(trained, LORA)), adapted, atol=1e-5,
                             rtol=0)


def test_frozen_base_has_no_optimizer_state():
  params = init(DEC, LORA)
  opt_cfg = config_lib.base_config().optimizer
  opt_cfg.warmup_steps = 0
  opt_cfg.schedule = 'constant'
  tx, _ = optim.make_optimizer(opt_cfg, 10, frozen=lora.base_pattern('llm/'))
  state = jax.jit(tx.init)(params)
  head = sum(x.size for x in jax.tree.leaves(params['head']))
  trainable = lora.adapter_count(params) + head
  # AdamW's mu and nu for the adapters and the head only (the rest are scalar step counts).
  assert sum(x.size for x in jax.tree.leaves(state) if x.ndim) == 2 * trainable
  grads = jax.tree.map(jnp.ones_like, params)
  new = jax.jit(lambda g, s, p: optax.apply_updates(p, tx.update(g, s, p)[0]))(
      grads, state, params)
  for k, v in traverse_util.flatten_dict(new, sep='/').items():
    old = traverse_util.flatten_dict(params, sep='/')[k]
    changed = not np.array_equal(np.asarray(v), np.asarray(old))
    assert changed == (lora.is_adapter(k) or k.startswith('head/')), k


def test_freeze_base_forms_no_base_weight_gradients():
  params = perturbed(init(DEC, LORA))
  ids, mask = inputs()

  def grad_fn(freeze):
    return jax.grad(lambda p: Embedder(DEC, LORA, freeze).apply({'params': p}, ids, mask).sum())

  compiled = {f: jax.jit(grad_fn(f), compiler_options=FAST_COMPILE).lower(params).compile()
              for f in (True, False)}
  frozen, full = compiled[True](params), compiled[False](params)
  for k, g in traverse_util.flatten_dict(frozen, sep='/').items():
    want = traverse_util.flatten_dict(full, sep='/')[k]
    if lora.is_adapter(k) or k.startswith('head/'):
      np.testing.assert_allclose(g, want, atol=1e-6, rtol=1e-5, err_msg=k)
    else:
      assert not np.asarray(g).any(), k
  # No weight-gradient matmul for the 7 base projections of each layer (in the compiled step:
  # DenseND's custom VJP still traces one, XLA drops it as dead), nor for the input gradient of
  # the first layer (only the frozen embedding would need it).
  dots = {f: len(re.findall(r' dot\(', c.as_text())) for f, c in compiled.items()}
  assert dots[False] - dots[True] >= DEC.depth * 7


def test_patterns_and_refusals():
  assert [bool(re.search(lora.base_pattern('llm/'), p)) for p in (
      'llm/layers_0/attn/query/kernel', 'llm/layers_0/attn/query/lora_a', 'llm/norm/scale',
      'head/kernel', 'llm/layers/mlp/down/lora_b')] == [True, False, True, False, False]
  with pytest.raises(ConfigError, match='LoraConfig.targets'):
    LoraConfig(rank=2, targets='attn/(')
  with pytest.raises(ConfigError, match='LoraConfig.rank=-1'):
    LoraConfig(rank=-1)
