"""Render a batch of requests with one pipeline call per shape and one generator per request."""

import io
from collections import defaultdict

import torch
from diffusers import FluxPipeline
from PIL import Image

from service.schema import GenerationRequest


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def group_by_shape(requests: list[GenerationRequest]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, request in enumerate(requests):
        groups[request.shape].append(index)
    return groups


def render_batch(pipe: FluxPipeline, requests: list[GenerationRequest]) -> list[bytes]:
    """PNG bytes in request order; a seed gives the same image alone or in a batch."""
    images: list[bytes] = [b""] * len(requests)
    for (height, width, steps, guidance), indices in group_by_shape(requests).items():
        output = pipe(
            prompt=[requests[i].prompt for i in indices], height=height, width=width,
            num_inference_steps=steps, guidance_scale=guidance,
            generator=[torch.Generator(pipe.device).manual_seed(requests[i].seed) for i in indices],
        )
        for index, image in zip(indices, output.images):
            images[index] = encode_png(image)
    return images
