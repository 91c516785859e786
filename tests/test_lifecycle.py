"""Every request ends once, in a typed outcome: a real server (tiny int8, largest side 1024) driven over HTTP."""

import io
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import bentoml
import grpc
import httpx
import psutil
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from models.artifact import load_pipeline
from service.client import FluxGrpcClient
from service.fronts.stubs import messages
from service.launcher import start_server, stop, wait_ready
from service.runtime.placement import Placement
from service.runtime.render import Renderer
from service.schema import WorkItem
from tests.conftest import free_port, private_home

SMALL = dict(width=128, height=128, steps=2)
SLOW = dict(width=1024, height=1024)  # about a quarter of a second per step for the tiny model on 2 cores


CACHED_COMPILED = {"FLUX_STEP_CACHE": "fast", "FLUX_COMPILE": "blocks"}


@pytest.fixture(
    scope="module",
    params=[
        pytest.param({}, id="eager"),
        # every lifecycle test again with step caching and compiled blocks (compiling takes minutes here)
        pytest.param(CACHED_COMPILED, id="cached-compiled", marks=pytest.mark.slow),
    ],
)
def server(request, tiny_int8_tag, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lifecycle")
    port, log, grpc_target = free_port(), folder / "server.log", f"127.0.0.1:{free_port()}"
    env = {
        **request.param,
        "FLUX_ARTIFACT": tiny_int8_tag,
        "FLUX_GRPC_ADDRESS": grpc_target,
        "FLUX_MAX_RESOLUTION": "1024",
        "FLUX_LIVENESS_TIMEOUT_S": "2",
        **private_home(folder / "home"),
    }
    process = start_server(port, log, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log, timeout_s=300)
        yield url, process, log, grpc_target, request.param
    finally:
        stop(process)


def post(url: str, timeout: float = 300, headers: dict | None = None, **fields) -> httpx.Response:
    return httpx.post(f"{url}/txt2img", json=fields, timeout=timeout, headers=headers)


def metric(url: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def abandon(url: str, after_s: float, **fields) -> None:
    """A client that gives up after `after_s` seconds and closes its connection."""
    with pytest.raises(httpx.ReadTimeout):
        post(url, timeout=after_s, **fields)


def timed_post(url: str, **fields) -> float:
    started = time.perf_counter()
    assert post(url, **fields).status_code == 200
    return time.perf_counter() - started


def test_a_client_that_disconnects_stops_the_render_within_a_step(server):
    url = server[0]
    full_s = timed_post(url, prompt="probe", steps=16, **SLOW)
    cancelled_before = metric(url, "flux_steps_after_cancel_count")
    abandon(url, 1.0, prompt="abandoned", steps=40, **SLOW)
    next_s = timed_post(url, prompt="next", **SMALL)
    assert metric(url, "flux_steps_after_cancel_count") == cancelled_before + 1
    assert metric(url, "flux_steps_after_cancel_bucket", le="1.0") == cancelled_before + 1  # at most one step
    assert next_s < full_s / 2, f"the next request took {next_s:.2f} s; a 16-step render takes {full_s:.2f} s"


def test_a_queued_request_whose_client_left_is_never_rendered(server):
    url = server[0]
    dropped_before = metric(url, "flux_cancellations_total", stage="queued")
    small_calls_before = metric(url, "flux_stage_seconds_count", stage="denoise", bucket="512")
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, url, prompt="occupies the device", steps=12, **SLOW)
        time.sleep(0.5)
        abandon(url, 0.5, prompt="waits, then leaves", **SMALL)
        assert running.result().status_code == 200
    deadline = time.monotonic() + 10
    while metric(url, "flux_cancellations_total", stage="queued") == dropped_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(url, "flux_cancellations_total", stage="queued") == dropped_before + 1
    assert metric(url, "flux_stage_seconds_count", stage="denoise", bucket="512") == small_calls_before


def test_small_requests_do_not_wait_behind_large_ones_queued_before_them(server):
    """One large render runs; a second large one queues, then a small one: it goes first (its own bucket's
    queue, smallest bucket first when the device frees) instead of riding in the large one's batch, which
    would hand both images back together."""
    url, finished = server[0], {}

    def send(name: str, **fields) -> None:
        assert post(url, prompt=name, **fields).status_code == 200
        finished[name] = time.monotonic()

    with ThreadPoolExecutor(3) as pool:
        pool.submit(send, "large 1", steps=8, **SLOW)
        time.sleep(0.5)
        pool.submit(send, "large 2", steps=8, **SLOW)
        time.sleep(0.3)
        pool.submit(send, "small", **SMALL)
    assert finished["large 1"] < finished["small"] < finished["large 2"] - 0.5, finished


def test_info_answers_while_a_batch_runs(server):
    url = server[0]
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, url, prompt="long", steps=20, **SLOW)
        time.sleep(1.0)
        started = time.perf_counter()
        info = httpx.post(f"{url}/info", json={}, timeout=60).json()
        info_s = time.perf_counter() - started
        assert not running.done(), "the render finished before /info was asked: make it longer"
        assert running.result().status_code == 200
    assert info_s < 1.0 and info["max_side"] == 1024


def test_a_render_survives_many_calls_to_the_worker_beside_it(server):
    """BentoML's client to the worker replaces its session every 100 calls by default, closing the calls still
    in flight on it ("Server disconnected"); the front must not lose a render that way."""
    url = server[0]
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, url, prompt="long", steps=48, **SLOW)
        time.sleep(0.5)
        calls = 0
        while not running.done() and calls < 250:
            assert httpx.post(f"{url}/info", json={}, timeout=60).status_code == 200
            calls += 1
        assert running.result().status_code == 200, f"after {calls} calls: {running.result().text}"
        assert calls > 110, f"only {calls} calls beside the render: make it longer"


def test_a_size_over_the_plan_is_a_400_naming_the_field_and_the_largest_side(server):
    response = post(server[0], prompt="too wide", width=1536, height=512, steps=1)
    assert response.status_code == 400
    body = response.json()
    assert body["detail"][0]["loc"] == ["width"] and "largest side: 1024" in body["error"]
    assert response.headers["x-request-id"]


def test_a_grpc_refusal_names_the_field_and_is_logged_with_its_id(server):
    _, _, log, target, _ = server
    stub = FluxGrpcClient(target).stub
    for rid, message, start in (
        ("grpc-wide-1", messages.GenerateRequest(prompt="too wide", width=1536, height=512), "width: 1536 is larger"),
        ("grpc-odd-2", messages.GenerateRequest(prompt="odd", width=100), "width: Input should be a multiple"),
    ):
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(message, metadata=[("x-request-id", rid)])
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith(start), error.value.details()
        assert f"[request {rid}] grpc refused (refused): {start}" in log.read_text()


def test_an_unknown_field_is_a_400_naming_it(server):
    response = post(server[0], prompt="fox", sede=7, **SMALL)
    assert response.status_code == 400
    assert ["sede"] in [error["loc"] for error in response.json()["detail"]]


def test_the_body_is_the_workers_bytes_unchanged(server, tiny_int8_tag):
    """The worker's image, as a renderer configured as the server renders it (compiled code rounds differently)."""
    pipe, _ = load_pipeline(bentoml.models.get(tiny_int8_tag).path)
    env = server[4]
    renderer = Renderer(pipe, Placement.resident(torch.device("cpu")), step_cache=env.get("FLUX_STEP_CACHE", "off"))
    if env.get("FLUX_COMPILE") == "blocks":
        renderer.compile_blocks([[WorkItem(prompt="warm-up", **SMALL)]])
    for image_format, media_type in (("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")):
        fields = dict(prompt="a fox", seed=3, format=image_format, quality=80, **SMALL)
        response = post(server[0], **fields)
        assert response.headers["content-type"] == media_type
        assert response.content == renderer.render([WorkItem(**fields)])[0].image
        assert Image.open(io.BytesIO(response.content)).format == image_format.upper()


def test_requests_sent_together_give_each_its_solo_bytes_when_served(server):
    """The batch promise over HTTP, as deployed (eager, and with FLUX_COMPILE=blocks and step caching: compiled
    code specialized for one row rounded differently from its code for more, until one row ran as two)."""
    url = server[0]
    asked = [dict(prompt=f"a fox {i}", seed=i, cache=cache, **SMALL) for i, cache in enumerate(CACHES * 2)]
    alone = [post(url, **fields).content for fields in asked]
    before = metric(url, "bentoml_service_adaptive_batch_size_count") - metric(
        url, "bentoml_service_adaptive_batch_size_bucket", le="1.0"
    )
    with ThreadPoolExecutor(len(asked)) as pool:
        together = [response.content for response in pool.map(lambda fields: post(url, **fields), asked)]
    batched = metric(url, "bentoml_service_adaptive_batch_size_count") - metric(
        url, "bentoml_service_adaptive_batch_size_bucket", le="1.0"
    )
    assert batched > before, "no two requests shared a batch"
    assert together == alone


CACHES = ("off", "balanced", "fast")


@pytest.mark.parametrize("poisoned", ["transformer", "vae"])
def test_inf_or_nan_gives_a_typed_failure_not_a_black_image(tiny_int8_tag, poisoned):
    """An overflow (what fp16 does to T5 or the VAE on cards without bf16) poisons the latents or the decoded
    image: the request fails as `non_finite`, and the next request still renders."""
    pipe, _ = load_pipeline(bentoml.models.get(tiny_int8_tag).path)
    renderer = Renderer(pipe, Placement.resident(torch.device("cpu")))
    layer = pipe.transformer.proj_out if poisoned == "transformer" else pipe.vae.decoder.conv_out
    healthy = layer.bias.data.clone()
    layer.bias.data.fill_(float("nan"))
    result = renderer.render([WorkItem(prompt="overflow", **SMALL)])[0]
    assert result.status == "non_finite" and not result.image, result
    assert ("latents" if poisoned == "transformer" else "decoded image") in result.message
    layer.bias.data.copy_(healthy)
    assert renderer.render([WorkItem(prompt="healthy again", **SMALL)])[0].ok


def test_the_request_id_is_echoed_and_in_the_log_lines_of_front_and_worker(server):
    url, _, log, _, _ = server
    response = post(url, prompt="traced", headers={"x-request-id": "trace-me-42"}, **SMALL)
    assert response.headers["x-request-id"] == "trace-me-42"
    generated = post(url, prompt="untraced", **SMALL).headers["x-request-id"]
    assert len(generated) == 32
    lines = [line for line in log.read_text().splitlines() if "[request trace-me-42]" in line]
    assert any("service.name=Flux)" in line for line in lines), lines  # the front's line
    assert any("service.name=FluxWorker)" in line for line in lines), lines  # the worker's line


def test_every_stage_is_measured(server):
    url = server[0]
    assert post(url, prompt="measured", **SMALL).status_code == 200
    for stage in ("queue_wait", "text_encode", "denoise", "decode", "image_encode"):
        assert metric(url, "flux_stage_seconds_count", stage=stage) > 0, stage
    assert metric(url, "flux_requests_total", protocol="http", outcome="ok") > 0
    assert metric(url, "flux_prompt_cache_total", result="miss") > 0


def test_every_step_is_counted_computed_or_reused_and_info_shows_the_policy(server):
    url, env = server[0], server[4]
    before = metric(url, "flux_steps_total")
    assert post(url, prompt="counted", **SMALL).status_code == 200
    assert metric(url, "flux_steps_total") - before == SMALL["steps"]
    info = httpx.post(f"{url}/info", json={}, timeout=60).json()
    assert info["step_cache"]["default"] == env.get("FLUX_STEP_CACHE", "off")
    assert info["compiled_blocks"]["enabled"] == (env.get("FLUX_COMPILE") == "blocks")


def worker_process(server_process) -> psutil.Process:
    return next(
        p for p in psutil.Process(server_process.pid).children(recursive=True) if "FluxWorker" in " ".join(p.cmdline())
    )


def test_livez_fails_while_the_worker_cannot_answer(server):
    url, process, _, _, _ = server
    worker = worker_process(process)
    assert httpx.get(f"{url}/livez", timeout=10).status_code == 200
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        assert httpx.get(f"{url}/livez", timeout=10).status_code == 503
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    assert httpx.get(f"{url}/livez", timeout=10).status_code == 200


def test_many_disconnects_leave_nothing_in_flight(server):
    url = server[0]
    threads = [
        threading.Thread(target=abandon, args=(url, 0.3), kwargs=dict(prompt=f"gone {i}", steps=6, **SLOW))
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    deadline = time.monotonic() + 5
    while metric(url, "flux_requests_in_flight") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(url, "flux_requests_in_flight") == 0
    assert post(url, prompt="still serving", **SMALL).status_code == 200
