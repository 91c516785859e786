"""Artifacts written before the backend registry still load and render the same bytes."""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.artifact import load_pipeline

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
RECIPES = ("int8", "int4", "fp8", "int8-bnb", "nf4", "fp4")  # gguf needs a GGUF source: medium, test_gguf


def assembled(recipe: str, folder: Path) -> Path:
    shutil.copytree(LEGACY / "common", folder)
    shutil.copytree(LEGACY / recipe, folder, dirs_exist_ok=True)
    return folder


@pytest.mark.parametrize("recipe", RECIPES)
def test_an_artifact_of_the_previous_main_renders_the_same_bytes(recipe, tmp_path):
    folder = assembled(recipe, tmp_path / recipe)
    expected = (folder / "render.sha256").read_text().strip()
    (folder / "render.sha256").unlink()  # not part of the artifact: the listing check would refuse it
    pipe, manifest = load_pipeline(folder)
    assert manifest.recipe == recipe
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the render was recorded
    try:
        image = pipe(
            "a red fox",
            width=64,
            height=64,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images[0]
    finally:
        torch.set_num_threads(threads)
    pixels = (image * 255).round().astype(np.uint8)
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == expected
