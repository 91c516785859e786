"""The trained toy model as users get it: quantized to int8 (its gate reading adherence), served, asked for
held-out prompts over HTTP and through the OpenAI API, and with its two LoRA adapters mixed in one batch."""

import base64
import io
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from bench.report import batch_histogram, batches_between
from models.toy import TRAINED
from models.toy.checker import adherence
from models.toy.scenes import held_out_prompts
from service.launcher import running_server
from service.pictures import png
from tests.conftest import free_port, private_home, quantize_main, run_cli, run_module
from tests.test_images_in import REFUSED, b64

JSON = {"Content-Type": "application/json"}

SCENES = held_out_prompts(20, things=1, seed=5)  # combinations training never drew
FEWER = SCENES[:8]  # for checks that each picture changes, not how often it is right
# The floor: 85 % of the prompts drawn entirely as asked (bench.quality: int8 draws about 95 % of 200),
# colour, place and background nearly always; a muted text path fails all of them.
MIN_ALL, MIN_READ = 0.85, 0.95


def drawn_as_asked(shares: dict[str, float]) -> bool:
    return shares["all"] >= MIN_ALL and min(shares[a] for a in ("colour", "position", "background")) >= MIN_READ


SIZE = {"width": 64, "height": 64}


def quantize(folder, *options: str):
    return run_cli(quantize_main, str(folder), "--recipe", "int8", *options)


@pytest.fixture(scope="module")
def toy_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    shutil.copytree(TRAINED, folder / "flux-toy")
    result = quantize(folder / "flux-toy", "--min-adherence", str(MIN_ALL))
    assert result.returncode == 0, result.stderr
    assert "adherence: the checker finds" in result.stdout
    tag = result.stdout.strip().splitlines()[-1]
    for style in ("outlined", "pastel"):
        added = run_cli(
            quantize_main,
            "lora",
            "add",
            str(TRAINED / "loras" / f"{style}.safetensors"),
            "--name",
            style,
            "--base",
            tag,
        )
        assert added.returncode == 0, added.stderr
    env = {
        "FLUX_ARTIFACT": tag,
        "FLUX_GRPC_ADDRESS": f"127.0.0.1:{free_port()}",
        "FLUX_MAX_IMAGE_BODY_MB": "1",  # the picture routes' own limit, low enough to try
        **private_home(folder / "home"),
    }
    with running_server(free_port(), folder / "server.log", env=env) as url:
        yield url


def txt2img(url: str, **fields) -> Image.Image:
    response = httpx.post(f"{url}/txt2img", json={**SIZE, **fields}, timeout=300)
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content))


def test_a_prompt_longer_than_the_toy_reads_is_refused_naming_the_toy(toy_server):
    response = httpx.post(f"{toy_server}/txt2img", json={**SIZE, "prompt": "a small red circle " * 10}, timeout=60)
    assert response.status_code == 400 and response.json()["detail"][0]["loc"] == ["prompt"], response.text
    message = response.json()["error"]
    assert "flux-toy-int8:" in message and "reads 40 T5 tokens" in message and "FLUX.1-dev" not in message, message


def test_held_out_prompts_are_drawn_as_asked_over_http(toy_server):
    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(lambda i: txt2img(toy_server, prompt=SCENES[i].caption(), seed=i), range(len(SCENES))))
    assert drawn_as_asked(adherence(SCENES, images)), adherence(SCENES, images)


def test_held_out_prompts_are_drawn_as_asked_through_the_openai_api_four_at_a_time(toy_server):
    client = openai.OpenAI(api_key="unused", base_url=f"{toy_server}/v1", max_retries=0, timeout=300)

    def four(index: int) -> list[Image.Image]:
        response = client.images.generate(
            prompt=SCENES[index].caption(), n=4, size="64x64", extra_body={"seed": 100 + 4 * index}
        )
        return [Image.open(io.BytesIO(base64.b64decode(image.b64_json))) for image in response.data]

    with ThreadPoolExecutor(2) as pool:
        images = [image for group in pool.map(four, range(len(SCENES) // 2)) for image in group]
    shares = adherence([scene for scene in SCENES[: len(SCENES) // 2] for _ in range(4)], images)
    assert drawn_as_asked(shares), shares


def test_the_adapters_are_mixed_in_one_batch_and_scale_zero_is_the_base(toy_server):
    """Every stack of the two style adapters in the same batches as plain requests: each changes the picture,
    and scale 0 is the base's bytes. (What they draw is judged by the checker's `style_adherence`, hue
    included: today's adapters fall short of it, issue 32.)"""
    stacks = {
        (): [],
        ("outlined",): [{"name": "outlined"}],
        ("pastel",): [{"name": "pastel"}],
        ("outlined", "pastel"): [{"name": "outlined"}, {"name": "pastel"}],
        "outlined at 0": [{"name": "outlined", "scale": 0.0}],
    }
    jobs = [(name, index) for index in range(len(FEWER)) for name in stacks]
    before = batch_histogram(httpx.get(f"{toy_server}/metrics").text)

    def draw(job: tuple) -> bytes:
        name, index = job
        response = httpx.post(
            f"{toy_server}/txt2img",
            json={**SIZE, "prompt": FEWER[index].caption(), "seed": index, "loras": stacks[name]},
            timeout=300,
        )
        assert response.status_code == 200, response.text
        return response.content

    with ThreadPoolExecutor(len(stacks)) as pool:
        drawn = dict(zip(jobs, pool.map(draw, jobs), strict=True))
    after = batch_histogram(httpx.get(f"{toy_server}/metrics").text)
    assert after[float("inf")] - before.get(float("inf"), 0) > after[1.0] - before.get(1.0, 0), "no batch mixed them"
    for name in list(stacks)[1:4]:
        assert all(drawn[name, index] != drawn[(), index] for index in range(len(FEWER))), name
    assert all(drawn["outlined at 0", index] == drawn[(), index] for index in range(len(FEWER)))


def test_the_gate_refuses_an_artifact_that_ignores_its_prompt(tmp_path):
    """T5's output zeroed: the pictures no longer follow the text, and --min-adherence stores nothing."""
    shutil.copytree(TRAINED, tmp_path / "flux-toy-mute")
    path = tmp_path / "flux-toy-mute" / "text_encoder_2" / "model.safetensors"
    tensors = load_file(path)
    tensors["encoder.final_layer_norm.weight"] = torch.zeros_like(tensors["encoder.final_layer_norm.weight"])
    save_file(tensors, path)
    result = quantize(tmp_path / "flux-toy-mute", "--min-adherence", str(MIN_ALL), "--name", "toy-mute")
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"is below --min-adherence {MIN_ALL:.2f}; nothing was stored" in result.stderr
    assert "toy-mute" not in run_module("bentoml", "models", "list").stdout


# --- images in ---------------------------------------------------------------------------------------------

PICTURE = base64.b64encode(png(held_out_prompts(1, things=1, seed=9)[0].draw())).decode()
MASK = Image.new("L", (64, 64), 0)
MASK.paste(255, (32, 32, 64, 64))  # the bottom right quarter is repainted
IMAGE_REQUESTS = {
    "text": ("/txt2img", {}),
    "img2img 0.3": ("/img2img", {"image": PICTURE, "strength": 0.3}),
    "img2img 0.7": ("/img2img", {"image": PICTURE, "strength": 0.7}),
    "inpainting": ("/img2img", {"image": PICTURE, "mask": base64.b64encode(png(MASK)).decode(), "strength": 1.0}),
    "img2img with a stack": ("/img2img", {"image": PICTURE, "strength": 0.6, "loras": [{"name": "outlined"}]}),
    "text, cache fast": ("/txt2img", {"cache": "fast"}),
    "inpainting, cache fast": (
        "/img2img",
        {"image": PICTURE, "mask": base64.b64encode(png(MASK)).decode(), "strength": 0.8, "cache": "fast"},
    ),
}


def post(url: str, route: str, **fields) -> httpx.Response:
    return httpx.post(f"{url}{route}", json={**SIZE, "prompt": SCENES[0].caption(), **fields}, timeout=300)


def test_a_mixed_batch_of_text_and_image_requests_gives_each_its_solo_bytes(toy_server):
    """Text-to-image, img2img at two strengths, inpainting, a LoRA stack and a step cache policy, sent together
    (in batches, the metrics show) and alone: the same bytes, on a served deployment."""
    jobs = [(name, seed) for seed in range(3) for name in IMAGE_REQUESTS]

    def draw(job: tuple) -> bytes:
        name, seed = job
        route, fields = IMAGE_REQUESTS[name]
        response = post(toy_server, route, seed=seed, **fields)
        assert response.status_code == 200, response.text
        return response.content

    alone = {job: draw(job) for job in jobs}
    before = batch_histogram(httpx.get(f"{toy_server}/metrics").text)
    with ThreadPoolExecutor(len(IMAGE_REQUESTS)) as pool:
        together = dict(zip(jobs, pool.map(draw, jobs), strict=True))
    after = batch_histogram(httpx.get(f"{toy_server}/metrics").text)
    assert after[float("inf")] - before.get(float("inf"), 0) > after[1.0] - before.get(1.0, 0), "no batch mixed them"
    assert [job for job in jobs if together[job] != alone[job]] == []
    assert len({alone[name, 0] for name in IMAGE_REQUESTS}) == len(IMAGE_REQUESTS)  # each differs from the others


@pytest.mark.parametrize("name", REFUSED)
def test_a_bad_picture_over_http_is_refused_naming_the_field_and_the_server_serves_on(toy_server, name):
    response = post(toy_server, "/img2img", image=b64(REFUSED[name]))
    assert response.status_code == 400, response.text
    assert ["image"] in [error["loc"] for error in response.json()["detail"]], response.json()
    assert post(toy_server, "/img2img", image=PICTURE, strength=0.3).status_code == 200


def test_picture_routes_have_their_own_body_limit(toy_server):
    """/img2img takes bodies over the text routes' 64 KB, up to its own limit (1 MB here): 413 above it."""
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8))
    big = base64.b64encode(png(noise)).decode()  # ~100 KB of base64
    assert len(big) > 64 * 1024
    assert post(toy_server, "/img2img", image=big, strength=0.3).status_code == 200
    assert post(toy_server, "/txt2img", padding=big).status_code == 413
    huge = httpx.post(f"{toy_server}/img2img", content=b"{" + b" " * 2**20 + b"}", timeout=60, headers=JSON)
    assert huge.status_code == 413, huge.text


def test_openai_images_edit_renders_n_images_in_one_batch_as_our_route_does(toy_server):
    """The official SDK's `images.edit` with an image and a mask (OpenAI's convention: repaint where the mask is
    transparent): n images from one call, each the bytes of /img2img with the same seed, mask in ours."""
    picture = held_out_prompts(1, things=1, seed=9)[0].draw().convert("RGBA")
    openai_mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    openai_mask.paste((0, 0, 0, 0), (32, 32, 64, 64))  # transparent: repainted
    client = openai.OpenAI(api_key="unused", base_url=f"{toy_server}/v1", max_retries=0, timeout=300)
    before = batch_histogram(httpx.get(f"{toy_server}/metrics").text)
    response = client.images.edit(
        image=("in.png", png(picture), "image/png"),
        mask=("mask.png", png(openai_mask), "image/png"),
        prompt=SCENES[0].caption(),
        n=3,
        size="64x64",
        extra_body={"seed": 40},
    )
    batches = batches_between(before, batch_histogram(httpx.get(f"{toy_server}/metrics").text))
    assert sum(batches.values()) == 1, batches  # the three images were one call of the worker: one batch
    edited = [base64.b64decode(image.b64_json) for image in response.data]
    ours = [
        post(toy_server, "/img2img", image=b64(png(picture)), mask=b64(png(MASK)), strength=1.0, seed=40 + k).content
        for k in range(3)
    ]
    assert edited == ours and len(set(edited)) == 3
