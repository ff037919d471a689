"""The LLM embedder: multimodal inputs, pooling, refusals, instructions, Matryoshka, training."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.config import DecoderConfig, ViTConfig
from mmjax.data import demo, llm_tasks, tokenizer as tokenizer_lib
from mmjax import kinds
from mmjax.losses import objectives
from mmjax.models import llm_embedder as lm

TOKEN = '<image>'
INSTRUCTIONS = llm_tasks.Instructions(
    {'i2t': 'find a caption for this image:', 't2i': 'find an image for this caption:',
     'composed': 'find the image after this change:'}, candidate='represent this:')


@pytest.fixture(scope='module')
def tokenizer():
  import ml_collections  # pylint: disable=import-outside-toplevel
  cfg = ml_collections.ConfigDict({'seed': 0, 'data': {'llm': {
      'instructions': INSTRUCTIONS.query, 'candidate_instruction': INSTRUCTIONS.candidate}}})
  tok = tokenizer_lib.train_wordpiece(llm_tasks.corpus(cfg, num_scenes=300), 400)
  return llm_tasks.add_image_token(tok, TOKEN)


def model_config(vocab: int, **kw) -> lm.LLMEmbedderConfig:
  image = ViTConfig(image_size=16, patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64)
  decoder = DecoderConfig(vocab_size=vocab, width=32, depth=1, num_heads=4, num_kv_heads=2,
                          mlp_dim=64, max_len=96)
  return lm.LLMEmbedderConfig(image=image, decoder=decoder, **{'max_len': 80, 'merge': 2, **kw})


def encoder(tok, cfg, pad_side='right'):
  return llm_tasks.MultimodalEncoder(tok, max_len=cfg.max_len, image_token=TOKEN,
                                     tokens_per_image=cfg.tokens_per_image,
                                     max_images=cfg.max_images, pad_side=pad_side)


def rows(tok, cfg, n=6, pad_side='right', negatives=0):
  src = llm_tasks.DemoTasks('train', 100, 16, 0, {'i2t': 1, 't2i': 1, 'composed': 1}, TOKEN,
                            negatives)
  enc = llm_tasks.EncodeTask(encoder(tok, cfg, pad_side), INSTRUCTIONS, 16, negatives)
  examples = [enc.map(src[i]) for i in range(n)]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


@pytest.fixture(scope='module')
def tiny(tokenizer):
  """(config, model, params), initialised once for the module (compiles dominate here)."""
  cfg = model_config(tokenizer.get_vocab_size(), matryoshka_dims=(8, 16))
  model = lm.LLMEmbedder(cfg)
  params = jax.jit(lambda r: model.init(r, lm.dummy_batch(cfg))['params'])(jax.random.key(0))
  return cfg, model, params


def test_left_and_right_padding_give_identical_embeddings(tokenizer, tiny):
  cfg, model, params = tiny
  right, left = rows(tokenizer, cfg), rows(tokenizer, cfg, pad_side='left')
  assert set(right['task'].tolist()) == {0, 1, 2}  # i2t, t2i and composed rows.
  assert (right['query_mask'][:, 0] == 1).all() and (left['query_mask'][:, -1] == 1).all()
  assert not np.array_equal(right['query_tokens'], left['query_tokens'])
  embed = jax.jit(lambda b: model.apply({'params': params}, b, method='embed_batch'))
  z_right, z_left = embed(right), embed(left)
  for role in ('query', 'candidate'):
    np.testing.assert_allclose(z_right[role], z_left[role], atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(z_right[role], axis=-1), 1.0, atol=1e-5)
  mean = jax.jit(lambda b: lm.LLMEmbedder(dataclasses.replace(cfg, pool='mean')).apply(
      {'params': params}, b['query_tokens'], b['query_mask'], b['query_images'], method='embed'))
  np.testing.assert_allclose(mean(right), mean(left), atol=2e-5)


def test_placeholder_image_mismatch_and_long_sequences_are_refused(tokenizer):
  cfg = model_config(tokenizer.get_vocab_size(), max_images=2)
  enc = encoder(tokenizer, cfg)
  with pytest.raises(ValueError, match=r'2 image placeholder\(s\).*but 1 image'):
    enc(f'{TOKEN} and {TOKEN}', 1)
  with pytest.raises(ValueError, match=r'0 image placeholder\(s\).*but 1 image'):
    enc('a red circle', 1)
  with pytest.raises(ValueError, match=r'1 image placeholder\(s\).*but 0 image'):
    enc(f'{TOKEN} a red circle', 0)
  with pytest.raises(ValueError, match='3 images.*max_images=2'):
    enc(' '.join([TOKEN] * 3), 3)
  with pytest.raises(ValueError, match=r'tokens \(2 image\(s\) x 4 visual tokens \+ \d+ text '
                                       r'tokens with EOS\) exceed the context '
                                       r'model.llm.max_len=80'):
    enc(f'{TOKEN} {TOKEN} ' + 'a red circle ' * 30, 2)
  ids, mask = enc(f'{TOKEN} a red circle and {TOKEN}', 2)
  assert (ids == llm_tasks.IMAGE_SLOT).sum() == 2 * cfg.tokens_per_image
  assert ids[mask.sum() - 1] == enc.eos_id


def test_instruction_prefixes_in_query_tokens(tokenizer):
  cfg = model_config(tokenizer.get_vocab_size())
  batch = rows(tokenizer, cfg, n=6)
  for i, task in enumerate(batch['task']):
    text = batch['query_tokens'][i][batch['query_mask'][i] == 1]
    text = tokenizer.decode([int(t) for t in text if t != llm_tasks.IMAGE_SLOT])
    assert text.startswith(INSTRUCTIONS.query[llm_tasks.TASKS[task]].rstrip(':')), text
    cand = batch['cand_tokens'][i][batch['cand_mask'][i] == 1]
    assert tokenizer.decode([int(t) for t in cand if t != llm_tasks.IMAGE_SLOT]).startswith(
        'represent this')


def test_several_images_go_to_their_own_placeholders():
  t = 2  # visual tokens per image
  visual = jnp.arange(1, 2 * t + 1, dtype=jnp.float32)[None, :, None] * jnp.ones((1, 1, 3))
  s = llm_tasks.IMAGE_SLOT
  tokens = jnp.asarray([[5, s, s, 7, 8, s, s, 2, 0]])
  out = lm.splice(jnp.zeros((1, 9, 3)), visual, tokens)
  np.testing.assert_array_equal(out[0, :, 0], [0, 1, 2, 0, 0, 3, 4, 0, 0])


@pytest.mark.parametrize('seed', range(4))
def test_composed_edits_change_exactly_what_they_say(seed):
  rng = np.random.default_rng(seed)
  for _ in range(25):
    scene = demo.sample_scene(rng)
    target, text = llm_tasks.modify(scene, rng)
    assert target != scene
    before, after = set(scene.objects), set(target.objects)
    verb = text.split()[0]
    if verb == 'add':
      assert len(after - before) == 1 and before < after
    elif verb == 'remove':
      assert len(before - after) == 1 and after < before
    else:  # One object changed in one attribute.
      (old,), (new,) = before - after, after - before
      changed = [f for f in ('colour', 'shape', 'size', 'position')
                 if getattr(old, f) != getattr(new, f)]
      assert len(changed) == 1 and old.colour in text and old.shape in text


def test_composed_input_embeds_and_eval_reports_every_task_and_dim(tokenizer, tiny):
  from mmjax.embedder import MultimodalEmbedder  # pylint: disable=import-outside-toplevel
  from mmjax.eval import llm_retrieval, specs  # pylint: disable=import-outside-toplevel
  cfg, _, params = tiny
  emb = MultimodalEmbedder(cfg, params, encoder(tokenizer, cfg), INSTRUCTIONS, batch_size=16)
  ev = llm_retrieval.LLMRetrievalEvaluator(
      specs.resolved({'type': 'llm_retrieval', 'num_scenes': 16, 'num_composed': 8}), 16)
  queries, gallery = ev.embeddings(emb)['composed']
  assert queries.shape == (8, 32) and gallery.shape == (16, 32)  # targets + references
  out = ev(emb)
  for prefix in ('', 'dim8/', 'dim16/'):
    for task in ('i2t', 't2i', 'composed'):
      assert 0.0 <= out[f'{prefix}{task}/recall@1'] <= 1.0
  with pytest.raises(ValueError, match='image placeholder'):
    emb.embed([f'{TOKEN} {TOKEN}'], [[ev.images[0]]])


def test_mmeb_suite_and_grounding_run_through_the_multimodal_embedder(tokenizer, tiny):
  from mmjax.embedder import MultimodalEmbedder  # pylint: disable=import-outside-toplevel
  from mmjax.eval import evaluators, specs  # pylint: disable=import-outside-toplevel
  cfg, _, params = tiny
  emb = MultimodalEmbedder(cfg, params, encoder(tokenizer, cfg), INSTRUCTIONS, batch_size=16)
  out = evaluators.make(specs.resolved({'type': 'mmeb', 'num_scenes': 12}), 16)(emb)
  for key in ('classification/shape/hit@1', 'vqa/count/hit@1', 'retrieval/t2i/hit@1',
              'grounding/crops/hit@1', 'overall/hit@1'):
    assert 0.0 <= out[key] <= 1.0, key
  grd = evaluators.make(specs.resolved({'type': 'grounding', 'num_scenes': 6}), 16)(emb)
  assert 0.0 <= grd['hit@1'] <= 1.0 and grd['num_queries'] >= 6


def test_matryoshka_objective_averages_the_nested_dimensions():
  def objective(embs, t, b, batch):
    del t, b, batch
    return jnp.sum(embs['query'] * embs['candidate']), {'loss/contrastive': 0.0}

  rng = np.random.default_rng(0)
  embs = {k: lm.l2_normalize(jnp.asarray(rng.normal(size=(4, 16)), jnp.float32))
          for k in ('query', 'candidate')}
  loss, metrics = objectives.matryoshka_objective(objective, (4, 8, 16))(embs, 50.0, 0.0, {})
  parts = [float(objective(objectives.truncate(embs, d), 0, 0, {})[0]) for d in (4, 8, 16)]
  np.testing.assert_allclose(loss, np.mean(parts), rtol=1e-6)
  np.testing.assert_allclose(metrics['loss/dim4'], parts[0], rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(objectives.truncate(embs, 4)['query'], axis=-1), 1, atol=1e-4)
  assert objectives.matryoshka_objective(objective, (16,)) is objective


def test_logit_params_are_fixed_constants(tiny):
  cfg, _, params = tiny
  model = lm.LLMEmbedder(dataclasses.replace(cfg, temperature=0.05))
  t, b = model.apply({'params': params}, method='logit_params')
  assert float(t) == pytest.approx(20.0) and float(b) == 0.0
  assert not any('temp' in '/'.join(map(str, p)) for p, _ in
                 jax.tree_util.tree_flatten_with_path(params)[0])


def small_run_config():
  from configs import llm_embed_tiny  # pylint: disable=import-outside-toplevel
  c = llm_embed_tiny.get_config()
  c.batch_size, c.total_steps, c.log_every_steps = 16, 2, 1
  c.model.image.image_size, c.model.image.patch_size = 16, 4
  c.model.image.width, c.model.image.depth, c.model.image.mlp_dim = 32, 1, 64
  c.model.decoder.width, c.model.decoder.depth, c.model.decoder.mlp_dim = 32, 1, 64
  c.model.llm.matryoshka_dims = (16,)
  c.data.num_hard_negatives = 1
  c.data.num_train_examples = 1000
  c.eval.num_scenes, c.eval.num_composed, c.eval.batch_size = 16, 8, 16
  c.checkpoint.every_steps = c.eval.every_steps = 2
  return c


def test_gradcache_equals_plain_backprop(tmp_path):
  """Through the generic step: Matryoshka InfoNCE with a hard negative per query gives the same
  loss and gradients with 2 GradCache micro-batches per device as with plain backprop."""
  from mmjax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from mmjax.train import loop, step as step_lib  # pylint: disable=import-outside-toplevel
  config = small_run_config()
  run = loop.setup(config, tmp_path)
  state, _, _ = loop.init_or_restore(run, None)
  run.checkpointer.close()
  local = next(iter(run.kind.train_dataset(config, run.encoder, run.contract)))
  assert local['neg_candidate_valid'].all()
  batch = mesh_lib.global_batch({k: local[k] for k in run.contract.columns}, run.mesh)
  results = []
  for m in (1, 2):
    opts = dataclasses.replace(step_lib.make_options(config, run.mesh), micro_batches=m)
    with mesh_lib.activate(run.mesh, run.axis_rules):
      fn = jax.jit(lambda p, b, r, o=opts: step_lib.loss_and_grads(run.model.apply, p, b, r, o))
      loss, grads, t, _, metrics = fn(state.params, batch, jax.random.key(3))
    results.append((float(loss), jax.device_get(grads)))
    assert float(t) == pytest.approx(1 / 0.02) and 'loss/dim16' in metrics
  np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
  ref = jax.tree.leaves(results[0][1])
  overall = max(float(np.max(np.abs(g))) for g in ref)
  for g1, g2 in zip(ref, jax.tree.leaves(results[1][1])):
    # Relative to the leaf's scale; leaves whose exact gradient is 0 (attention key biases) to
    # 1e-2 of the largest gradient.
    scale = max(float(np.max(np.abs(g1))), 1e-2 * overall)
    assert float(np.max(np.abs(g2 - g1))) <= 1e-3 * scale


@pytest.mark.slow  # Two compiles of the step and the evaluator (minutes on 2 loaded cores).
def test_cli_run_trains_with_gradcache_lora_and_exports_merged(tmp_path):
  from mmjax.embedder import load_embedder  # pylint: disable=import-outside-toplevel
  from mmjax.models import lora  # pylint: disable=import-outside-toplevel
  from mmjax.train import loop  # pylint: disable=import-outside-toplevel
  config = small_run_config()
  config.micro_batches = 2
  config.model.lora.rank = 2
  out = loop.train_and_evaluate(config, tmp_path)
  assert out['step'] == 2 and (tmp_path / 'eval.json').exists()
  for key in ('i2t/recall@1', 't2i/recall@1', 'composed/recall@1', 'dim16/composed/mrr'):
    assert 0.0 <= out[key] <= 1.0
  # --mode=export merges the trained adapters; the loaded plain model embeds as the adapted one.
  run, state, _ = loop.load_for_inference(config, tmp_path)
  run.checkpointer.close()
  assert lora.adapter_count(state.params) > 0
  loop.export_checkpoint(config, tmp_path)
  loaded = load_embedder(tmp_path)
  assert loaded.config.lora.rank == 0 and lora.adapter_count(loaded.params) == 0
  images = demo.make_eval_set(num_scenes=2, image_size=16)['images']
  texts, ims = [f'{TOKEN} make the red circle blue', 'a red circle.'], [[images[0]], []]
  np.testing.assert_allclose(loaded.embed_queries('composed', texts, ims),
                             loop.make_embedder(run, state.params).embed_queries(
                                 'composed', texts, ims), atol=1e-4)


def test_init_decoder_from_a_qwen2_checkpoint():
  import flax  # pylint: disable=import-outside-toplevel
  from mmjax import config as config_lib, hf  # pylint: disable=import-outside-toplevel
  from mmjax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from mmjax.train import optim, state as state_lib, transfer  # pylint: disable=import-outside-toplevel
  fixture = pathlib.Path(__file__).parent / 'fixtures' / 'hf' / 'qwen2'
  config = small_run_config()
  config.init.decoder = f'hf:{fixture}'
  d = config.model.decoder
  d.vocab_size, d.width, d.depth, d.num_heads, d.num_kv_heads = 128, 32, 2, 4, 1
  d.mlp_dim, d.rope_theta, d.max_len, d.qkv_bias, d.scan_layers = 48, 1000.0, 64, True, True
  config.model.llm.max_len = 64
  config_lib.validate(config)
  mesh, rules = mesh_lib.make_mesh(config.mesh), mesh_lib.rules(config)
  cfg = kinds.llm_embedder_config(config)
  tx, _ = optim.make_optimizer(config.optimizer, config.total_steps)
  state, shardings = state_lib.create_train_state(lm.LLMEmbedder(cfg), tx, mesh, rules,
                                                  jax.random.key(0))
  state = transfer.apply_init(config, state, shardings, cfg)
  want = flax.traverse_util.flatten_dict(hf.load_decoder(fixture).params_for(cfg.decoder))
  got = flax.traverse_util.flatten_dict(jax.device_get(state.params['llm']))
  assert got.keys() == want.keys()
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v)
  d.mlp_dim = 64
  with pytest.raises(config_lib.ConfigError, match=r"differs from the checkpoint in \['mlp_dim'\]"):
    transfer.apply_init(config, state, shardings, kinds.llm_embedder_config(config))
