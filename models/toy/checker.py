"""Read a toy picture back: its background, and each object's colour, shape, size and position.

Analytic: every pixel takes the nearest palette colour (each object colour also in its pastel shade, under the
same name); the background is the commonest neutral colour; objects are the connected regions of object colours,
holes filled (so an outline reads as its shape). Each region is fitted (`fit`): the shape, turn and half-width
whose outline, of the region's area and centroid, overlaps it most. Its size is read from that half-width, its
place from that outline's centre, and its look (what the caption leaves open) from all of them.
Rounded corners and soft edges, as a model draws them, keep their shape."""

import math
from dataclasses import dataclass
from itertools import product

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from models.toy.scenes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIDE,
    SIZES,
    TURN,
    Look,
    Scene,
    Thing,
    outline,
    pastel,
)

PALETTE = np.array([*BACKGROUNDS.values(), *COLOURS.values(), *(pastel(c) for c in COLOURS.values())], dtype=np.float32)
NAMES = [*BACKGROUNDS, *COLOURS, *COLOURS]
NEUTRAL = len(BACKGROUNDS)  # labels below this are background colours
MIN_AREA = 24  # pixels: smaller regions are smudges, not objects
# Half-widths: the midpoint of the two sizes, inside the gap between their ranges (small up to 7.5 px, large from
# 9.8): a model's soft edges make what it draws look a little larger than it is.
SIZE_SPLIT = (SIZES["small"] + SIZES["large"]) / 2
# A shape of half-width h drawn in pixels covers about a·h² + b·h of them (b: the edge's pixels, fitted on PIL's
# drawings); the fit tries half-widths around the solution, by these factors.
AREA = {"circle": (math.pi, 3.15), "square": (4.0, 2.52), "triangle": (2.0, 2.2), "diamond": (2.0, 1.93)}
SCALES = (0.93, 0.965, 1.0, 1.035, 1.07)
TURNS = {shape: list(np.linspace(-TURN, TURN, 7)) if TURN and shape != "circle" else [0.0] for shape in SHAPES}
ATTRIBUTES = ("background", "count", "colour", "shape", "size", "position")


def labels_of(image: Image.Image) -> np.ndarray:
    """Each pixel's nearest palette entry (index into NAMES)."""
    pixels = np.asarray(image.convert("RGB").resize((SIDE, SIDE)), dtype=np.float32)
    distances = ((pixels[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1)
    return distances.argmin(-1)


def read(image: Image.Image) -> Scene:
    """What the picture shows, as a Scene (objects ordered by place)."""
    labels = labels_of(image)
    background = NAMES[int(np.bincount(labels.ravel(), minlength=len(NAMES))[:NEUTRAL].argmax())]
    regions, count = ndimage.label(labels >= NEUTRAL)
    pixels = np.asarray(image.convert("RGB").resize((SIDE, SIDE)), dtype=np.float32)
    things = []
    for index in range(1, count + 1):
        painted = regions == index
        if painted.sum() >= MIN_AREA:
            things.append(thing_in(painted, labels[painted], pixels[painted]))
    return Scene(background, tuple(sorted(things, key=lambda t: list(POSITIONS).index(t.position))))


@dataclass(frozen=True)
class Fit:
    shape: str
    turn: float
    half: float
    centre: tuple[float, float]
    overlap: float  # intersection over union with the region


def fit(mask: np.ndarray) -> Fit:
    """The outline that overlaps the region most, each shape and turn at the region's area and centroid."""
    area = float(mask.sum())
    rows, columns = np.nonzero(mask)
    centroid = float(columns.mean()) + 0.5, float(rows.mean()) + 0.5  # pixel i covers [i, i + 1) in PIL's terms
    fits = []
    for shape in SHAPES:
        for turn, scale in product(TURNS[shape], SCALES):
            a, b = AREA[shape]
            half = scale * (math.sqrt(b * b + 4 * a * area) - b) / (2 * a)
            corners = outline(shape, half, turn)
            offset = np.mean(corners, axis=0) if shape == "triangle" else (0.0, 0.0)  # a triangle's centroid
            centre = centroid[0] - offset[0], centroid[1] - offset[1]
            drawn = rasterize(shape, [(centre[0] + x, centre[1] + y) for x, y in corners])
            overlap = (drawn & mask).sum() / (drawn | mask).sum()
            fits.append((float(overlap), -abs(scale - 1), Fit(shape, float(turn), half, centre, float(overlap))))
    return max(fits, key=lambda f: f[:2])[2]  # pixels often fit a range of half-widths: the middle one


def rasterize(shape: str, corners: list[tuple[float, float]]) -> np.ndarray:
    canvas = Image.new("1", (SIDE, SIDE))
    pen = ImageDraw.Draw(canvas)
    if shape == "circle":
        (x0, y0), (x1, y1) = corners[0], corners[2]
        pen.ellipse((x0, y0, x1, y1), fill=1)
    else:
        pen.polygon(corners, fill=1)
    return np.asarray(canvas, dtype=bool)


def thing_in(painted: np.ndarray, labels: np.ndarray, pixels: np.ndarray) -> Thing:
    """The object in a region (its holes filled: an outline reads as its shape): its commonest colour name, the
    best fit's shape and place, its size from the fit's half-width, and its look."""
    mask = ndimage.binary_fill_holes(painted)
    found = fit(mask)
    position = min(POSITIONS, key=lambda p: math.dist(POSITIONS[p], found.centre))
    colour = NAMES[int(np.bincount(labels).argmax())]
    size = "large" if found.half >= SIZE_SPLIT else "small"
    shade = np.median(pixels, axis=0) - np.array(COLOURS[colour])
    look = Look(
        shift=(found.centre[0] - POSITIONS[position][0], found.centre[1] - POSITIONS[position][1]),
        growth=found.half / SIZES[size],
        turn=found.turn,
        shade=tuple(int(round(c)) for c in shade),
        fill=float(painted.sum() / mask.sum()),
    )
    return Thing(colour, found.shape, position, size, look)


@dataclass(frozen=True)
class Verdict:
    """Which of the prompt's attributes the picture shows."""

    matches: dict[str, bool]

    @property
    def all(self) -> bool:
        return all(self.matches.values())


def judge(asked: Scene, seen: Scene) -> Verdict:
    """Background and count; then, for the objects at the places asked, their colour, shape and size (each
    attribute right only if right for every object asked), and position (an object at every place asked)."""
    found = {thing.position: thing for thing in seen.things}
    matched = [(thing, found.get(thing.position)) for thing in asked.things]
    matches = {
        "background": asked.background == seen.background,
        "count": len(asked.things) == len(seen.things),
        "position": all(other is not None for _, other in matched),
    }
    for attribute in ("colour", "shape", "size"):
        matches[attribute] = all(
            other is not None and getattr(thing, attribute) == getattr(other, attribute) for thing, other in matched
        )
    return Verdict({name: matches[name] for name in ATTRIBUTES})


OUTLINED_FILL = 0.95  # an outline 2 pixels wide paints 30–91 % of its shape's area; a filled shape all of it


def styles_of(thing: Thing) -> frozenset[str]:
    """The style adapters' effects on an object read back: `outlined` when it paints less than OUTLINED_FILL of
    its shape's area, `pastel` when its colour is nearer its name's pastel shade than the colour itself."""
    found = {"outlined"} if thing.look.fill < OUTLINED_FILL else set()
    named = np.array(COLOURS[thing.colour])
    if np.linalg.norm(thing.rgb() - np.array(pastel(named))) < np.linalg.norm(thing.rgb() - named):
        found.add("pastel")
    return frozenset(found)


def style_adherence(
    scenes: list[Scene], images: list[Image.Image | np.ndarray], styles: frozenset[str]
) -> dict[str, float]:
    """For pictures asked of a style stack (e.g. {"outlined", "pastel"}): the share drawn as asked (`drawn`),
    showing exactly those styles on every object asked (`effect`), and both (`all`)."""
    drawn, effect = [], []
    for scene, image in zip(scenes, images, strict=True):
        seen = read(as_image(image))
        found = {thing.position: thing for thing in seen.things}
        drawn.append(judge(scene, seen).all)
        effect.append(all(t.position in found and styles_of(found[t.position]) == styles for t in scene.things))
    both = [d and e for d, e in zip(drawn, effect, strict=True)]
    return {"all": float(np.mean(both)), "drawn": float(np.mean(drawn)), "effect": float(np.mean(effect))}


def adherence(scenes: list[Scene], images: list[Image.Image | np.ndarray]) -> dict[str, float]:
    """Share of pictures showing everything their prompt asked (`all`), and per attribute."""
    verdicts = [judge(scene, read(as_image(image))) for scene, image in zip(scenes, images, strict=True)]
    shares = {name: float(np.mean([v.matches[name] for v in verdicts])) for name in ATTRIBUTES}
    return {"all": float(np.mean([v.all for v in verdicts])), **shares}


def as_image(image: Image.Image | np.ndarray) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(image)
