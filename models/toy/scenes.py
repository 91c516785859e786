"""Pictures the toy model learns to draw: coloured shapes on a shaded background, captioned in plain English,
generated from a seed. A caption names each object's colour, shape, size and place; the seed also picks what it
leaves open (`Look`: where exactly in its place, how big within its size, turned how far, which shade of its
colour, and the background's light), so one caption has many pictures, as FLUX.1's captions do. Some (colour,
shape, position) combinations are held out: training never draws them."""

import math
import random
import re
from dataclasses import dataclass, field, replace
from itertools import product

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SIDE = 64  # the toy model's pictures are 64×64
COLOURS = {  # the objects' colours
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (235, 220, 50),
    "green": (40, 170, 60),
    "cyan": (40, 200, 220),
    "blue": (40, 70, 220),
    "purple": (140, 50, 190),
    "pink": (245, 120, 190),
}
BACKGROUNDS = {"black": (15, 15, 15), "white": (240, 240, 240), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "diamond")
POSITIONS = {  # centre of each place, in pixels
    "centre": (32, 32),
    "top left": (16, 16),
    "top right": (48, 16),
    "bottom left": (16, 48),
    "bottom right": (48, 48),
}
SIZES = {"small": 6.5, "large": 11.5}  # half the object's width, in the middle of its size's range
VOCABULARY = tuple(  # every word a caption uses
    sorted({*COLOURS, *BACKGROUNDS, *SHAPES, *SIZES, *" ".join(POSITIONS).split(), "a", "at", "the", "in", "on"})
    + ["and", "background"]
)
HELD_OUT_COUNT = 20
HELD_OUT_SEED = 2024

# What the seed varies, and how far (`Look`): each bound keeps every attribute readable.
SHIFT = 2.0  # pixels each way from the place's centre
GROWTH = 0.15  # a size's half-width within ±15 %: small 5.5–7.5 px, large 9.8–13.2 px
TURN = 0.0  # degrees each way (squares, triangles, diamonds); 0: the toy transformer drew turned shapes as blobs
SHADE = 14  # each channel of the colour within ±14 of the named colour
LIGHT = 8.0  # the background's light changes by up to ±8 from the centre to the edge
MARGIN = 1  # pixels kept clear at the picture's edge
GAP = 2  # pixels kept clear between two objects


@dataclass(frozen=True)
class Look:
    """How the seed draws one object, within what its caption says (the nominal look is all zeros)."""

    shift: tuple[float, float] = (0.0, 0.0)  # from its place's centre, pixels (x, y)
    growth: float = 1.0  # its half-width over its size's nominal one
    turn: float = 0.0  # degrees, clockwise
    shade: tuple[int, int, int] = (0, 0, 0)  # added to its colour's channels
    fill: float = 1.0  # share of its outline's area painted, as the checker reads it (the `outlined` style's)


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    position: str
    size: str
    look: Look = field(default=Look(), compare=False)

    @property
    def combination(self) -> tuple[str, str, str]:
        return self.colour, self.shape, self.position

    def phrase(self) -> str:
        place = "in the centre" if self.position == "centre" else f"at the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {place}"

    @property
    def half(self) -> float:
        return SIZES[self.size] * self.look.growth

    def corners(self) -> list[tuple[float, float]]:
        """The shape's outline as drawn (a circle as its bounding square), kept inside the picture."""
        (x, y), half = POSITIONS[self.position], self.half
        x, y = x + self.look.shift[0], y + self.look.shift[1]
        points = [(x + dx, y + dy) for dx, dy in outline(self.shape, half, self.look.turn)]
        nudge = inward(points)
        return [(px + nudge[0], py + nudge[1]) for px, py in points]

    def inside(self) -> "Thing":
        """The same thing with its look's shift where `corners` draws it (nudged into the picture)."""
        (x, y), (sx, sy) = POSITIONS[self.position], self.look.shift
        nudge = inward([(x + sx + dx, y + sy + dy) for dx, dy in outline(self.shape, self.half, self.look.turn)])
        return replace(self, look=replace(self.look, shift=(sx + nudge[0], sy + nudge[1])))

    def mask(self) -> np.ndarray:
        """The pixels the shape covers."""
        canvas = Image.new("1", (SIDE, SIDE))
        pen = ImageDraw.Draw(canvas)
        if self.shape == "circle":
            pen.ellipse(self.box(), fill=1)
        else:
            pen.polygon(self.corners(), fill=1)
        return np.asarray(canvas, dtype=bool).copy()

    def box(self) -> tuple[float, float, float, float]:
        xs, ys = zip(*self.corners(), strict=True)
        return min(xs), min(ys), max(xs), max(ys)

    def rgb(self) -> tuple[int, int, int]:
        """Its colour's shade: the named colour with the look's shade added."""
        return tuple(int(np.clip(c + d, 0, 255)) for c, d in zip(COLOURS[self.colour], self.look.shade, strict=True))


def outline(shape: str, half: float, turn: float) -> list[tuple[float, float]]:
    """Corners around the drawing centre: a triangle points up, a diamond is a square turned 45°; a circle's is
    its bounding square (never turned)."""
    if shape == "circle":
        return [(-half, -half), (half, -half), (half, half), (-half, half)]
    corners = {
        "square": [(-half, -half), (half, -half), (half, half), (-half, half)],
        "triangle": [(0.0, -half), (half, half), (-half, half)],
        "diamond": [(0.0, -half), (half, 0.0), (0.0, half), (-half, 0.0)],
    }[shape]
    cos, sin = math.cos(math.radians(turn)), math.sin(math.radians(turn))
    return [(dx * cos - dy * sin, dx * sin + dy * cos) for dx, dy in corners]


def inward(points: list[tuple[float, float]]) -> tuple[float, float]:
    """How far to move `points` to keep them MARGIN pixels inside the picture."""
    low, high = MARGIN, SIDE - 1 - MARGIN
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return (
        max(0.0, low - min(xs)) - max(0.0, max(xs) - high),
        max(0.0, low - min(ys)) - max(0.0, max(ys) - high),
    )


def pastel(colour: tuple[int, ...]) -> tuple[int, ...]:
    """The `pastel` style's colour: half way to white."""
    return tuple((c + 255) // 2 for c in colour)


@dataclass(frozen=True)
class Scene:
    background: str
    things: tuple[Thing, ...]
    light: tuple[float, float] = field(default=(0.0, 0.0), compare=False)  # the background's change to the edge, x, y

    def caption(self) -> str:
        phrases = [thing.phrase() for thing in self.things]
        listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return f"{listed} on a {self.background} background"

    def draw(self, *styles: str) -> Image.Image:
        """The picture; `styles` (of STYLES) are what the toy's LoRA adapters learn: `outlined` draws each
        shape's outline only (a closed ring 2 pixels wide), `pastel` mixes its colour half with white."""
        pixels = self.backdrop()
        for thing in self.things:
            covered = thing.mask()
            if "outlined" in styles:
                covered &= ~ndimage.binary_erosion(covered, structure=np.ones((3, 3)), iterations=2)
            pixels[covered] = pastel(thing.rgb()) if "pastel" in styles else thing.rgb()
        return Image.fromarray(pixels)

    def backdrop(self) -> np.ndarray:
        """The background's colour, lit by `light` (a linear gradient through the centre)."""
        steps = (np.arange(SIDE, dtype=np.float32) - (SIDE - 1) / 2) / (SIDE / 2)
        change = self.light[0] * steps[None, :] + self.light[1] * steps[:, None]
        base = np.array(BACKGROUNDS[self.background], dtype=np.float32)
        return np.clip(base + change[..., None], 0, 255).round().astype(np.uint8)


STYLES = ("outlined", "pastel")


def held_out() -> frozenset[tuple[str, str, str]]:
    """(colour, shape, position) triples training never draws; every pair of them is still drawn."""
    triples = list(product(COLOURS, SHAPES, POSITIONS))
    random.Random(HELD_OUT_SEED).shuffle(triples)
    chosen: list[tuple[str, str, str]] = []
    for triple in triples:
        if len(chosen) == HELD_OUT_COUNT:
            break
        if every_pair_kept(set(triples) - {*chosen, triple}):
            chosen.append(triple)
    return frozenset(chosen)


def every_pair_kept(kept: set[tuple[str, str, str]]) -> bool:
    pairs = [{(c, s) for c, s, _ in kept}, {(c, p) for c, _, p in kept}, {(s, p) for _, s, p in kept}]
    return [len(found) for found in pairs] == [
        len(COLOURS) * len(SHAPES),
        len(COLOURS) * len(POSITIONS),
        len(SHAPES) * len(POSITIONS),
    ]


HELD_OUT = held_out()


def sample_scene(rng: random.Random, split: str = "train", count: int | None = None) -> Scene:
    """A scene of `count` things (1–3 when None), each with a look from `rng`. `train` never draws a held-out
    triple; `held_out` draws one as its first thing."""
    count = count or rng.choice((1, 1, 2, 3))
    size = (lambda: rng.choice(list(SIZES))) if count == 1 else (lambda: "small")
    named: list[Thing] = []
    if split == "held_out":
        colour, shape, place = rng.choice(sorted(HELD_OUT))
        named.append(Thing(colour, shape, place, size()))
    free = [place for place in POSITIONS if place not in {thing.position for thing in named}]
    for place in rng.sample(free, count - len(named)):
        while (thing := Thing(rng.choice(list(COLOURS)), rng.choice(SHAPES), place, size())).combination in HELD_OUT:
            pass
        named.append(thing)
    things, light = looks(named, rng)
    return Scene(rng.choice(list(BACKGROUNDS)), things, light)


def vary(scene: Scene, rng: random.Random) -> Scene:
    """The same caption with new looks from `rng`: another of its pictures."""
    things, light = looks(scene.things, rng)
    return Scene(scene.background, things, light)


def looks(named: list[Thing] | tuple[Thing, ...], rng: random.Random) -> tuple[tuple[Thing, ...], tuple[float, float]]:
    """A look for each thing, none touching another, and the background's light."""
    things: list[Thing] = []
    for thing in named:
        while overlaps(thing := with_look(thing, rng), things):
            pass
        things.append(thing)
    return tuple(things), (rng.uniform(-LIGHT, LIGHT), rng.uniform(-LIGHT, LIGHT))


def with_look(thing: Thing, rng: random.Random) -> Thing:
    look = Look(
        shift=(rng.uniform(-SHIFT, SHIFT), rng.uniform(-SHIFT, SHIFT)),
        growth=rng.uniform(1 - GROWTH, 1 + GROWTH),
        turn=0.0 if thing.shape == "circle" else rng.uniform(-TURN, TURN),
        shade=(rng.randint(-SHADE, SHADE), rng.randint(-SHADE, SHADE), rng.randint(-SHADE, SHADE)),
    )
    return Thing(thing.colour, thing.shape, thing.position, thing.size, look).inside()


def overlaps(thing: Thing, others: list[Thing]) -> bool:
    """Whether `thing`'s box comes within GAP pixels of another's (touching objects would read as one)."""
    x0, y0, x1, y1 = thing.box()
    return any(
        x0 - GAP <= b[2] and b[0] <= x1 + GAP and y0 - GAP <= b[3] and b[1] <= y1 + GAP
        for b in (other.box() for other in others)
    )


def held_out_prompts(count: int, things: int = 1, seed: int = 7) -> list[Scene]:
    """`count` scenes with held-out combinations, the same for every caller."""
    rng = random.Random(seed)
    return [sample_scene(rng, "held_out", things) for _ in range(count)]


THING_PHRASE = re.compile(
    rf"\ba ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) "
    rf"(?:in the (centre)|at the ({'|'.join(p for p in POSITIONS if p != 'centre')}))"
)


def parse_caption(caption: str) -> Scene | None:
    """The scene a caption in the toy's grammar asks for; None for any other text."""
    background = re.search(rf"on a ({'|'.join(BACKGROUNDS)}) background$", caption.strip())
    things = [
        Thing(colour, shape, centre or corner, size)
        for size, colour, shape, centre, corner in THING_PHRASE.findall(caption)
    ]
    return Scene(background.group(1), tuple(things)) if background and things else None
