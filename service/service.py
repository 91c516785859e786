"""BentoML services: a batching FLUX worker and the HTTP front that calls it."""

import io
import logging
import os
from pathlib import Path

import bentoml
import torch
from PIL import Image

from models.artifact import load_pipeline
from service.render import render_batch
from service.schema import GenerationRequest

ARTIFACT_ENV = "FLUX_ARTIFACT"
DEFAULT_ARTIFACT = "flux-tiny-int8:latest"
MAX_BATCH_SIZE = int(os.environ.get("FLUX_MAX_BATCH_SIZE", 8))
MAX_LATENCY_MS = int(os.environ.get("FLUX_MAX_LATENCY_MS", 600_000))  # above one full batch's run
logger = logging.getLogger("bentoml.flux")


def artifact_reference(tag: str) -> bentoml.models.BentoModel:
    """The served artifact, checked when the service is defined so a wrong tag stops `serve` and `build` at once."""
    reference = bentoml.models.BentoModel(tag)
    if reference.stored is None:
        known = ", ".join(str(model.tag) for model in bentoml.models.list()) or "none"
        raise SystemExit(f"{ARTIFACT_ENV}={tag!r}: no such model in the BentoML store (have: {known})")
    return reference


@bentoml.service(traffic={"timeout": 900})
class FluxWorker:
    """Loads one artifact, verifies it, warms up, then renders batches."""

    artifact = artifact_reference(os.environ.get(ARTIFACT_ENV, DEFAULT_ARTIFACT))

    def __init__(self) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe, self.manifest = load_pipeline(Path(self.artifact.path))
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        render_batch(self.pipe, [GenerationRequest(prompt="warm-up", width=256, height=256, steps=1)])
        logger.info("serving %s (%s, %s)", self.artifact.tag, self.manifest.recipe, self.device)

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def generate(self, requests: list[GenerationRequest]) -> list[bytes]:
        """PNG bytes per request; a batch may mix shapes."""
        return render_batch(self.pipe, requests)

    @bentoml.api
    def info(self) -> dict:
        return {"artifact": str(self.artifact.tag), "device": str(self.device), **self.manifest.model_dump(exclude={"files"})}


@bentoml.service(traffic={"timeout": 900, "max_concurrency": 64})
class Flux:
    """POST /txt2img: JSON in, image/png out."""

    worker = bentoml.depends(FluxWorker)

    @bentoml.api(route="/txt2img", input_spec=GenerationRequest)
    async def txt2img(self, **fields) -> Image.Image:
        png = (await self.worker.to_async.generate([GenerationRequest(**fields)]))[0]
        return Image.open(io.BytesIO(png))

    @bentoml.api(route="/info")
    async def info(self) -> dict:
        return await self.worker.to_async.info()
