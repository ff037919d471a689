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
import hashlib
import math
import operator
import re
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond", "ring",
                           "hexagon")
# Well separated in RGB (min pairwise distance ~97) and away from every background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (245, 225, 40), "purple": (140, 60, 190), "orange": (245, 130, 20),
    "white": (250, 250, 250), "black": (20, 20, 20), "pink": (250, 140, 200),
    "cyan": (40, 210, 220),
}
SIZES: tuple[str, ...] = ("small", "large")
# Row-major 3x3 grid; the index in this tuple is the grid cell.
POSITIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "center", "right",
                              "bottom left", "bottom", "bottom right")
# Muted, and none of them is an object colour name, so colour words in a caption are objects.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128), "beige": (205, 190, 160), "slate": (95, 110, 130),
    "brown": (120, 95, 75), "sage": (150, 165, 140),
}
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
NUM_OBJECTS_P: dict[int, float] = {1: 0.10, 2: 0.35, 3: 0.35, 4: 0.20}
VALIDATION_FRACTION = 0.1
SPLITS: tuple[str, ...] = ("train", "validation")

_SALT = 0x6D6D6A78  # "mmjx": keeps these seed streams apart from other users of the same seed
_HASH_SALT = b"mmjax-demo-v1:"
_NUM_OBJECTS_CDF = np.cumsum(list(NUM_OBJECTS_P.values()))[:-1]
_COLOUR_NAMES = tuple(COLOURS)
_BACKGROUND_NAMES = tuple(BACKGROUNDS)
_SIZE_RADIUS = {"small": 0.24, "large": 0.38}  # fraction of a grid cell
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


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for field, allowed in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES),
                               ("position", POSITIONS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"unknown {field} {getattr(self, field)!r}")


@dataclasses.dataclass(frozen=True)
class Scene:
    """A canonical scene. Objects are stored sorted by grid cell, so equality, ``key()`` and
    ``split()`` do not depend on the order they were given in."""

    background: str
    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}")
        objs = tuple(sorted(self.objects, key=lambda o: POSITIONS.index(o.position)))
        if not 1 <= len(objs) <= 4:
            raise ValueError(f"a scene has 1..4 objects, got {len(objs)}")
        if len({o.position for o in objs}) != len(objs):
            raise ValueError(f"two objects share a grid cell: {objs}")
        object.__setattr__(self, "objects", objs)

    def key(self) -> str:
        objs = ";".join(f"{o.position},{o.size},{o.colour},{o.shape}" for o in self.objects)
        return f"{self.background}|{objs}"

    def split(self) -> str:
        digest = hashlib.blake2b(_HASH_SALT + self.key().encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / 2.0**64
        return "validation" if u < VALIDATION_FRACTION else "train"


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draws one scene (of either split) from ``rng``, with a single generator call (cheap
    enough to rejection-sample validation scenes)."""
    u = rng.random(23)
    n = 1 + int(np.searchsorted(_NUM_OBJECTS_CDF, u[0], side="right"))
    cells = np.argsort(u[1:10])[:n]
    objs = tuple(SceneObject(shape=SHAPES[int(u[10 + 3 * k] * len(SHAPES))],
                             colour=_COLOUR_NAMES[int(u[11 + 3 * k] * len(_COLOUR_NAMES))],
                             size=SIZES[int(u[12 + 3 * k] * len(SIZES))],
                             position=POSITIONS[c]) for k, c in enumerate(cells))
    return Scene(background=_BACKGROUND_NAMES[int(u[22] * len(_BACKGROUND_NAMES))], objects=objs)


def _sample_scene_in(split: str, rng: np.random.Generator) -> Scene:
    # Rejection sampling on the key hash: about 1 draw for train, 10 for validation.
    for _ in range(100_000):
        scene = sample_scene(rng)
        if scene.split() == split:
            return scene
    raise RuntimeError(f"no {split!r} scene found")  # pragma: no cover


# ----------------------------------------------------------------------------- rendering

def _polygon(cx: float, cy: float, radii: list[tuple[float, float]], rot: float) -> list:
    """Points at (radius, angle) around (cx, cy), rotated by ``rot`` radians (0 = up)."""
    return [(cx + r * math.sin(a + rot), cy - r * math.cos(a + rot)) for r, a in radii]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                rot: float, fill: tuple[int, int, int]) -> None:
    tau = 2 * math.pi
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, round(0.34 * r)))
    elif shape == "square":
        pts = _polygon(cx, cy, [(1.15 * r, tau / 8 + k * tau / 4) for k in range(4)], rot)
        draw.polygon(pts, fill=fill)
    elif shape == "diamond":  # vertically elongated, never rotated: distinct from a square
        draw.polygon([(cx, cy - 1.15 * r), (cx + 0.72 * r, cy), (cx, cy + 1.15 * r),
                      (cx - 0.72 * r, cy)], fill=fill)
    elif shape == "triangle":  # centred on its bounding box, not its centroid
        pts = _polygon(cx, cy + 0.25 * r, [(1.15 * r, k * tau / 3) for k in range(3)], rot)
        draw.polygon(pts, fill=fill)
    elif shape == "star":
        radii = [(1.15 * r if k % 2 == 0 else 0.48 * r, k * tau / 10) for k in range(10)]
        draw.polygon(_polygon(cx, cy, radii, rot), fill=fill)
    elif shape == "cross":
        w, arm = 0.36 * r, 1.05 * r
        corners = [(w, -arm), (w, -w), (arm, -w), (arm, w), (w, w), (w, arm),
                   (-w, arm), (-w, w), (-arm, w), (-arm, -w), (-w, -w), (-w, -arm)]
        radii = [(math.hypot(x, y), math.atan2(x, -y)) for x, y in corners]
        draw.polygon(_polygon(cx, cy, radii, rot), fill=fill)
    elif shape == "hexagon":
        pts = _polygon(cx, cy, [(1.08 * r, tau / 12 + k * tau / 6) for k in range(6)], rot)
        draw.polygon(pts, fill=fill)
    else:  # pragma: no cover - SceneObject validates shapes
        raise ValueError(f"unknown shape {shape!r}")


def _jitter(colour: tuple[int, int, int], u: np.ndarray, amount: float) -> tuple:
    """Shifts each channel by up to +-amount, from three uniforms ``u``."""
    return tuple(min(255, max(0, round(v + amount * (2 * x - 1)))) for v, x in zip(colour, u))


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Renders ``scene`` as uint8 [image_size, image_size, 3].

    ``rng`` drives the per-image jitter (cell offset, +-10% size, small rotations, colour
    tint and faint noise), so two renderings of one canonical scene differ a little and a model
    cannot match captions to exact pixels. Shapes are drawn at 2x and box-downsampled for
    anti-aliasing.
    """
    image_size = operator.index(image_size)
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    ss = 2
    canvas = image_size * ss
    cell = canvas / 3
    u = rng.random((1 + len(scene.objects), 7))  # one generator call: it dominates otherwise
    img = Image.new("RGB", (canvas, canvas), _jitter(BACKGROUNDS[scene.background], u[0], 8))
    draw = ImageDraw.Draw(img)
    for obj, (us, ux, uy, ur, *uc) in zip(scene.objects, u[1:]):
        row, col = divmod(POSITIONS.index(obj.position), 3)
        r = cell * _SIZE_RADIUS[obj.size] * (0.9 + 0.2 * us)
        slack = max(0.0, 0.5 * cell - 1.1 * r - 0.02 * cell)
        cx = (col + 0.5) * cell + slack * (2 * ux - 1)
        cy = (row + 0.5) * cell + slack * (2 * uy - 1)
        rot = math.radians(24.0 * ur - 12.0)
        _draw_shape(draw, obj.shape, cx, cy, r, rot, _jitter(COLOURS[obj.colour], uc, 10))
    pixels = np.asarray(img.reduce(ss), dtype=np.float32)
    noise = rng.standard_normal(pixels.shape, dtype=np.float32) * rng.uniform(0.5, 3.0)
    return np.clip(pixels + noise + 0.5, 0, 255).astype(np.uint8)


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
        scene = _sample_scene_in("train", rng)
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
        return _sample_scene_in(self.split, rng), rng

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
        scene = _sample_scene_in("validation", rng)
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
        scene = _sample_scene_in("validation", rng)
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
