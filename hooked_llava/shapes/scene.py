"""Shapes-world scenes: objects, their rasterised masks, the rendered image and its descriptions.

A scene is a small RGB image (64×64 by default) holding one to three non-overlapping objects
on a lightly textured background. Every object has a shape, a colour, a size and a position,
and records its pixel bounding box, so that the image patches an object covers can be found.

Shapes are rasterised with numpy masks (no anti-aliasing, no font or platform dependence); the
randomness comes from the generator the caller passes (`ShapesWorld.rng`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")

# Base RGB of each colour; every object gets a small jitter around it.
_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 85, 215),
    "yellow": (235, 205, 35),
    "purple": (135, 65, 175),
    "orange": (240, 135, 30),
}
MIN_SIZE, MAX_SIZE = 16, 24  # side of an object's square, in pixels (inclusive)
_GAP = 2  # minimum number of background pixels between two objects' squares
_CENTRE_MARGIN = 4  # |x - middle| beyond which a description says "left" / "right"


@dataclass(frozen=True)
class ShapeObject:
    """One object in a scene.

    Attributes:
        shape: One of ``SHAPES``.
        color: One of ``COLORS``.
        size: Side of the square the shape is drawn in, in pixels.
        center: ``(x, y)`` centre of that square, in pixels.
        bbox: Tight pixel bounding box ``(x0, y0, x1, y1)`` of the drawn shape; x1, y1 exclusive.
    """

    shape: str
    color: str
    size: int
    center: tuple[float, float]
    bbox: tuple[int, int, int, int]

    @property
    def article(self) -> str:
        """The indefinite article for "<colour> <shape>"."""
        return "an" if self.color[0] in "aeiou" else "a"


def horizontal_word(x: float, image_size: int = 64) -> str:
    """Where a description places an object whose centre is at ``x``: left, middle or right."""
    middle = image_size / 2
    if x < middle - _CENTRE_MARGIN:
        return "left"
    if x > middle + _CENTRE_MARGIN:
        return "right"
    return "middle"


@dataclass(frozen=True)
class Scene:
    """A rendered scene: its image and its objects, sorted left to right."""

    image: Image.Image
    objects: list[ShapeObject]

    @property
    def image_size(self) -> int:
        return self.image.size[0]

    def find(self, shape: str) -> ShapeObject | None:
        """The object with this shape, or None (shapes are unique within a scene)."""
        return next((o for o in self.objects if o.shape == shape), None)

    def describe(self) -> str:
        """Describe the scene in words, objects in left-to-right order.

        Returns:
            e.g. ``"There is a red circle on the left and a blue square on the right."``
        """
        parts = [describe_object(o, self.image_size) for o in self.objects]
        listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"There is {listed}."


def describe_object(o: ShapeObject, image_size: int = 64) -> str:
    """An object in words, as a scene description names it: ``"a red circle on the left"``."""
    where = horizontal_word(o.center[0], image_size)
    place = "in the middle" if where == "middle" else f"on the {where}"
    return f"{o.article} {o.color} {o.shape} {place}"


@cache
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean ``[size, size]`` mask of a shape drawn in a square of side ``size``."""
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0  # pixel centres in (-1, 1)
    u, v = np.meshgrid(c, c)  # u grows rightwards, v grows downwards
    if shape == "circle":
        m = u * u + v * v <= 1.0
    elif shape == "square":
        m = np.maximum(np.abs(u), np.abs(v)) <= 0.82
    elif shape == "diamond":
        m = np.abs(u) + np.abs(v) <= 1.0
    elif shape == "triangle":  # apex up
        m = (v >= -0.92) & (v <= 0.82) & (np.abs(u) <= (v + 0.92) / 1.74)
    elif shape == "cross":
        m = ((np.abs(u) <= 0.32) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 0.95))
    elif shape == "star":
        m = _star(u, v)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    m.setflags(write=False)
    return m


def _star(u: np.ndarray, v: np.ndarray, points: int = 5, inner: float = 0.5) -> np.ndarray:
    """Even-odd point-in-polygon test for a five-pointed star pointing up."""
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    px, py = radii * np.cos(angles), radii * np.sin(angles)
    inside = np.zeros(u.shape, dtype=bool)
    for k in range(2 * points):
        x0, y0, x1, y1 = px[k - 1], py[k - 1], px[k], py[k]
        crosses = (y0 > v) != (y1 > v)
        x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0 + 1e-12)
        inside ^= crosses & (u < x_at)
    return inside


def make_object(shape: str, color: str, size: int, x0: int, y0: int) -> ShapeObject:
    """An object drawn in the square with top-left corner ``(x0, y0)``."""
    m = shape_mask(shape, size)
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    bbox = (x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1)
    return ShapeObject(shape, color, size, (x0 + size / 2, y0 + size / 2), bbox)


def sample_objects(rng: np.random.Generator, n: int, image_size: int = 64) -> list[ShapeObject]:
    """Sample ``n`` non-overlapping objects with distinct shapes, sorted left to right."""
    shapes = [SHAPES[k] for k in rng.permutation(len(SHAPES))[:n]]
    colors = [COLORS[k] for k in rng.integers(0, len(COLORS), size=n)]
    while True:
        sizes = rng.integers(MIN_SIZE, MAX_SIZE + 1, size=n)
        corners = [rng.integers(1, image_size - s, size=2) for s in sizes]
        squares = [(int(x), int(y), int(x + s), int(y + s)) for (x, y), s in zip(corners, sizes)]
        if all(_apart(a, b) for k, a in enumerate(squares) for b in squares[k + 1 :]):
            break
    objects = [make_object(sh, co, int(s), q[0], q[1]) for sh, co, s, q in zip(shapes, colors, sizes, squares)]
    return sorted(objects, key=lambda o: o.center)


def _apart(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return a[2] + _GAP <= b[0] or b[2] + _GAP <= a[0] or a[3] + _GAP <= b[1] or b[3] + _GAP <= a[1]


def render(rng: np.random.Generator, objects: list[ShapeObject], image_size: int = 64) -> Image.Image:
    """Draw objects on a lightly textured background (a gentle gradient plus pixel noise)."""
    grey = int(rng.integers(200, 231))
    tint = rng.integers(-6, 7, size=3)
    ramp = np.linspace(-1.0, 1.0, image_size)
    slope = rng.integers(-6, 7, size=2)
    gradient = np.rint(slope[0] * ramp[None, :] + slope[1] * ramp[:, None]).astype(np.int32)
    noise = rng.integers(-8, 9, size=(image_size, image_size, 1))
    img = grey + tint[None, None, :] + gradient[:, :, None] + noise
    for o in objects:
        rgb = np.asarray(_RGB[o.color]) + rng.integers(-10, 11, size=3)
        m = shape_mask(o.shape, o.size)
        x0, y0 = int(o.center[0] - o.size / 2), int(o.center[1] - o.size / 2)
        patch = img[y0 : y0 + o.size, x0 : x0 + o.size]
        texture = rng.integers(-4, 5, size=(o.size, o.size, 1))
        patch[m] = (rgb[None, None, :] + texture)[m]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
