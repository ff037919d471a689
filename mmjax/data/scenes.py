"""The demo dataset's world: its vocabulary, canonical scenes and their split, sampling and
rendering (`mmjax.data.demo` captions them and serves them as data sources).

Train and validation share no canonical scene: a scene's split is a stable hash of its
canonical key (Python's salted ``hash()`` is never used).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import operator

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
NUM_OBJECTS_P: dict[int, float] = {1: 0.10, 2: 0.35, 3: 0.35, 4: 0.20}
VALIDATION_FRACTION = 0.1
SPLITS: tuple[str, ...] = ("train", "validation")

_HASH_SALT = b"mmjax-demo-v1:"
_NUM_OBJECTS_CDF = np.cumsum(list(NUM_OBJECTS_P.values()))[:-1]
_COLOUR_NAMES = tuple(COLOURS)
_BACKGROUND_NAMES = tuple(BACKGROUNDS)
_SIZE_RADIUS = {"small": 0.24, "large": 0.38}  # fraction of a grid cell


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


def sample_scene_in(split: str, rng: np.random.Generator) -> Scene:
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
