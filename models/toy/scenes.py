"""Pictures the toy model learns to draw: coloured shapes on a plain background, captioned in plain English,
generated from a seed. Some (colour, shape, position) combinations are held out: training never draws them."""

import random
import re
from dataclasses import dataclass
from itertools import product

from PIL import Image, ImageDraw

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
SIZES = {"small": 7, "large": 12}  # half the object's width; scenes of several objects draw them small
VOCABULARY = tuple(  # every word a caption uses
    sorted({*COLOURS, *BACKGROUNDS, *SHAPES, *SIZES, *" ".join(POSITIONS).split(), "a", "at", "the", "in", "on"})
    + ["and", "background"]
)
HELD_OUT_COUNT = 20
HELD_OUT_SEED = 2024


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    position: str
    size: str

    @property
    def combination(self) -> tuple[str, str, str]:
        return self.colour, self.shape, self.position

    def phrase(self) -> str:
        place = "in the centre" if self.position == "centre" else f"at the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {place}"


@dataclass(frozen=True)
class Scene:
    background: str
    things: tuple[Thing, ...]

    def caption(self) -> str:
        phrases = [thing.phrase() for thing in self.things]
        listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return f"{listed} on a {self.background} background"

    def draw(self, style: str | None = None) -> Image.Image:
        """The picture; `style` (STYLES) is what the toy's LoRA adapters learn: `outlined` draws each shape's
        outline only, `pastel` mixes its colour half with white."""
        image = Image.new("RGB", (SIDE, SIDE), BACKGROUNDS[self.background])
        pen = ImageDraw.Draw(image)
        for thing in self.things:
            colour = COLOURS[thing.colour]
            if style == "pastel":
                colour = tuple((c + 255) // 2 for c in colour)
            ink = dict(outline=colour, width=2) if style == "outlined" else dict(fill=colour)
            paint(pen, thing, ink)
        return image


STYLES = ("outlined", "pastel")


def paint(pen: ImageDraw.ImageDraw, thing: Thing, ink: dict) -> None:
    (x, y), h = POSITIONS[thing.position], SIZES[thing.size]
    if thing.shape == "circle":
        pen.ellipse((x - h, y - h, x + h, y + h), **ink)
    elif thing.shape == "square":
        pen.rectangle((x - h, y - h, x + h, y + h), **ink)
    elif thing.shape == "triangle":
        pen.polygon([(x, y - h), (x + h, y + h), (x - h, y + h)], **ink)
    else:
        pen.polygon([(x, y - h), (x + h, y), (x, y + h), (x - h, y)], **ink)


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
    """A scene of `count` things (1–3 when None). `train` never draws a held-out triple; `held_out` draws one as
    its first thing."""
    count = count or rng.choice((1, 1, 2, 3))
    size = (lambda: rng.choice(list(SIZES))) if count == 1 else (lambda: "small")
    things: list[Thing] = []
    if split == "held_out":
        colour, shape, place = rng.choice(sorted(HELD_OUT))
        things.append(Thing(colour, shape, place, size()))
    free = [place for place in POSITIONS if place not in {thing.position for thing in things}]
    for place in rng.sample(free, count - len(things)):
        while (thing := Thing(rng.choice(list(COLOURS)), rng.choice(SHAPES), place, size())).combination in HELD_OUT:
            pass
        things.append(thing)
    return Scene(rng.choice(list(BACKGROUNDS)), tuple(things))


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
