"""Render batches in explicit stages: text encode, denoise, decode, image encode; one Result per request.

Requests whose caller left are dropped before their batch starts; a running batch stops at the next step
once every request in it has left, and what nobody waits for is neither decoded nor encoded. A batch that
runs out of memory is split in halves, after the failed attempt's tensors are released.
"""

import gc
import time
from collections import defaultdict
from contextlib import nullcontext

import torch
from diffusers import FluxPipeline

from models.architecture import pipeline_variant, vae_in_float32
from service.observe import (
    CANCELLATIONS,
    OOM_SPLITS,
    PROMPT_CACHE,
    STAGE_SECONDS,
    STEPS,
    STEPS_AFTER_CANCEL,
    logger,
    request_id,
)
from service.runtime.adapters import AdapterCache, stacks_applied
from service.runtime.blocks import RowCache, Rows, compile_blocks, modulation_row_by_row, step_cache
from service.runtime.board import Board
from service.runtime.denoise import Denoiser, Start
from service.runtime.imaging import MEDIA_TYPES, encode_image
from service.runtime.placement import Placement
from service.runtime.prompts import PromptCache, cached_embeddings, encode_missing, stack
from service.runtime.result import Result, Status, failure
from service.schema import CachePolicy, WorkItem, with_defaults
from service.settings import bucket_of


def group_by_shape(items: list[WorkItem]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[item.shape].append(index)
    return groups


class NonFinite(Exception):
    """A stage produced inf or NaN: the image would be black or noise, so there is none."""


def check_finite(tensor: torch.Tensor, stage: str) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        raise NonFinite(f"the {stage} held inf/NaN values (a numeric overflow, e.g. in fp16): no image returned")
    return tensor


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Stopwatch:
    """Milliseconds per stage for one pipeline call, also observed in the stage histograms."""

    def __init__(self, bucket: int) -> None:
        self.bucket, self.ms = str(bucket), {}

    def record(self, stage: str, started: float) -> None:
        seconds = time.perf_counter() - started
        self.ms[stage] = self.ms.get(stage, 0.0) + 1000 * seconds
        STAGE_SECONDS.labels(stage=stage, bucket=self.bucket).observe(seconds)


class Renderer:
    """Setup once (placement, prompt cache, board of cancellations and progress), render many batches."""

    def __init__(
        self,
        pipe: FluxPipeline,
        placement: Placement,
        cache: PromptCache | None = None,
        board: Board | None = None,
        adapters: AdapterCache | None = None,
        step_cache: CachePolicy = CachePolicy.off,
    ) -> None:
        self.pipe, self.placement, self.cache, self.board = pipe, placement, cache, board or Board()
        self.adapters, self.step_cache, self.compiled = adapters, step_cache, False
        self.variant, self.denoiser = pipeline_variant(pipe), Denoiser(pipe)
        placement.apply(pipe)
        modulation_row_by_row(pipe.transformer)
        if placement.device.type == "cpu" or pipe.vae.dtype == torch.float16:  # no fast bf16 / fp16 range
            vae_in_float32(pipe.vae)
        pipe.set_progress_bar_config(disable=True)

    def render(self, items: list[WorkItem]) -> list[Result]:
        """One Result per item, in order; a batch may mix shapes. Unset steps and guidance take the variant's,
        an unset cache policy the deployment's."""
        items = [with_defaults(item, self.variant, self.step_cache) for item in items]
        results: list[Result | None] = [self._left(item, "queued") or self._refusal(item) for item in items]
        if self.adapters is not None:
            broken = self.adapters.load([item for item, result in zip(items, results, strict=True) if result is None])
            results = [result or unreadable(item, broken) for item, result in zip(items, results, strict=True)]
        for indices in group_by_shape(items).values():
            live = [i for i in indices if results[i] is None]
            size = self.placement.max_batch(items[indices[0]].side)
            pending = [live[start : start + size] for start in range(0, len(live), size)]
            while pending:
                group = pending.pop(0)
                rendered = self._attempt([items[i] for i in group])
                if rendered is not None:
                    results_for(results, group, rendered)
                    continue
                free_device_memory()  # outside the except clause: the failed attempt's frames are gone
                if len(group) == 1:
                    results[group[0]] = failure(
                        Status.does_not_fit,
                        f"{items[group[0]].width}x{items[group[0]].height} does not fit in device memory even alone",
                    )
                else:
                    OOM_SPLITS.inc()
                    pending[:0] = [group[: len(group) // 2], group[len(group) // 2 :]]
        for item, result in zip(items, results, strict=True):
            log_outcome(item, result)
        return results

    def _left(self, item: WorkItem, stage: str) -> Result | None:
        """The outcome of an item nobody waits for any more (cancelled, past its deadline), else None."""
        if self.board.is_cancelled(item.request_id):
            CANCELLATIONS.labels(stage=stage).inc()
            return failure(Status.cancelled, f"cancelled while {stage}")
        if item.deadline is not None and time.time() > item.deadline:
            return failure(Status.deadline, f"deadline passed while {stage}")
        return None

    def _refusal(self, item: WorkItem) -> Result | None:
        """Why this deployment cannot run `item` as asked (a LoRA it does not have), else None."""
        if not item.loras:
            return None
        if self.adapters is None:
            return failure(Status.refused, "this deployment serves no LoRA adapters", field="loras")
        if self.compiled:
            return failure(
                Status.refused, "this deployment compiles its blocks (FLUX_COMPILE=blocks): no LoRA", field="loras"
            )
        return self.adapters.refusal(item)

    def _attempt(self, group: list[WorkItem]) -> list[Result] | None:
        """The group's results, or None when it ran out of device memory."""
        try:
            return self._render_group(group)
        except torch.OutOfMemoryError:
            logger.warning("out of memory at batch %d of %dx%d", len(group), group[0].width, group[0].height)
        return None

    def _render_group(self, group: list[WorkItem]) -> list[Result]:
        height, width, steps, guidance = group[0].shape
        self.denoiser.schedule(steps, height, width, self.placement.device)
        ids = [item.request_id for item in group]
        clock, started = Stopwatch(bucket_of(group[0].side)), time.perf_counter()
        queue_ms = {item.request_id: 1000 * max(0.0, time.time() - item.arrived) for item in group if item.arrived}
        for seconds in queue_ms.values():
            STAGE_SECONDS.labels(stage="queue_wait", bucket=clock.bucket).observe(seconds / 1000)
        self.board.start(ids)
        try:
            text = self._encode_text([item.prompt for item in group])
            clock.record("text_encode", started)
            started, rows = time.perf_counter(), Rows(len(group))
            starts = self._starts(group, text[0].dtype)
            if any(item.conditioning for item in group):
                clock.record("image_in", started)
                started = time.perf_counter()
            policies = [item.cache for item in group]
            with self._loras(group, rows), step_cache(self.pipe.transformer, policies, rows) as cached:
                latents = self.denoiser.run(
                    starts, text, (height, width), guidance, rows, self._after_step(group, cached, steps)
                )
            clock.record("denoise", started)
            results = [self._finish(item, latents[k : k + 1], clock) for k, item in enumerate(group)]
        finally:
            self.board.finish(ids)
        for item, result in zip(group, results, strict=True):
            result.timings_ms = {"queue_wait": queue_ms.get(item.request_id, 0.0), **clock.ms}
        return results

    def compile_blocks(self, warm_up: list[list[WorkItem]]) -> float:
        """Compile the transformer's repeated blocks, rendering `warm_up` batches to do it; the seconds taken.
        From then on LoRA stacks are refused: their per-row hooks inside compiled code would recompile for
        every mix of stacks, or run eager and change the other images' bytes."""
        compile_blocks(self.pipe.transformer)
        self.compiled, started = True, time.perf_counter()
        for batch in warm_up:
            self.render(batch)
        return time.perf_counter() - started

    def _loras(self, group: list[WorkItem], rows: Rows):
        """Each item's LoRA stack on the transformer for one pipeline call (nothing when none has one)."""
        if not any(item.loras for item in group):
            return nullcontext()
        return stacks_applied(self.pipe.transformer, self.adapters.stacks(group), rows)

    def _encode_text(self, prompts: list[str]):
        """Embeddings for the batch; the encoders (and the placement's moves for them) run only on a miss."""
        found = cached_embeddings(prompts, self.cache)
        missing = [prompt for prompt in dict.fromkeys(prompts) if prompt not in found]
        PROMPT_CACHE.labels(result="hit").inc(len(prompts) - sum(p in missing for p in prompts))
        PROMPT_CACHE.labels(result="miss").inc(sum(p in missing for p in prompts))
        if missing:
            with self.placement.encoding(self.pipe):
                found |= encode_missing(self.pipe, missing, self.cache, self.variant.max_sequence_length)
        return stack(found, prompts, self.pipe._execution_device)

    def _starts(self, group: list[WorkItem], dtype: torch.dtype) -> list[Start]:
        """Each row's start: its seed's noise, or its image encoded and noised to its strength's step."""
        height, width, steps, _ = group[0].shape
        device, vae = self.placement.device, self.pipe.vae
        vae.enable_tiling() if self.placement.decode_tiled(max(height, width)) else vae.disable_tiling()
        return [
            self.denoiser.start(
                item.conditioning, torch.Generator(device).manual_seed(item.seed), (height, width, steps), dtype, device
            )
            for item in group
        ]

    def _after_step(self, group: list[WorkItem], cached: RowCache | None, steps: int):
        """Publish progress and count the step's images computed or reused (a reused step is a step too);
        stop early when nobody in the call waits for its images any more."""
        ids = [item.request_id for item in group]

        def after_step(step: int, active: list[int]) -> bool:
            self.board.report(ids, step + 1)
            computed = len(cached.computing) if cached else len(active)
            STEPS.labels(result="computed").inc(computed)
            STEPS.labels(result="reused").inc(len(active) - computed)
            if not all(self._gone(item) for item in group):
                return True
            cancelled = [rid for rid in ids if self.board.is_cancelled(rid)]
            if len(cancelled) == len(ids):
                STEPS_AFTER_CANCEL.observe(self.board.steps_after_cancel(cancelled, step + 1))
            logger.info("stopped at step %d of %d: nobody waits for %s", step + 1, steps, ids)
            return False

        return after_step

    def _gone(self, item: WorkItem) -> bool:
        return self.board.is_cancelled(item.request_id) or (item.deadline is not None and time.time() > item.deadline)

    def _finish(self, item: WorkItem, latents: torch.Tensor, clock: Stopwatch) -> Result:
        """Decode and encode one image, unless its caller has left."""
        if (left := self._left(item, "running")) is not None:
            return left
        token = request_id.set(item.request_id)
        try:
            started = time.perf_counter()
            image = self._decode(check_finite(latents, "denoised latents"), item.height, item.width)
            clock.record("decode", started)
            started = time.perf_counter()
            encoded = encode_image(image, item.format, item.quality)
            clock.record("image_encode", started)
        except NonFinite as error:
            return failure(Status.non_finite, str(error))
        finally:
            request_id.reset(token)
        return Result(status=Status.ok, image=encoded, media_type=MEDIA_TYPES[item.format])

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor, height: int, width: int):
        """The VAE decode FluxPipeline runs for output_type="pil", one image at a time."""
        pipe, vae = self.pipe, self.pipe.vae
        vae.enable_tiling() if self.placement.decode_tiled(max(height, width)) else vae.disable_tiling()
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        image = check_finite(vae.decode(latents.to(vae.device), return_dict=False)[0], "decoded image")
        return pipe.image_processor.postprocess(image, output_type="pil")[0]


def unreadable(item: WorkItem, broken: dict[str, str]) -> Result | None:
    """The failure of an item whose stack names an adapter that could not be read, else None."""
    for index, lora in enumerate(item.loras):
        if lora.name in broken:
            message = f"the stored LoRA adapter {lora.name!r} cannot be read: {broken[lora.name]}"
            return failure(Status.error, message, field=f"loras[{index}].name")
    return None


def log_outcome(item: WorkItem, result: Result) -> None:
    token = request_id.set(item.request_id)
    logger.info(
        "%dx%d, %d steps: %s %s",
        item.width,
        item.height,
        item.steps,
        result.status,
        result.message or {stage: round(ms, 1) for stage, ms in result.timings_ms.items()},
    )
    request_id.reset(token)


def results_for(results: list, indices: list[int], rendered: list[Result]) -> None:
    for index, result in zip(indices, rendered, strict=True):
        results[index] = result
