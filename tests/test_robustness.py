"""Image corruptions, caption perturbations and the compositionality check
(mmjax.eval.robustness)."""

import collections
import zlib

import numpy as np
import pytest

from mmjax.data import demo
from mmjax.eval import robustness as rb
from mmjax.eval import specs


@pytest.fixture(scope='module')
def images():
  return demo.make_eval_set(num_scenes=6, image_size=32, seed=5)['images']


@pytest.mark.parametrize('corruption', specs.CORRUPTIONS)
def test_corruptions_keep_shape_are_deterministic_and_graded(images, corruption):
  image = images[0]
  diffs = []
  for sev in (1, 3, 5):
    out = rb.corrupt_image(image, corruption, sev, np.random.default_rng(sev))
    again = rb.corrupt_image(image, corruption, sev, np.random.default_rng(sev))
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, again)
    diffs.append(np.abs(out.astype(float) - image).mean())
  assert 0 < diffs[0] < diffs[2], diffs  # Severity 5 changes the image more than severity 1.


def test_unknown_corruption_and_perturbation():
  with pytest.raises(ValueError, match='Unknown corruption'):
    rb.corrupt_image(np.zeros((16, 16, 3), np.uint8), 'fog', 1, np.random.default_rng(0))
  with pytest.raises(ValueError, match='Unknown perturbation'):
    rb.perturb_caption('a b', 'paraphrase', 1, np.random.default_rng(0))


CAPTION = 'a large red circle at the top left and a small blue star in the center.'


@pytest.mark.parametrize('perturbation', specs.TEXT_PERTURBATIONS)
def test_perturbations_are_deterministic_and_change_more_with_severity(perturbation):
  outs = {}
  for sev in (1, 5):
    changed = 0
    for j in range(30):
      a = rb.perturb_caption(CAPTION, perturbation, sev, np.random.default_rng(j))
      assert a == rb.perturb_caption(CAPTION, perturbation, sev, np.random.default_rng(j))
      changed += a != CAPTION
    outs[sev] = changed
  assert outs[5] >= outs[1] and outs[5] > 0, outs


def test_attribute_swap_keeps_words_and_makes_a_hard_negative():
  out = rb.swap_attributes(CAPTION, 1, np.random.default_rng(0))
  assert out != CAPTION
  assert collections.Counter(out.split()) == collections.Counter(CAPTION.split())
  assert rb.swap_attributes('a red circle.', 3, np.random.default_rng(0)) == 'a red circle.'
  both = rb.swap_attributes('a red circle and a blue star.', 1, np.random.default_rng(0))
  assert both in ('a blue circle and a red star.', 'a red star and a blue circle.')


def test_scene_keys_round_trip_and_swapped_scene():
  keys = demo.make_eval_set(num_scenes=20, image_size=16, seed=2)['scene_keys']
  for key in keys:
    assert rb.parse_scene_key(key).key() == key
  scene = rb.parse_scene_key('grey|top left,large,red,circle;center,small,blue,star')
  swapped = rb.swapped_scene(scene, 'colour')
  assert swapped.key() == 'grey|top left,large,blue,circle;center,small,red,star'
  assert rb.swapped_scene(rb.parse_scene_key('grey|center,small,blue,star'), 'shape') is None


def sentence_embed(texts):
  """One (stably) hashed bucket per whole caption: a model that binds every attribute."""
  out = np.zeros((len(texts), 4096))
  for i, t in enumerate(texts):
    out[i, zlib.crc32(t.encode()) % 4096] = 1.0
  return out


def test_compositionality_of_a_binding_and_a_bag_of_words_model():
  keys = ['grey|top left,large,red,circle;center,small,blue,star',
          'sage|top,small,green,ring;bottom,small,pink,ring']
  true = sentence_embed([demo.canonical_caption(rb.parse_scene_key(k)) for k in keys])
  m = rb.compositionality(true, sentence_embed, keys)
  # Key 2 has equal sizes and shapes: only colour is testable there.
  assert m == {'compositionality/colour': 1.0, 'compositionality/shape': 1.0,
               'compositionality/size': 1.0}

  def bag_of_words(texts):
    out = np.zeros((len(texts), 4096))
    for i, t in enumerate(texts):
      for w in t.replace('.', '').split():
        out[i, zlib.crc32(w.encode()) % 4096] += 1
    return out

  bag = rb.compositionality(bag_of_words([demo.canonical_caption(rb.parse_scene_key(k))
                                          for k in keys]), bag_of_words, keys)
  assert all(v == 0.0 for v in bag.values())  # Ties are failures: words alone cannot tell.
