"""Cards without bf16 (T4 sm75, V100 sm70): float16 compute made safe, and recipes a card cannot run refused at
start. No GPU here: the capability is simulated (FLUX_DEVICE_CAPABILITY), and float16 runs on the CPU."""

import io
import json
import math
import re
import shutil
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from models.architecture import build_pipeline
from models.artifact import ArtifactError, load_pipeline
from models.kernels import KERNELS, choose_dtype, kernel_note, refusal, runnable
from models.sizes import linear_layers
from quantize.recipes import RECIPES
from service.launcher import running_server, serve_command
from service.runtime.placement import Placement
from service.runtime.render import Renderer
from service.schema import WorkItem
from tests.conftest import free_port, private_home, run_module

LONG_PROMPT = "a red fox in fresh snow at dawn, photograph, " * 40  # past T5's 512 tokens: truncated, all read


def stored(tag: str) -> Path:
    return Path(bentoml.models.get(tag).path)


def psnr(a: bytes, b: bytes) -> float:
    x, y = (np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64) for png in (a, b))
    mse = ((x - y) ** 2).mean()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def test_every_recipe_has_its_kernel_rules():
    assert set(KERNELS) == set(RECIPES)


def test_the_capability_chooses_the_dtype_and_what_runs():
    assert choose_dtype("auto", None) == torch.bfloat16  # a CPU
    assert choose_dtype("auto", (7, 5)) == choose_dtype("auto", (7, 0)) == torch.float16
    assert choose_dtype("auto", (8, 0)) == choose_dtype("auto", (9, 0)) == torch.bfloat16
    assert choose_dtype("float16", (9, 0)) == torch.float16
    assert "sm75 has no native bf16" in refusal("int8", (7, 5), torch.bfloat16)
    assert "needs sm75+; this card is sm70" in refusal("int8-bnb", (7, 0), torch.float16)
    assert refusal("int8-bnb", (7, 5), torch.float16) is None and refusal("int8-bnb", None, torch.bfloat16) is None
    assert runnable((7, 0), torch.float16) == ["int8", "int4", "fp8", "nf4", "fp4", "gguf"]
    assert kernel_note("int4", (8, 0), torch.bfloat16).startswith("TinyGemm")
    assert "generic path" in kernel_note("int4", (7, 5), torch.float16)
    assert "generic path" in kernel_note("int4", (9, 0), torch.float16)  # TinyGemm takes bf16 activations only


@pytest.mark.slow  # about a minute: `make test-all`
def test_a_simulated_v100_refuses_llm_int8_at_start_naming_what_runs(tiny_tag):
    tag = tiny_tag("int8-bnb")
    result = run_module(
        *serve_command(free_port())[2:],
        env={"FLUX_ARTIFACT": tag, "FLUX_DEVICE_CAPABILITY": "7.0", "FLUX_GRPC_ADDRESS": f"127.0.0.1:{free_port()}"},
    )
    log = result.stdout + result.stderr
    reason = (
        rf"\[CRITICAL\] \[(service:FluxWorker)?:1\] {re.escape(tag)}: recipe int8-bnb runs LLM.int8\(\) int8 "
        r"matmul \(cuBLASLt\), which needs sm75\+; this card is sm70; recipes this card runs in float16: "
        r"int8, int4, fp8, nf4, fp4, gguf"
    )
    assert re.search(reason, log), log[-3000:]
    forced = run_module(
        *serve_command(free_port())[2:],
        env={
            "FLUX_ARTIFACT": tag,
            "FLUX_DEVICE_CAPABILITY": "7.5",
            "FLUX_COMPUTE_DTYPE": "bfloat16",
            "FLUX_GRPC_ADDRESS": f"127.0.0.1:{free_port()}",
        },
    )
    assert (
        "sm75 has no native bf16 (it needs sm80+): set FLUX_COMPUTE_DTYPE=float16 or auto"
        in forced.stdout + forced.stderr
    )


@pytest.fixture(scope="module")
def hot_t5_tag(tmp_path_factory) -> str:
    """The tiny model with T5 feed-forward outputs ~1.9e5, beyond float16's 65504 (T5-XXL's reach that on real
    prompts); the transformer int8, T5 kept in bf16, so the reference is the unquantized T5."""
    pipe = build_pipeline("tiny")
    with torch.no_grad():
        for block in pipe.text_encoder_2.encoder.block:
            block.layer[-1].DenseReluDense.wo.weight.mul_(1e5)
    source = tmp_path_factory.mktemp("checkpoints") / "flux-hot-t5"
    pipe.save_pretrained(source)
    result = run_module(
        "quantize",
        str(source),
        "--recipe",
        "int8",
        "--components",
        "transformer",
        "--skip-validation",
        "--name",
        "flux-hot-t5",
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_float16_keeps_t5_s_overflowing_layers_in_float32(hot_t5_tag):
    reference = load_pipeline(stored(hot_t5_tag))[0]
    ids = reference.tokenizer_2(
        [LONG_PROMPT], return_tensors="pt", padding="max_length", max_length=512, truncation=True
    ).input_ids
    with torch.no_grad():
        truth = reference.text_encoder_2.float()(ids).last_hidden_state
        ours = load_pipeline(stored(hot_t5_tag), dtype=torch.float16)[0].text_encoder_2(ids).last_hidden_state
        naive = reference.text_encoder_2.half()(ids).last_hidden_state  # everything in fp16: transformers clamps
    error = lambda x: ((x.float() - truth).norm() / truth.norm()).item()  # noqa: E731
    print(f"T5 in fp16 against fp32: ours {error(ours):.4f}, all-fp16 {error(naive):.4f}")
    assert torch.isfinite(ours).all() and error(ours) < 0.02
    assert error(naive) > 0.1  # the overflow this guards against is really there


def test_float16_pipelines_give_finite_images_for_long_prompts(hot_t5_tag, tiny_tag):
    """Every recipe family in float16 on the CPU: finite, and close to bf16 (PSNR stated on this machine)."""
    for tag in (hot_t5_tag, tiny_tag("int4"), tiny_tag("nf4")):
        images = {}
        for dtype in (torch.bfloat16, torch.float16):
            renderer = Renderer(load_pipeline(stored(tag), dtype=dtype)[0], Placement.resident(torch.device("cpu")))
            result = renderer.render([WorkItem(prompt=LONG_PROMPT, width=128, height=128, steps=4, seed=1)])[0]
            assert result.ok, result.message  # a non-finite latent or image would be a typed failure
            images[dtype] = result.image
        quality = psnr(images[torch.float16], images[torch.bfloat16])
        print(f"{tag}: fp16 vs bf16 image PSNR {quality:.1f} dB")
        assert quality > 30


@pytest.mark.slow  # over half a minute: `make test-all`
def test_a_simulated_t4_serves_in_float16(tiny_int8_tag, tmp_path):
    env = {
        "FLUX_ARTIFACT": tiny_int8_tag,
        "FLUX_DEVICE_CAPABILITY": "7.5",
        "FLUX_GRPC_ADDRESS": f"127.0.0.1:{free_port()}",
        **private_home(tmp_path / "home"),
    }
    item = WorkItem(prompt=LONG_PROMPT, width=128, height=128, steps=2, seed=3)
    with running_server(free_port(), tmp_path / "server.log", env=env) as url:
        card = httpx.post(f"{url}/info", timeout=30).json()["card"]
        response = httpx.post(
            f"{url}/txt2img", timeout=300, json=item.model_dump(include={"prompt", "width", "height", "steps", "seed"})
        )
    assert card == {
        "capability": "7.5",
        "compute_dtype": "float16",
        "kernels": "quanto int8 weights: dequantized, then a 16-bit matmul",
        "peak_memory_bytes": None,  # a CPU
    }
    assert response.status_code == 200, response.text
    in_process = Renderer(
        load_pipeline(stored(tiny_int8_tag), dtype=torch.float16)[0], Placement.resident(torch.device("cpu"))
    ).render([item])[0]
    assert response.content == in_process.image


def test_a_4bit_t5_wo_layer_from_an_older_artifact_is_refused(tiny_tag, tmp_path):
    folder = tmp_path / "old-nf4"
    shutil.copytree(stored(tiny_tag("nf4")), folder)
    mapping = folder / "text_encoder_2" / "quantization_map.json"
    entries = json.loads(mapping.read_text())
    assert not any(name.endswith(".wo") for name in entries)  # the 4-bit recipes keep it now
    entries["encoder.block.0.layer.1.DenseReluDense.wo"] = {"weights": "nf4"}
    mapping.write_text(json.dumps(entries))
    with pytest.raises(ArtifactError, match="DenseReluDense.wo is nf4, and transformers casts its input"):
        load_pipeline(folder, verify=False)


def test_recipe_memory_counts_t5_s_kept_layers_as_the_card_loads_them():
    nf4, int8 = RECIPES["nf4"], RECIPES["int8"]
    wo = sum(weights for name, (weights, _) in linear_layers("full", "text_encoder_2").items() if name.endswith(".wo"))
    assert (
        nf4.memory_bytes("full", "text_encoder_2", torch.float16) - nf4.memory_bytes("full", "text_encoder_2") == 2 * wo
    )
    assert int8.memory_bytes("full", "text_encoder_2", torch.float16) == int8.memory_bytes("full", "text_encoder_2")


def test_the_planner_table_refuses_llm_int8_on_a_v100_and_plans_the_t4_in_float16():
    from bench.planner import CARDS, decision

    v100, t4 = (next(card for card in CARDS if card.name.startswith(prefix)) for prefix in ("V100", "T4"))
    assert decision(v100, RECIPES["int8-bnb"]).startswith("refused: recipe int8-bnb runs LLM.int8()")
    assert decision(t4, RECIPES["int4"]).endswith("(no fused kernel)")
    assert decision(t4, RECIPES["nf4"]).startswith("resident")
