"""Zero-shot classification and the ridge linear probe (mmjax.eval.classification)."""

import numpy as np
import pytest
from sklearn.linear_model import RidgeClassifier

from mmjax.eval import classification as cls


def fake_embed_texts(texts):
  """Deterministic text 'embeddings': a bag of hashed words (no model needed)."""
  out = np.zeros((len(texts), 16))
  for i, t in enumerate(texts):
    for w in t.strip('.').split():
      out[i, sum(map(ord, w)) % 16] += 1.0
  return out


def test_class_embeddings_average_normalised_prompts():
  names, templates = ('cat', 'dog'), ('a {}.', 'a big {}.', 'my {} here.')
  z = cls.class_embeddings(fake_embed_texts, names, templates)
  assert z.shape == (2, 16)
  np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0)
  prompts = fake_embed_texts([t.format('dog') for t in templates])
  mean = (prompts / np.linalg.norm(prompts, axis=1, keepdims=True)).mean(0)
  np.testing.assert_allclose(z[1], mean / np.linalg.norm(mean))
  with pytest.raises(ValueError, match='templates'):
    cls.class_embeddings(fake_embed_texts, names, ('no placeholder',))


def test_accuracy_metrics_hand_case_with_ties():
  scores = np.array([[0.9, 0.1, 0.0],    # label 0: top1
                     [0.5, 0.5, 0.0],    # label 1, tied with class 0: rank 2 (pessimistic)
                     [0.2, 0.3, 0.1],    # label 2: rank 3
                     [0.0, 0.0, 1.0]])   # label 2: top1
  m = cls.accuracy_metrics(scores, np.array([0, 1, 2, 2]), ('a', 'b', 'c'), ks=(1, 2, 5))
  assert m == pytest.approx({'top1': 0.5, 'top2': 0.75, 'mean_per_class': (1 + 0 + 0.5) / 3,
                             'per_class/a': 1.0, 'per_class/b': 0.0, 'per_class/c': 0.5})


def test_zero_shot_with_prompted_embeddings():
  names = ('red', 'blue', 'green')
  class_emb = cls.class_embeddings(fake_embed_texts, names, ('a {} thing.',))
  images = class_emb[[0, 1, 2, 1]] + 0.01  # 'Images' near their class prompt.
  m = cls.zero_shot_metrics(images, np.array([0, 1, 2, 1]), class_emb, names)
  assert m['top1'] == 1.0 and m['mean_per_class'] == 1.0 and 'top5' not in m


def test_ridge_matches_sklearn_ridge_classifier():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(60, 5))
  y = rng.integers(0, 3, 60)
  l2 = 0.05
  w = cls.ridge_fit(x, y, 3, l2=l2)
  ref = RidgeClassifier(alpha=l2 * len(x)).fit(x, y)
  np.testing.assert_allclose(w[:-1], ref.coef_.T, atol=1e-8)
  np.testing.assert_allclose(w[-1], ref.intercept_, atol=1e-8)
  np.testing.assert_array_equal(cls.ridge_scores(w, x).argmax(1), ref.predict(x))


def test_few_shot_indices_and_probe_learns_separable_classes():
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(4), 30)
  x = np.eye(4)[labels] * 5 + rng.normal(size=(120, 4))
  idx = cls.few_shot_indices(labels, shots=5, seed=0)
  assert np.bincount(labels[idx]).tolist() == [5, 5, 5, 5]
  w = cls.ridge_fit(x[idx], labels[idx], 4)
  rest = np.setdiff1d(np.arange(120), idx)
  acc = np.mean(cls.ridge_scores(w, x[rest]).argmax(1) == labels[rest])
  assert acc > 0.9


@pytest.mark.parametrize('attribute', ['shape', 'colour'])
def test_demo_single_objects(attribute):
  images, labels, names = cls.demo_single_objects(24, 16, attribute, seed=3)
  assert images.shape == (24, 16, 16, 3) and images.dtype == np.uint8
  assert names == cls.DEMO_CLASSES[attribute]
  assert np.bincount(labels).max() - np.bincount(labels).min() <= 1
  again = cls.demo_single_objects(24, 16, attribute, seed=3)
  np.testing.assert_array_equal(images, again[0])
  with pytest.raises(ValueError, match='attribute'):
    cls.demo_single_objects(2, 16, 'size', seed=0)
