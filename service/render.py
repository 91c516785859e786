"""Render batches: one pipeline call per shape, one generator per request, cached prompts, OOM splitting."""

import gc
import io
import logging
from collections import defaultdict

import torch
from diffusers import FluxPipeline
from PIL import Image

from models.architecture import decode_in_float32
from service.jobs import JobBoard
from service.placement import Placement
from service.prompts import PromptCache, encode_prompts
from service.schema import GenerationRequest, WorkItem

OUT_OF_MEMORY = b""  # the result of a request that does not fit in memory even alone
logger = logging.getLogger("bentoml.flux")


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


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


class Renderer:
    """Setup once (placement, prompt cache, job board), render many batches."""

    def __init__(self, pipe: FluxPipeline, placement: Placement, cache: PromptCache | None = None,
                 board: JobBoard | None = None) -> None:
        self.pipe, self.placement, self.cache, self.board = pipe, placement, cache, board or JobBoard()
        placement.apply(pipe)
        if placement.device.type == "cpu":
            decode_in_float32(pipe.vae)
        pipe.vae.enable_slicing()  # decode one image at a time: batched convolutions round differently
        pipe.set_progress_bar_config(disable=True)

    def render(self, requests: list[WorkItem]) -> list[bytes]:
        """PNG bytes in request order; empty for cancelled requests and OUT_OF_MEMORY for unfittable ones."""
        images: list[bytes] = [b""] * len(requests)
        for (height, width, _, _), indices in group_by_shape(requests).items():
            live = [i for i in indices if not self.board.is_cancelled(requests[i].job_id)]
            step = self.placement.max_batch(max(height, width))
            for start in range(0, len(live), step):
                chunk = live[start:start + step]
                for index, png in zip(chunk, self._render_splitting([requests[i] for i in chunk])):
                    images[index] = png
        return images

    def _render_splitting(self, group: list[WorkItem]) -> list[bytes]:
        """Render a same-shape group; on out-of-memory, free memory and retry each half."""
        if not group:
            return []
        try:
            return self._render_group(group)
        except torch.OutOfMemoryError:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(group) == 1:
                logger.warning("out of memory rendering %s alone", group[0].shape)
                return [OUT_OF_MEMORY]
            logger.warning("out of memory at batch %d: splitting", len(group))
            half = len(group) // 2
            return self._render_splitting(group[:half]) + self._render_splitting(group[half:])

    def _render_group(self, group: list[WorkItem]) -> list[bytes]:
        height, width, steps, guidance = group[0].shape
        job_ids = [request.job_id for request in group]
        self.board.start(job_ids)
        try:
            with self.placement.encoding(self.pipe):
                embeds, pooled = encode_prompts(self.pipe, [request.prompt for request in group], self.cache)
            tiled = self.placement.decode_tiled(max(height, width))
            self.pipe.vae.enable_tiling() if tiled else self.pipe.vae.disable_tiling()
            output = self.pipe(
                prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=height, width=width,
                num_inference_steps=steps, guidance_scale=guidance,
                generator=[torch.Generator(self.placement.device).manual_seed(r.seed) for r in group],
                callback_on_step_end=_step_reporter(self.board, job_ids),
            )
        finally:
            self.board.finish(job_ids)
        return [encode_png(image) for image in output.images]
