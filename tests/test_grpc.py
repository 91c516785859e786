"""gRPC beside HTTP on one batching queue: a real server, real gRPC calls."""

import io
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from service.client import FluxClient, FluxGrpcClient
from service.fronts.stubs import SERVICE_NAME, messages
from service.launcher import running_server, start_server, stop, wait_ready
from service.pictures import png
from service.schema import GenerationRequest
from tests.conftest import free_port, private_home
from tests.test_images_in import b64

SMALL = dict(width=128, height=128, steps=2)


@pytest.fixture(scope="module")
def servers(tiny_int8_tag, tmp_path_factory):
    grpc_target = f"127.0.0.1:{free_port()}"
    folder = tmp_path_factory.mktemp("grpc")
    env = {"FLUX_ARTIFACT": tiny_int8_tag, "FLUX_GRPC_ADDRESS": grpc_target, **private_home(folder / "home")}
    with running_server(free_port(), folder / "server.log", env=env) as url:
        yield url, grpc_target


def test_generate_returns_a_png(servers):
    reply = FluxGrpcClient(servers[1]).generate(GenerationRequest(prompt="a fox", seed=9, **SMALL))
    image = Image.open(io.BytesIO(reply.image))
    assert (image.format, image.size, reply.mime_type, reply.seed) == ("PNG", (128, 128), "image/png", 9)
    assert reply.timings.total_ms > 0


@pytest.mark.parametrize("cache", [None, "fast"])
def test_same_seed_same_bytes_over_http_and_grpc(servers, cache):
    request = GenerationRequest(prompt="a lighthouse", seed=1234, cache=cache, **SMALL)
    assert FluxClient(servers[0]).txt2img(request) == FluxGrpcClient(servers[1]).generate(request).image


def test_jpeg_output(servers):
    reply = FluxGrpcClient(servers[1]).generate(GenerationRequest(prompt="a fox", format="jpeg", **SMALL))
    assert reply.mime_type == "image/jpeg" and Image.open(io.BytesIO(reply.image)).format == "JPEG"


def test_stream_reports_every_step_then_the_image(servers):
    events = list(
        FluxGrpcClient(servers[1]).generate_stream(GenerationRequest(prompt="a fox", width=512, height=512, steps=30))
    )
    steps = [event.progress.step for event in events if event.HasField("progress")]
    assert events[-1].HasField("result") and Image.open(io.BytesIO(events[-1].result.image)).size == (512, 512)
    assert steps == sorted(steps) and steps and steps[-1] <= 30


def mixed_batches(url: str) -> float:
    found = re.search(r'flux_batches_total\{[^}]*protocols="grpc\+http"[^}]*\} (\S+)', httpx.get(f"{url}/metrics").text)
    return float(found.group(1)) if found else 0.0


def test_http_and_grpc_share_one_batching_queue(servers):
    url, target = servers
    http, rpc = FluxClient(url), FluxGrpcClient(target)
    calls = [lambda i=i: http.txt2img(GenerationRequest(prompt=f"h{i}", seed=i, **SMALL)) for i in range(8)]
    calls += [lambda i=i: rpc.generate(GenerationRequest(prompt=f"g{i}", seed=i, **SMALL)).image for i in range(8)]
    with ThreadPoolExecutor(16) as pool:
        images = list(pool.map(lambda call: call(), calls))
    assert all(Image.open(io.BytesIO(image)).size == (128, 128) for image in images)
    assert mixed_batches(url) >= 1


def test_invalid_argument_names_the_field(servers):
    rpc = FluxGrpcClient(servers[1])
    for message, field in (
        (messages.GenerateRequest(prompt="fox", width=100), "width"),
        (messages.GenerateRequest(prompt=""), "prompt"),
        (messages.GenerateRequest(prompt="fox", steps=0), "steps"),
        (messages.GenerateRequest(prompt="fox", cache="turbo"), "cache"),
    ):
        with pytest.raises(grpc.RpcError) as error:
            rpc.stub.Generate(message)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith(f"{field}:")


def test_reflection_lists_the_service(servers):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    database = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(servers[1]))
    assert SERVICE_NAME in database.get_services()


# A server whose worker takes seconds to warm up (after the seconds it takes to import torch and diffusers, which
# the front does not), and admits two gRPC calls at a time.
SLOW_START = {"FLUX_WARMUP_SIZE": "1024", "FLUX_WARMUP_STEPS": "20", "FLUX_MAX_IN_FLIGHT": "2"}


def health(target: str) -> int:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    return stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=2).status


@pytest.fixture(scope="module")
def slow_server(tiny_int8_tag, tmp_path_factory):
    """Started by hand so the test can watch it before it is ready."""
    port, target = free_port(), f"127.0.0.1:{free_port()}"
    log = tmp_path_factory.mktemp("slow") / "server.log"
    process = start_server(port, log, {**SLOW_START, "FLUX_ARTIFACT": tiny_int8_tag, "FLUX_GRPC_ADDRESS": target})
    yield f"http://127.0.0.1:{port}", target, process, log
    stop(process)


def test_health_and_unavailable_before_ready_then_serving(slow_server):
    url, target, process, log = slow_server
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and health_or_none(target) is None:
        time.sleep(0.1)
    assert health(target) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as error:
        FluxGrpcClient(target).generate(GenerationRequest(prompt="too early", **SMALL))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    wait_ready(url, process, log, timeout_s=120)
    while time.monotonic() < deadline and health(target) != health_pb2.HealthCheckResponse.SERVING:
        time.sleep(0.2)
    assert health(target) == health_pb2.HealthCheckResponse.SERVING


def health_or_none(target: str) -> int | None:
    try:
        return health(target)
    except grpc.RpcError:
        return None


def test_overload_is_resource_exhausted(slow_server):
    url, target, process, log = slow_server
    wait_ready(url, process, log, timeout_s=120)
    rpc = FluxGrpcClient(target)
    busy = GenerationRequest(prompt="busy", width=1024, height=1024, steps=8)  # seconds: outlasts the checks
    workers = [threading.Thread(target=rpc.generate, args=(busy,)) for _ in range(2)]
    for worker in workers:
        worker.start()
    time.sleep(1.0)
    with pytest.raises(grpc.RpcError) as error:
        rpc.generate(GenerationRequest(prompt="one too many", **SMALL))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(error.value.trailing_metadata()).get("retry-after") == "1"
    http_busy = [threading.Thread(target=httpx.post, args=(f"{url}/txt2img",), kwargs=BUSY_HTTP) for _ in range(2)]
    for worker in http_busy:
        worker.start()
    time.sleep(1.0)
    answer = httpx.post(f"{url}/txt2img", json={"prompt": "one too many", **SMALL}, timeout=60)
    assert (answer.status_code, answer.headers.get("retry-after")) == (429, "1"), (answer.headers, answer.text)
    assert answer.json()["outcome"] == "overloaded" and answer.headers["x-request-id"], answer.text
    for worker in [*workers, *http_busy]:
        worker.join()


BUSY_HTTP = dict(json={"prompt": "busy", "width": 1024, "height": 1024, "steps": 8}, timeout=300)


def test_deadline_exceeded_and_the_abandoned_work_is_stopped(slow_server):
    url, target, process, log = slow_server
    wait_ready(url, process, log, timeout_s=120)
    rpc = FluxGrpcClient(target)
    started = time.monotonic()
    rpc.generate(GenerationRequest(prompt="probe", width=1024, height=1024, steps=40))
    full_run_s = time.monotonic() - started
    with pytest.raises(grpc.RpcError) as error:
        rpc.generate(GenerationRequest(prompt="too slow", width=1024, height=1024, steps=40), timeout_s=1.0)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    started = time.monotonic()
    rpc.generate(GenerationRequest(prompt="next", **SMALL))
    assert time.monotonic() - started < full_run_s / 2, "the abandoned call kept the worker busy"


def steps_after_cancel(url: str) -> tuple[float, float]:
    """(calls stopped because every caller left, of which within one step) from the worker's histogram."""
    text = httpx.get(f"{url}/metrics").text
    count = re.search(r"^flux_steps_after_cancel_count (\S+)", text, re.M)
    within_one = re.search(r'^flux_steps_after_cancel_bucket\{le="1.0"\} (\S+)', text, re.M)
    return (float(count.group(1)), float(within_one.group(1))) if count else (0.0, 0.0)


def test_cancelling_a_stream_stops_the_render_within_a_step(servers):
    url, target = servers
    before = steps_after_cancel(url)
    stream = FluxGrpcClient(target).generate_stream(
        GenerationRequest(prompt="abandoned", width=1024, height=1024, steps=60)
    )
    first = next(stream)
    assert first.HasField("progress")
    stream.cancel()
    deadline = time.monotonic() + 10
    while steps_after_cancel(url) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert steps_after_cancel(url) == (before[0] + 1, before[1] + 1)
    started = time.monotonic()
    FluxGrpcClient(target).generate(GenerationRequest(prompt="next", **SMALL))
    assert time.monotonic() - started < 5


@pytest.mark.slow  # over half a minute: `make test-all`
def test_a_2048_image_fits_the_documented_message_limits(servers):
    reply = FluxGrpcClient(servers[1]).generate(GenerationRequest(prompt="large", width=2048, height=2048, steps=1))
    assert len(reply.image) > 4 * 1024 * 1024  # over gRPC's default 4 MB receive limit
    assert Image.open(io.BytesIO(reply.image)).size == (2048, 2048)


def test_unknown_fields_are_invalid_argument(servers):
    call = grpc.insecure_channel(servers[1]).unary_unary("/flux.v1.TextToImage/Generate")
    known = messages.GenerateRequest(prompt="fox", width=128, height=128, steps=1).SerializeToString()
    with pytest.raises(grpc.RpcError) as error:
        call(known + bytes([0xF8, 0x06, 0x07]))  # field 111, varint 7: not in flux.v1
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown fields (numbers [111])" in error.value.details()


def test_the_request_id_comes_back_in_trailing_metadata(servers):
    _, call = FluxGrpcClient(servers[1]).stub.Generate.with_call(
        messages.GenerateRequest(prompt="fox", width=128, height=128, steps=1), metadata=(("x-request-id", "grpc-7"),)
    )
    assert ("x-request-id", "grpc-7") in call.trailing_metadata()


def test_a_second_server_cannot_share_the_port(servers):
    import asyncio

    from service.fronts.grpc_front import GrpcFront
    from service.gateway import Gateway
    from service.settings import Settings

    async def start_second() -> None:
        await GrpcFront(Gateway(worker=None), Settings(grpc_address=servers[1])).start()

    with pytest.raises(SystemExit, match=f"FLUX_GRPC_ADDRESS={servers[1]}: cannot listen"):
        asyncio.run(start_second())


def test_sigterm_drains_http_and_grpc_alike(tiny_int8_tag, tmp_path):
    """One HTTP and one gRPC render in flight at SIGTERM: health NOT_SERVING and /readyz 503 at once, new calls
    refused retryably on both protocols, /livez still 200, both renders finish, exit 0."""
    port, target = free_port(), f"127.0.0.1:{free_port()}"
    url, log = f"http://127.0.0.1:{port}", tmp_path / "server.log"
    process = start_server(port, log, {"FLUX_ARTIFACT": tiny_int8_tag, "FLUX_GRPC_ADDRESS": target})
    try:
        wait_ready(url, process, log, timeout_s=300)
        statuses = health_pb2_grpc.HealthStub(grpc.insecure_channel(target)).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        )
        assert next(statuses).status == health_pb2.HealthCheckResponse.SERVING
        slow = GenerationRequest(prompt="finish me", width=1024, height=1024, steps=16)
        with ThreadPoolExecutor(2) as pool:
            over_grpc = pool.submit(FluxGrpcClient(target).generate, slow)
            over_http = pool.submit(FluxClient(url).txt2img, slow.model_copy(update={"seed": 1}))
            time.sleep(2)
            assert not over_grpc.done() and not over_http.done()
            process.send_signal(signal.SIGTERM)
            assert next(statuses).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as refused:
                FluxGrpcClient(target).generate(GenerationRequest(prompt="too late", **SMALL), timeout_s=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
            assert httpx.get(f"{url}/readyz", timeout=5).status_code == 503
            assert httpx.get(f"{url}/livez", timeout=5).status_code == 200
            late = httpx.post(f"{url}/txt2img", json={"prompt": "too late", **SMALL}, timeout=10)
            assert late.status_code == 503 and late.headers["retry-after"], late.text
            assert not over_grpc.done() and not over_http.done(), "the renders did not outlast the checks"
            assert Image.open(io.BytesIO(over_grpc.result(timeout=120).image)).size == (1024, 1024)
            assert Image.open(io.BytesIO(over_http.result(timeout=120))).size == (1024, 1024)
        assert process.wait(timeout=60) == 0
    finally:
        stop(process)


@pytest.fixture(scope="module")
def impatient_server(tiny_int8_tag, tmp_path_factory):
    """Requests up to 512² may wait 1 ms in their queue: a burst overflows it."""
    folder = tmp_path_factory.mktemp("impatient")
    target = f"127.0.0.1:{free_port()}"
    env = {
        "FLUX_ARTIFACT": tiny_int8_tag,
        "FLUX_GRPC_ADDRESS": target,
        "FLUX_MAX_LATENCY_MS": '{"512": 1}',
        **private_home(folder / "home"),
    }
    with running_server(free_port(), folder / "server.log", env=env) as url:
        yield url, target


def test_overload_says_what_happened_and_when_to_retry_on_every_protocol(impatient_server):
    url, target = impatient_server
    fields = dict(prompt="burst", width=512, height=512, steps=4)

    def over_http(seed: int) -> tuple[int, str, str | None]:
        answer = httpx.post(f"{url}/txt2img", json={**fields, "seed": seed}, timeout=120)
        return answer.status_code, answer.text, answer.headers.get("retry-after")

    def over_openai(seed: int) -> tuple[int, str, str | None]:
        body = {"prompt": "burst", "size": "512x512", "steps": 4, "seed": seed}
        answer = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)
        return answer.status_code, answer.text, answer.headers.get("retry-after")

    def over_grpc(seed: int) -> tuple[grpc.StatusCode, str, str | None]:
        call = FluxGrpcClient(target).stub.Generate.with_call
        try:
            call(FluxGrpcClient.message(GenerationRequest(**fields, seed=seed)), timeout=120)
            return grpc.StatusCode.OK, "", None
        except grpc.RpcError as error:
            return error.code(), error.details(), dict(error.trailing_metadata()).get("retry-after")

    with ThreadPoolExecutor(18) as pool:
        calls = [pool.submit(send, seed) for seed in range(6) for send in (over_http, over_openai, over_grpc)]
        answers = [call.result() for call in calls]
    http_refused = [a for a in answers[0::3] + answers[1::3] if a[0] == 503]
    grpc_refused = [a for a in answers[2::3] if a[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert http_refused and grpc_refused, answers
    for _, message, retry_after in http_refused + grpc_refused:
        assert "overloaded" in message and "send it again in 2 s" in message, message
        assert "unexpected error" not in message and retry_after == "2", (message, retry_after)
    assert any('"code":"queue_full"' in text.replace(" ", "") for _, text, _ in answers[1::3]), answers[1::3]


def test_an_image_request_over_grpc_renders_the_bytes_of_img2img(servers):
    """Images in on gRPC: the picture's file bytes in the message, the same image as POST /img2img."""
    picture = png(Image.radial_gradient("L").resize((128, 128)).convert("RGB"))
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (0, 0, 64, 64))
    fields = {"prompt": "a fox", "steps": 4, "seed": 3, "strength": 0.3}
    reply = FluxGrpcClient(servers[1]).stub.Generate(
        messages.GenerateRequest(**fields, image=picture, mask=png(mask)), timeout=120
    )
    http = httpx.post(
        f"{servers[0]}/img2img", json={**fields, "image": b64(picture), "mask": b64(png(mask))}, timeout=120
    )
    assert http.status_code == 200, http.text
    assert reply.image == http.content and Image.open(io.BytesIO(reply.image)).size == (128, 128)
    for message, field in (
        (messages.GenerateRequest(prompt="fox", image=b"GIF89a"), "image"),
        (messages.GenerateRequest(prompt="fox", strength=0.5), "image"),
    ):
        with pytest.raises(grpc.RpcError) as error:
            FluxGrpcClient(servers[1]).stub.Generate(message)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith(f"{field}:"), error.value.details()
