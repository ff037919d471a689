"""Transfer: freezing by regex, per-subtree learning rates, locked towers (LiT) and runs that
start from a Hugging Face checkpoint (`config.init`)."""

from __future__ import annotations

import json
import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
from flax import traverse_util
import jax.extend
import optax
import pytest
from safetensors.numpy import load_file, save_file

from mmjax import config as config_lib
from mmjax import hf
from mmjax.data import demo, tokenizer as tokenizer_lib
from mmjax.models import TwoTower
from mmjax.train import checkpoint as ckpt_lib
from mmjax.train import loop, optim, transfer

BERT = pathlib.Path(__file__).parent / 'fixtures' / 'hf' / 'bert'


def opt_cfg(**kw):
  c = config_lib.base_config().optimizer
  c.warmup_steps = 0
  c.schedule = 'constant'
  c.grad_clip_norm = 0.0
  c.update(kw)
  return c


PARAMS = {'img': {'w': jnp.ones((3, 2)), 'b': jnp.ones((2,))},
          'txt': {'w': jnp.ones((4, 2)), 'emb': jnp.ones((5, 2))}, 't_prime': jnp.zeros(())}


def test_param_labels():
  labels = optim.param_labels(PARAMS, frozen='^txt/', multipliers=(('^img/w', 0.1), ('img', 2)))
  assert labels == {'img': {'w': 'lr0', 'b': 'lr1'}, 'txt': {'w': 'frozen', 'emb': 'frozen'},
                    't_prime': 'default'}


def test_frozen_params_have_no_state_and_no_update():
  tx, _ = optim.make_optimizer(opt_cfg(frozen='^txt/', grad_clip_norm=1.0), 10)
  state = tx.init(PARAMS)
  # Adam moments (mu, nu) exist for the 7 trainable scalars only: 2 * (6 + 2 + 1).
  sizes = sum(x.size for x in jax.tree.leaves(state) if x.ndim or x.dtype != jnp.int32)
  assert sizes == 2 * (6 + 2 + 1)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 100.0), PARAMS)
  updates, _ = tx.update(grads, state, PARAMS)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates['txt']))
  assert float(jnp.abs(updates['img']['w']).max()) > 0
  # The clip's global norm counts the trainable gradients only (frozen ones are zeroed first).
  clipped = optax.chain(optax.masked(optax.set_to_zero(), lambda p: jax.tree.map(
      lambda lab: lab == 'frozen', optim.param_labels(p, '^txt/'))),
                        optax.clip_by_global_norm(1.0))
  g, _ = clipped.update(grads, clipped.init(PARAMS), PARAMS)
  np.testing.assert_allclose(optax.tree.norm(g), 1.0, rtol=1e-6)


def test_lr_multipliers_scale_the_first_update():
  base_tx, _ = optim.make_optimizer(opt_cfg(weight_decay=0.0), 10)
  tx, _ = optim.make_optimizer(opt_cfg(weight_decay=0.0, lr_multipliers=(('^img/', 0.25),)), 10)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), PARAMS)
  base, _ = base_tx.update(grads, base_tx.init(PARAMS), PARAMS)
  scaled, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  np.testing.assert_allclose(scaled['img']['w'], 0.25 * base['img']['w'], rtol=1e-6)
  np.testing.assert_allclose(scaled['txt']['w'], base['txt']['w'], rtol=1e-6)


def test_frozen_pattern_adds_locked_towers():
  c = config_lib.base_config()
  assert transfer.frozen_pattern(c) == ''
  c.optimizer.frozen = 'img_head/'
  c.model.text.locked = True
  assert transfer.frozen_pattern(c) == '(?:img_head/)|(?:^txt/)'


def tiny_model_config(**text):
  c = config_lib.load_config_file(config_lib.REPO_ROOT / 'configs' / 'tiny.py')
  c.model.text.update(text)
  return c


def test_bad_regex_and_init_are_config_errors():
  c = tiny_model_config()
  c.optimizer.frozen = 'txt/('
  with pytest.raises(config_lib.ConfigError, match=r"config.optimizer.frozen: 'txt/\(' is not a"):
    config_lib.validate(c, num_devices=8, num_processes=1)
  c = tiny_model_config()
  c.init.text = '/some/dir'
  with pytest.raises(config_lib.ConfigError, match="config.init.text='/some/dir' must be"):
    config_lib.validate(c, num_devices=8, num_processes=1)


def _dots(jaxpr) -> int:
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == 'dot_general'
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += _dots(sub)
  return n


def test_locked_tower_gets_no_gradient_and_no_backward_pass():
  """The gradient of a locked text tower is zero and its backward matmuls are not traced."""
  cfg = config_lib.model_config(tiny_model_config())
  images = jnp.zeros((2, 16, 16, 3), jnp.uint8)
  tokens, mask = jnp.ones((2, 40), jnp.int32), jnp.ones((2, 40), jnp.int32)
  dots = {}
  for locked in (False, True):
    c = cfg.__class__(**{**cfg.__dict__, 'text': cfg.text.__class__(
        **{**cfg.text.__dict__, 'locked': locked})})
    model = TwoTower(c)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images, tokens, mask)['params']
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.1,
                          nn.unbox(shapes))

    def loss(p, model=model):
      zi, zt, _, _ = model.apply({'params': p}, images, tokens, mask, train=True)
      return jnp.sum(zi * zt)
    grads = jax.jit(jax.grad(loss))(params)
    txt_norm = optax.tree.norm(grads['txt'])
    assert (float(txt_norm) == 0.0) == locked
    dots[locked] = _dots(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
  # The text tower has 6 matmuls per block (q, k, v, out, fc1, fc2) + 2 in attention; each
  # backward adds 2 matmuls per projection: the locked trace is smaller by at least 12.
  assert dots[True] <= dots[False] - 12, dots


@pytest.fixture(scope='module')
def bert_dir(tmp_path_factory):
  """The BERT fixture with a small WordPiece tokenizer.json next to it."""
  d = tmp_path_factory.mktemp('bert')
  shutil.copytree(BERT, d, dirs_exist_ok=True)
  tok = tokenizer_lib.train_wordpiece(demo.caption_corpus(num_scenes=200, seed=0), 99)
  (d / 'tokenizer.json').write_text(tok.to_str())
  return d


def lit_config(bert_dir) -> ml_collections.ConfigDict:
  c = tiny_model_config(width=32, depth=2, num_heads=4, mlp_dim=64, norm='post', act='gelu',
                        ln_eps=1e-12, embed_ln=True, final_ln=False, vocab_size=99,
                        num_positions=16, max_len=16, type_vocab_size=2, causal=False,
                        pool='mean', locked=True)
  c.init.text = f'hf:{bert_dir}'
  c.model.text_head = 'none'
  c.model.embed_dim = 32
  c.total_steps = 2
  c.eval.every_steps = 2
  c.eval.num_scenes = 16
  c.eval.batch_size = 16
  return c


def test_architecture_mismatch_lists_fields(bert_dir):
  c = lit_config(bert_dir)
  c.model.text.update(depth=1, act='gelu_tanh')
  with pytest.raises(config_lib.ConfigError) as e:
    transfer.load_init(c, config_lib.model_config(c))
  msg = str(e.value)
  assert 'is a different architecture than config.model.text; set:' in msg
  assert "--config.model.text.depth=2 (run has 1)" in msg
  assert "--config.model.text.act='gelu' (run has 'gelu_tanh')" in msg


@pytest.mark.slow  # ~90 s end to end; the pieces are tested above by default.
def test_lit_run_starts_from_checkpoint_and_keeps_it_locked(bert_dir, tmp_path):
  c = lit_config(bert_dir)
  loop.train_and_evaluate(c, tmp_path)
  ckpt = hf.load(bert_dir)
  run = loop.setup(c, tmp_path)
  state, _, step = loop.init_or_restore(run, None)
  run.checkpointer.close()
  assert step == 2
  # The locked tower is bit-identical to the checkpoint after training; the image tower moved.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params['txt']),
               ckpt.params['txt'])
  opt_leaves = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
  assert not [p for p, _ in opt_leaves if "'txt'" in jax.tree_util.keystr(p)]
  assert any("'img'" in jax.tree_util.keystr(p) for p, _ in opt_leaves)
  # The run's tokenizer is the checkpoint's.
  assert (tmp_path / 'tokenizer.json').read_text() == (bert_dir / 'tokenizer.json').read_text()
  assert json.loads((tmp_path / 'eval.json').read_text())['step'] == 2
  meta = ckpt_lib.shape_signature(state.params)
  assert any(k.startswith("['txt']['type_embedding']") or 'type_embedding' in k for k in meta)


def test_init_lands_in_param_dtype_from_a_bf16_checkpoint(bert_dir, tmp_path):
  d = tmp_path / 'bf16'
  shutil.copytree(bert_dir, d)
  f32 = load_file(d / 'model.safetensors')
  save_file({k: v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v
             for k, v in f32.items()}, d / 'model.safetensors')
  c = lit_config(d)
  for param_dtype in ('bfloat16', 'float32'):
    c.model.param_dtype = param_dtype
    flat = transfer.load_init(c, config_lib.model_config(c))
    assert {x.dtype.name for x in flat.values()} == {param_dtype}
  np.testing.assert_array_equal(flat['txt/embed_ln/scale'], f32['embeddings.LayerNorm.weight']
                                .astype(ml_dtypes.bfloat16).astype(np.float32))


def test_describe_gives_the_overrides_that_match(bert_dir):
  lines = transfer.describe(bert_dir).splitlines()
  assert "--config.model.text.norm='post'" in lines and '--config.model.text.depth=2' in lines
  c = tiny_model_config()
  for line in lines:
    key, value = line[len('--config.model.text.'):].split('=', 1)
    c.model.text[key] = eval(value)  # pylint: disable=eval-used
  c.init.text = f'hf:{bert_dir}'
  c.model.text_head, c.model.embed_dim = 'none', 32
  assert set(transfer.load_init(c, config_lib.model_config(c))) == {
      k for k in traverse_util.flatten_dict(hf.load(bert_dir).params, sep='/')}
