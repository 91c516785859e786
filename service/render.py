"""Render a batch of requests with one pipeline call per shape and one generator per request."""

import io
from collections import defaultdict

import torch
from diffusers import FluxPipeline
from PIL import Image

from service.jobs import JobBoard
from service.schema import GenerationRequest, WorkItem


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def prepare_for_serving(pipe: FluxPipeline, device: torch.device) -> FluxPipeline:
    """Move to the device; decode latents one by one, since batched VAE convolutions round differently."""
    pipe.to(device)
    pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def group_by_shape(requests: list[GenerationRequest]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, request in enumerate(requests):
        groups[request.shape].append(index)
    return groups


def _step_reporter(board: JobBoard, job_ids: list[str]):
    """A diffusers step callback: publish progress; stop early when every job of the call was cancelled."""
    def on_step_end(pipe: FluxPipeline, step: int, timestep, callback_kwargs: dict) -> dict:
        board.report(job_ids, step + 1)
        if all(board.is_cancelled(job_id) for job_id in job_ids):
            pipe._interrupt = True  # diffusers' documented way to stop a running pipeline
        return callback_kwargs
    return on_step_end


def render_batch(pipe: FluxPipeline, requests: list[WorkItem], board: JobBoard | None = None) -> list[bytes]:
    """PNG bytes in request order (empty for cancelled requests); a seed gives the same image alone or in a batch."""
    board = board or JobBoard()
    images: list[bytes] = [b""] * len(requests)
    for (height, width, steps, guidance), indices in group_by_shape(requests).items():
        live = [i for i in indices if not board.is_cancelled(requests[i].job_id)]
        job_ids = [requests[i].job_id for i in live]
        if not live:
            continue
        board.start(job_ids)
        try:
            output = pipe(
                prompt=[requests[i].prompt for i in live], height=height, width=width,
                num_inference_steps=steps, guidance_scale=guidance,
                generator=[torch.Generator(pipe.device).manual_seed(requests[i].seed) for i in live],
                callback_on_step_end=_step_reporter(board, job_ids),
            )
        finally:
            board.finish(job_ids)
        for index, image in zip(live, output.images):
            images[index] = encode_png(image)
    return images
