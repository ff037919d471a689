"""Embedded, offline, deterministic image-caption data for the demo and the tests.

Images are procedurally rendered scenes (1-4 coloured shapes on a 3x3 grid over a muted
background) with compositional captions. Nothing is downloaded: every example is rendered on
the fly from ``(seed, split, index)``, so the dataset installs with pip alone, is random access
and is identical in every process. Retrieval is not trivial: a caption must bind colour, shape,
size and position of every object, and the eval set holds pairs of scenes that differ in a
single attribute of a single object.

Train and validation share no canonical scene: a scene's split is a stable hash of its
canonical key (Python's salted ``hash()`` is never used).
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Iterator

import numpy as np

from mmjax.data.scenes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, SPLITS
from mmjax.data.scenes import NUM_OBJECTS_P, VALIDATION_FRACTION, sample_scene  # noqa: F401
from mmjax.data.scenes import Scene, SceneObject, render, sample_scene_in

# The scene world lives in mmjax.data.scenes; its names stay importable from here, and
# `_sample_scene_in` is the old name of `sample_scene_in` (mmjax.data.llm_tasks uses it).
_sample_scene_in = sample_scene_in

SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "tiny"), "large": ("large", "big")}
# Every phrase names exactly one position, so a caption determines the layout.
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("at the top left", "in the upper left corner", "in the top-left corner"),
    "top": ("at the top", "at the top center", "in the upper middle"),
    "top right": ("at the top right", "in the upper right corner", "in the top-right corner"),
    "left": ("on the left", "at the middle left", "on the left side"),
    "center": ("in the center", "in the middle", "in the centre"),
    "right": ("on the right", "at the middle right", "on the right side"),
    "bottom left": ("at the bottom left", "in the lower left corner", "in the bottom-left corner"),
    "bottom": ("at the bottom", "at the bottom center", "in the lower middle"),
    "bottom right": (
        "at the bottom right", "in the lower right corner", "in the bottom-right corner"),
}

_SALT = 0x6D6D6A78  # "mmjx": keeps these seed streams apart from other users of the same seed
_COUNT = {1: ("one shape", "a single shape"), 2: ("two shapes",), 3: ("three shapes",),
          4: ("four shapes",)}
# Object phrases: {a} article, {s} size word, {c} colour, {h} shape, {p} position phrase.
_OBJECT_FORMS = ("{a} {s} {c} {h} {p}",)
_CLAUSE_FORMS = ("{p} there is {a} {s} {c} {h}", "{a} {s} {c} {h} is {p}")
# Sentence templates: {objs} joined object phrases, {bg} optional " on a X background".
_LIST_TEMPLATES = ("{objs}{bg}.", "a picture of {objs}{bg}.", "an image showing {objs}{bg}.",
                   "{count}{bg}: {objs}.", "a scene with {objs}{bg}.")
_BG_PHRASE = " on {a} {b} background"
_BG_SENTENCE = " the background is {b}."
_AND = " and "


# ------------------------------------------------------------------------------ captions

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + _AND + parts[-1]


def _object_phrase(form: str, obj: SceneObject, size_word: str, position_phrase: str) -> str:
    return form.format(a=_article(size_word), s=size_word, c=obj.colour, h=obj.shape,
                       p=position_phrase)


def canonical_caption(scene: Scene) -> str:
    """One fixed caption: objects in grid order, first synonym everywhere, background named."""
    parts = [_object_phrase(_OBJECT_FORMS[0], o, SIZE_WORDS[o.size][0],
                            POSITION_PHRASES[o.position][0]) for o in scene.objects]
    bg = _BG_PHRASE.format(a=_article(scene.background), b=scene.background)
    return f"{_join(parts)}{bg}."


def _random_caption(scene: Scene, rng: np.random.Generator) -> str:
    n = len(scene.objects)
    u = iter(rng.random(5 + 2 * n))  # one generator call per caption

    def pick(options):
        return options[int(next(u) * len(options))]

    objs = [scene.objects[i] for i in rng.permutation(n)]
    clauses = next(u) < 0.3
    form = pick(_CLAUSE_FORMS if clauses else _OBJECT_FORMS)
    parts = [_object_phrase(form, o, pick(SIZE_WORDS[o.size]), pick(POSITION_PHRASES[o.position]))
             for o in objs]
    with_bg = next(u) < 0.5
    if clauses:
        bg = _BG_SENTENCE.format(b=scene.background) if with_bg else ""
        return f"{_join(parts)}.{bg}"
    bg = _BG_PHRASE.format(a=_article(scene.background), b=scene.background) if with_bg else ""
    return pick(_LIST_TEMPLATES).format(objs=_join(parts), bg=bg,
                                        count=pick(_COUNT[len(scene.objects)]))


def captions(scene: Scene, rng: np.random.Generator, num: int = 5) -> list[str]:
    """``num`` distinct paraphrases of ``scene``; each one names every object's size, colour,
    shape and position (templates, synonyms and object order vary; background optional)."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    out: list[str] = []
    for _ in range(100 * num):
        caption = _random_caption(scene, rng)
        if caption not in out:
            out.append(caption)
            if len(out) == num:
                return out
    raise ValueError(f"could not find {num} distinct captions for {scene.key()}")


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text))


def vocabulary_words() -> frozenset[str]:
    """Every word (maximal run of a-z) the caption templates can emit."""
    words: set[str] = set()
    fixed = (_OBJECT_FORMS + _CLAUSE_FORMS + _LIST_TEMPLATES + (_BG_PHRASE, _BG_SENTENCE)
             + SHAPES + tuple(COLOURS) + tuple(BACKGROUNDS)
             + tuple(w for ws in SIZE_WORDS.values() for w in ws)
             + tuple(p for ps in POSITION_PHRASES.values() for p in ps)
             + tuple(c for cs in _COUNT.values() for c in cs) + ("a", "an", _AND))
    for text in fixed:
        words |= _words(re.sub(r"\{[a-z]+\}", " ", text))
    return frozenset(words)


def caption_corpus(num_scenes: int = 20_000, seed: int = 0) -> Iterator[str]:
    """Captions of train scenes, to train a tokenizer on.

    Yields the canonical caption plus 4 paraphrases for each of ``num_scenes`` scenes, then
    keeps going (a few more scenes at most) until every word of ``vocabulary_words()`` has
    appeared, so a tokenizer trained on it never meets an unknown template word.
    """
    if num_scenes < 1:
        raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
    rng = np.random.default_rng([_SALT, seed, 2])
    missing = set(vocabulary_words())
    for n in range(num_scenes + 100_000):
        if n >= num_scenes and not missing:
            return
        scene = sample_scene_in("train", rng)
        for caption in [canonical_caption(scene)] + captions(scene, rng, num=4):
            missing -= _words(caption)
            yield caption
    raise RuntimeError(f"caption_corpus never produced {sorted(missing)}")  # pragma: no cover


# ------------------------------------------------------------------------------ datasets

class DemoScenes:
    """Random-access demo dataset (Grain ``RandomAccessDataSource`` compatible, picklable).

    Example ``i`` of split ``s`` is drawn from a generator seeded with ``(seed, s, i)``: scenes
    are sampled until one hashes into ``s``, then rendered and captioned from the same stream.
    Different indices may repeat a canonical scene (most often one-object scenes).
    """

    def __init__(self, split: str = "train", num_examples: int = 100_000, image_size: int = 64,
                 seed: int = 0, num_captions: int = 5):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if num_examples <= 0:
            raise ValueError(f"num_examples must be > 0, got {num_examples}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if num_captions < 1:
            raise ValueError(f"num_captions must be >= 1, got {num_captions}")
        self.split, self.num_examples, self.image_size = split, int(num_examples), int(image_size)
        self.seed, self.num_captions = int(seed), int(num_captions)

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return (f"DemoScenes(split={self.split!r}, num_examples={self.num_examples}, "
                f"image_size={self.image_size}, seed={self.seed})")

    def _draw(self, index: int) -> tuple[Scene, np.random.Generator]:
        index = operator.index(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        rng = np.random.default_rng([_SALT, self.seed, SPLITS.index(self.split), index])
        return sample_scene_in(self.split, rng), rng

    def scene(self, index: int) -> Scene:
        return self._draw(index)[0]

    def __getitem__(self, index: int) -> dict:
        scene, rng = self._draw(index)
        return {"image": render(scene, self.image_size, rng),
                "captions": captions(scene, rng, self.num_captions),
                "scene_key": scene.key(), "index": operator.index(index)}


ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position")
_ATTRIBUTES = ATTRIBUTES


def negative_attributes(text: str) -> tuple[str, ...]:
    """Comma-separated attributes ('shape,colour') -> ('shape', 'colour'); unknown ones raise."""
    attributes = tuple(a.strip() for a in text.split(",") if a.strip())
    bad = [a for a in attributes if a not in ATTRIBUTES]
    if bad:
        raise ValueError(f"negatives={text!r} names {bad}: a demo source's negatives are "
                         f"comma-separated attributes of {ATTRIBUTES}")
    return attributes


def hard_negatives(scene: Scene, attributes: tuple[str, ...], num: int, image_size: int,
                   rng: np.random.Generator) -> tuple[list[np.ndarray], list[str]]:
    """``num`` train scenes that differ from ``scene`` in one attribute of one object, rendered
    and captioned: (images, captions). The j-th changes ``attributes[j % len(attributes)]``
    (a random object, a random other value). Scenes of the validation split are never used; a
    scene with no train mutation of that attribute (rare) gives fewer negatives."""
    for a in attributes:
        if a not in ATTRIBUTES:
            raise ValueError(f"unknown attribute {a!r}; expected one of {ATTRIBUTES}")
    images, caps = [], []
    for j in range(num):
        candidates = [m for m in _mutations(scene, attributes[j % len(attributes)])
                      if m.split() == "train"]
        if not candidates:
            continue
        other = candidates[int(rng.integers(len(candidates)))]
        images.append(render(other, image_size, rng))
        caps.append(captions(other, rng, num=1)[0])
    return images, caps


def _mutations(scene: Scene, attribute: str) -> list[Scene]:
    """All scenes that differ from ``scene`` only in ``attribute`` of one object."""
    free = [p for p in POSITIONS if p not in {o.position for o in scene.objects}]
    values = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "position": free}[attribute]
    out = []
    for i, obj in enumerate(scene.objects):
        for value in values:
            if value != getattr(obj, attribute):
                new = dataclasses.replace(obj, **{attribute: value})
                out.append(Scene(scene.background, scene.objects[:i] + (new,)
                                 + scene.objects[i + 1:]))
    return out


def make_eval_set(num_scenes: int = 500, image_size: int = 64, seed: int = 1234,
                  near_duplicate_fraction: float = 0.5) -> dict:
    """A fixed retrieval eval set of distinct validation scenes.

    About ``near_duplicate_fraction`` of the scenes come in sibling pairs that differ in exactly
    one attribute (colour, shape, size or position) of one object, so retrieval has to bind
    every attribute. Returns ``images`` uint8[N,H,W,3], ``captions`` (one paraphrase per image),
    ``scene_keys`` and ``near_duplicate_of`` int32[N] (sibling index or -1). Deterministic.
    """
    if num_scenes < 1:
        raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
    if not 0.0 <= near_duplicate_fraction <= 1.0:
        raise ValueError(
            f"near_duplicate_fraction must be in [0, 1], got {near_duplicate_fraction}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    rng = np.random.default_rng([_SALT, seed, 3])
    num_pairs = min(int(round(num_scenes * near_duplicate_fraction / 2)), num_scenes // 2)
    scenes: list[Scene] = []
    sibling: list[int] = []  # index of the pair partner in `scenes`, or -1
    used: set[str] = set()
    while len(scenes) < 2 * num_pairs:
        scene = sample_scene_in("validation", rng)
        if scene.key() in used:
            continue
        # Pairs cycle through the attributes, so each kind of near duplicate is equally common
        # (picking among all mutations would give mostly colour, which has 9 alternatives).
        attribute = _ATTRIBUTES[(len(scenes) // 2) % len(_ATTRIBUTES)]
        candidates = _mutations(scene, attribute)
        other = next((candidates[j] for j in rng.permutation(len(candidates))
                      if candidates[j].split() == "validation"
                      and candidates[j].key() not in used), None)
        if other is not None:
            used |= {scene.key(), other.key()}
            sibling += [len(scenes) + 1, len(scenes)]
            scenes += [scene, other]
    while len(scenes) < num_scenes:
        scene = sample_scene_in("validation", rng)
        if scene.key() not in used:
            used.add(scene.key())
            scenes.append(scene)
            sibling.append(-1)
    order = rng.permutation(num_scenes)  # so siblings are not adjacent
    where = np.empty(num_scenes, dtype=np.int64)
    where[order] = np.arange(num_scenes)
    images, caps, keys, dup = [], [], [], np.full(num_scenes, -1, dtype=np.int32)
    for new_i, old_i in enumerate(order):
        scene = scenes[old_i]
        item_rng = np.random.default_rng([_SALT, seed, 4, new_i])
        images.append(render(scene, image_size, item_rng))
        caps.append(captions(scene, item_rng, num=1)[0])
        keys.append(scene.key())
        if sibling[old_i] >= 0:
            dup[new_i] = where[sibling[old_i]]
    return {"images": np.stack(images), "captions": caps, "scene_keys": keys,
            "near_duplicate_of": dup}
