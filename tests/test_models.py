"""The towers and the dual encoder (mmjax.models): shapes, exact parameter counts, pooling,
padding invariance, dtypes, logical axis names, the sin-cos position embedding and dropout.

Speed: shapes and parameter counts go through `jax.eval_shape` (nothing is compiled). Forward
passes use parameters filled from NumPy (a real `init` compiles the PRNG, seconds per config on
CPU) and one jitted forward per (config, train), compiled at the lowest XLA optimisation level
and shared between tests.
"""

import dataclasses
import functools
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmjax import config as config_lib
from mmjax.data import llm_tasks
from mmjax.config import ModelConfig, TextConfig, ViTConfig
from mmjax.models import TextTransformer, TwoTower, ViT, poolers
from mmjax.models import two_tower as two_tower_lib
from mmjax.models import vit as vit_lib

B, L, IMG, VOCAB = 3, 8, 16, 50
LENGTHS = (2, 5, 8)  # Valid tokens per row (right padded to L).

SMALL_IMAGE = ViTConfig(image_size=IMG, patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32)
SMALL_TEXT = TextConfig(max_len=L, vocab_size=VOCAB, width=16, depth=1, num_heads=2, mlp_dim=32)
SMALL = ModelConfig(image=SMALL_IMAGE, text=SMALL_TEXT, embed_dim=8)


def small(image=None, text=None, **kw) -> ModelConfig:
  return dataclasses.replace(SMALL, image=dataclasses.replace(SMALL_IMAGE, **(image or {})),
                             text=dataclasses.replace(SMALL_TEXT, **(text or {})), **kw)


def shipped(name: str) -> ModelConfig:
  return config_lib.model_config(config_lib.load_config_file(config_lib.REPO_ROOT / 'configs' /
                                                             f'{name}.py'))


# ---------------------------------------------------------------------------------------------
# Independent closed-form parameter counts.


def block_params(w, m):
  ln = 2 * (2 * w)  # ln1, ln2: scale + bias.
  attn = 4 * (w * w + w)  # query, key, value, out: kernel + bias.
  mlp = w * m + m + m * w + w
  return ln + attn + mlp


def map_head_params(w, m):
  return w + 4 * (w * w + w) + 2 * w + (w * m + m + m * w + w)  # probe, attn, ln, mlp.


def vit_params(c: ViTConfig) -> int:
  w, p = c.width, c.patch_size
  n = p * p * 3 * w + w  # Patch kernel + bias.
  if c.posemb == 'learn':
    n += (c.image_size // p) ** 2 * w
  n += c.depth * block_params(w, c.mlp_dim) + 2 * w  # Blocks + final LN.
  n += w if c.pool == 'cls' else 0
  n += map_head_params(w, c.mlp_dim) if c.pool == 'map' else 0
  return n


def text_params(c: TextConfig) -> int:
  w = c.width
  n = c.vocab_size * w + c.max_len * w
  n += c.depth * block_params(w, c.mlp_dim) + 2 * w
  n += map_head_params(w, c.mlp_dim) if c.pool == 'map' else 0
  return n


def head_params(kind, w, e):
  return {'linear': e * (w + 1), 'mlp': w * (w + 1) + e * (w + 1), 'none': 0}[kind]


def two_tower_params(c: ModelConfig) -> int:
  n = vit_params(c.image) + text_params(c.text)
  n += head_params(c.head, c.image.width, c.embed_dim) + head_params(c.head, c.text.width,
                                                                     c.embed_dim)
  return n + 1 + (1 if c.bias_init is not None else 0)  # t_prime (+ bias for sigmoid).


# ---------------------------------------------------------------------------------------------
# Helpers.


def image_inputs(cfg: ModelConfig, batch=B):
  s = cfg.image.image_size
  return np.random.default_rng(0).integers(0, 256, (batch, s, s, 3), dtype=np.uint8)


def text_inputs(lengths=LENGTHS, length=L, seed=0, pad_id=0):
  """Right-padded random tokens (ids >= 3) and their mask."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, VOCAB, (len(lengths), length)).astype(np.int32)
  mask = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return np.where(mask == 1, tokens, pad_id).astype(np.int32), mask


def abstract_variables(module, *inputs):
  return jax.eval_shape(module.init, jax.random.key(0), *inputs)


def abstract_init_with_output(module, *inputs):
  """(output shapes, boxed abstract variables) from one trace."""
  return jax.eval_shape(module.init_with_output, jax.random.key(0), *inputs)


def count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree)))


def fill(abstract, seed=0, scale=0.3):
  """Concrete parameters of the abstract (unboxed) tree: LN scales near 1, the rest N(0, scale)."""
  rng = np.random.default_rng(seed)

  def one(path, s):
    name = getattr(path[-1], 'key', '')
    x = rng.normal(size=s.shape) * scale
    if name == 'scale':
      x = 1.0 + 0.1 * x
    return jnp.asarray(x, s.dtype)

  return jax.tree_util.tree_map_with_path(one, nn.unbox(abstract))


@functools.lru_cache(maxsize=None)
def two_tower_abstract(cfg: ModelConfig):
  """(output shapes, boxed abstract variables) of TwoTower(cfg) on the standard small inputs."""
  tokens, mask = text_inputs(length=cfg.text.max_len)
  return abstract_init_with_output(TwoTower(cfg), image_inputs(cfg), tokens, mask)


def variables_for(cfg: ModelConfig, seed=0):
  """Fresh concrete variables (a new dict each call, safe to modify)."""
  return fill(two_tower_abstract(cfg)[1], seed)


# Lowest XLA optimisation and the classic CPU emitters: ~6x faster CPU compiles of these tiny
# graphs. Results are unaffected at the tolerances used.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_cpu_use_fusion_emitters': False}


@functools.lru_cache(maxsize=None)
def jitted(cfg: ModelConfig, train: bool = False):
  """`TwoTower(cfg).apply(variables, images, tokens, mask, train=train)`, jitted once."""
  model = TwoTower(cfg)

  def f(variables, images, tokens, mask, key=None):
    rngs = {} if key is None else {'dropout': key}
    return model.apply(variables, images, tokens, mask, train=train, rngs=rngs)

  return jax.jit(f, compiler_options=FAST_COMPILE)


def forward(cfg, variables, tokens, mask, images=None, train=False, key=None):
  images = image_inputs(cfg) if images is None else images
  out = jitted(cfg, train)(variables, images, tokens, mask, key=key)
  return tuple(np.asarray(x) for x in out)


def embed_texts(cfg, variables, tokens, mask):
  return forward(cfg, variables, tokens, mask)[1]


# ---------------------------------------------------------------------------------------------
# Parameter counts and shapes (eval_shape only).


def test_bench_tiny_formula_is_17_875_714():
  assert two_tower_params(shipped('bench_tiny')) == 17_875_714


@pytest.mark.parametrize('name', ['tiny', 'bench_tiny'])
def test_shipped_configs_param_counts_and_shapes(name):
  cfg = shipped(name)
  images = jax.ShapeDtypeStruct((2, cfg.image.image_size, cfg.image.image_size, 3), jnp.uint8)
  tokens = jax.ShapeDtypeStruct((2, cfg.text.max_len), jnp.int32)
  mask = jax.ShapeDtypeStruct((2, cfg.text.max_len), jnp.int32)
  dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

  out, v = abstract_init_with_output(ViT(cfg.image, dt, pdt), images)
  assert count(v) == vit_params(cfg.image)
  assert out.shape == (2, cfg.image.width)

  out, v = abstract_init_with_output(TextTransformer(cfg.text, dt, pdt), tokens, mask)
  assert count(v) == text_params(cfg.text)
  assert out.shape == (2, cfg.text.width)

  (zimg, ztxt, t, b), v = abstract_init_with_output(TwoTower(cfg), images, tokens, mask)
  assert count(v) == two_tower_params(cfg)
  params = v['params']
  assert count(params['img']) == vit_params(cfg.image)
  assert count(params['txt']) == text_params(cfg.text)
  assert zimg.shape == ztxt.shape == (2, cfg.embed_dim)
  assert t.shape == b.shape == ()
  assert zimg.dtype == ztxt.dtype == t.dtype == b.dtype == jnp.float32
  if name == 'bench_tiny':
    assert count(v) == 17_875_714


# Forward cases: case i combines image option i % 6, text option i and head i % 3, so the 8 cases
# cover every image pool x posemb, every text pool x attention, and every head.
IMAGE_OPTIONS = [(pool, pe) for pool in ('cls', 'gap', 'map') for pe in ('learn', 'sincos2d')]
TEXT_OPTIONS = [(pool, causal) for pool in ('last', 'first', 'mean', 'map')
                for causal in (True, False)]
HEAD_OPTIONS = ['linear', 'mlp', 'none']


def forward_config(i: int) -> ModelConfig:
  (ipool, pe), (tpool, causal) = IMAGE_OPTIONS[i % 6], TEXT_OPTIONS[i]
  head = HEAD_OPTIONS[i % 3]
  return small(image={'pool': ipool, 'posemb': pe}, text={'pool': tpool, 'causal': causal},
               head=head, embed_dim=16 if head == 'none' else 8)


def _name(c: ModelConfig) -> str:
  return (f'img-{c.image.pool}-{c.image.posemb}-txt-{c.text.pool}-'
          f'{"causal" if c.text.causal else "bidir"}-head-{c.head}')


FORWARD = {_name(forward_config(i)): forward_config(i) for i in range(len(TEXT_OPTIONS))}
VARIANTS = {
    **FORWARD,
    'small': SMALL,
    'softmax': small(loss='softmax', bias_init=None),
    'deeper': small(image={'depth': 2, 'mlp_dim': 24}, text={'depth': 3, 'max_len': 12}),
}


def test_forward_cases_cover_every_option():
  cfgs = FORWARD.values()
  assert {(c.image.pool, c.image.posemb) for c in cfgs} == set(IMAGE_OPTIONS)
  assert {(c.text.pool, c.text.causal) for c in cfgs} == set(TEXT_OPTIONS)
  assert {c.head for c in cfgs} == set(HEAD_OPTIONS)


@pytest.mark.parametrize('name', list(VARIANTS))
def test_variant_param_counts_and_shapes(name):
  cfg = VARIANTS[name]
  (zimg, ztxt, _, _), v = two_tower_abstract(cfg)
  assert count(v) == two_tower_params(cfg)
  params = nn.unbox(v)['params']
  assert ('bias' in params) == (cfg.bias_init is not None)
  assert ('pos_embedding' in params['img']) == (cfg.image.posemb == 'learn')
  assert ('cls' in params['img']) == (cfg.image.pool == 'cls')
  assert ('map_head' in params['img']) == (cfg.image.pool == 'map')
  assert ('map_head' in params['txt']) == (cfg.text.pool == 'map')
  assert ('img_head' in params) == ('txt_head' in params) == (cfg.head != 'none')
  if cfg.head != 'none':
    assert ('hidden' in params['img_head']) == (cfg.head == 'mlp')
  assert zimg.shape == ztxt.shape == (B, cfg.embed_dim)


def test_head_none_needs_width_equal_to_embed_dim():
  model = TwoTower(small(head='none', embed_dim=8))  # Widths are 16.
  tokens, mask = text_inputs()
  with pytest.raises(ValueError, match='embed_dim'):
    abstract_variables(model, image_inputs(SMALL), tokens, mask)


def test_text_longer_than_max_len_is_rejected():
  tokens, mask = text_inputs(lengths=(3,), length=L + 1)
  with pytest.raises(ValueError, match='max_len'):
    abstract_variables(TextTransformer(SMALL_TEXT), tokens, mask)


# ---------------------------------------------------------------------------------------------
# Forward passes (one compile per config, shared by the padding tests below).


@pytest.mark.parametrize('name', list(FORWARD))
def test_forward_shapes_and_unit_norm(name):
  cfg = FORWARD[name]
  variables = variables_for(cfg)
  tokens, mask = text_inputs()
  zimg, ztxt, t, b = forward(cfg, variables, tokens, mask)
  for z in (zimg, ztxt):
    assert z.shape == (B, cfg.embed_dim) and z.dtype == np.float32
    assert np.all(np.isfinite(z))
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, atol=1e-4)
    # Different inputs give different embeddings (the towers are not constant).
    assert np.abs(z[0] - z[1]).max() > 1e-3
  np.testing.assert_allclose(t, np.exp(float(variables['params']['t_prime'])), rtol=1e-6)
  np.testing.assert_allclose(b, float(variables['params']['bias']), rtol=1e-6)


def test_softmax_model_has_zero_bias():
  cfg = VARIANTS['softmax']
  tokens, mask = text_inputs()
  _, _, t, b = forward(cfg, variables_for(cfg), tokens, mask)
  assert float(b) == 0.0 and float(t) > 0


def test_head_none_returns_normalised_tower_features():
  cfg = forward_config(2)
  assert cfg.head == 'none'
  variables = variables_for(cfg)
  tokens, mask = text_inputs()
  feats = jax.jit(TextTransformer(cfg.text).apply, compiler_options=FAST_COMPILE)(
      {'params': variables['params']['txt']}, tokens, mask)
  feats = np.asarray(feats)
  want = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
  np.testing.assert_allclose(embed_texts(cfg, variables, tokens, mask), want, atol=1e-5)


def test_uint8_images_are_mapped_to_minus_one_one():
  x = np.array([0, 255, 51], np.uint8)
  np.testing.assert_allclose(np.asarray(two_tower_lib.normalize_images(x, jnp.float32)),
                             [-1.0, 1.0, 51 * 2 / 255 - 1], atol=1e-6)
  f = np.array([0.25], np.float32)
  np.testing.assert_allclose(np.asarray(two_tower_lib.normalize_images(f, jnp.float32)), f)


# ---------------------------------------------------------------------------------------------
# Padding.


def _left_pad(x, lengths):
  """Moves each row's valid prefix to the end; the padding in front is random garbage."""
  rng = np.random.default_rng(7)
  out = rng.normal(size=x.shape).astype(x.dtype) if x.dtype.kind == 'f' else \
      rng.integers(3, VOCAB, x.shape).astype(x.dtype)
  mask = np.zeros(x.shape[:2], np.int32)
  for i, n in enumerate(lengths):
    out[i, x.shape[1] - n:] = x[i, :n]
    mask[i, x.shape[1] - n:] = 1
  return out, mask


@pytest.mark.parametrize('mask_dtype', [np.int32, bool])
def test_last_token_and_mean_pool_left_vs_right_padding(mask_dtype):
  rng = np.random.default_rng(0)
  lengths = (1, 3, 6, 4)
  x = rng.normal(size=(4, 6, 5)).astype(np.float32)
  right_mask = (np.arange(6)[None] < np.asarray(lengths)[:, None])
  x_right = np.where(right_mask[..., None], x, rng.normal(size=x.shape)).astype(np.float32)
  x_left, left_mask = _left_pad(x, lengths)

  want_last = np.stack([x[i, n - 1] for i, n in enumerate(lengths)])
  want_mean = np.stack([x[i, :n].mean(axis=0) for i, n in enumerate(lengths)])
  for xs, m in ((x_right, right_mask), (x_left, left_mask)):
    m = m.astype(mask_dtype)
    np.testing.assert_allclose(np.asarray(poolers.last_token(xs, m)), want_last, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(poolers.mean_pool(xs, m)), want_mean, rtol=1e-5,
                               atol=1e-6)


def test_other_poolers():
  x = np.random.default_rng(1).normal(size=(2, 4, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(poolers.first_token(x)), x[:, 0])
  np.testing.assert_allclose(np.asarray(poolers.mean_pool(x)), x.mean(axis=1), rtol=1e-6)
  # Last-token pooling with a hole in the mask still reads the last valid position.
  m = np.array([[1, 0, 1, 0], [1, 1, 1, 1]], np.int32)
  np.testing.assert_allclose(np.asarray(poolers.last_token(x, m)), x[[0, 1], [2, 3]])
  # An empty row is not NaN.
  assert np.all(np.isfinite(np.asarray(poolers.mean_pool(x, np.zeros((2, 4), np.int32)))))
  assert set(poolers.POOLERS) >= {'first', 'cls', 'mean', 'gap', 'last'}


def text_case(pool, causal) -> ModelConfig:
  """The forward case with this text option (its compiled function is reused)."""
  return forward_config(TEXT_OPTIONS.index((pool, causal)))


@pytest.mark.parametrize('pool,causal', TEXT_OPTIONS)
def test_padded_token_ids_do_not_change_text_embedding(pool, causal):
  cfg = text_case(pool, causal)
  variables = variables_for(cfg)
  tokens, mask = text_inputs(pad_id=0)
  garbage = np.random.default_rng(3).integers(3, VOCAB, tokens.shape).astype(np.int32)
  tokens2 = np.where(mask == 1, tokens, garbage)
  assert np.any(tokens2 != tokens)
  z1 = embed_texts(cfg, variables, tokens, mask)
  z2 = embed_texts(cfg, variables, tokens2, mask)
  np.testing.assert_allclose(z2, z1, atol=1e-6)
  # ... while changing a valid token of row 1 does change that row (the test can fail).
  tokens3 = tokens.copy()
  tokens3[1, 0] = 3 if tokens[1, 0] != 3 else 4
  z3 = embed_texts(cfg, variables, tokens3, mask)
  assert np.abs(z3[1] - z1[1]).max() > 1e-4
  np.testing.assert_allclose(z3[[0, 2]], z1[[0, 2]], atol=1e-6)


@pytest.mark.parametrize('pool,causal', [(p, c) for p in ('last', 'mean', 'map')
                                         for c in (True, False)])
def test_left_and_right_padding_agree_without_position_embedding(pool, causal):
  """Position embeddings aside, the key mask (and causal order) make padding side irrelevant."""
  cfg = text_case(pool, causal)
  variables = variables_for(cfg)
  variables['params']['txt']['pos_embedding'] = jnp.zeros_like(
      variables['params']['txt']['pos_embedding'])
  tokens, mask = text_inputs()
  left_tokens, left_mask = _left_pad(tokens, LENGTHS)
  z_right = embed_texts(cfg, variables, tokens, mask)
  z_left = embed_texts(cfg, variables, left_tokens, left_mask)
  np.testing.assert_allclose(z_left, z_right, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Dtypes and logical axis names.


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  cfg32 = forward_config(0)  # Its float32 forward is compiled already.
  cfg16 = dataclasses.replace(cfg32, dtype='bfloat16', param_dtype='float32')
  variables = variables_for(cfg16)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype('float32')}
  tokens, mask = text_inputs()
  images = image_inputs(cfg16)
  zimg16, ztxt16, t, b = forward(cfg16, variables, tokens, mask, images)
  assert zimg16.dtype == ztxt16.dtype == t.dtype == b.dtype == np.float32
  # The same parameters in float32 compute give nearly the same unit vectors.
  zimg32, ztxt32, _, _ = forward(cfg32, variables, tokens, mask, images)
  for a, c in ((zimg16, zimg32), (ztxt16, ztxt32)):
    cos = np.sum(a * c, axis=-1)
    assert np.all(cos > 0.98), cos
    assert np.abs(a - c).max() > 0  # bfloat16 compute really happened.
    np.testing.assert_allclose(np.linalg.norm(a, axis=-1), 1.0, atol=1e-4)


def test_bfloat16_param_dtype_stores_bfloat16_except_logit_scale():
  cfg = small(dtype='bfloat16', param_dtype='bfloat16')
  tokens, mask = text_inputs()
  params = nn.unbox(abstract_variables(TwoTower(cfg), image_inputs(cfg), tokens, mask))['params']
  assert params['t_prime'].dtype == params['bias'].dtype == jnp.float32
  towers = {k: v for k, v in params.items() if k not in ('t_prime', 'bias')}
  assert {x.dtype for x in jax.tree.leaves(towers)} == {jnp.dtype('bfloat16')}


def test_params_carry_logical_axis_names():
  cfg = forward_config(4)
  assert cfg.image.pool == 'map' and cfg.head == 'mlp'
  _, boxed = two_tower_abstract(cfg)
  specs = nn.get_partition_spec(boxed)['params']
  block = specs['img']['encoder']['block0']
  assert block['mlp']['fc1']['kernel'] == P('embed', 'mlp')
  assert block['mlp']['fc1']['bias'] == P('mlp')
  assert block['mlp']['fc2']['kernel'] == P('mlp', 'embed')
  assert block['attn']['query']['kernel'] == P('embed', 'heads', 'kv')
  assert block['attn']['query']['bias'] == P('heads', 'kv')
  assert block['attn']['out']['kernel'] == P('heads', 'kv', 'embed')
  assert block['ln1']['scale'] == P('embed')
  assert specs['txt']['token_embedding'] == P('vocab', 'embed')
  assert specs['txt']['encoder']['block0']['mlp']['fc1']['kernel'] == P('embed', 'mlp')
  assert specs['img_head']['hidden']['kernel'] == P('embed', 'mlp')
  assert specs['img']['map_head']['probe'] == P(None, None, 'embed')
  # Every non-scalar parameter is boxed with one name per dimension.
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed['params'], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  unboxed = []
  for path, leaf in leaves:
    if isinstance(leaf, nn.LogicallyPartitioned):
      assert len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)
    else:
      unboxed.append(jax.tree_util.keystr(path))
  assert sorted(unboxed) == ["['bias']", "['t_prime']"]  # Only the logit scalars are unboxed.


# ---------------------------------------------------------------------------------------------
# Position embedding and dropout.


def np_sincos2d(h, w, width, temperature=10_000.0):
  q = width // 4
  out = np.zeros((h * w, width))
  for r in range(h):  # Row (y).
    for c in range(w):  # Column (x).
      for k in range(q):
        omega = temperature ** (-k / (q - 1))
        out[r * w + c, k] = math.sin(c * omega)
        out[r * w + c, q + k] = math.cos(c * omega)
        out[r * w + c, 2 * q + k] = math.sin(r * omega)
        out[r * w + c, 3 * q + k] = math.cos(r * omega)
  return out


@pytest.mark.parametrize('h,w,width', [(2, 3, 8), (4, 4, 16), (3, 2, 12)])
def test_sincos2d_matches_reference(h, w, width):
  got = vit_lib.sincos2d(h, w, width)
  assert got.shape == (1, h * w, width) and got.dtype == np.float32
  np.testing.assert_allclose(got[0], np_sincos2d(h, w, width), atol=1e-6)


def test_sincos2d_rejects_width_not_divisible_by_4():
  with pytest.raises(ValueError, match='divisible by 4'):
    vit_lib.sincos2d(2, 2, 6)


def test_dropout_only_in_train_mode():
  cfg = small(image={'dropout': 0.3}, text={'dropout': 0.3})
  variables = variables_for(cfg)
  tokens, mask = text_inputs()
  images = image_inputs(cfg)
  # A cheap PRNG implementation keeps the CPU compile short; Dropout is impl-agnostic.
  key = lambda s: jax.random.key(s, impl='rbg')  # noqa: E731

  def run(train, seed=None):
    k = None if seed is None else key(seed)
    zimg, ztxt, _, _ = forward(cfg, variables, tokens, mask, images, train=train, key=k)
    return zimg, ztxt

  eval1, eval2 = run(False), run(False)
  train1, train1b, train2 = run(True, 1), run(True, 1), run(True, 2)
  for i in range(2):
    np.testing.assert_array_equal(eval1[i], eval2[i])
    np.testing.assert_array_equal(train1[i], train1b[i])  # A pure function of the rng.
    assert np.abs(train1[i] - eval1[i]).max() > 1e-3
    assert np.abs(train1[i] - train2[i]).max() > 1e-3


@pytest.mark.parametrize('x_shape,w_shape,n_in', [((3, 5, 8), (8, 2, 4), 1),
                                                  ((2, 7, 2, 4), (2, 4, 8), 2),
                                                  ((6, 8), (8, 16), 1)])
def test_matmul_nd_value_and_gradients_match_tensordot(x_shape, w_shape, n_in):
  from mmjax.models import layers as layers_lib  # pylint: disable=import-outside-toplevel
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  ref = lambda x, w: jnp.tensordot(x, w, axes=n_in)  # noqa: E731
  out = layers_lib.matmul_nd(x, w, n_in)
  np.testing.assert_allclose(out, ref(x, w), rtol=1e-5, atol=1e-5)
  g = jax.random.normal(kg, out.shape)
  got = jax.grad(lambda x, w: jnp.sum(layers_lib.matmul_nd(x, w, n_in) * g), argnums=(0, 1))(x, w)
  want = jax.grad(lambda x, w: jnp.sum(ref(x, w) * g), argnums=(0, 1))(x, w)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # 20 s each
@pytest.mark.parametrize('policy', ['nothing_saveable', 'save_attention', 'save_mlp_hidden'])
def test_remat_gives_the_same_gradients(tiny_config, policy):
  """`remat` recomputes activations in the backward pass (keeping what `remat_policy` names);
  the gradients must not change."""
  cfg = config_lib.model_config(tiny_config)
  inputs = TwoTower(cfg).init_inputs(4)
  images = jax.random.randint(jax.random.key(2), inputs[0].shape, 0, 255).astype(jnp.uint8)
  tokens = jax.random.randint(jax.random.key(3), inputs[1].shape, 3, cfg.text.vocab_size)
  params = nn.unbox(TwoTower(cfg).init(jax.random.key(0), images, tokens, inputs[2]))

  def grads(model_cfg):
    def loss(p):
      zi, zt, t, b = TwoTower(model_cfg).apply(p, images, tokens, inputs[2])
      return jnp.sum(zi @ zt.T) * t + b
    return jax.jit(jax.grad(loss))(params)

  remat = dataclasses.replace(
      cfg, image=dataclasses.replace(cfg.image, remat=True, remat_policy=policy),
      text=dataclasses.replace(cfg.text, remat=True, remat_policy=policy))
  for a, b in zip(jax.tree.leaves(grads(cfg)), jax.tree.leaves(grads(remat))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Initialisation statistics (real `init`, one layer: the embeddings do not depend on depth).


@functools.lru_cache(maxsize=None)
def demo_init_params():
  """Initial (unboxed) parameters of the demo's ViT and text towers, depth 1."""
  cfg = shipped('demo')
  vit = ViT(dataclasses.replace(cfg.image, depth=1))
  txt = TextTransformer(dataclasses.replace(cfg.text, depth=1))
  s = cfg.image.image_size
  images = jnp.zeros((1, s, s, 3), jnp.float32)
  tokens = jnp.zeros((1, cfg.text.max_len), jnp.int32)
  img = vit.init(jax.random.key(0), images)['params']
  text = txt.init(jax.random.key(1), tokens, jnp.ones_like(tokens))['params']
  return cfg, nn.unbox(img), nn.unbox(text)


def test_patch_kernel_init_is_lecun_over_the_patch_fan_in():
  # The Xavier default counted the patch area in the fan-out too: std 0.035 at the demo's
  # p=4, C=3, width=96 instead of 1/sqrt(48) = 0.144 (big_vision; open_clip's conv: 0.083).
  # The demo now patchifies its conv stem's output (p=1, C = the stem's last channels); the
  # fan-in is p*p*C either way.
  cfg, img, _ = demo_init_params()
  p = cfg.image.patch_size
  c = cfg.image.stem_channels[-1] if cfg.image.stem_channels else 3
  kernel = np.asarray(img['patch_kernel'])
  assert kernel.shape == (p, p, c, cfg.image.width)
  expected = 1 / math.sqrt(p * p * c)
  assert abs(kernel.std() / expected - 1) < 0.06, (kernel.std(), expected)
  # Truncated at 2 std (flax's variance-scaling normal), so nothing beyond ~2.3x expected.
  assert np.abs(kernel).max() < 2.3 * expected


def test_text_position_embedding_starts_below_the_token_embedding():
  # At 1/sqrt(width) (0.10 for width 96) positions were 5x the tokens' 0.02: every caption
  # pooled to nearly one vector at init. open_clip: tokens 0.02, positions 0.01.
  _, _, text = demo_init_params()
  tok = np.asarray(text['token_embedding']).std()
  pos = np.asarray(text['pos_embedding']).std()
  assert abs(tok / 0.02 - 1) < 0.05, tok
  assert abs(pos / 0.01 - 1) < 0.05, pos
  assert pos < tok


def test_conv_stem_feeds_the_patch_embedding_and_trains():
  # config.model.image.stem_channels: 3x3 stride-1 conv + GELU layers before patchifying; the
  # patch kernel then reads the last conv's channels. () keeps the plain ViT (no stem params).
  cfg = ViTConfig(image_size=16, patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64,
                  stem_channels=(8, 12))
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  vit = ViT(cfg)
  params = nn.unbox(vit.init(jax.random.key(1), images)['params'])
  assert params['stem_0']['kernel'].shape == (3, 3, 3, 8)
  assert params['stem_1']['kernel'].shape == (3, 3, 8, 12)
  assert params['patch_kernel'].shape == (4, 4, 12, 32)
  out = vit.apply({'params': params}, images)
  assert out.shape == (2, 32) and np.all(np.isfinite(out))
  grads = jax.grad(lambda p: jnp.sum(vit.apply({'params': p}, images) ** 2))(params)
  assert float(jnp.abs(grads['stem_0']['kernel']).sum()) > 0
  plain = nn.unbox(ViT(dataclasses.replace(cfg, stem_channels=())).init(
      jax.random.key(1), images)['params'])
  assert not any(k.startswith('stem_') for k in plain)
  assert plain['patch_kernel'].shape == (4, 4, 3, 32)


def test_conv_stem_channels_are_validated():
  c = config_lib.load_config_file(pathlib.Path(__file__).parents[1] / 'configs' / 'demo.py')
  c.model.image.stem_channels = (16, 0)
  with pytest.raises(config_lib.ConfigError, match=r'model\.image\.stem_channels=\(16, 0\)'):
    config_lib.validate(c, num_devices=1, num_processes=1)
  c.model.image.stem_channels = (16,)
  config_lib.validate(c, num_devices=1, num_processes=1)
  assert config_lib.model_config(c).image.stem_channels == (16,)


@pytest.mark.parametrize('mode', ['maxpool', 'stride'])
def test_downsampling_stem_halves_the_grid_per_conv(mode):
  # stem_downsample='maxpool' (2x2 max pool after each conv) or 'stride' (stride-2 convs): two
  # stem convs take a 16 px image to a 4x4 map, which patch_size=1 turns into 16 tokens; the
  # max-pooled stem is shift-invariant inside each pooling window, the strided one is not.
  cfg = ViTConfig(image_size=16, patch_size=1, width=32, depth=1, num_heads=2, mlp_dim=64,
                  stem_channels=(8, 12), stem_downsample=mode)
  assert cfg.stem_reduction == 4 and cfg.grid_size == 4 and cfg.num_patches == 16
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  vit = ViT(cfg)
  params = nn.unbox(vit.init(jax.random.key(1), images)['params'])
  assert params['pos_embedding'].shape == (1, 16, 32)
  assert params['patch_kernel'].shape == (1, 1, 12, 32)
  tokens = vit.apply({'params': params}, images, patch_tokens=True)
  assert tokens.shape == (2, 16, 32)
  grads = jax.grad(lambda p: jnp.sum(vit.apply({'params': p}, images) ** 2))(params)
  assert float(jnp.abs(grads['stem_0']['kernel']).sum()) > 0
  with pytest.raises(ValueError, match=r'stem reduction 4'):
    vit.apply({'params': params}, images[:, :14, :14])


def test_stem_downsample_is_validated_and_sizes_the_llm_visual_tokens():
  c = config_lib.load_config_file(pathlib.Path(__file__).parents[1] / 'configs' / 'demo.py')
  c.model.image.stem_channels = (16, 32)
  c.model.image.stem_downsample = 'avgpool'
  with pytest.raises(config_lib.ConfigError, match=r"model\.image\.stem_downsample='avgpool'"):
    config_lib.validate(c, num_devices=1, num_processes=1)
  c.model.image.stem_downsample = 'maxpool'  # 32 px / 4 = 8, not a multiple of patch 16.
  c.model.image.patch_size = 16
  with pytest.raises(config_lib.ConfigError, match=r'patch_size=16 x the stem reduction 4'):
    config_lib.validate(c, num_devices=1, num_processes=1)
  c.model.image.patch_size = 2
  config_lib.validate(c, num_devices=1, num_processes=1)
  assert config_lib.model_config(c).image.grid_size == 4
  assert llm_tasks.tokens_per_image(c) == 16
