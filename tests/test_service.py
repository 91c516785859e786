"""A real BentoML server on 127.0.0.1 serving the tiny int8 artifact."""

import io
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import bentoml
import httpx
import pytest
import torch
from PIL import Image

from bench.report import batch_histogram
from models.artifact import load_pipeline
from service.launcher import REPO, running_server, serve_command
from service.runtime.placement import Placement
from service.runtime.render import Renderer
from service.schema import WorkItem
from tests.conftest import free_port

SMALL = dict(width=128, height=128, steps=2)


@pytest.fixture(scope="module")
def served(tiny_int8_tag, tmp_path_factory):
    """The server's URL and its log."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {
        "FLUX_ARTIFACT": tiny_int8_tag,
        "FLUX_GRPC_ADDRESS": f"127.0.0.1:{free_port()}",
        "FLUX_MAX_RESOLUTION": "1024",  # a side beyond it is refused after validation, before defaults
    }
    with running_server(free_port(), log, env=env) as url:
        yield url, log


@pytest.fixture(scope="module")
def server(served) -> str:
    return served[0]


def txt2img(url: str, **fields) -> httpx.Response:
    return httpx.post(f"{url}/txt2img", json=fields, timeout=300)


def assert_png(response: httpx.Response, size: tuple[int, int]) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG" and image.size == size


def test_sixteen_concurrent_requests_are_batched(server):
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: txt2img(server, prompt=f"fox {i}", seed=i, **SMALL), range(16)))
    for response in responses:
        assert_png(response, (128, 128))
    buckets = batch_histogram(httpx.get(f"{server}/metrics").text)
    assert buckets, "no batch-size metric"
    batches_of_one = buckets[1.0]
    assert buckets[float("inf")] > batches_of_one, f"every batch had one request: {buckets}"


def test_a_seed_gives_the_same_image_alone_or_in_a_batch(server):
    alone = txt2img(server, prompt="fox 5", seed=5, **SMALL)
    with ThreadPoolExecutor(8) as pool:
        crowd = list(pool.map(lambda i: txt2img(server, prompt=f"fox {i}", seed=i, **SMALL), range(8)))
    assert alone.content == crowd[5].content
    assert crowd[4].content != crowd[5].content


def test_mixed_shapes_in_one_batch_match_single_renders(tiny_int8_tag):
    pipe, _ = load_pipeline(bentoml.models.get(tiny_int8_tag).path)
    renderer = Renderer(pipe, Placement.resident(torch.device("cpu")))
    requests = [
        WorkItem(prompt="a", seed=1, **SMALL),
        WorkItem(prompt="b", seed=2, width=64, height=128, steps=2),
        WorkItem(prompt="c", seed=3, **SMALL),
    ]
    batched = [result.image for result in renderer.render(requests)]
    assert batched == [renderer.render([request])[0].image for request in requests]
    assert Image.open(io.BytesIO(batched[1])).size == (64, 128)


BAD_INPUTS = [
    ({"prompt": "fox", "width": 100}, "width"),
    ({"prompt": "fox", "steps": 0}, "steps"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 3000}, "prompt"),  # over 2000 characters, within the body limit
    ({"prompt": "fox", "guidance": -1}, "guidance"),
    ({"width": 128}, "prompt"),
    ({"prompt": "fox", "seed": True}, "seed"),
    ({"prompt": "fox", "width": "64"}, "width"),
    ({"prompt": "fox", "width": 64.0}, "width"),
    ({"prompt": "fox", "steps": 1.0}, "steps"),
    ({"prompt": "fox", "quality": "90"}, "quality"),
    ({"prompt": "fox", "guidance": True}, "guidance"),
    ({"prompt": "a fox\x00"}, "prompt"),
    ({"prompt": "a \x1b[31mred\x1b[0m fox"}, "prompt"),
    ({"prompt": "fox", "cache": "turbo"}, "cache"),
]


@pytest.mark.parametrize("fields, field", BAD_INPUTS)
def test_bad_input_is_a_4xx_naming_the_field(server, fields, field):
    response = httpx.post(f"{server}/txt2img", json=fields, timeout=60)
    assert response.status_code == 400
    assert [field] in [error["loc"] for error in response.json()["detail"]]


def test_a_request_leaving_steps_unset_logs_its_outcome_line(served):
    """The outcome line operators grep for, for the default request (steps filled in from the model) and for
    one refused before its defaults were known; never a logging traceback."""
    url, log = served
    ok = httpx.post(f"{url}/txt2img", json={"prompt": "default steps", "width": 64, "height": 64}, timeout=300)
    refused = httpx.post(f"{url}/txt2img", json={"prompt": "too wide", "width": 2048, "height": 64}, timeout=60)
    assert ok.status_code == 200 and refused.status_code == 400, refused.text
    text = log.read_text()
    assert f"[request {ok.headers['x-request-id']}] http 1× 64x64 28 steps: ok" in text
    assert f"[request {refused.headers['x-request-id']}] http 1× 2048x64 default steps: refused" in text
    assert "Logging error" not in text


def test_a_400_carries_a_request_id_and_is_logged_with_it(served):
    url, log = served
    response = httpx.post(f"{url}/txt2img", json={"prompt": "fox", "seed": True}, timeout=60)
    rid = response.headers["x-request-id"]
    assert response.status_code == 400 and len(rid) >= 16
    assert f"[request {rid}] POST /txt2img: 400" in log.read_text()
    offered = httpx.post(f"{url}/txt2img", json={"width": 1}, headers={"x-request-id": "mine-42"}, timeout=60)
    assert offered.status_code == 400 and offered.headers["x-request-id"] == "mine-42"


@pytest.mark.parametrize(
    "path, body, content_type",
    [
        ("/txt2img", b"prompt=a&width=64", "application/x-www-form-urlencoded"),
        ("/txt2img", b'{"prompt": "fox"}', "text/plain"),
        ("/txt2img", b'{"prompt": "fox"}', None),
        ("/v1/images/generations", b'{"prompt": "fox"}', "text/plain"),
    ],
)
def test_a_body_that_is_not_json_is_a_415(server, path, body, content_type):
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(f"{server}{path}", content=body, headers=headers, timeout=60)
    assert response.status_code == 415, response.text
    assert "JSON" in response.text and response.headers["x-request-id"]


def test_a_body_over_the_limit_is_a_413_before_it_is_read(server):
    prompt = "x" * (64 * 1024)  # FLUX_MAX_BODY_KB: 64
    response = httpx.post(f"{server}/txt2img", json={"prompt": prompt}, timeout=60)
    assert response.status_code == 413 and "over this route's 65536" in response.text

    def chunks():  # no content-length: the limit is counted as the body arrives
        yield from [b'{"prompt": "' + b"x" * 16384] * 8

    chunked = httpx.post(f"{server}/txt2img", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413, chunked.text
    assert_png(txt2img(server, prompt="still here", **SMALL), (128, 128))


def test_malformed_json_is_a_400_and_the_server_keeps_serving(server):
    response = httpx.post(
        f"{server}/txt2img", content=b'{"prompt": "fox"', timeout=60, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "JSON" in response.text
    assert_png(txt2img(server, prompt="still here", **SMALL), (128, 128))


def test_info_describes_the_served_artifact(server, tiny_int8_tag):
    info = httpx.post(f"{server}/info", json={}, timeout=60).json()
    assert info["artifact"] == tiny_int8_tag and info["recipe"] == "int8"


def test_unknown_artifact_stops_the_server_with_a_clear_error():
    result = subprocess.run(
        serve_command(free_port()),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FLUX_ARTIFACT": "no-such:v1"},
    )
    assert result.returncode != 0
    assert "FLUX_ARTIFACT='no-such:v1': no such model in the BentoML store" in result.stderr


def test_only_the_worker_loads_torch_and_diffusers(tiny_int8_tag):
    """`bentoml serve` imports the service module in the arbiter and in the front's process too: there it
    must stay light (a second or so), as every server start and `bentoml build` waits on it."""
    probe = "import sys, service.service; print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FLUX_ARTIFACT": tiny_int8_tag},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
