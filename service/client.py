"""Clients for the FLUX service: `python -m service.client "a prompt" -o out.png [--grpc]`."""

import argparse
import os
import time
import typing
from collections.abc import Iterator
from pathlib import Path
from types import NoneType

import grpc
import httpx
from rich.progress import Progress

from service.fronts.grpc_front import FORMATS, message_limits
from service.fronts.stubs import messages, services
from service.schema import GenerationRequest, ImageRequest, LoraWeight, field_path

GRPC_FORMATS = {image_format: number for number, image_format in FORMATS.items()}
FINISHED = ("succeeded", "failed", "cancelled")
POLL_S = 0.5
MAX_REPLY_MB = 64  # the server's FLUX_GRPC_MAX_SEND_MB default; gRPC's own 4 MB is less than a 2048² PNG


def server_message(response: httpx.Response) -> str:
    """The server's one-line reason, from any of its error shapes (ours, BentoML's validation, OpenAI's)."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500]
    error, detail = body.get("error"), body.get("detail")
    if isinstance(error, dict):
        return str(error.get("message"))
    if isinstance(detail, list) and detail:
        return "; ".join(f"{field_path(tuple(d['loc']))}: {d['msg']}" if d.get("loc") else d["msg"] for d in detail)
    return str(error or body)


class FluxClient:
    """HTTP: raises httpx.HTTPStatusError carrying the status and the server's message on 4xx/5xx."""

    def __init__(self, url: str = "http://127.0.0.1:3000", timeout_s: float = 900, api_key: str | None = None) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else None
        self.http = httpx.Client(base_url=url, timeout=timeout_s, headers=headers)

    def txt2img(self, request: GenerationRequest) -> bytes:
        """The image's bytes, in the request's format."""
        return self._checked(self.http.post("/txt2img", json=request.model_dump(mode="json"))).content

    def img2img(self, request: ImageRequest) -> bytes:
        """img2img or inpainting (with a mask): the image's bytes."""
        return self._checked(self.http.post("/img2img", json=request.model_dump(mode="json"))).content

    def _json(self, response: httpx.Response) -> dict:
        return self._checked(response).json()

    @staticmethod
    def _checked(response: httpx.Response) -> httpx.Response:
        if response.is_error:
            message = f"{response.status_code}: {server_message(response)}"
            raise httpx.HTTPStatusError(message, request=response.request, response=response)
        return response

    def submit_job(
        self,
        request: GenerationRequest,
        webhook: str | None = None,
        idempotency_key: str | None = None,
        wait_s: int = 0,
    ) -> dict:
        """Queue a job (the server needs FLUX_JOBS_REDIS_URL); `wait_s`: answer once done, up to that long."""
        headers = {"idempotency-key": idempotency_key} if idempotency_key else {}
        if wait_s:
            headers["prefer"] = f"wait={wait_s}"
        body = request.model_dump(mode="json") | ({"webhook": webhook} if webhook else {})
        return self._json(self.http.post("/v1/jobs", json=body, headers=headers))

    def get_job(self, job_id: str) -> dict:
        return self._json(self.http.get(f"/v1/jobs/{job_id}"))

    def cancel_job(self, job_id: str) -> dict:
        return self._json(self.http.post(f"/v1/jobs/{job_id}/cancel"))

    def wait_job(self, job_id: str, timeout_s: float = 900, on_progress=None) -> dict:
        """Poll until the job is finished; `on_progress(step, total)` on each look."""
        deadline = time.monotonic() + timeout_s
        while (job := self.get_job(job_id))["status"] not in FINISHED and time.monotonic() < deadline:
            if on_progress:
                on_progress(job["progress"]["step"], job["progress"]["total"])
            time.sleep(POLL_S)
        return job


class FluxGrpcClient:
    """gRPC (flux.v1.TextToImage): raises grpc.RpcError with the status code and message."""

    def __init__(
        self, target: str = "127.0.0.1:50051", max_reply_mb: int = MAX_REPLY_MB, api_key: str | None = None
    ) -> None:
        self.channel = grpc.insecure_channel(target, options=message_limits(4, max_reply_mb))
        self.stub = services.TextToImageStub(self.channel)
        self.jobs = services.JobsStub(self.channel)
        self.metadata = [("authorization", f"Bearer {api_key}")] if api_key else None

    @staticmethod
    def message(request: GenerationRequest):
        fields = request.model_dump(exclude={"format"}, exclude_none=True)  # unset: the served model's default
        return messages.GenerateRequest(**fields, format=GRPC_FORMATS[request.format])

    def generate(self, request: GenerationRequest, timeout_s: float | None = None):
        return self.stub.Generate(self.message(request), timeout=timeout_s, metadata=self.metadata)

    def generate_stream(self, request: GenerationRequest, timeout_s: float | None = None) -> Iterator:
        """Progress events, then one event holding the result."""
        return self.stub.GenerateStream(self.message(request), timeout=timeout_s, metadata=self.metadata)

    def submit_job(self, request: GenerationRequest, webhook: str = "", idempotency_key: str = ""):
        message = messages.SubmitJobRequest(
            request=self.message(request), webhook=webhook, idempotency_key=idempotency_key
        )
        return self.jobs.SubmitJob(message, metadata=self.metadata)

    def get_job(self, job_id: str):
        return self.jobs.GetJob(messages.JobRef(id=job_id), metadata=self.metadata)

    def cancel_job(self, job_id: str):
        return self.jobs.CancelJob(messages.JobRef(id=job_id), metadata=self.metadata)

    def watch_job(self, job_id: str) -> Iterator:
        """The job at each change of status or step, until it is finished."""
        return self.jobs.WatchJob(messages.JobRef(id=job_id), metadata=self.metadata)


def stream_with_progress_bar(client: FluxGrpcClient, request: GenerationRequest) -> bytes:
    with Progress(transient=True) as progress:
        task = progress.add_task("denoising", total=request.steps)
        for event in client.generate_stream(request):
            if event.HasField("progress"):
                progress.update(task, completed=event.progress.step)
            else:
                return event.result.image
    raise RuntimeError("the stream ended without an image")


def job_with_progress_bar(args, request: GenerationRequest) -> bytes:
    """Submit a job, follow it (gRPC WatchJob, or HTTP polling), then fetch its result from its URL."""
    with Progress(transient=True) as progress:
        task = progress.add_task("job", total=request.steps)
        if args.grpc:
            client = FluxGrpcClient(args.target, api_key=args.api_key)
            for job in client.watch_job(client.submit_job(request).id):
                progress.update(task, completed=job.step)
            url, error = job.result_url, job.error
        else:
            client = FluxClient(args.url, api_key=args.api_key)
            job = client.wait_job(
                client.submit_job(request)["id"], on_progress=lambda step, total: progress.update(task, completed=step)
            )
            url, error = (job["result"] or {}).get("url"), (job["error"] or {}).get("message")
    if not url:
        raise SystemExit(f"job failed: {error}")
    return httpx.get(url, timeout=300).raise_for_status().content


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service.client", description=__doc__)
    parser.add_argument("prompt")
    parser.add_argument("-o", "--out", type=Path, required=True, help="image file to write")
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="HTTP base URL")
    parser.add_argument("--grpc", action="store_true", help="use gRPC (streaming, with a progress bar)")
    parser.add_argument("--job", action="store_true", help="as an async job (the server needs a Redis)")
    parser.add_argument("--target", default="127.0.0.1:50051", help="gRPC host:port")
    parser.add_argument("--api-key", default=os.environ.get("FLUX_API_KEY"), help="bearer token (env FLUX_API_KEY)")
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        type=lora_weight,
        metavar="NAME[=SCALE]",
        help="a LoRA adapter of the stack (repeat for more, in order); SCALE defaults to 1",
    )
    for name, field in GenerationRequest.model_fields.items():
        if name not in ("prompt", "loras"):
            kind = next(arg for arg in (*typing.get_args(field.annotation), field.annotation) if arg is not NoneType)
            kind = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Annotated else kind  # StrictInt
            parser.add_argument(f"--{name}", type=kind, default=field.default, help=field.description)
    return parser.parse_args(argv)


def lora_weight(value: str) -> LoraWeight:
    """`NAME[=SCALE]`, e.g. `brand-style=0.8` or `brand-style:v2`."""
    name, _, scale = value.partition("=")
    return LoraWeight(name=name, **({"scale": float(scale)} if scale else {}))


def main(argv: list[str] | None = None) -> None:
    """Writes the image; a refusal or failure prints the server's one-line reason and exits with 1."""
    args = parse_args(argv)
    fields = {name: getattr(args, name) for name in GenerationRequest.model_fields if name != "loras"}
    request = GenerationRequest(**fields, loras=args.lora)
    try:
        image = fetch(args, request)
    except httpx.HTTPStatusError as error:
        raise SystemExit(f"error: {error}") from None
    except grpc.RpcError as error:
        raise SystemExit(f"error: {error.code().name}: {error.details()}") from None
    except httpx.TransportError as error:
        raise SystemExit(f"error: cannot reach {args.url}: {error}") from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(image)
    print(args.out)


def fetch(args: argparse.Namespace, request: GenerationRequest) -> bytes:
    """The image, by the way the arguments ask: a job, a gRPC stream, or one HTTP call."""
    if args.job:
        return job_with_progress_bar(args, request)
    if args.grpc:
        return stream_with_progress_bar(FluxGrpcClient(args.target, api_key=args.api_key), request)
    return FluxClient(args.url, api_key=args.api_key).txt2img(request)


if __name__ == "__main__":
    main()
