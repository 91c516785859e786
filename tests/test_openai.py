"""The OpenAI-compatible Images API, driven with the official `openai` SDK against a real server with auth on."""

import base64

import bentoml
import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client import FluxGrpcClient
from service.launcher import start_server, stop, wait_ready
from service.schema import GenerationRequest
from tests.conftest import free_port, private_home
from tests.test_lifecycle import metric

KEY, FILE_KEY = "sk-flux-test-env", "sk-flux-test-file"
FAST = {"steps": 2}


@pytest.fixture(scope="module")
def server(tiny_int8_tag, tmp_path_factory):
    folder = tmp_path_factory.mktemp("openai")
    (folder / "keys").write_text(f"\n{FILE_KEY}\n")
    port, grpc_port, log = free_port(), free_port(), folder / "server.log"
    env = {
        "FLUX_ARTIFACT": tiny_int8_tag,
        "FLUX_GRPC_ADDRESS": f"127.0.0.1:{grpc_port}",
        "FLUX_MAX_RESOLUTION": "512",
        "FLUX_API_KEYS": f"{KEY}, other-key",
        "FLUX_API_KEYS_FILE": str(folder / "keys"),
        **private_home(folder / "home"),
    }
    process = start_server(port, log, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log, timeout_s=300)
        yield url, f"127.0.0.1:{grpc_port}"
    finally:
        stop(process)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(api_key=KEY, base_url=f"{server[0]}/v1", max_retries=0, timeout=300)


def model_name(tiny_int8_tag: str) -> str:
    return bentoml.models.get(tiny_int8_tag).tag.name


def test_n_images_are_one_batch_and_equal_single_renders_with_consecutive_seeds(server, client, tiny_int8_tag):
    url = server[0]
    batches_before = metric(url, "flux_batches_total", protocols="openai")
    response = client.images.generate(
        model=model_name(tiny_int8_tag),
        prompt="a red fox",
        n=3,
        size="256x256",
        response_format="b64_json",
        extra_body={**FAST, "seed": 7, "cache": "balanced"},
    )
    assert metric(url, "flux_batches_total", protocols="openai") == batches_before + 1
    images = [base64.b64decode(image.b64_json) for image in response.data]
    assert len(images) == 3 and all(image[:8] == b"\x89PNG\r\n\x1a\n" for image in images)
    singles = [
        httpx.post(
            f"{url}/txt2img",
            headers={"authorization": f"Bearer {KEY}"},
            timeout=300,
            json={"prompt": "a red fox", "width": 256, "height": 256, "seed": seed, "cache": "balanced", **FAST},
        ).content
        for seed in (7, 8, 9)
    ]
    assert images == singles
    assert len(set(images)) == 3


def test_output_format_and_default_model(client):
    response = client.images.generate(prompt="a jay", size="128x64", output_format="jpeg", extra_body=FAST)
    assert base64.b64decode(response.data[0].b64_json)[:3] == b"\xff\xd8\xff"
    assert response.output_format == "jpeg"


@pytest.mark.parametrize("size", ["100x100", "abc", "1024x1024"])  # not a multiple of 16; no size; over the plan
def test_a_bad_size_names_the_size(client, size):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a fox", size=size, extra_body=FAST)
    assert caught.value.param == "size" and caught.value.status_code == 400


def test_more_images_than_one_batch_names_n(client):
    with pytest.raises(openai.BadRequestError, match="at most") as caught:
        client.images.generate(prompt="a fox", n=64, size="256x256", extra_body=FAST)
    assert caught.value.param == "n"


def test_unknown_field_and_url_without_a_store_are_named(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a fox", size="256x256", extra_body={**FAST, "sede": 7})
    assert caught.value.param == "sede"
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a fox", size="256x256", extra_body={**FAST, "cache": "turbo"})
    assert caught.value.param == "cache"
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a fox", size="256x256", response_format="url", extra_body=FAST)
    assert caught.value.param == "response_format"


def test_a_body_that_is_not_valid_json_names_no_field(server):
    response = httpx.post(
        f"{server[0]}/v1/images/generations",
        content=b'{"prompt": "fox"',
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] is None and error["code"] == "invalid_json"
    assert error["message"].startswith("the body is not valid JSON")


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(model="dall-e-3", prompt="a fox", size="256x256", extra_body=FAST)
    assert caught.value.param == "model" and caught.value.code == "model_not_found"


def test_models_list_shows_the_artifact(client, tiny_int8_tag):
    models = client.models.list().data
    assert [model.id for model in models] == [model_name(tiny_int8_tag)]
    assert models[0].owned_by == "flux-serve" and models[0].created > 0


def test_keys_from_the_list_and_the_file_are_accepted_others_refused_probes_open(server):
    url = server[0]
    wrong = openai.OpenAI(api_key="wrong", base_url=f"{url}/v1", max_retries=0)
    for sent in ({}, {"Authorization": openai.omit}):  # a wrong key; none at all
        with pytest.raises(openai.AuthenticationError) as caught:
            wrong.images.generate(prompt="a fox", size="64x64", extra_body=FAST, extra_headers=sent)
        assert caught.value.code == "invalid_api_key"
    assert openai.OpenAI(api_key=FILE_KEY, base_url=f"{url}/v1", max_retries=0).models.list().data
    assert httpx.post(f"{url}/txt2img", json={"prompt": "a fox", "width": 64, "height": 64}).status_code == 401
    assert httpx.post(f"{url}/info", json={}).status_code == 401
    for probe in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(f"{url}{probe}").status_code == 200


def test_grpc_requires_a_key_and_health_stays_open(server):
    request = GenerationRequest(prompt="a fox", width=64, height=64, steps=1)
    with pytest.raises(grpc.RpcError) as caught:
        FluxGrpcClient(server[1]).generate(request, timeout_s=60)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert FluxGrpcClient(server[1], api_key=FILE_KEY).generate(request, timeout_s=120).image[:4] == b"\x89PNG"
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server[1]))
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
