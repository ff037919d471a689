"""Tests for the embedded demo dataset (mmjax.data.demo)."""

import dataclasses
import itertools
import pickle
import re

import numpy as np
import pytest

from mmjax.data import demo


def _scene_diff(a: demo.Scene, b: demo.Scene) -> list[str]:
    """Names of the attributes in which two scenes with one changed object differ."""
    assert a.background == b.background and len(a.objects) == len(b.objects)
    only_a = set(a.objects) - set(b.objects)
    only_b = set(b.objects) - set(a.objects)
    assert len(only_a) == len(only_b) == 1, (a.key(), b.key())
    (oa,), (ob,) = only_a, only_b
    return [f.name for f in dataclasses.fields(oa) if getattr(oa, f.name) != getattr(ob, f.name)]


def _parse_key(key: str) -> demo.Scene:
    background, objs = key.split("|")
    return demo.Scene(background, tuple(
        demo.SceneObject(position=p, size=s, colour=c, shape=h)
        for p, s, c, h in (o.split(",") for o in objs.split(";"))))


def _object_bound(caption: str, obj: demo.SceneObject) -> bool:
    """True if the caption states obj's size, colour and shape together with its position."""
    sizes = "|".join(demo.SIZE_WORDS[obj.size])
    positions = "|".join(re.escape(p) for p in demo.POSITION_PHRASES[obj.position])
    noun = rf"\b(?:{sizes}) {obj.colour} {obj.shape}\b"
    return bool(re.search(rf"{noun} (?:is )?(?:{positions})(?![a-z-])", caption)
                or re.search(rf"(?<![a-z-])(?:{positions}) there is an? {noun}", caption))


def test_same_index_is_deterministic_and_seeds_differ():
    a = demo.DemoScenes("train", 1000, image_size=32, seed=0)
    b = demo.DemoScenes("train", 1000, image_size=32, seed=0)
    c = demo.DemoScenes("train", 1000, image_size=32, seed=1)
    for i in (0, 7, 999):
        x, y, z = a[i], b[i], c[i]
        assert x["image"].tobytes() == y["image"].tobytes()
        assert x["captions"] == y["captions"] and x["scene_key"] == y["scene_key"]
        assert x["image"].tobytes() != z["image"].tobytes()
        assert x["index"] == i and isinstance(x["index"], int)
    item = a[3]
    assert item["image"].shape == (32, 32, 3) and item["image"].dtype == np.uint8
    assert len(item["captions"]) == 5 and all(isinstance(s, str) for s in item["captions"])
    assert a.scene(3).key() == item["scene_key"]
    assert a[np.int64(3)]["scene_key"] == item["scene_key"]


def test_renderings_of_one_scene_jitter():
    scene = demo.DemoScenes().scene(0)
    x = demo.render(scene, 64, np.random.default_rng(0))
    y = demo.render(scene, 64, np.random.default_rng(1))
    assert x.shape == (64, 64, 3) and x.dtype == np.uint8
    assert x.tobytes() != y.tobytes()
    assert np.abs(x.astype(int) - y.astype(int)).mean() < 20  # same scene, small differences
    assert demo.render(scene, 64, np.random.default_rng(0)).tobytes() == x.tobytes()


def test_every_object_is_drawn():
    # One large white object on a grey background: the pixels in its cell change.
    for position in demo.POSITIONS:
        obj = demo.SceneObject("square", "white", "large", position)
        image = demo.render(demo.Scene("grey", (obj,)), 48, np.random.default_rng(0))
        row, col = divmod(demo.POSITIONS.index(position), 3)
        cell = image[row * 16:(row + 1) * 16, col * 16:(col + 1) * 16]
        assert (cell.min(axis=-1) > 200).mean() > 0.3, position
        assert (image.min(axis=-1) > 200).mean() < 0.1


def test_scene_key_is_order_independent():
    a = demo.SceneObject("star", "red", "small", "top left")
    b = demo.SceneObject("ring", "blue", "large", "center")
    assert demo.Scene("grey", (a, b)) == demo.Scene("grey", (b, a))
    assert demo.Scene("grey", (a, b)).key() == demo.Scene("grey", (b, a)).key()
    assert demo.Scene("grey", (a, b)).key() != demo.Scene("beige", (a, b)).key()
    with pytest.raises(ValueError, match="grid cell"):
        demo.Scene("grey", (a, dataclasses.replace(b, position="top left")))
    with pytest.raises(ValueError, match="'hexagram'"):
        demo.SceneObject("hexagram", "red", "small", "top")


def test_splits_share_no_scene():
    train = demo.DemoScenes("train", 3000)
    val = demo.DemoScenes("validation", 1000)
    train_scenes = [train.scene(i) for i in range(3000)]
    val_scenes = [val.scene(i) for i in range(1000)]
    assert all(s.split() == "train" for s in train_scenes)
    assert all(s.split() == "validation" for s in val_scenes)
    assert not {s.key() for s in train_scenes} & {s.key() for s in val_scenes}
    assert len({s.key() for s in val_scenes}) > 900  # validation is not a handful of scenes


def test_validation_fraction_of_all_one_object_scenes():
    scenes = [demo.Scene(bg, (demo.SceneObject(*o),)) for bg in demo.BACKGROUNDS
              for o in itertools.product(demo.SHAPES, demo.COLOURS, demo.SIZES, demo.POSITIONS)]
    fraction = np.mean([s.split() == "validation" for s in scenes])
    assert 0.08 < fraction < 0.12


def test_captions_identify_the_scene():
    ds = demo.DemoScenes("train", 200, image_size=16)
    caption_owner: dict[str, str] = {}
    for i in range(200):
        scene = ds.scene(i)
        caps = demo.captions(scene, np.random.default_rng(i), num=6)
        assert len(set(caps)) == len(caps) == 6
        caps.append(demo.canonical_caption(scene))
        for cap in caps:
            assert cap == cap.lower() and cap.endswith(".")
            words = re.findall(r"[a-z]+", cap)
            assert sum(w in demo.COLOURS for w in words) == len(scene.objects), cap
            assert sum(w in demo.SHAPES for w in words) == len(scene.objects), cap
            for obj in scene.objects:
                assert _object_bound(cap, obj), (cap, obj)
            assert caption_owner.setdefault(cap, scene.key()) == scene.key()
    assert len({len(demo.DemoScenes()[i]["captions"]) for i in range(3)}) == 1
    assert len(set(demo.DemoScenes()[0]["captions"])) >= 4


def test_canonical_caption():
    scene = demo.Scene("beige", (demo.SceneObject("star", "orange", "small", "center"),
                                 demo.SceneObject("circle", "red", "large", "top left")))
    assert demo.canonical_caption(scene) == (
        "a large red circle at the top left and a small orange star in the center"
        " on a beige background.")


def test_make_eval_set():
    num = 80
    ev = demo.make_eval_set(num_scenes=num, image_size=24, seed=5, near_duplicate_fraction=0.5)
    assert ev["images"].shape == (num, 24, 24, 3) and ev["images"].dtype == np.uint8
    assert ev["near_duplicate_of"].shape == (num,) and ev["near_duplicate_of"].dtype == np.int32
    assert len(ev["captions"]) == len(ev["scene_keys"]) == num
    assert len(set(ev["scene_keys"])) == num
    scenes = [_parse_key(k) for k in ev["scene_keys"]]
    assert [s.key() for s in scenes] == ev["scene_keys"]
    assert all(s.split() == "validation" for s in scenes)
    dup = ev["near_duplicate_of"]
    paired = np.flatnonzero(dup >= 0)
    assert len(paired) == 40
    for i in paired:
        j = dup[i]
        assert j != i and dup[j] == i
        assert len(_scene_diff(scenes[i], scenes[j])) == 1
    attributes = {_scene_diff(scenes[i], scenes[dup[i]])[0] for i in paired}
    assert attributes == {"colour", "shape", "size", "position"}
    for scene, cap in zip(scenes, ev["captions"]):
        assert all(_object_bound(cap, o) for o in scene.objects)
    again = demo.make_eval_set(num_scenes=num, image_size=24, seed=5, near_duplicate_fraction=0.5)
    assert again["images"].tobytes() == ev["images"].tobytes()
    assert again["captions"] == ev["captions"] and again["scene_keys"] == ev["scene_keys"]
    assert (again["near_duplicate_of"] == dup).all()
    none = demo.make_eval_set(num_scenes=7, image_size=16, near_duplicate_fraction=0.0)
    assert (none["near_duplicate_of"] == -1).all()


def test_pickle_round_trip():
    ds = demo.DemoScenes("validation", 50, image_size=24, seed=3, num_captions=2)
    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone) == 50
    a, b = ds[11], clone[11]
    assert a["image"].tobytes() == b["image"].tobytes()
    assert a["captions"] == b["captions"] and len(a["captions"]) == 2
    scene = ds.scene(11)
    assert pickle.loads(pickle.dumps(scene)) == scene


@pytest.mark.parametrize("kwargs, exc, value", [
    ({"split": "test"}, ValueError, "'test'"),
    ({"image_size": 8}, ValueError, "8"),
    ({"num_examples": 0}, ValueError, "0"),
    ({"num_examples": -5}, ValueError, "-5"),
    ({"num_captions": 0}, ValueError, "0"),
])
def test_bad_arguments(kwargs, exc, value):
    with pytest.raises(exc, match=re.escape(value)):
        demo.DemoScenes(**kwargs)


def test_bad_index_and_functions():
    ds = demo.DemoScenes("train", 10)
    for index in (10, -1, 1234):
        with pytest.raises(IndexError, match=str(index)):
            ds[index]
    with pytest.raises(ValueError, match="12"):
        demo.render(ds.scene(0), 12, np.random.default_rng(0))
    with pytest.raises(ValueError, match="1.5"):
        demo.make_eval_set(num_scenes=4, near_duplicate_fraction=1.5)
    with pytest.raises(ValueError, match="0"):
        demo.make_eval_set(num_scenes=0)


def test_caption_corpus_covers_vocabulary():
    vocab = demo.vocabulary_words()
    corpus = list(demo.caption_corpus(num_scenes=50, seed=0))
    assert len(corpus) >= 50 * 5
    seen = set(re.findall(r"[a-z]+", " ".join(corpus)))
    assert seen == vocab  # every template word appears, and nothing outside the vocabulary
    assert set(demo.SHAPES) | set(demo.COLOURS) | set(demo.BACKGROUNDS) <= vocab
    assert corpus[:20] == list(itertools.islice(demo.caption_corpus(num_scenes=50), 20))
    # Train scenes only: canonical captions map back to train scenes.
    val_captions = {demo.canonical_caption(demo.DemoScenes("validation").scene(i))
                    for i in range(100)}
    assert not val_captions & set(corpus)


def test_hard_negatives_change_one_attribute_of_one_object():
    ds = demo.DemoScenes("train", num_examples=50, image_size=32, seed=0)
    for i in range(20):
        scene = ds.scene(i)
        attrs = ("shape",) if i % 2 else ("shape", "colour")
        images, caps = demo.hard_negatives(scene, attrs, 2, 32, np.random.default_rng(i))
        assert len(images) == len(caps) == 2
        for j, cap in enumerate(caps):
            assert images[j].shape == (32, 32, 3) and images[j].dtype == np.uint8
            # The caption names a train scene that differs in exactly that attribute.
            other = next(m for m in demo._mutations(scene, attrs[j % len(attrs)])
                         if all(_object_bound(cap, o) for o in m.objects))
            assert other.split() == "train"
            assert _scene_diff(scene, other) == [attrs[j % len(attrs)]]
    again = demo.hard_negatives(ds.scene(3), ("shape",), 1, 32, np.random.default_rng(3))
    first = demo.hard_negatives(ds.scene(3), ("shape",), 1, 32, np.random.default_rng(3))
    assert again[1] == first[1] and np.array_equal(again[0][0], first[0][0])
    assert demo.negative_attributes(" shape, size ") == ("shape", "size")
    with pytest.raises(ValueError, match="'hue'"):
        demo.negative_attributes("shape,hue")


def test_demo_source_carries_rendered_negatives():
    from mmjax.data import sources  # Grain: only this test needs it.
    plain = sources.DemoSource(20, 32, 0)
    with_neg = sources.DemoSource(20, 32, 0, negatives="shape", num_negatives=1)
    a, b = plain[5], with_neg[5]
    assert np.array_equal(a["image"], b["image"]) and a["captions"] == b["captions"]
    assert a["neg_images"] == [] and a["neg_texts"] == []
    assert len(b["neg_images"]) == len(b["neg_texts"]) == 1
    assert not np.array_equal(b["neg_images"][0], b["image"])
