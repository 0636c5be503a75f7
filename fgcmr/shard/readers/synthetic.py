"""The embedded default corpus: procedural shape images with several differently-phrased captions.

The category is the kind of shape (10 kinds), clearly visible in the image and named (by one of
its synonyms) in most captions. Colour, size, position and count are drawn independently of the
category and named in the captions too, so texts of different categories can share most of their
words (hard negatives) and captions of one category can share few (hard positives). Every item is
drawn from its own RNG seeded by ``(seed, index)``: any worker or task regenerates the same item,
and generation streams, so memory does not grow with the number of items.

Two knobs plant pairs whose hardness the labels can know about (both 0 by default, which leaves the
corpus byte-identical): ``atypical`` is the chance that a caption names its shape by a rare
paraphrase (``RARE``; paraphrases of a confusable pair share words, so they make hard negatives: the
category labeler scores a planted caption against the partner shape at p ≈ 0.36, a plain one at 0.20,
other shapes at 0.01; it learns the paraphrases themselves, so they are no harder positives than plain
captions), ``mislabel`` the chance that a caption names the confusable partner's shape instead (a
wrong text: a suspected mismatch that down-weighting should discount).
"""

from __future__ import annotations

import dataclasses
import io
import math
import random
from typing import Iterator

from PIL import Image, ImageDraw

from fgcmr.shard.records import Item, Ref
from fgcmr.shard.readers import Reader

SHAPES = ["circle", "square", "triangle", "diamond", "star", "hexagon", "cross", "ring", "crescent", "arrow"]
SYNONYMS = {
    "circle": ["circle", "disc", "round dot"],
    "square": ["square", "box", "square block"],
    "triangle": ["triangle", "three-sided shape", "pyramid shape"],
    "diamond": ["diamond", "rhombus", "lozenge"],
    "star": ["star", "five-pointed star", "star shape"],
    "hexagon": ["hexagon", "six-sided shape", "honeycomb cell"],
    "cross": ["cross", "plus sign", "plus shape"],
    "ring": ["ring", "hollow circle", "donut"],
    "crescent": ["crescent", "moon shape", "sickle"],
    "arrow": ["arrow", "pointer", "arrowhead"],
}
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SIZES = {"small": 0.24, "medium": 0.34, "large": 0.46}  # diameter / image side
POSITIONS = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
COUNTS = {1: "one", 2: "two", 3: "three"}
BACKGROUNDS = [(128, 128, 128), (90, 110, 130), (170, 160, 140), (60, 60, 70), (200, 200, 210)]
TEST_EVERY = 5  # every 5th item is a test item: an 80/20 split
PARTNER = {0: 7, 7: 0, 1: 3, 3: 1, 2: 9, 9: 2, 4: 6, 6: 4, 5: 8, 8: 5}  # confusable shape pairs (by index)
RARE = {  # a confusable pair's paraphrases share words
    "circle": "perfectly round figure",
    "ring": "round hollow band",
    "square": "four equal sided figure",
    "diamond": "four sided tilted figure",
    "triangle": "three cornered figure",
    "arrow": "three cornered pointing figure",
    "star": "pointed spiky figure",
    "cross": "pointed crossed figure",
    "hexagon": "six cornered flat figure",
    "crescent": "curved flat figure",
}


@dataclasses.dataclass(frozen=True)
class Spec:
    shape: int
    colour: str
    size: str
    position: str
    count: int
    background: tuple[int, int, int]
    jitter: tuple[tuple[float, float], ...]
    angle: float
    phrasing: tuple[int, ...]
    noise: tuple[float, ...]  # per template: the draws that decide atypical / mislabelled captions


def split_of(index: int) -> str:
    return "test" if index % TEST_EVERY == TEST_EVERY - 1 else "train"


def spec_of(seed: int, index: int) -> Spec:
    rng = random.Random(f"fgcmr-synthetic:{seed}:{index}")
    count = rng.choice(list(COUNTS))
    shape, colour = rng.randrange(len(SHAPES)), rng.choice(list(COLOURS))
    return Spec(
        shape=shape,
        colour=colour,
        size=rng.choice(list(SIZES)),
        position=rng.choice(list(POSITIONS)),
        count=count,
        background=rng.choice([b for b in BACKGROUNDS if _contrast(COLOURS[colour], b) >= 200]),
        jitter=tuple((rng.uniform(-1, 1), rng.uniform(-1, 1)) for _ in range(count)),
        angle=rng.uniform(-0.3, 0.3),
        phrasing=tuple(rng.randrange(1000) for _ in range(2 * len(TEMPLATES))),
        noise=tuple(rng.random() for _ in range(2 * len(TEMPLATES))),  # drawn last: earlier draws unchanged
    )


def _contrast(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    return sum(abs(x - y) for x, y in zip(a, b))


def draw(spec: Spec, side: int) -> Image.Image:
    """Render the shapes; several objects are spread around the named position and never leave the image."""
    img = Image.new("RGB", (side, side), spec.background)
    pen = ImageDraw.Draw(img)
    radius = SIZES[spec.size] * side / 2 * (1.0, 0.8, 0.62)[spec.count - 1]
    cx, cy = POSITIONS[spec.position]
    spread = side * 0.14 if spec.count > 1 else side * 0.05
    colour = COLOURS[spec.colour]
    for k, (jx, jy) in enumerate(spec.jitter):
        offset = (k - (spec.count - 1) / 2) * 2.05 * radius
        x = cx * side + jx * spread + (offset if spec.count > 1 else 0)
        y = cy * side + jy * spread
        x = min(max(x, radius + 1), side - radius - 1)
        y = min(max(y, radius + 1), side - radius - 1)
        _SHAPE_DRAWERS[SHAPES[spec.shape]](pen, x, y, radius, spec.angle, colour, spec.background)
    return img


def _polygon(
    points: list[tuple[float, float]], x: float, y: float, r: float, angle: float
) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(x + r * (px * c - py * s), y + r * (px * s + py * c)) for px, py in points]


def _regular(n: int, start: float = -math.pi / 2, radii: tuple[float, ...] = (1.0,)) -> list[tuple[float, float]]:
    return [
        (
            radii[i % len(radii)] * math.cos(start + 2 * math.pi * i / n),
            radii[i % len(radii)] * math.sin(start + 2 * math.pi * i / n),
        )
        for i in range(n)
    ]


def _poly_drawer(points: list[tuple[float, float]]):
    def drawer(pen, x, y, r, angle, colour, background):
        pen.polygon(_polygon(points, x, y, r, angle), fill=colour)

    return drawer


def _circle(pen, x, y, r, angle, colour, background):
    pen.ellipse((x - r, y - r, x + r, y + r), fill=colour)


def _ring(pen, x, y, r, angle, colour, background):
    pen.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    pen.ellipse((x - r * 0.55, y - r * 0.55, x + r * 0.55, y + r * 0.55), fill=background)


def _crescent(pen, x, y, r, angle, colour, background):
    pen.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    dx = r * 0.5
    pen.ellipse((x - r + dx, y - r * 0.9, x + r + dx, y + r * 0.9), fill=background)


_SHAPE_DRAWERS = {
    "circle": _circle,
    "square": _poly_drawer([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]),
    "triangle": _poly_drawer(_regular(3)),
    "diamond": _poly_drawer([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)]),
    "star": _poly_drawer(_regular(10, radii=(1.0, 0.42))),
    "hexagon": _poly_drawer(_regular(6, start=0)),
    "cross": _poly_drawer(
        [
            (-0.3, -1),
            (0.3, -1),
            (0.3, -0.3),
            (1, -0.3),
            (1, 0.3),
            (0.3, 0.3),
            (0.3, 1),
            (-0.3, 1),
            (-0.3, 0.3),
            (-1, 0.3),
            (-1, -0.3),
            (-0.3, -0.3),
        ]
    ),
    "ring": _ring,
    "crescent": _crescent,
    "arrow": _poly_drawer([(-1, -0.25), (0.1, -0.25), (0.1, -0.7), (1, 0), (0.1, 0.7), (0.1, 0.25), (-1, 0.25)]),
}

TEMPLATES = [
    "{a_count} {size} {colour} {shape_n} in the {position}",
    "{position} of the picture: {count_word} {colour} {shape_n}",
    "there {be} {count_word} {shape_n} here, {colour} and {size}, near the {position}",
    "a {bg} background with {count_word} {colour} {shape_n}",
    "{colour} {shape_n}, {size}, {position}",
    "an image of {count_word} {shape_n} coloured {colour}",
]
BG_NAMES = {
    (128, 128, 128): "grey",
    (90, 110, 130): "slate",
    (170, 160, 140): "beige",
    (60, 60, 70): "dark",
    (200, 200, 210): "light",
}


def captions(spec: Spec, n: int, atypical: float = 0.0, mislabel: float = 0.0) -> list[str]:
    """``n`` captions, each from a different template, naming the shape by a per-caption synonym
    (or, with the planting knobs, by a rare paraphrase or as the confusable partner shape)."""
    order = sorted(range(len(TEMPLATES)), key=lambda t: spec.phrasing[t])[:n]
    out = []
    for t in order:
        shape = SHAPES[PARTNER[spec.shape]] if spec.noise[t] < mislabel else SHAPES[spec.shape]
        rare = spec.noise[len(TEMPLATES) + t] < atypical
        noun = RARE[shape] if rare else SYNONYMS[shape][spec.phrasing[len(TEMPLATES) + t] % 3]
        plural = spec.count > 1
        words = {
            "count_word": COUNTS[spec.count],
            "a_count": COUNTS[spec.count] if plural else ("an" if spec.size[0] in "aeiou" else "a"),
            "size": spec.size,
            "colour": spec.colour,
            "position": spec.position,
            "shape_n": _plural(noun) if plural else noun,
            "be": "are" if plural else "is",
            "bg": BG_NAMES[spec.background],
        }
        out.append(TEMPLATES[t].format(**words))
    return out


def _plural(noun: str) -> str:
    head, _, tail = noun.rpartition(" ")
    word = tail + ("es" if tail.endswith(("x", "s")) else "s")
    return f"{head} {word}" if head else word


class SyntheticReader(Reader):
    """``items`` procedural items; ``image_size`` px JPEGs; ``captions`` texts per image."""

    unique_ids = True

    def __init__(
        self,
        items: int,
        seed: int = 0,
        image_size: int = 64,
        num_captions: int = 5,
        quality: int = 90,
        atypical: float = 0.0,
        mislabel: float = 0.0,
    ):
        if not (0 <= atypical <= 1 and 0 <= mislabel <= 1):
            raise ValueError(f"atypical={atypical} and mislabel={mislabel} are probabilities: each in [0, 1]")
        self.atypical, self.mislabel = atypical, mislabel
        if items < 1:
            raise ValueError(f"items={items} must be at least 1")
        if not 1 <= num_captions <= len(TEMPLATES):
            raise ValueError(f"num_captions={num_captions} must be between 1 and {len(TEMPLATES)}")
        self.items, self.seed, self.image_size = items, seed, image_size
        self.total = items  # known up front: progress shows an ETA
        self.num_captions, self.quality = num_captions, quality
        self.categories = list(SHAPES)

    def refs(self) -> Iterator[Ref]:
        for i in range(self.items):
            yield Ref(id=f"synth{i:08d}", split=split_of(i), data=i)  # category drawn in load(), in the worker

    def load(self, ref: Ref) -> Item:
        spec = spec_of(self.seed, ref.data)
        buf = io.BytesIO()
        draw(spec, self.image_size).save(buf, format="JPEG", quality=self.quality)
        return Item(
            id=ref.id,
            split=ref.split,
            category=spec.shape,
            texts=captions(spec, self.num_captions, self.atypical, self.mislabel),
            source=f"synthetic:seed={self.seed}:index={ref.data}",
            image=buf.getvalue(),
        )
