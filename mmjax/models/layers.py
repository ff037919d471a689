"""Transformer building blocks shared by every tower.

Parameters carry logical axis names ('embed', 'mlp', 'heads', 'kv', 'vocab'); the config's
`logical_axis_rules` decide which mesh axis each lives on. Activations are constrained at block
boundaries only. Attention goes through `jax.nn.dot_product_attention`, which picks the fused
kernel of the backend (cuDNN flash attention on GPU, the XLA path on CPU/TPU).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Dtype = Any

DEFAULT_KERNEL_INIT = nn.initializers.xavier_uniform()


def dense_init(axes: tuple[str, ...], init=DEFAULT_KERNEL_INIT):
  return nn.with_logical_partitioning(init, axes)


def layer_norm(dtype: Dtype, param_dtype: Dtype, name: str | None = None,
               eps: float = 1e-6) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))


def rms_norm(dtype: Dtype, param_dtype: Dtype, name: str | None = None,
             eps: float = 1e-6) -> nn.RMSNorm:
  """RMSNorm (Llama, Qwen2): statistics in float32, a learned scale and no bias."""
  return nn.RMSNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)))


class Dropout(nn.Module):
  """Dropout whose mask for each example depends only on (dropout key, example row, layer).

  Each row's mask is drawn from fold_in(key, row), so an example gets the same mask however the
  batch is split: over devices, hosts or GradCache micro-batches. `rows` are the examples' rows in
  the global batch (default: 0..batch-1, right for a call that sees the whole batch).
  """

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool, rows: jax.Array | None = None):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    key = self.make_rng('dropout')
    rows = jnp.arange(x.shape[0], dtype=jnp.uint32) if rows is None else rows.astype(jnp.uint32)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, rows)
    masks = jax.vmap(lambda k: jax.random.bernoulli(k, keep, x.shape[1:]))(keys)
    return jnp.where(masks, x / keep, 0).astype(x.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's sigmoid approximation of GELU."""
  return x * jax.nn.sigmoid(1.702 * x)


# Released checkpoints differ here: 'gelu_tanh' (SigLIP, mmjax's default), exact 'gelu' (BERT),
# 'quick_gelu' (OpenAI CLIP).
ACTIVATIONS = {'gelu_tanh': lambda x: nn.gelu(x, approximate=True),
               'gelu': lambda x: nn.gelu(x, approximate=False),
               'quick_gelu': quick_gelu,
               'relu': nn.relu}


class MlpBlock(nn.Module):
  """Dense -> activation (GELU by default) -> Dense."""

  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  act: str = 'gelu_tanh'

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool,
               rows: jax.Array | None = None) -> jax.Array:
    d = x.shape[-1]
    h = DenseND((self.mlp_dim,), ('embed', 'mlp'), dtype=self.dtype, param_dtype=self.param_dtype,
                name='fc1')(x)
    h = ACTIVATIONS[self.act](checkpoint_name(h, 'mlp_hidden'))
    h = Dropout(self.dropout)(h, deterministic=deterministic, rows=rows)
    return DenseND((d,), ('mlp', 'embed'), dtype=self.dtype, param_dtype=self.param_dtype,
                   name='fc2')(h)


def matmul_nd(x: jax.Array, w: jax.Array, n_in: int) -> jax.Array:
  """x [..., *in] @ w [*in, *out] -> [..., *out], as one 2-D matmul with a 2-D weight gradient."""
  lead, in_shape = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:]
  out_shape = w.shape[n_in:]
  y = _matmul_2d(x.reshape(-1, math.prod(in_shape)),
                 w.reshape(math.prod(in_shape), math.prod(out_shape)))
  return y.reshape(lead + out_shape)


@jax.custom_vjp
def _matmul_2d(x: jax.Array, w: jax.Array) -> jax.Array:
  return x @ w


def _matmul_2d_fwd(x, w):
  return x @ w, (x, w)


def _matmul_2d_bwd(res, g):
  # The same products autodiff would form, written so XLA:CPU lowers dW = x^T g to its fast
  # (YNNPACK) matmul instead of the Eigen fallback (see DenseND).
  x, w = res
  return g @ w.T, jnp.einsum('nd,nm->dm', x, g)


_matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


class DenseND(nn.Module):
  """Dense over the last `in_dims` axes into `features` axes, the kernel kept multi-dimensional
  ([*in, *features]) so each axis has its own logical name (e.g. 'embed', 'heads', 'kv').

  Every projection in mmjax uses it: one 2-D matmul whose weight gradient XLA:CPU runs on its
  fast (YNNPACK) path, where `nn.Dense`'s autodiff form fell back to the slower Eigen path
  (measured in bench/: see BENCHMARKS.md). Gradients are the same products either way.
  """

  features: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  in_dims: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[x.ndim - self.in_dims:]
    n_in, n_out = len(in_shape), len(self.features)
    init = nn.initializers.xavier_uniform(in_axis=tuple(range(n_in)),
                                          out_axis=tuple(range(n_in, n_in + n_out)))
    kernel = self.param('kernel', nn.with_logical_partitioning(init, self.kernel_axes),
                        in_shape + tuple(self.features), self.param_dtype)
    y = matmul_nd(x.astype(self.dtype), kernel.astype(self.dtype), n_in)
    if not self.use_bias:
      return y
    bias = self.param('bias', nn.with_logical_partitioning(
        nn.initializers.zeros, self.kernel_axes[n_in:]), tuple(self.features), self.param_dtype)
    return y + bias.astype(self.dtype)


class Attention(nn.Module):
  """Multi-head attention with separate q/k/v projections (the layout released checkpoints use).

  `mask` is a boolean key mask [batch, kv_len] (True = attend); `causal` adds the causal mask.
  """

  num_heads: int
  causal: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q_in: jax.Array, kv_in: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    kv_in = q_in if kv_in is None else kv_in
    d = q_in.shape[-1]
    head_dim = d // self.num_heads

    def heads(name: str) -> DenseND:
      return DenseND((self.num_heads, head_dim), ('embed', 'heads', 'kv'), dtype=self.dtype,
                     param_dtype=self.param_dtype, name=name)

    q, k, v = (checkpoint_name(x, 'qkv') for x in
               (heads('query')(q_in), heads('key')(kv_in), heads('value')(kv_in)))
    attn_mask = None if mask is None else mask[:, None, None, :].astype(bool)
    out = jax.nn.dot_product_attention(q, k, v, mask=attn_mask, is_causal=self.causal)
    out = checkpoint_name(out, 'attn_context')
    return DenseND((d,), ('heads', 'kv', 'embed'), in_dims=2, dtype=self.dtype,
                   param_dtype=self.param_dtype, name='out')(out)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

  norm='post' is the BERT block instead: LN(x + Attn(x)), then LN(x + MLP(x)) (same parameters).
  """

  num_heads: int
  mlp_dim: int
  causal: bool = False
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm: str = 'pre'
  act: str = 'gelu_tanh'
  ln_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool,
               rows: jax.Array | None = None) -> jax.Array:
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    if self.norm == 'post':
      return self._post_ln(x, mask, deterministic, rows)
    h = layer_norm(self.dtype, self.param_dtype, 'ln1', self.ln_eps)(x)
    h = Attention(self.num_heads, self.causal, self.dtype, self.param_dtype, name='attn')(h, mask=mask)
    x = x + Dropout(self.dropout)(h, deterministic=deterministic, rows=rows)
    h = layer_norm(self.dtype, self.param_dtype, 'ln2', self.ln_eps)(x)
    h = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.param_dtype, self.act, name='mlp')(
        h, deterministic=deterministic, rows=rows)
    return x + Dropout(self.dropout)(h, deterministic=deterministic, rows=rows)

  def _post_ln(self, x: jax.Array, mask: jax.Array | None, deterministic: bool,
               rows: jax.Array | None) -> jax.Array:
    h = Attention(self.num_heads, self.causal, self.dtype, self.param_dtype, name='attn')(
        x, mask=mask)
    x = layer_norm(self.dtype, self.param_dtype, 'ln1', self.ln_eps)(
        x + Dropout(self.dropout)(h, deterministic=deterministic, rows=rows))
    h = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.param_dtype, self.act, name='mlp')(
        x, deterministic=deterministic, rows=rows)
    return layer_norm(self.dtype, self.param_dtype, 'ln2', self.ln_eps)(
        x + Dropout(self.dropout)(h, deterministic=deterministic, rows=rows))


# Named activations of an encoder block (jax.ad_checkpoint.checkpoint_name), which the named
# remat policies keep (mmjax.types.ENCODER_REMAT_POLICIES).
NAMED_REMAT_POLICIES = {'save_attention': ('qkv', 'attn_context'),
                        'save_mlp_hidden': ('mlp_hidden',)}


def remat_policy(name: str):
  """The jax.checkpoint policy called `name`: a jax.checkpoint_policies one or a named one."""
  if name in NAMED_REMAT_POLICIES:
    return jax.checkpoint_policies.save_only_these_names(*NAMED_REMAT_POLICIES[name])
  return getattr(jax.checkpoint_policies, name)


class Encoder(nn.Module):
  """A stack of `depth` encoder blocks and a final LayerNorm (none for post-LN stacks: BERT)."""

  depth: int
  num_heads: int
  mlp_dim: int
  causal: bool = False
  dropout: float = 0.0
  remat: bool = False
  remat_policy: str = 'nothing_saveable'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm: str = 'pre'
  act: str = 'gelu_tanh'
  ln_eps: float = 1e-6
  final_ln: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
               deterministic: bool = True, rows: jax.Array | None = None) -> jax.Array:
    block = (nn.remat(EncoderBlock, static_argnums=(3,), policy=remat_policy(self.remat_policy))
             if self.remat else EncoderBlock)
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_dim, self.causal, self.dropout, self.dtype,
                self.param_dtype, self.norm, self.act, self.ln_eps, name=f'block{i}')(
                    x, mask, deterministic, rows)
    if not self.final_ln:
      return x
    return layer_norm(self.dtype, self.param_dtype, 'ln_final', self.ln_eps)(x)


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the sequence (SigLIP's head)."""

  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  act: str = 'gelu_tanh'
  ln_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    b, _, d = x.shape
    probe = self.param('probe', nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(), (None, None, 'embed')), (1, 1, d), self.param_dtype)
    probe = jnp.broadcast_to(probe.astype(self.dtype), (b, 1, d))
    h = Attention(self.num_heads, False, self.dtype, self.param_dtype, name='attn')(
        probe, x, mask=mask)
    y = layer_norm(self.dtype, self.param_dtype, 'ln', self.ln_eps)(h)
    h = h + MlpBlock(self.mlp_dim, 0.0, self.dtype, self.param_dtype, self.act, name='mlp')(
        y, deterministic=True)
    return h[:, 0]
