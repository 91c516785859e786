"""Encoding rendered images once, in the format the caller asked for."""

import io

from PIL import Image

from service.schema import ImageFormat

MEDIA_TYPES = {ImageFormat.png: "image/png", ImageFormat.jpeg: "image/jpeg", ImageFormat.webp: "image/webp"}


def encode_image(image: Image.Image, image_format: ImageFormat, quality: int) -> bytes:
    buffer = io.BytesIO()
    if image_format is ImageFormat.png:
        image.save(buffer, format="PNG")
    else:
        image.convert("RGB").save(buffer, format=image_format.value.upper(), quality=quality)
    return buffer.getvalue()
