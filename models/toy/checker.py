"""Read a toy picture back: its background, and each object's colour, shape, size and position.

Analytic: every pixel takes the nearest palette colour; the background is the commonest neutral colour; objects
are the connected regions of object colours. A region's shape comes from which corners of its bounding box it
fills (`shape_of`); its size from its box's width; its place from its box's centre.
Rounded corners and soft edges, as a model draws them, keep their shape."""

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from models.toy.scenes import BACKGROUNDS, COLOURS, POSITIONS, SIDE, SIZES, Scene, Thing

PALETTE = np.array([*BACKGROUNDS.values(), *COLOURS.values()], dtype=np.float32)
NAMES = [*BACKGROUNDS, *COLOURS]
NEUTRAL = len(BACKGROUNDS)  # labels below this are background colours
MIN_AREA = 24  # pixels: smaller regions are smudges, not objects
SIZE_SPLIT = SIZES["small"] + SIZES["large"] + 1  # box width between a small object's and a large one's
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
    things = []
    for index, box in enumerate(ndimage.find_objects(regions), start=1):
        mask = regions[box] == index
        if mask.sum() >= MIN_AREA:
            things.append(thing_in(mask, labels[box][mask], box))
    return Scene(background, tuple(sorted(things, key=lambda t: list(POSITIONS).index(t.position))))


def shape_of(mask: np.ndarray) -> str:
    """From the corners of the bounding box, a quarter of its side each way: a square fills them, a triangle the
        bottom two (half), a circle all four a little, a diamond none; a circle also fills more of its box (π/4
    against ½), so the two together tell a rounded diamond from a small circle."""
    height, width = mask.shape
    rows, columns = max(1, height // 4), max(1, width // 4)
    top = (mask[:rows, :columns].mean() + mask[:rows, -columns:].mean()) / 2
    bottom = (mask[-rows:, :columns].mean() + mask[-rows:, -columns:].mean()) / 2
    if min(top, bottom) > 0.55:
        return "square"
    if bottom - top > 0.2:
        return "triangle"
    return "circle" if mask.mean() + (top + bottom) / 2 > 0.82 else "diamond"


def thing_in(mask: np.ndarray, labels: np.ndarray, box: tuple[slice, slice]) -> Thing:
    height, width = mask.shape
    shape = shape_of(mask)
    centre = ((box[1].start + box[1].stop) / 2, (box[0].start + box[0].stop) / 2)
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - centre[0]) ** 2 + (POSITIONS[p][1] - centre[1]) ** 2)
    colour = NAMES[int(np.bincount(labels).argmax())]
    return Thing(colour, shape, position, "large" if max(height, width) >= SIZE_SPLIT else "small")


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


def adherence(scenes: list[Scene], images: list[Image.Image | np.ndarray]) -> dict[str, float]:
    """Share of pictures showing everything their prompt asked (`all`), and per attribute."""
    verdicts = [judge(scene, read(as_image(image))) for scene, image in zip(scenes, images, strict=True)]
    shares = {name: float(np.mean([v.matches[name] for v in verdicts])) for name in ATTRIBUTES}
    return {"all": float(np.mean([v.all for v in verdicts])), **shares}


def as_image(image: Image.Image | np.ndarray) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(image)


def object_mask(image: Image.Image) -> np.ndarray:
    """Pixels far from the picture's background colour."""
    pixels = np.asarray(image.convert("RGB").resize((SIDE, SIDE)), dtype=np.float32)
    background = PALETTE[NAMES.index(read(image).background)]
    return np.sqrt(((pixels - background) ** 2).sum(-1)) > 60


def thinness(image: Image.Image) -> float:
    """Share of the objects' pixels on their edge (a background pixel next to them): about ¼ for filled shapes,
    near 1 for 2-pixel outlines, closed or not (the `outlined` adapter's effect)."""
    mask = object_mask(image)
    edge = mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3)))
    return float(edge.sum() / max(mask.sum(), 1))


def saturation(image: Image.Image) -> float:
    """Mean HSV saturation of the objects' pixels: ~0.8 for the palette, ~0.4 pastel (the `pastel` adapter's)."""
    hsv = np.asarray(image.convert("RGB").resize((SIDE, SIDE)).convert("HSV"), dtype=np.float32) / 255
    mask = object_mask(image)
    return float(hsv[..., 1][mask].mean()) if mask.any() else 0.0
