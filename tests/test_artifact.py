"""The artifact round trip: what is quantized before save is what runs after load."""

import json

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel

from models.architecture import build_module
from models.artifact import ArtifactError, load_pipeline, load_quantized, read_manifest, save_quantized
from quantize.recipes import RECIPES, apply_recipe, quantize_component


def transformer_inputs(config, tokens: int = 64, text: int = 32) -> dict:
    generator = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=generator).to(torch.bfloat16)  # noqa: E731
    return dict(hidden_states=randn(1, tokens, config.in_channels),
                encoder_hidden_states=randn(1, text, config.joint_attention_dim),
                pooled_projections=randn(1, config.pooled_projection_dim),
                timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3))


@pytest.mark.parametrize("recipe", ["int8", "int4"])
def test_medium_transformer_round_trip_is_exact(recipe, tmp_path):
    """Real FLUX.1-dev layer shapes; int8 data read back unaligned used to crash the int8 matmul."""
    torch.manual_seed(0)
    transformer = build_module("medium", "transformer").to(torch.bfloat16).eval()
    quantize_component(transformer, "transformer", RECIPES[recipe])
    inputs = transformer_inputs(transformer.config)
    with torch.no_grad():
        before = transformer(**inputs).sample
    save_quantized(transformer, tmp_path / "transformer")
    del transformer
    loaded = load_quantized(FluxTransformer2DModel, tmp_path / "transformer", torch.bfloat16)
    with torch.no_grad():
        after = loaded(**inputs).sample
    assert torch.isfinite(after).all()
    assert torch.equal(before, after)


def render(pipe, seed: int = 3) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red fox", height=128, width=128, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(seed)).images[0]
    return np.asarray(image)


def test_tiny_pipeline_round_trip_gives_the_same_image(tiny_source, tiny_int8_tag, tiny_int4_tag, tiny_fp8_tag):
    import bentoml

    from models.architecture import build_pipeline

    for tag, weights in ((tiny_int8_tag, "qint8"), (tiny_int4_tag, "qint4"), (tiny_fp8_tag, "qfloat8_e4m3fn")):
        folder = bentoml.models.get(tag).path
        loaded, manifest = load_pipeline(folder)
        assert manifest.components["transformer"].quantization["weights"] == weights
        before_save = build_pipeline("tiny")  # the same weights the source folder holds
        apply_recipe(before_save, RECIPES[manifest.recipe])
        assert np.array_equal(render(before_save), render(loaded))


@pytest.fixture
def artifact_copy(tiny_int8_tag, tmp_path):
    import shutil

    import bentoml

    return shutil.copytree(bentoml.models.get(tiny_int8_tag).path, tmp_path / "artifact")


def test_altered_file_is_named(artifact_copy):
    weights = artifact_copy / "transformer" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="transformer/model.safetensors: sha256 mismatch"):
        load_pipeline(artifact_copy)


def test_truncated_and_missing_files_are_named(artifact_copy):
    weights = artifact_copy / "text_encoder_2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="text_encoder_2/model.safetensors"):
        load_pipeline(artifact_copy)
    weights.unlink()
    with pytest.raises(ArtifactError, match="text_encoder_2/model.safetensors: listed in the manifest but missing"):
        load_pipeline(artifact_copy)


def test_newer_schema_is_refused(artifact_copy):
    manifest_path = artifact_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["schema_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="schema version 99 is newer"):
        read_manifest(artifact_copy)


def test_manifest_records_provenance(tiny_source, artifact_copy):
    manifest = read_manifest(artifact_copy)
    assert manifest.source == str(tiny_source)
    assert manifest.source_revision.startswith("sha256:")
    assert set(manifest.libraries) >= {"torch", "diffusers", "optimum-quanto"}
    assert all(len(digest) == 64 for digest in manifest.files.values())
    assert manifest.components["transformer"].bytes < manifest.components["vae"].bytes


def test_recipe_mismatch_names_the_quantization_map(artifact_copy):
    manifest_path = artifact_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["components"]["transformer"]["quantization"]["weights"] = "qint4"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"transformer/quantization_map.json: weights \['qint8'\] but the manifest"):
        load_pipeline(artifact_copy)


def test_unknown_backend_is_refused(artifact_copy):
    manifest_path = artifact_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["backend"] = "bitsandbytes"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="manifest.json: backend 'bitsandbytes' is not one this reader loads"):
        load_pipeline(artifact_copy)
