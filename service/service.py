"""BentoML services: a batching FLUX worker, and the front that serves it over HTTP and gRPC."""

import io
import logging
from pathlib import Path

import bentoml
import torch
from PIL import Image

from models.artifact import load_pipeline
from service.grpc_server import start_grpc_server
from service.jobs import JobBoard
from service.remote import call_worker
from service.render import prepare_for_serving, render_batch
from service.schema import GenerationRequest, WorkItem
from service.settings import (ARTIFACT, ARTIFACT_ENV, GRPC_ADDRESS, MAX_BATCH_SIZE, MAX_IN_FLIGHT, MAX_LATENCY_MS,
                              WARMUP_SIZE, WARMUP_STEPS)

BATCHES = bentoml.metrics.Counter(name="flux_batches", documentation="Batches run, by the protocols they mixed",
                                  labelnames=["protocols"])
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

    artifact = artifact_reference(ARTIFACT)

    def __init__(self) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        pipe, self.manifest = load_pipeline(Path(self.artifact.path))
        self.pipe = prepare_for_serving(pipe, self.device)
        self.jobs = JobBoard()
        warmup = WorkItem(prompt="warm-up", width=WARMUP_SIZE, height=WARMUP_SIZE, steps=WARMUP_STEPS)
        render_batch(self.pipe, [warmup])
        logger.info("serving %s (%s, %s)", self.artifact.tag, self.manifest.recipe, self.device)

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def generate(self, requests: list[WorkItem]) -> list[bytes]:
        """PNG bytes per request; a batch may mix shapes and protocols."""
        BATCHES.labels(protocols="+".join(sorted({request.protocol for request in requests}))).inc()
        return render_batch(self.pipe, requests, self.jobs)

    @bentoml.api
    async def progress(self, job_id: str) -> int:
        return self.jobs.progress(job_id)

    @bentoml.api
    async def cancel(self, job_id: str) -> None:
        self.jobs.cancel(job_id)

    @bentoml.api
    def info(self) -> dict:
        return {"artifact": str(self.artifact.tag), "device": str(self.device), **self.manifest.model_dump(exclude={"files"})}


@bentoml.service(traffic={"timeout": 900, "max_concurrency": MAX_IN_FLIGHT})
class Flux:
    """POST /txt2img (JSON in, image/png out) and gRPC flux.v1.TextToImage on FLUX_GRPC_ADDRESS."""

    worker = bentoml.depends(FluxWorker)

    @bentoml.on_startup
    async def start_grpc(self) -> None:
        self.grpc_server, self.readiness = await start_grpc_server(self.worker, GRPC_ADDRESS, MAX_IN_FLIGHT)

    @bentoml.on_shutdown
    async def stop_grpc(self) -> None:
        self.readiness.cancel()
        await self.grpc_server.stop(grace=30)

    @bentoml.api(route="/txt2img", input_spec=GenerationRequest)
    async def txt2img(self, **fields) -> Image.Image:
        png = (await call_worker(self.worker.to_async.generate, [WorkItem(**fields)]))[0]
        return Image.open(io.BytesIO(png))

    @bentoml.api(route="/info")
    async def info(self) -> dict:
        return await call_worker(self.worker.to_async.info)
