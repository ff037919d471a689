"""LoRA: low-rank adapters on chosen projections of any mmjax model, a frozen base, and merging.

An adapted projection computes `x W + (alpha / rank) * (x A) B` with A [*in, r] and B [r, *out]
(B starts at zero, so an adapted model starts exactly at its base). The adapters are added from
outside the model: inside `adapters(cfg)` (a flax method interceptor) every `layers.DenseND` whose
module path matches `cfg.targets` creates and applies its own 'lora_a'/'lora_b' parameters next to
its 'kernel'. The model code does not know about LoRA: `init` under the context creates the
adapters and `apply` under it uses them (outside it they are ignored, so enter the context inside
the model method that calls the adapted module). Nothing full-size is materialised per step:
x A B costs O(r) per token.

Freezing the base has two parts: the optimizer's (config.optimizer.frozen = `base_pattern(
prefix)`: no update and no optimizer state for every parameter under `prefix` but the adapters),
and `freeze_base(ModuleClass)`, through which autodiff never forms the base's weight gradients
(without it the step computes them, then the optimizer zeroes them). `merge(params, cfg)` folds
the adapters into the kernels for export (the result needs no context).
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from mmjax.types import LoraConfig
import mmjax.models.layers as layers

NAMES = ('lora_a', 'lora_b')
# PEFT's default for A (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_A_SCALE = 1.0 / 3.0


def _intercept(cfg: LoraConfig):
  targets = re.compile(cfg.targets)

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if (context.method_name != '__call__' or not isinstance(m, layers.DenseND)
        or not targets.search('/'.join(m.path))):
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    x, n_in = args[0], m.in_dims
    in_shape = x.shape[x.ndim - n_in:]
    init_a = nn.initializers.variance_scaling(_A_SCALE, 'fan_in', 'uniform',
                                              in_axis=tuple(range(n_in)), out_axis=-1)
    a = m.param('lora_a', nn.with_logical_partitioning(init_a, m.kernel_axes[:n_in] + (None,)),
                in_shape + (cfg.rank,), m.param_dtype)
    b = m.param('lora_b', nn.with_logical_partitioning(nn.initializers.zeros,
                                                       (None,) + m.kernel_axes[n_in:]),
                (cfg.rank,) + tuple(m.features), m.param_dtype)
    h = layers.matmul_nd(x.astype(m.dtype), a.astype(m.dtype), n_in)
    return y + (cfg.scale * layers.matmul_nd(h, b.astype(m.dtype), 1)).astype(y.dtype)

  return interceptor


@contextlib.contextmanager
def adapters(cfg: LoraConfig) -> Iterator[None]:
  """Within this context, `init` creates and `apply` uses the adapters of `cfg` (rank 0: none)."""
  if cfg.rank == 0:
    yield
    return
  with nn.intercept_methods(_intercept(cfg)):
    yield


def _stop_base(variables: Any) -> Any:
  flat = traverse_util.flatten_dict(variables, sep='/')
  return traverse_util.unflatten_dict(
      {k: v if is_adapter(k) else jax.lax.stop_gradient(v) for k, v in flat.items()}, sep='/')


def freeze_base(module: type[nn.Module]) -> type[nn.Module]:
  """`module` (a class, constructed as before, same parameter tree) whose non-adapter parameters
  pass through `jax.lax.stop_gradient` when read: autodiff forms no weight gradient for the base
  at all (the optimizer's `frozen` pattern alone zeroes them after they were computed)."""
  methods = [name for name, fn in vars(module).items() if callable(fn) and name != 'setup'
             and (name == '__call__' or not name.startswith('_'))]
  return nn.map_variables(module, 'params', trans_in_fn=_stop_base, init=True, methods=methods)


def base_pattern(prefix: str = '') -> str:
  """Regex (for config.optimizer.frozen) of the parameters under `prefix` ('llm/') that are not
  adapters: the frozen base."""
  return f'^{re.escape(prefix)}(?!(.*/)?lora_[ab]$)'


def is_adapter(path: str) -> bool:
  return path.rsplit('/', 1)[-1] in NAMES


def adapter_count(params: Any) -> int:
  """Number of adapter parameters (what LoRA trains)."""
  flat = traverse_util.flatten_dict(nn.unbox(params), sep='/')
  return sum(math.prod(x.shape) for k, x in flat.items() if is_adapter(k))


def _delta(a: jax.Array, b: jax.Array, kernel_shape: tuple[int, ...]) -> jax.Array:
  """A B in the kernel's layout; leading axes shared by A, B and the kernel (a scanned stack's
  'layers') are batch axes."""
  lead = a.ndim + b.ndim - 2 - len(kernel_shape)
  lead_shape, rank = a.shape[:lead], a.shape[-1]
  a2 = a.reshape(lead_shape + (-1, rank))
  b2 = b.reshape(lead_shape + (rank, -1))
  return jnp.matmul(a2.astype(jnp.float32), b2.astype(jnp.float32)).reshape(kernel_shape)


def merge(params: Any, cfg: LoraConfig) -> Any:
  """`params` with every adapter folded into its kernel (W + (alpha / rank) A B) and removed: the
  plain model (applied without `adapters`) then computes what the adapted one did."""
  flat = traverse_util.flatten_dict(params, sep='/')
  out = {k: v for k, v in flat.items() if not is_adapter(k)}
  for key in flat:
    if key.endswith('/lora_a'):
      base = key[:-len('lora_a')]
      kernel = flat[base + 'kernel']
      delta = _delta(flat[key], flat[base + 'lora_b'], kernel.shape)
      out[base + 'kernel'] = (kernel.astype(jnp.float32) + cfg.scale * delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict(out, sep='/')
