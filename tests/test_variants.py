"""FLUX.1-schnell beside FLUX.1-dev: artifacts record their variant, and the service takes its defaults and
bounds (steps, guidance, T5 tokens) from the artifact it serves."""

import json
from pathlib import Path

import bentoml
import grpc
import httpx
import pytest
import torch

from models.architecture import build_pipeline
from models.artifact import load_pipeline
from models.variants import VARIANTS
from service.client import FluxGrpcClient
from service.launcher import running_server
from service.runtime.placement import Placement
from service.runtime.render import Renderer
from service.schema import GenerationRequest, WorkItem
from tests.conftest import free_port, private_home, quantize_main, run_cli

SMALL = {"width": 128, "height": 128}


@pytest.fixture(scope="module")
def schnell_tag(tmp_path_factory) -> str:
    source = tmp_path_factory.mktemp("checkpoints") / "flux-tiny-schnell"
    build_pipeline("tiny-schnell").save_pretrained(source)
    result = run_cli(quantize_main, str(source), "--recipe", "int8", "--validation-size", "64")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_a_schnell_artifact_records_its_variant(schnell_tag, tiny_int8_tag):
    model = bentoml.models.get(schnell_tag)
    manifest = json.loads((Path(model.path) / "manifest.json").read_text())
    assert manifest["variant"] == "schnell" and model.info.labels["variant"] == "schnell"
    assert json.loads((Path(bentoml.models.get(tiny_int8_tag).path) / "manifest.json").read_text())["variant"] == "dev"


def renderer(tag: str) -> Renderer:
    return Renderer(load_pipeline(Path(bentoml.models.get(tag).path))[0], Placement.resident(torch.device("cpu")))


def test_unset_steps_and_guidance_take_the_served_variant_s_defaults(schnell_tag):
    schnell = renderer(schnell_tag)
    unset, explicit, fewer = schnell.render(
        [
            WorkItem(prompt="fox", seed=3, **SMALL),
            WorkItem(prompt="fox", seed=3, steps=4, guidance=0.0, **SMALL),
            WorkItem(prompt="fox", seed=3, steps=2, **SMALL),
        ]
    )
    assert unset.ok and unset.image == explicit.image != fewer.image
    assert schnell.variant is VARIANTS["schnell"] and schnell.variant.max_sequence_length == 256


@pytest.fixture(scope="module")
def schnell_server(schnell_tag, tmp_path_factory):
    folder = tmp_path_factory.mktemp("schnell-server")
    grpc_address = f"127.0.0.1:{free_port()}"
    env = {"FLUX_ARTIFACT": schnell_tag, "FLUX_GRPC_ADDRESS": grpc_address, **private_home(folder / "home")}
    with running_server(free_port(), folder / "server.log", env=env) as url:
        yield url, grpc_address


def txt2img(url: str, **fields) -> httpx.Response:
    return httpx.post(f"{url}/txt2img", json=fields, timeout=300)


def test_the_server_serves_schnell_with_its_own_defaults(schnell_server):
    url, grpc_address = schnell_server
    info = httpx.post(f"{url}/info", timeout=30).json()
    assert info["variant"] == "schnell"
    assert info["defaults"] == {"steps": 4, "guidance": 0.0, "max_steps": 12, "takes_guidance": False, "t5_tokens": 256}
    unset = txt2img(url, prompt="fox", seed=5, **SMALL)
    assert unset.status_code == 200, unset.text
    assert unset.content == txt2img(url, prompt="fox", seed=5, steps=4, guidance=0, **SMALL).content
    assert unset.content != txt2img(url, prompt="fox", seed=5, steps=2, **SMALL).content
    request = GenerationRequest(prompt="fox", seed=5, **SMALL)
    assert FluxGrpcClient(grpc_address).generate(request).image == unset.content


@pytest.mark.parametrize(
    "fields, field, phrase",
    [
        ({"guidance": 3.5}, "guidance", "FLUX.1-schnell has no guidance embedding"),
        ({"steps": 20}, "steps", "at most 12"),
        ({"prompt": "fox " * 300}, "prompt", "256 T5 tokens"),
    ],
)
def test_a_dev_only_request_on_schnell_is_a_400_naming_the_field(schnell_server, fields, field, phrase):
    url, grpc_address = schnell_server
    response = txt2img(url, **({"prompt": "fox"} | fields), **SMALL)
    assert response.status_code == 400, response.text
    assert response.json()["detail"][0]["loc"] == [field] and phrase in response.json()["error"]
    with pytest.raises(grpc.RpcError) as error:
        FluxGrpcClient(grpc_address).generate(GenerationRequest(**({"prompt": "fox"} | fields), **SMALL))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and phrase in error.value.details()
    openai = httpx.post(f"{url}/v1/images/generations", timeout=60, json={"prompt": "fox", "size": "256x256"} | fields)
    assert openai.status_code == 400 and openai.json()["error"]["param"] == field, openai.text
    assert txt2img(url, prompt="fox", **SMALL).status_code == 200
