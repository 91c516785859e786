"""Images in: pictures read and refused as documented, and image rows rendered as diffusers' own pipelines
render them, alone and in any batch (the trained toy, in process; tests/test_toy_served.py serves them)."""

import base64
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline
from PIL import Image
from pydantic import ValidationError

from models.source import load_source_pipeline, resolve_source
from models.toy import TRAINED
from models.toy.scenes import held_out_prompts
from service.pictures import PictureError, png, read_image, read_mask
from service.runtime.denoise import first_step
from service.runtime.placement import Placement
from service.runtime.render import Renderer
from service.schema import Conditioning, ImageRequest, WorkItem

SCENE, OTHER = held_out_prompts(2, things=1, seed=1)
PICTURE = SCENE.draw()  # 64×64
MASK = Image.new("L", (64, 64), 0)
MASK.paste(255, (0, 0, 32, 32))  # repaint the top left quarter


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encoded(picture: Image.Image, image_format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def bomb() -> bytes:
    """A 1×1 PNG whose header claims 50,000 × 50,000 pixels (a few dozen bytes)."""
    data = encoded(Image.new("L", (1, 1)))
    header = b"IHDR" + struct.pack(">II", 50_000, 50_000) + data[24:29]
    return data[:12] + header + struct.pack(">I", zlib.crc32(header)) + data[33:]


def animated() -> bytes:
    frames = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue")]
    return encoded(frames[0], "PNG", save_all=True, append_images=frames[1:])


def exif_rotated() -> bytes:
    """A 64×32 JPEG whose EXIF says: turn it 90° clockwise to show it (orientation 6)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(Image.new("RGB", (64, 32), "red"), "JPEG", exif=exif)


REFUSED = {
    "not an image": b"hello, this is text",
    "truncated": encoded(PICTURE)[:200],
    "GIF": encoded(PICTURE, "GIF"),
    "animated": animated(),
    "bomb": bomb(),
    "too large": encoded(Image.new("L", (2064, 16))),
}
REASONS = {
    "not an image": "not a PNG, JPEG or WebP",
    "truncated": "truncated or corrupt",
    "GIF": "GIF is not taken",
    "animated": "animated image (2 frames)",
    "bomb": "too many pixels",
    "too large": "2064x16 pixels is larger than taken here",
}


@pytest.mark.parametrize("name", REFUSED)
def test_a_bad_picture_is_refused_naming_the_field_and_why(name):
    with pytest.raises(ValidationError) as caught:
        ImageRequest(prompt="a fox", image=b64(REFUSED[name]))
    (error,) = caught.value.errors()
    assert error["loc"] == ("image",) and REASONS[name] in error["msg"], error


def test_a_bomb_is_refused_from_its_header_before_any_pixel_is_decoded():
    with pytest.raises(PictureError, match="too many pixels"):
        read_image(bomb(), 2048)
    assert len(bomb()) < 100


def test_a_mask_of_another_size_is_refused_naming_the_mask():
    small = b64(encoded(MASK.resize((32, 32))))
    with pytest.raises(ValidationError, match="mask: 32x32 is not the image's size, 64x64"):
        ImageRequest(prompt="a fox", image=b64(encoded(PICTURE)), mask=small)


CONVERTED = {
    "16-bit gray": (Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)), (156, 156, 156)),
    "palette": (Image.new("RGB", (64, 64), (200, 30, 30)).quantize(4), (200, 30, 30)),
    "CMYK": (Image.new("CMYK", (64, 64), (0, 255, 255, 0)), (255, 0, 0)),
    "alpha": (Image.new("RGBA", (64, 64), (10, 20, 200, 0)), (10, 20, 200)),  # alpha dropped, colours kept
}


@pytest.mark.parametrize("name", CONVERTED)
def test_unusual_pictures_are_converted_to_8_bit_rgb(name):
    picture, expected = CONVERTED[name]
    read = read_image(encoded(picture, "JPEG" if name == "CMYK" else "PNG"), 2048)
    assert read.mode == "RGB" and read.size == (64, 64)
    assert np.abs(np.asarray(read)[32, 32].astype(int) - expected).max() <= 2, np.asarray(read)[32, 32]


def test_an_exif_rotated_picture_is_read_upright_and_sizes_the_request():
    assert read_image(exif_rotated(), 2048).size == (32, 64)
    request = ImageRequest(prompt="a fox", image=b64(exif_rotated()))
    assert (request.width, request.height) == (64, 64)  # 32 is below the smallest side: 64
    request = ImageRequest(prompt="a fox", image=b64(encoded(Image.new("RGB", (100, 200)))))
    assert (request.width, request.height) == (96, 192)  # unset: the image's, down to a multiple of 16
    request = ImageRequest(prompt="a fox", image=b64(encoded(PICTURE)), width=128)
    assert (request.width, request.height) == (128, 64)  # set: the image is resized to it


def test_a_mask_is_read_as_gray_white_repainted():
    assert np.asarray(read_mask(encoded(MASK.convert("RGB")), 2048))[0, 0] == 255


def test_strength_counts_steps_as_diffusers_does():
    assert [first_step(28, s) for s in (1.0, 0.8, 0.5, 0.3, 0.01)] == [0, 5, 14, 19, 27]
    with pytest.raises(ValidationError, match="strength"):
        Conditioning(image=b64(encoded(PICTURE)), strength=0.0)


# --- rendering: diffusers' pixels alone, solo bytes in a batch -------------------------------------------------

KW = {"height": 64, "width": 64, "num_inference_steps": 8, "guidance_scale": 3.5, "max_sequence_length": 40}


@pytest.fixture(scope="module")
def toy():
    pipe = load_source_pipeline(resolve_source(str(TRAINED)), torch.bfloat16)
    return pipe, Renderer(pipe, Placement.resident(torch.device("cpu")))


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def rendered(renderer: Renderer, items: list[WorkItem]) -> list[np.ndarray]:
    results = renderer.render(items)
    assert all(result.ok for result in results), [result.message for result in results]
    return [pixels(result.image) for result in results]


def item(seed: int, strength: float | None = None, mask: Image.Image | None = None) -> WorkItem:
    pictures = None
    if strength is not None:
        mask_data = b64(png(mask)) if mask else None
        pictures = Conditioning(image=b64(png(PICTURE)), strength=strength, mask=mask_data)
    return WorkItem(prompt=OTHER.caption(), seed=seed, width=64, height=64, steps=8, conditioning=pictures)


def test_alone_an_image_request_renders_diffusers_pixels(toy):
    pipe, renderer = toy
    components = pipe.components  # the same modules (FluxImg2ImgPipeline.from_pipe would cast them to float32)
    ours = [rendered(renderer, [one])[0] for one in (item(3), item(3, 0.5), item(3, 1.0, MASK))]
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    text = pipe(OTHER.caption(), generator=generator(), **KW).images[0]
    img2img = FluxImg2ImgPipeline(**components)(
        OTHER.caption(), image=PICTURE, strength=0.5, generator=generator(), **KW
    ).images[0]
    inpainted = FluxInpaintPipeline(**components)(
        OTHER.caption(), image=PICTURE, mask_image=MASK, strength=1.0, generator=generator(), **KW
    ).images[0]
    for mine, theirs in zip(ours, (text, img2img, inpainted), strict=True):
        assert np.array_equal(mine, np.asarray(theirs))
    assert not np.array_equal(ours[0], ours[1]) and not np.array_equal(ours[1], ours[2])
