"""Closed-loop load: `concurrency` callers, each sending its next request as soon as the last one returns."""

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import cycle

import grpc
import httpx

from service.client import FluxGrpcClient
from service.schema import GenerationRequest

CALL_TIMEOUT_S = 600


class Unreachable(RuntimeError):
    """The service did not answer at all."""


def http_caller(url: str):
    client = httpx.Client(base_url=url, timeout=CALL_TIMEOUT_S)

    def call(request: GenerationRequest) -> str:
        try:
            return str(client.post("/txt2img", json=request.model_dump(mode="json")).status_code)
        except httpx.TransportError as error:
            return type(error).__name__

    return call


def grpc_caller(target: str):
    client = FluxGrpcClient(target)

    def call(request: GenerationRequest) -> str:
        try:
            client.generate(request, timeout_s=CALL_TIMEOUT_S)
            return "OK"
        except grpc.RpcError as error:
            return error.code().name

    return call


def run_level(
    call, requests: list[GenerationRequest], concurrency: int, on_done=lambda: None
) -> tuple[float, list[float], dict[str, int]]:
    """Send every request once; returns wall seconds, latencies of the successful calls, counts per status."""
    pending, lock = iter(requests), threading.Lock()
    latencies, statuses = [], Counter()

    def caller() -> None:
        while True:
            with lock:
                request = next(pending, None)
            if request is None:
                return
            started = time.perf_counter()
            status = call(request)
            with lock:
                statuses[status] += 1
                if status in ("200", "OK"):
                    latencies.append(time.perf_counter() - started)
            on_done()

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(caller) for _ in range(concurrency)]:
            future.result()
    return time.perf_counter() - started, latencies, dict(statuses)


def request_stream(mix: list[dict], count: int, seed0: int = 0) -> list[GenerationRequest]:
    """`count` requests cycling through the mix, each with its own seed and prompt."""
    shapes = cycle(mix)
    return [GenerationRequest(prompt=f"benchmark prompt {i}", seed=seed0 + i, **next(shapes)) for i in range(count)]


def check_reachable(url: str) -> None:
    try:
        ready = httpx.get(f"{url}/readyz", timeout=5)
    except httpx.TransportError as error:
        raise Unreachable(f"{url}: not reachable ({type(error).__name__}: {error})") from error
    if ready.status_code != 200:
        raise Unreachable(f"{url}/readyz answered {ready.status_code}: the service is not ready")
