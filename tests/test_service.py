"""A real BentoML server on 127.0.0.1 serving the tiny int8 artifact."""

import io
import os
import subprocess
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
def server(tiny_int8_tag, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {"FLUX_ARTIFACT": tiny_int8_tag, "FLUX_GRPC_ADDRESS": f"127.0.0.1:{free_port()}"}
    with running_server(free_port(), log, env=env) as url:
        yield url


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
    ({"prompt": "x" * 100_000}, "prompt"),
    ({"prompt": "fox", "guidance": -1}, "guidance"),
    ({"width": 128}, "prompt"),
]


@pytest.mark.parametrize("fields, field", BAD_INPUTS)
def test_bad_input_is_a_4xx_naming_the_field(server, fields, field):
    response = httpx.post(f"{server}/txt2img", json=fields, timeout=60)
    assert response.status_code == 400
    assert [field] in [error["loc"] for error in response.json()["detail"]]


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
