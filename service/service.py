"""BentoML services: a batching FLUX worker (one queue per resolution bucket), and the front that serves
it over HTTP and gRPC. Nothing heavy happens at import: torch and diffusers are loaded, the artifact read and
the device queried only when the worker starts (service/runtime/engine.py), so the arbiter and the front
processes start in about a second."""

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Annotated

import bentoml
from bentoml._internal.configuration.containers import BentoMLContainer
from starlette.responses import JSONResponse, Response

from service.drain import DRAIN, CountInFlight
from service.fronts.auth import BearerAuth
from service.fronts.grpc_front import GrpcFront
from service.fronts.grpc_jobs import Jobs
from service.fronts.http_gate import HttpGate
from service.fronts.outcomes import http_status, retry_headers
from service.fronts.v1 import app as v1_app
from service.gateway import Gateway, Rejected
from service.jobs.engine import JobEngine
from service.jobs.results import ResultStore
from service.observe import BATCHES, REQUEST_ID_HEADER, logger, new_request_id
from service.runtime import batching
from service.runtime.result import Result
from service.schema import GenerationRequest, ImageRequest, Limits, WorkItem
from service.settings import RESOLUTION_BUCKETS, settings

SETTINGS = settings()
API_KEYS = SETTINGS.accepted_keys()


def artifact_reference(tag: str, variable: str = "FLUX_ARTIFACT") -> bentoml.models.BentoModel:
    """A model the service references (a model-store lookup), so a wrong tag stops `serve` and `build` at once."""
    reference = bentoml.models.BentoModel(tag)
    if reference.stored is None:
        known = ", ".join(str(model.tag) for model in stored_models()) or "none"
        raise SystemExit(f"{variable}={tag!r}: no such model in the BentoML store (have: {known})")
    return reference


def stored_models() -> list[bentoml.models.Model]:
    """The model store's complete entries. An entry another process is still writing (`python -m quantize`
    storing a model beside a running server) has no model.yaml yet: skipped, where `bentoml.models.list()`
    raises."""
    found = []
    for folder in sorted(Path(BentoMLContainer.model_store_dir.get()).glob("*/*/")):
        try:
            found.append(bentoml.models.get(f"{folder.parent.name}:{folder.name}"))
        except bentoml.exceptions.BentoMLException:
            continue
    return found


def is_adapter_for(model: bentoml.models.Model, architecture: str) -> bool:
    """A stored LoRA adapter checked against this architecture (`python -m quantize lora add`)."""
    return model.info.labels.get("kind") == "lora" and model.info.labels.get("architecture") == architecture


def lora_folder(architecture: str, name: str) -> Path | None:
    """The stored adapter `name` (NAME: its latest version) when it fits this architecture, else None."""
    try:
        model = bentoml.models.get(name)
    except bentoml.exceptions.BentoMLException:
        return None
    return Path(model.path) if is_adapter_for(model, architecture) else None


def lora_names(architecture: str) -> list[str]:
    return sorted({model.tag.name for model in stored_models() if is_adapter_for(model, architecture)})


def stop_server(message: str) -> None:
    """A configuration the worker cannot serve: stop the whole server (BentoML would restart the worker
    forever), with the reason in the log."""
    logger.critical(message)
    os.kill(os.getppid(), signal.SIGTERM)  # the arbiter: it stops every process of this server
    raise SystemExit(message)


def bucket_api(resolution: int):
    """The batching queue for requests whose larger side is at most `resolution` (and above the last)."""

    def generate(self, items: list[WorkItem]) -> list[Result]:
        with self.engine.turns.turn(resolution):
            BATCHES.labels(protocols="+".join(sorted({item.protocol for item in items}))).inc()
            return self.engine.renderer.render(items)

    generate.__name__ = generate.__qualname__ = f"generate_{resolution}"
    return bentoml.api(
        generate, batchable=True, max_batch_size=SETTINGS.max_batch_size, max_latency_ms=SETTINGS.latency_ms(resolution)
    )


batching.install({f"generate_{bucket}": SETTINGS.wait_ms(bucket) for bucket in RESOLUTION_BUCKETS})
ARTIFACT = artifact_reference(SETTINGS.artifact)
PACKED_LORAS = [
    artifact_reference(tag, "FLUX_LORAS") for tag in SETTINGS.loras
]  # travel in the Bento beside the artifact


# A thread per bucket's queue, so a waiting batch can be chosen by DeviceTurns (one runs at a time).
# The front's client to this worker replaces its session every 100 calls or 300 s by default and closes the
# calls still in flight on it: never, here (a local socket has nothing to refresh).
@bentoml.service(
    traffic={"timeout": 900},
    threads=len(RESOLUTION_BUCKETS),
    runner_connection={"max_requests": 2**31 - 1, "max_age": 10.0**9},
)
class FluxWorker:
    """Loads one artifact, plans its placement, warms up, then renders batches."""

    artifact = ARTIFACT

    def __init__(self) -> None:
        from service.runtime.engine import CannotServe, Engine  # torch and diffusers: in this process only

        try:
            self.engine = Engine(SETTINGS, Path(self.artifact.path), str(self.artifact.tag), lora_folder, lora_names)
        except CannotServe as error:
            stop_server(str(error))

    @bentoml.on_startup
    async def drain_on_sigterm(self) -> None:
        """Finish what the fronts have sent (they send nothing new once draining), then stop."""
        DRAIN.install(busy=lambda: DRAIN.in_flight > 0, grace_s=SETTINGS.shutdown_grace_s, quiet_s=1.0)

    generate_512, generate_768, generate_1024, generate_1536, generate_2048 = map(bucket_api, RESOLUTION_BUCKETS)

    @bentoml.api
    async def limits(self) -> Limits:
        manifest = self.engine.manifest
        return Limits(
            max_side=SETTINGS.max_resolution,
            max_batch=self.engine.plan.max_batch,
            variant=manifest.variant,
            t5_tokens=manifest.t5_tokens,
            model=str(self.artifact.tag),
        )

    @bentoml.api
    async def progress(self, request_id: str) -> int:
        return self.engine.board.progress(request_id)

    @bentoml.api
    async def cancel(self, request_id: str) -> None:
        self.engine.board.cancel(request_id)

    @bentoml.api
    async def alive(self) -> bool:
        return await asyncio.wait_for(asyncio.to_thread(self.engine.responds), SETTINGS.liveness_timeout_s)

    @bentoml.api
    async def info(self) -> dict:
        """Async, so it answers while a batch runs in the worker's thread."""
        return self.engine.info()


def http_answer(ctx: bentoml.Context, outcome: str, message: str, rid: str, field: str | None = None) -> JSONResponse:
    """A failure in the shape of BentoML's validation errors, so one client parser reads both."""
    ctx.response.status_code = http_status(outcome)  # BentoML sets the response's status from the context
    detail = [{"loc": [field] if field else [], "msg": message, "type": outcome}]
    headers = {REQUEST_ID_HEADER: rid, **retry_headers(outcome)}
    return JSONResponse({"error": message, "outcome": outcome, "detail": detail}, headers=headers)


@bentoml.asgi_app(v1_app, path="/v1")
@bentoml.service(traffic={"timeout": 900})  # the in-flight limit is HttpGate's: 429 with Retry-After
class Flux:
    """POST /txt2img (JSON in, the worker's image bytes out), gRPC flux.v1.TextToImage, OpenAI's
    POST /v1/images/generations, and, with a Redis configured, jobs (/v1/jobs, gRPC flux.v1.Jobs)."""

    worker = bentoml.depends(FluxWorker)

    @bentoml.on_startup
    async def start(self) -> None:
        self.gateway = Gateway(self.worker)
        self.model = ARTIFACT.stored
        self.results = (
            ResultStore(SETTINGS.results_url, SETTINGS.results_endpoint_url, SETTINGS.results_url_ttl_s)
            if SETTINGS.results_url
            else None
        )
        self.jobs = JobEngine(SETTINGS, self.gateway, self.results) if SETTINGS.jobs_redis_url else None
        self.grpc = GrpcFront(self.gateway, SETTINGS, API_KEYS, Jobs(self.jobs) if self.jobs else None)
        await self.grpc.start()
        if self.jobs:
            self.jobs.start()
        DRAIN.install(
            busy=lambda: self.gateway.in_flight > 0, grace_s=SETTINGS.shutdown_grace_s, on_begin=self.begin_drain
        )

    async def begin_drain(self) -> None:
        """SIGTERM: gRPC health NOT_SERVING, pull no more jobs (those running finish); HTTP: fronts/http_gate.py."""
        await asyncio.gather(self.grpc.drain(), *([self.jobs.stop(SETTINGS.shutdown_grace_s)] if self.jobs else []))

    @bentoml.on_shutdown
    async def stop(self) -> None:
        jobs = [self.jobs.stop(SETTINGS.shutdown_grace_s)] if self.jobs and not DRAIN.draining else []
        await asyncio.gather(self.grpc.stop(), *jobs)

    async def __is_ready__(self) -> bool:
        return self.gateway.limits is not None and not DRAIN.draining

    async def __is_alive__(self) -> bool:
        """While draining: alive (finishing its work) even once the worker has stopped."""
        return DRAIN.draining or await self.gateway.alive(SETTINGS.liveness_timeout_s)

    @bentoml.api(route="/txt2img", input_spec=GenerationRequest)
    async def txt2img(self, ctx: bentoml.Context, **fields) -> Annotated[bytes, "image/png, image/jpeg or image/webp"]:
        rid = new_request_id(ctx.request.headers.get(REQUEST_ID_HEADER))
        return await self._answer(ctx, WorkItem(**fields, protocol="http", request_id=rid, arrived=time.time()))

    @bentoml.api(route="/img2img", input_spec=ImageRequest)
    async def img2img(self, ctx: bentoml.Context, **fields) -> Annotated[bytes, "image/png, image/jpeg or image/webp"]:
        """img2img (`image`, `strength`) and inpainting (and `mask`): the fields of /txt2img and those."""
        rid = new_request_id(ctx.request.headers.get(REQUEST_ID_HEADER))
        request = ImageRequest.model_construct(**fields)  # validated by BentoML
        return await self._answer(ctx, request.work_item(protocol="http", request_id=rid, arrived=time.time()))

    async def _answer(self, ctx: bentoml.Context, item: WorkItem) -> Response:
        rid = item.request_id
        try:
            result = await self.gateway.render(item, caller_left=ctx.request.is_disconnected)
        except Rejected as error:
            return http_answer(ctx, error.outcome, error.message, rid, error.field)
        if not result.ok:
            return http_answer(ctx, result.status, result.message, rid, result.field)
        return Response(result.image, media_type=result.media_type, headers={REQUEST_ID_HEADER: rid})

    @bentoml.api(route="/info")
    async def info(self) -> dict:
        return await self.gateway.info()


FluxWorker.models.extend(PACKED_LORAS)
FluxWorker.add_asgi_middleware(CountInFlight, drain=DRAIN)
Flux.add_asgi_middleware(
    HttpGate,
    drain=DRAIN,
    max_body_bytes=SETTINGS.max_body_kb * 1024,
    max_image_body_bytes=SETTINGS.max_image_body_mb * 2**20,
    max_in_flight=SETTINGS.max_in_flight,
)
Flux.add_asgi_middleware(BearerAuth, keys=API_KEYS)
