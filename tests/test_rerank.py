"""Two-stage retrieval (mmjax.eval.rerank) and the runner's ITM / captioning methods."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from mmjax import config as config_lib
from mmjax.data import demo, tokenizer as tokenizer_lib
from mmjax.embedder import Embedder
from mmjax.eval import evaluators, rerank, specs
from mmjax.models import TwoTower
from mmjax.types import ConfigError


def test_rerank_with_an_oracle_finds_every_true_item_in_the_top_k():
  rs = np.random.RandomState(0)
  scores = rs.normal(size=(50, 50))
  first = rerank.topk(scores, 10)
  assert (first[:, 0] == scores.argmax(1)).all()
  in_top = np.any(first == np.arange(50)[:, None], axis=1)
  second = rerank.rerank(first, lambda q, c: (q == c).astype(float))
  assert rerank.recall_at_1(second) == pytest.approx(in_top.mean())
  # k = 1 changes nothing.
  one = rerank.topk(scores, 1)
  np.testing.assert_array_equal(rerank.rerank(one, lambda q, c: -c), one)


@pytest.fixture(scope='module')
def embedder():
  from configs import tiny  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  c.model.itm.depth, c.loss.itm_weight = 1, 1.0
  c.model.caption.depth, c.loss.caption_weight = 1, 1.0
  config_lib.validate(c)
  mc = config_lib.model_config(c)
  model = TwoTower(mc)
  params = nn.unbox(model.init(jax.random.key(0), *model.init_inputs())['params'])
  assert {'itm', 'captioner'} <= set(params)
  tok = tokenizer_lib.train_wordpiece(demo.caption_corpus(num_scenes=200), vocab_size=256)
  return Embedder(mc, params, tokenizer_lib.TextEncoder(tok, mc.text.max_len), batch_size=16)


def test_rerank_evaluator_reports_both_stages_the_hard_pairs_and_the_cost(embedder):
  spec = specs.resolved({'type': 'rerank', 'num_scenes': 24, 'k': 5})
  out = evaluators.make(spec, embedder.config.image.image_size)(embedder)
  for d in ('i2t', 't2i'):
    for key in ('recall@1', 'reranked_recall@1', 'near_duplicates/recall@1',
                'near_duplicates/reranked_recall@1', 'recall@5'):
      assert 0.0 <= out[f'{d}/{key}'] <= 1.0
    assert out[f'{d}/recall@1'] <= out[f'{d}/recall@5']
  assert out['rerank_seconds'] > 0 and out['pairs_scored_per_query'] == 5
  assert any(k.startswith('itm_compositionality/') for k in out)
  # The runner's match scores are those of the model on the same tokens.
  tok, mask = embedder.text_tokens(['a red star.', 'a big blue ring.'])
  img = embedder.image_tokens(np.zeros((2, 16, 16, 3), np.uint8))
  s = embedder.match_scores(tok, mask, img)
  ref = embedder.model.apply({'params': embedder.params}, tok, mask, img,
                             method=TwoTower.match_logits)
  np.testing.assert_allclose(s, np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_caption_decodes_strings(embedder):
  caps = embedder.caption(np.zeros((3, 16, 16, 3), np.uint8))
  assert len(caps) == 3 and all(isinstance(c, str) for c in caps)


def test_rerank_needs_an_itm_head():
  from configs import tiny  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  c.evals.rr = specs.spec('rerank')
  with pytest.raises(ConfigError, match="config.evals.rr is a 'rerank' evaluator"):
    config_lib.validate(c)


@pytest.mark.slow  # ~6 min on 2 loaded cores (compiles the step with both heads, GradCache).
def test_a_run_with_both_heads_trains_evaluates_reranking_and_exports(tmp_path):
  """config -> train (8 devices, GradCache) -> eval.json with the rerank keys -> export ->
  load_embedder -> captions."""
  import mmjax  # pylint: disable=import-outside-toplevel
  from configs import tiny  # pylint: disable=import-outside-toplevel
  from mmjax.train import loop  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  c.total_steps, c.micro_batches = 2, 2
  c.model.itm.depth, c.loss.itm_weight = 1, 1.0
  c.model.caption.depth, c.loss.caption_weight = 1, 0.5
  c.evals.rerank = specs.spec('rerank', num_scenes=16, k=4)
  result = loop.train_and_evaluate(c, tmp_path)
  assert 'rerank/i2t/reranked_recall@1' in result
  metrics = [l for l in (tmp_path / 'metrics.jsonl').read_text().splitlines() if 'loss/itm' in l]
  assert metrics and 'train/loss/caption' in metrics[-1]
  loop.export_checkpoint(c, tmp_path)
  emb = mmjax.load_embedder(tmp_path / 'export')
  assert emb.has_itm and len(emb.caption(np.zeros((2, 16, 16, 3), np.uint8))) == 2
