"""GGUF checkpoints in: streamed into any recipe (dequantized by the gguf package), or kept as they are (the
`gguf` recipe and backend: diffusers' GGUF Linear over the file's own blocks), and served."""

import io
from pathlib import Path

import bentoml
import httpx
import pytest
import torch
from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig
from diffusers.quantizers.gguf.utils import GGUFLinear, _dequantize_gguf_and_restore_linear
from PIL import Image

from models.artifact import load_pipeline
from models.gguf_file import GGUFTransformer, gguf_from_diffusers
from quantize.recipes import RECIPES, quantize_model
from service.launcher import running_server
from service.runtime.placement import Placement
from service.runtime.render import Renderer
from service.schema import WorkItem
from tests.conftest import free_port, private_home, run_module
from tests.test_artifact import transformer_inputs

GGML_TYPES = ("Q8_0", "Q4_0")  # the gguf package quantizes these (K-quants it only dequantizes)


@pytest.fixture(scope="module")
def gguf_files(medium_source, tmp_path_factory) -> dict[str, Path]:
    """The medium transformer as GGUF files, made the way city96's are (gguf package, BFL layout)."""
    folder = tmp_path_factory.mktemp("gguf")
    return {
        kind: gguf_from_diffusers(medium_source / "transformer", folder / f"flux-medium-{kind}.gguf", kind)
        for kind in GGML_TYPES
    }


@pytest.fixture(scope="module")
def gguf_tags(gguf_files, medium_source) -> dict[tuple[str, str], str]:
    """(GGML type, recipe) -> the artifact `python -m quantize FILE.gguf --base ... --recipe ...` stored."""
    tags = {}
    for kind, path in gguf_files.items():
        for recipe in ("gguf", "int8"):
            result = run_module(
                "quantize", str(path), "--base", str(medium_source), "--recipe", recipe, "--skip-validation"
            )
            assert result.returncode == 0, result.stderr
            tags[kind, recipe] = result.stdout.strip().splitlines()[-1]
    return tags


def diffusers_gguf(path: Path, medium_source: Path) -> FluxTransformer2DModel:
    """The reference: diffusers reads the file itself (its own key converter and dequantizer)."""
    return FluxTransformer2DModel.from_single_file(
        str(path),
        config=str(medium_source),
        subfolder="transformer",
        dtype=torch.bfloat16,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16),
    ).eval()


def stored(tag: str) -> Path:
    return Path(bentoml.models.get(tag).path)


def output(transformer: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**transformer_inputs(transformer.config)).sample.float()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", GGML_TYPES)
def test_the_gguf_recipe_keeps_the_blocks_and_computes_what_diffusers_does(kind, gguf_files, gguf_tags, medium_source):
    pipe, manifest = load_pipeline(stored(gguf_tags[kind, "gguf"]))
    assert manifest.backend == "gguf" and manifest.components["transformer"].quantization["weights"] == "gguf"
    blocks = {module.weight.quant_type.name for module in pipe.transformer.modules() if isinstance(module, GGUFLinear)}
    assert blocks == {kind}
    transformer_bytes = manifest.components["transformer"].bytes
    assert abs(transformer_bytes / gguf_files[kind].stat().st_size - 1) < 0.05  # the file's blocks, not re-encoded
    assert torch.equal(output(pipe.transformer), output(diffusers_gguf(gguf_files[kind], medium_source)))


@pytest.mark.parametrize("kind", GGML_TYPES)
def test_a_gguf_file_streams_into_int8_within_int8_s_own_error(kind, gguf_files, gguf_tags, medium_source):
    """Tolerance: quantizing the dequantized source to int8 in memory is the floor; ours may differ from it only
    by the dequantization's rounding (the gguf package in float32, diffusers via float16: one bf16 step on a
    few % of the weights), so its error may exceed the floor by at most a quarter, plus 0.2 %."""
    reference = diffusers_gguf(gguf_files[kind], medium_source)
    _dequantize_gguf_and_restore_linear(reference)
    ours = GGUFTransformer(gguf_files[kind])
    for name, weight in reference.state_dict().items():  # every tensor within one bf16 step of diffusers'
        torch.testing.assert_close(ours.get(name).to(torch.bfloat16), weight, rtol=2**-7, atol=0)
    dequantized = output(reference)
    quantize_model(reference, "transformer", RECIPES["int8"])
    floor = relative(output(reference), dequantized)
    streamed = load_pipeline(stored(gguf_tags[kind, "int8"]))[0].transformer
    error = relative(output(streamed), dequantized)
    print(f"{kind} -> int8: {error:.4f} relative L2 against the dequantized source (in-memory int8: {floor:.4f})")
    assert error <= 1.25 * floor + 0.002


def flat(text: str) -> str:
    """Rich wraps long lines: the words, one space apart."""
    return " ".join(text.split())


def test_bad_gguf_sources_are_refused_naming_the_file(medium_source, gguf_files, tmp_path):
    truncated = tmp_path / "flux-truncated.gguf"
    truncated.write_bytes(gguf_files["Q8_0"].read_bytes()[:100_000])
    before = {str(model.tag) for model in bentoml.models.list()}
    result = run_module(
        "quantize", str(truncated), "--base", str(medium_source), "--recipe", "gguf", "--skip-validation"
    )
    assert result.returncode == 2 and "flux-truncated.gguf: unreadable GGUF file" in flat(result.stderr), result.stderr
    result = run_module("quantize", str(medium_source), "--recipe", "gguf", "--skip-validation")
    assert result.returncode == 2 and "is not a .gguf transformer" in flat(result.stderr), result.stderr
    assert "writing" not in result.stderr  # refused before anything was written
    assert {str(model.tag) for model in bentoml.models.list()} == before


def test_a_gguf_artifact_serves_what_it_renders_in_process(gguf_tags, tmp_path):
    tag = gguf_tags["Q4_0", "gguf"]
    item = WorkItem(prompt="a lighthouse", seed=2, width=128, height=128, steps=2)
    solo = Renderer(load_pipeline(stored(tag))[0], Placement.resident(torch.device("cpu"))).render([item])[0]
    env = {"FLUX_ARTIFACT": tag, "FLUX_WARMUP_SIZE": "128", **private_home(tmp_path / "home")}
    with running_server(free_port(), tmp_path / "server.log", env=env) as url:
        info = httpx.post(f"{url}/info", timeout=30).json()
        response = httpx.post(
            f"{url}/txt2img", json=item.model_dump(include={"prompt", "seed", "width", "height", "steps"}), timeout=300
        )
    assert info["backend"] == "gguf" and info["recipe"] == "gguf"
    assert response.status_code == 200, response.text
    assert response.content == solo.image and Image.open(io.BytesIO(response.content)).size == (128, 128)
