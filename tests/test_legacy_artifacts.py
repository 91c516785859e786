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


def recorded_hash(file: Path) -> str:
    """The render's sha256; for the bitsandbytes 4-bit recipes one per CPU class ("avx512_bf16 HASH" and
    "no_avx512_bf16 HASH" lines): their CPU kernel dequantizes, then multiplies in bf16, which rounds
    differently where the CPU has native bf16. The second hash was recorded with today's reader on a CPU
    without it (the first with the main before the backend registry, 8120c1e, on one with it)."""
    lines = dict(line.split() for line in file.read_text().splitlines() if " " in line)
    if not lines:
        return file.read_text().strip()
    native = "avx512_bf16" in Path("/proc/cpuinfo").read_text().split()
    return lines["avx512_bf16" if native else "no_avx512_bf16"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_an_artifact_of_the_previous_main_renders_the_same_bytes(recipe, tmp_path):
    folder = assembled(recipe, tmp_path / recipe)
    expected = recorded_hash(folder / "render.sha256")
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
