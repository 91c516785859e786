"""The toy FLUX model: FLUX.1's component classes at a size that trains on a CPU, taught to draw coloured shapes
from their captions, so that what any pipeline or recipe renders can be checked (`checker`)."""

from pathlib import Path

TRAINED = Path(__file__).parent / "weights"  # `python -m models train --out models/toy/weights`
SIZE = 64  # the side it draws
STEPS = 28  # FLUX.1-dev's default; the toy was trained for the same sampler


def is_trained_toy(folder: Path) -> bool:
    """A diffusers folder written by `python -m models train` (or copied from TRAINED)."""
    return (folder / "training.json").is_file()
