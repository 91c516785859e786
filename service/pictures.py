"""Pictures that come in with a request (an input image, a mask): their header checked before any pixel is
decoded, then decoded once and converted to what the model takes, or refused with a message saying why.

What is taken: PNG, JPEG and WebP, one frame (an animated image is refused: which frame was meant is not
knowable), at most `max_side` pixels a side, read from the header (a decompression bomb, a small file that
claims 50,000 × 50,000 pixels, is refused before it is decoded). Converted: EXIF orientation applied (the
picture as a viewer shows it); palette, gray, 16-bit and CMYK pictures to 8-bit RGB; an alpha channel dropped
from an input image (its colours kept) and, for a mask, ignored (masks are read as gray; the OpenAI route
turns its alpha convention into ours first).
"""

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = ("PNG", "JPEG", "WEBP")
MAX_SIDE = 2048  # the largest side any request may send (a deployment's own limit is on /info)
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class PictureError(ValueError):
    """A picture that cannot be taken; the message says why (the caller adds the field)."""


def open_header(data: bytes, max_side: int) -> Image.Image:
    """The picture, its header read and checked (format, frames, size); no pixel decoded yet."""
    try:
        picture = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise PictureError(f"its header claims too many pixels to decode ({error})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise PictureError("not a PNG, JPEG or WebP image (unreadable)") from None
    if picture.format not in FORMATS:
        raise PictureError(f"{picture.format} is not taken: send PNG, JPEG or WebP")
    if getattr(picture, "n_frames", 1) > 1:
        raise PictureError(f"an animated image ({picture.n_frames} frames) is not taken: send one frame")
    width, height = picture.size
    if max(width, height) > max_side:
        raise PictureError(f"{width}x{height} pixels is larger than taken here (largest side: {max_side})")
    return picture


def decode(data: bytes, max_side: int) -> Image.Image:
    """The picture's pixels, upright as EXIF says; a truncated or corrupt file is refused."""
    picture = open_header(data, max_side)
    try:
        picture.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise PictureError(f"truncated or corrupt {picture.format} data ({error})") from None
    return ImageOps.exif_transpose(picture)


def to_rgb(picture: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit gray scaled down, palette and alpha pictures without their alpha, CMYK converted."""
    if picture.mode in SIXTEEN_BIT:
        picture = Image.fromarray((np.asarray(picture, dtype=np.uint32) >> 8).astype(np.uint8), mode="L")
    if picture.mode == "P":
        picture = picture.convert("RGBA")
    return picture.convert("RGB")


def read_image(data: bytes, max_side: int) -> Image.Image:
    """An input image as the model takes it: 8-bit RGB."""
    return to_rgb(decode(data, max_side))


def read_mask(data: bytes, max_side: int) -> Image.Image:
    """A mask as 8-bit gray (white: repaint, black: keep)."""
    return to_rgb(decode(data, max_side)).convert("L")


def picture_size(data: bytes, max_side: int) -> tuple[int, int]:
    """(width, height) as the picture is shown (EXIF rotation applied), from its header."""
    picture = open_header(data, max_side)
    orientation = picture.getexif().get(0x0112, 1)
    width, height = picture.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def transparent_as_mask(data: bytes, required: bool) -> bytes | None:
    """OpenAI's mask convention (repaint where fully transparent) as ours: a PNG, white where alpha is 0. None
    when the picture is opaque and no mask was `required` (the whole image is redrawn)."""
    picture = decode(data, MAX_SIDE)
    if picture.mode == "P":
        picture = picture.convert("RGBA")
    if "A" not in picture.getbands():
        if required:
            raise PictureError("a mask needs an alpha channel: its transparent pixels are the ones repainted")
        return None
    transparent = np.asarray(picture.getchannel("A")) == 0
    if not transparent.any() and not required:
        return None
    return png(Image.fromarray(np.where(transparent, 255, 0).astype(np.uint8), mode="L"))


def png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
