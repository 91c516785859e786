"""The gRPC front: flux.v1.TextToImage, health and reflection, calling the same batching worker as HTTP."""

import asyncio
import io
import time
import uuid
from http import HTTPStatus

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from PIL import Image
from pydantic import ValidationError

from service.remote import call_worker
from service.render import OUT_OF_MEMORY
from service.schema import GenerationRequest, WorkItem
from service.stubs import SERVICE_NAME, messages, services

PROGRESS_POLL_S = 0.2
STATUS_FOR_HTTP = {
    HTTPStatus.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    HTTPStatus.TOO_MANY_REQUESTS: grpc.StatusCode.RESOURCE_EXHAUSTED,
    HTTPStatus.SERVICE_UNAVAILABLE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    HTTPStatus.GATEWAY_TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
}
MIME_TYPES = {messages.IMAGE_FORMAT_PNG: "image/png", messages.IMAGE_FORMAT_JPEG: "image/jpeg"}


def work_item(request) -> WorkItem:
    """The gRPC message as the worker's request; unset optional fields take the HTTP defaults."""
    fields = {name: getattr(request, name) for name in GenerationRequest.model_fields
              if name == "prompt" or request.HasField(name)}
    return WorkItem(**fields, protocol="grpc", job_id=uuid.uuid4().hex)


def describe(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())


def encode(png: bytes, image_format: int) -> bytes:
    if image_format == messages.IMAGE_FORMAT_PNG:
        return png
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


class TextToImage(services.TextToImageServicer):
    def __init__(self, worker, max_in_flight: int) -> None:
        self.worker, self.max_in_flight = worker, max_in_flight
        self.in_flight, self.ready = 0, False

    async def Generate(self, request, context):
        item = await self._admit(request, context)
        return await self._render(item, request.format, context)

    async def GenerateStream(self, request, context):
        item = await self._admit(request, context)
        render = asyncio.ensure_future(self._render(item, request.format, context))
        reported = 0
        while not render.done():
            await asyncio.wait({render}, timeout=PROGRESS_POLL_S)
            step = await call_worker(self.worker.to_async.progress, job_id=item.job_id)
            if step > reported:
                reported = step
                yield messages.GenerateEvent(progress=messages.Progress(step=step, total_steps=item.steps))
        yield messages.GenerateEvent(result=await render)

    async def _admit(self, request, context) -> WorkItem:
        if not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        if self.in_flight >= self.max_in_flight:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"over {self.max_in_flight} calls in flight")
        try:
            return work_item(request)
        except ValidationError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, describe(error))

    async def _render(self, item: WorkItem, image_format: int, context):
        started = time.perf_counter()
        self.in_flight += 1
        try:
            png = (await call_worker(self.worker.to_async.generate, [item]))[0]
        except asyncio.CancelledError:  # client cancelled or deadline passed: don't render for nobody
            await call_worker(self.worker.to_async.cancel, job_id=item.job_id)
            raise
        except Exception as error:  # noqa: BLE001 - every worker failure becomes a status code
            code = STATUS_FOR_HTTP.get(getattr(error, "error_code", None), grpc.StatusCode.INTERNAL)
            await context.abort(code, str(error) or type(error).__name__)
        finally:
            self.in_flight -= 1
        if png == OUT_OF_MEMORY:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "out of GPU memory for this size, even alone")
        return messages.GenerateReply(image=encode(png, image_format), mime_type=MIME_TYPES[image_format],
                                      seed=item.seed, timings=messages.Timings(total_ms=1000 * (time.perf_counter() - started)))


async def watch_readiness(worker, servicer: TextToImage, health_servicer: health.aio.HealthServicer) -> None:
    """NOT_SERVING until the worker has loaded and warmed up its model, then SERVING."""
    while True:
        try:
            if await worker.is_ready(5):
                break
        except Exception:  # noqa: BLE001 - the worker is not listening yet
            pass
        await asyncio.sleep(0.5)
    servicer.ready = True
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


async def start_grpc_server(worker, address: str, max_in_flight: int) -> tuple[grpc.aio.Server, asyncio.Task]:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    servicer, health_servicer = TextToImage(worker, max_in_flight), health.aio.HealthServicer()
    services.add_TextToImageServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    server.add_insecure_port(address)
    await server.start()
    return server, asyncio.ensure_future(watch_readiness(worker, servicer, health_servicer))
