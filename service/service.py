"""BentoML services: a batching FLUX worker, and the front that serves it over HTTP and gRPC."""

import io
import logging
from pathlib import Path

import bentoml
import torch
from PIL import Image

from models.artifact import load_pipeline, read_manifest
from models.sizes import GIB
from service.grpc_server import start_grpc_server
from service.jobs import JobBoard
from service.remote import call_worker
from service.placement import Placement, Plan, PlanError, plan_placement
from service.prompts import PromptCache
from service.render import OUT_OF_MEMORY, Renderer
from service.schema import GenerationRequest, WorkItem
from service.settings import (ARTIFACT, ARTIFACT_ENV, GPU_MEMORY_GB, GRPC_ADDRESS, MAX_BATCH_SIZE, MAX_IN_FLIGHT,
                              MAX_LATENCY_MS, MAX_RESOLUTION, PROMPT_CACHE_MB, WARMUP_SIZE, WARMUP_STEPS)

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


def device_and_budget() -> tuple[torch.device, int]:
    if not torch.cuda.is_available():
        return torch.device("cpu"), int((GPU_MEMORY_GB or 1024) * GIB)
    total = torch.cuda.get_device_properties(0).total_memory
    return torch.device("cuda"), int(GPU_MEMORY_GB * GIB) if GPU_MEMORY_GB else total


def placement_plan(reference: bentoml.models.BentoModel) -> Plan:
    """Where the artifact's components go on this device's budget; a configuration that cannot fit stops here."""
    manifest = read_manifest(Path(reference.stored.path))
    weights = {name: manifest.components[name].bytes for name in ("transformer", "text_encoder_2", "text_encoder", "vae")}
    try:
        return plan_placement(weights, device_and_budget()[1], MAX_RESOLUTION, MAX_BATCH_SIZE)
    except PlanError as error:
        raise SystemExit(f"{reference.tag}: {error}") from None


@bentoml.service(traffic={"timeout": 900})
class FluxWorker:
    """Loads one artifact, verifies it, warms up, then renders batches."""

    artifact = artifact_reference(ARTIFACT)
    plan = placement_plan(artifact)

    def __init__(self) -> None:
        self.device, budget = device_and_budget()
        if self.device.type == "cuda" and GPU_MEMORY_GB:  # hold a bigger GPU to the configured budget
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget / torch.cuda.get_device_properties(0).total_memory))
        logger.info("placement for %s: %s", self.artifact.tag, self.plan.describe())
        pipe, self.manifest = load_pipeline(Path(self.artifact.path))
        self.cache = PromptCache(self.manifest.hash_of("text_encoder", "text_encoder_2"), PROMPT_CACHE_MB * 1024**2)
        self.jobs = JobBoard()
        self.renderer = Renderer(pipe, Placement(self.plan, self.device), self.cache, self.jobs)
        self.renderer.render([WorkItem(prompt="warm-up", width=WARMUP_SIZE, height=WARMUP_SIZE, steps=WARMUP_STEPS)])
        logger.info("serving %s (%s, %s)", self.artifact.tag, self.manifest.recipe, self.device)

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def generate(self, requests: list[WorkItem]) -> list[bytes]:
        """PNG bytes per request; a batch may mix shapes and protocols."""
        BATCHES.labels(protocols="+".join(sorted({request.protocol for request in requests}))).inc()
        return self.renderer.render(requests)

    @bentoml.api
    async def progress(self, job_id: str) -> int:
        return self.jobs.progress(job_id)

    @bentoml.api
    async def cancel(self, job_id: str) -> None:
        self.jobs.cancel(job_id)

    @bentoml.api
    def info(self) -> dict:
        cache = {"entries": len(self.cache.entries), "bytes": self.cache.bytes, "hits": self.cache.hits,
                 "misses": self.cache.misses}
        return {"artifact": str(self.artifact.tag), "device": str(self.device), "placement": self.plan.describe(),
                "prompt_cache": cache, **self.manifest.model_dump(exclude={"files"})}


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
        if png == OUT_OF_MEMORY:
            raise bentoml.exceptions.ServiceUnavailable("out of GPU memory for this size, even alone; try smaller")
        return Image.open(io.BytesIO(png))

    @bentoml.api(route="/info")
    async def info(self) -> dict:
        return await call_worker(self.worker.to_async.info)
