"""The gRPC front: flux.v1.TextToImage, health and reflection, over the same gateway as HTTP."""

import asyncio
import base64
import time

import grpc
from google.protobuf.unknown_fields import UnknownFieldSet
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from service.drain import DRAIN, Drain
from service.fronts.auth import OPEN_GRPC_PREFIXES, GrpcBearerAuth
from service.fronts.outcomes import grpc_code, retry_headers
from service.fronts.stubs import JOBS_SERVICE_NAME, SERVICE_NAME, messages, services
from service.gateway import Gateway, Rejected, over_in_flight
from service.observe import REQUEST_ID_HEADER, logger, new_request_id, request_id
from service.runtime.result import Result
from service.schema import GenerationRequest, ImageFormat, ImageRequest, WorkItem, field_path
from service.settings import Settings

PROGRESS_POLL_S = 0.2
FORMATS = {
    messages.IMAGE_FORMAT_PNG: ImageFormat.png,
    messages.IMAGE_FORMAT_JPEG: ImageFormat.jpeg,
    messages.IMAGE_FORMAT_WEBP: ImageFormat.webp,
}
MB = 1024 * 1024


def message_limits(max_send_mb: int, max_receive_mb: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_send_mb * MB),
        ("grpc.max_receive_message_length", max_receive_mb * MB),
    ]


def describe(error: ValidationError) -> str:
    return "; ".join(f"{field_path(e['loc'])}: {e['msg']}" for e in error.errors())


def request_fields(request) -> dict:
    """A GenerateRequest's fields the caller set (unset optional ones take the HTTP defaults)."""
    unknown = sorted({field.field_number for field in UnknownFieldSet(request)})
    if unknown:
        raise Rejected("refused", f"unknown fields (numbers {unknown}) in flux.v1.GenerateRequest")
    fields = {
        name: getattr(request, name)
        for name in GenerationRequest.model_fields
        if name not in ("format", "loras") and (name == "prompt" or request.HasField(name))
    }
    loras = [{"name": lora.name, **({"scale": lora.scale} if lora.HasField("scale") else {})} for lora in request.loras]
    return fields | {"format": FORMATS[request.format], "loras": loras}


def picture_fields(request) -> dict[str, str | float] | None:
    """The image request's fields (pictures as base64, as in JSON), or None for text-to-image."""
    if not request.HasField("image"):
        if request.HasField("mask") or request.HasField("strength"):
            raise Rejected("refused", "image: mask and strength need an image")
        return None
    fields: dict[str, str | float] = {"image": base64.b64encode(request.image).decode()}
    if request.HasField("mask"):
        fields["mask"] = base64.b64encode(request.mask).decode()
    if request.HasField("strength"):
        fields["strength"] = round(request.strength, 6)  # float32 on the wire: 0.3 arrives as 0.30000001
    return fields


def work_item(request, rid: str, context) -> WorkItem:
    """The gRPC message as the worker's request."""
    fields, pictures = request_fields(request), picture_fields(request)
    remaining = context.time_remaining()
    call = {
        "protocol": "grpc",
        "request_id": rid,
        "arrived": time.time(),
        "deadline": time.time() + remaining if remaining is not None else None,
    }
    try:
        if pictures is None:
            return WorkItem(**fields, **call)
        return ImageRequest(**fields, **pictures).work_item(**call)
    except ValidationError as error:
        raise Rejected("refused", describe(error)) from None


async def refuse(context, error: Rejected, rid: str) -> None:
    """End the call with the outcome's code and a message led by the field it is about; log it with its id."""
    token = request_id.set(rid)
    logger.info("grpc refused (%s): %s", error.outcome, error.reason)
    request_id.reset(token)
    await context.abort(grpc_code(error.outcome), error.reason, trailing_metadata(rid, error.outcome))


def trailing_metadata(rid: str, outcome: str) -> tuple[tuple[str, str], ...]:
    return ((REQUEST_ID_HEADER, rid), *retry_headers(outcome).items())


class GrpcDrainGate(grpc.aio.ServerInterceptor):
    """While the server drains, every call but health and reflection ends UNAVAILABLE (clients retry it)."""

    def __init__(self, drain: Drain) -> None:
        self.drain = drain

    async def intercept_service(self, continuation, details):
        if not self.drain.draining or details.method.startswith(OPEN_GRPC_PREFIXES):
            return await continuation(details)
        return grpc.unary_unary_rpc_method_handler(self._refuse)

    @staticmethod
    async def _refuse(request, context) -> None:
        await context.abort(grpc_code("draining"), "the server is shutting down: send the call again")


class TextToImage(services.TextToImageServicer):
    def __init__(self, gateway: Gateway, max_in_flight: int) -> None:
        self.gateway, self.max_in_flight, self.in_flight = gateway, max_in_flight, 0

    async def Generate(self, request, context):
        started, item = time.perf_counter(), await self._admit(request, context)
        return await self._reply(await self._render(item, context), item, started, context)

    async def GenerateStream(self, request, context):
        started, item = time.perf_counter(), await self._admit(request, context)
        render = asyncio.ensure_future(self._render(item, context))
        reported = 0
        try:
            while not render.done():
                await asyncio.wait({render}, timeout=PROGRESS_POLL_S)
                step = await self.gateway.progress(item.request_id)
                if step > reported:
                    reported = step
                    yield messages.GenerateEvent(progress=messages.Progress(step=step, total_steps=item.steps))
            yield messages.GenerateEvent(result=await self._reply(await render, item, started, context))
        finally:
            render.cancel()  # the client went away mid-stream: the gateway cancels the render on the worker

    async def _admit(self, request, context) -> WorkItem:
        rid = new_request_id(dict(context.invocation_metadata()).get(REQUEST_ID_HEADER))
        context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
        try:
            if self.in_flight >= self.max_in_flight:
                raise Rejected("overloaded", over_in_flight(self.max_in_flight))
            return self.gateway.check([work_item(request, rid, context)])[0]
        except Rejected as error:
            await refuse(context, error, rid)

    async def _render(self, item: WorkItem, context) -> Result:
        self.in_flight += 1
        try:
            return await self.gateway.render(item)
        except Rejected as error:
            await refuse(context, error, item.request_id)
        finally:
            self.in_flight -= 1

    @staticmethod
    async def _reply(result: Result, item: WorkItem, started: float, context):
        if not result.ok:
            await context.abort(grpc_code(result.status), result.reason)
        timings = messages.Timings(total_ms=1000 * (time.perf_counter() - started), stages_ms=result.timings_ms)
        return messages.GenerateReply(image=result.image, mime_type=result.media_type, seed=item.seed, timings=timings)


class GrpcFront:
    """The gRPC server beside BentoML's HTTP server: health follows readiness and shutdown."""

    def __init__(
        self,
        gateway: Gateway,
        settings: Settings,
        api_keys: tuple[str, ...] = (),
        jobs: services.JobsServicer | None = None,
    ) -> None:
        """`jobs`: the flux.v1.Jobs servicer, when the jobs API is on."""
        self.settings = settings
        self.server = grpc.aio.server(
            interceptors=[GrpcDrainGate(DRAIN), *([GrpcBearerAuth(api_keys)] if api_keys else [])],
            options=[
                ("grpc.so_reuseport", 0),
                *message_limits(settings.grpc_max_send_mb, settings.grpc_max_receive_mb),
            ],
        )
        self.health = health.aio.HealthServicer()
        self.servicer = TextToImage(gateway, settings.max_in_flight)
        services.add_TextToImageServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME]
        if jobs is not None:
            services.add_JobsServicer_to_server(jobs, self.server)
            names.append(JOBS_SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        self.gateway, self.readiness = gateway, None

    async def start(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            self.server.add_insecure_port(self.settings.grpc_address)
        except RuntimeError as error:
            raise SystemExit(
                f"FLUX_GRPC_ADDRESS={self.settings.grpc_address}: cannot listen ({error}); "
                f"is another server on that port?"
            ) from None
        await self.server.start()
        self.readiness = asyncio.ensure_future(self._serve_when_ready())

    async def _serve_when_ready(self) -> None:
        await self.gateway.wait_for_worker()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def drain(self) -> None:
        """NOT_SERVING; new calls are refused by GrpcDrainGate (the server's DRAIN is draining)."""
        self.readiness.cancel()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self) -> None:
        """After `drain`: let calls in flight finish within the grace period, then stop (health Watch streams
        never end by themselves: waiting for them would always use the whole grace)."""
        await self.drain()
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while self.servicer.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await self.server.stop(grace=1)

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
