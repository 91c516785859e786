"""The artifact round trip: what is quantized before save is what runs after load."""

import json

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel

from models.architecture import build_module, build_pipeline
from models.artifact import ArtifactError, Component, load_module, load_pipeline, read_manifest, sha256_file
from models.source import Source
from models.tensors import ShardWriter, read_shards
from quantize.recipes import RECIPES, apply_recipe, quantize_model
from quantize.stream import write_component


def transformer_inputs(config, tokens: int = 64, text: int = 32) -> dict:
    generator = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=generator).to(torch.bfloat16)  # noqa: E731
    return dict(
        hidden_states=randn(1, tokens, config.in_channels),
        encoder_hidden_states=randn(1, text, config.joint_attention_dim),
        pooled_projections=randn(1, config.pooled_projection_dim),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(text, 3),
    )


@pytest.fixture(scope="module")
def medium_source(tmp_path_factory) -> Source:
    """A diffusers-layout folder holding the medium transformer (real FLUX.1-dev shapes) in several shards."""
    folder = tmp_path_factory.mktemp("medium")
    torch.manual_seed(0)
    build_module("medium", "transformer").to(torch.bfloat16).save_pretrained(
        folder / "transformer", max_shard_size="400MB"
    )
    return Source(id=str(folder), revision="test", path=folder)


@pytest.mark.parametrize("recipe", ["int8", "int4", "nf4", "int8-bnb"])
def test_medium_transformer_streamed_then_loaded_equals_quantized_in_memory(recipe, medium_source, tmp_path):
    """Streamed from a sharded source into shards; unaligned int8 data read back used to crash the int8 matmul."""
    assert len(list((medium_source.path / "transformer").glob("*.safetensors"))) > 1
    entry = write_component(medium_source, "transformer", tmp_path, RECIPES[recipe], shard_bytes=128 << 20)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    component = Component(class_name="FluxTransformer2DModel", dtype="bfloat16", quantization=entry, bytes=0)
    loaded = load_module(FluxTransformer2DModel, tmp_path, component)
    in_memory = FluxTransformer2DModel.from_pretrained(medium_source.path / "transformer", dtype=torch.bfloat16)
    quantize_model(in_memory.eval(), "transformer", RECIPES[recipe])
    assert type(loaded.proj_out) is torch.nn.Linear  # the recipe keeps it in bf16
    assert type(loaded.transformer_blocks[0].attn.to_q) is type(in_memory.transformer_blocks[0].attn.to_q)
    assert type(loaded.transformer_blocks[0].attn.to_q) is not torch.nn.Linear
    inputs = transformer_inputs(loaded.config)
    with torch.no_grad():
        before, after = in_memory(**inputs).sample, loaded(**inputs).sample
    assert torch.isfinite(after).all()
    assert torch.equal(before, after)


def test_int4_group_size_is_recorded_and_layers_that_do_not_fit_stay_bf16(medium_source, tmp_path):
    recipe = RECIPES["int4"].tailored(None, {}, group_size=256)
    entry = write_component(medium_source, "transformer", tmp_path, recipe)
    quantization = json.loads((tmp_path / "quantization_map.json").read_text())
    assert {e["group_size"] for e in quantization.values()} == {256}
    assert "x_embedder" in entry["kept_in_bf16"].split(",")  # 64 inputs: no whole group of 256
    assert "x_embedder" not in quantization and "transformer_blocks.0.attn.to_q" in quantization
    component = Component(class_name="FluxTransformer2DModel", dtype="bfloat16", quantization=entry, bytes=0)
    loaded = load_module(FluxTransformer2DModel, tmp_path, component)
    assert loaded.transformer_blocks[0].attn.to_q.weight_group_size == 256


def render(pipe, seed: int = 3) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red fox", height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(seed)
    ).images[0]
    return np.asarray(image)


@pytest.mark.slow  # a quantize run per recipe; tests/test_legacy_artifacts.py renders every format in the fast tier
@pytest.mark.parametrize("recipe", sorted(set(RECIPES) - {"gguf"}))  # gguf needs a GGUF source: tests/test_gguf.py
def test_every_recipe_round_trips_a_pipeline_to_the_same_image(recipe, tiny_tag):
    """save -> load gives what the same recipe gives in memory, image for image."""
    import bentoml

    loaded, manifest = load_pipeline(bentoml.models.get(tiny_tag(recipe)).path)
    assert manifest.components["transformer"].quantization["weights"] == RECIPES[recipe].weights
    before_save = build_pipeline("tiny")  # the same weights the source folder holds
    apply_recipe(
        before_save,
        RECIPES[manifest.recipe].tailored(None, {}, manifest.components["transformer"].quantization["group_size"]),
    )
    assert np.array_equal(render(before_save), render(loaded))


@pytest.fixture
def artifact_copy(tiny_int8_tag, tmp_path):
    import shutil

    import bentoml

    return shutil.copytree(bentoml.models.get(tiny_int8_tag).path, tmp_path / "artifact")


def test_altered_file_is_named(artifact_copy):
    weights = artifact_copy / "transformer" / "model-00001.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="transformer/model-00001.safetensors: sha256 mismatch"):
        load_pipeline(artifact_copy)


def test_truncated_and_missing_files_are_named(artifact_copy):
    weights = artifact_copy / "text_encoder_2" / "model-00001.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="text_encoder_2/model-00001.safetensors"):
        load_pipeline(artifact_copy)
    weights.unlink()
    with pytest.raises(
        ArtifactError, match="text_encoder_2/model-00001.safetensors: listed in the manifest but missing"
    ):
        load_pipeline(artifact_copy)


def test_shards_read_back_as_aligned_views_and_a_bad_header_is_named(tmp_path):
    """Whole-sized tensors are read as views of their shard's buffer; odd-sized ones (which would misalign
    what follows them) are written to a shard of their own and copied into aligned memory on load."""
    written = {
        "a": torch.arange(3, dtype=torch.int8),
        "b": torch.randn(5).to(torch.bfloat16),
        "c": torch.randn(2, 3),
        "d": torch.ones((), dtype=torch.int64),
        "w": torch.randn(64, 16).to(torch.bfloat16),
        "q": torch.ones(128, 4, dtype=torch.int8),
    }
    writer = ShardWriter(tmp_path)
    writer.add(written)
    writer.close()
    read = read_shards(tmp_path)
    assert set(read) == set(written) and all(
        torch.equal(read[k], v) and read[k].dtype == v.dtype for k, v in written.items()
    )
    assert all(tensor.data_ptr() % 16 == 0 for tensor in read.values())
    assert read["w"].untyped_storage().data_ptr() == read["q"].untyped_storage().data_ptr()  # one buffer, no copy
    assert (
        json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]["w"]
        == "model-00001.safetensors"
    )
    shard = tmp_path / "model-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:10] = b"[["  # the JSON header
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model-00001.safetensors: unreadable safetensors file"):
        read_shards(tmp_path)


def test_newer_schema_is_refused(artifact_copy):
    manifest_path = artifact_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["schema_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="schema version 99 is newer"):
        read_manifest(artifact_copy)


def test_older_schema_and_unknown_files_are_refused(artifact_copy):
    (artifact_copy / "transformer" / "stray.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ArtifactError, match="transformer/stray.safetensors: not listed in the manifest"):
        load_pipeline(artifact_copy)
    (artifact_copy / "transformer" / "stray.safetensors").unlink()
    manifest_path = artifact_copy / "manifest.json"
    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "schema_version": 1}))
    with pytest.raises(
        ArtifactError, match="schema version 1 is older than this reader .* quantize the checkpoint again"
    ):
        load_pipeline(artifact_copy)


def bytes_read_by_this_process() -> int:
    """`rchar`: bytes that went through read() calls, from the page cache or the disk."""
    return int(dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())["rchar"])


def test_shards_are_verified_from_their_mapping_and_never_read_twice(medium_source, tmp_path):
    """Each shard's bytes are hashed and become tensors from one mapping: the loader reads() almost nothing,
    where the previous loader read every byte to hash it and then loaded it again."""
    entry = write_component(medium_source, "transformer", tmp_path, RECIPES["int8"], shard_bytes=128 << 20)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    digests = {path.name: sha256_file(path) for path in shards}
    component = Component(class_name="FluxTransformer2DModel", dtype="bfloat16", quantization=entry, bytes=0)
    before = bytes_read_by_this_process()
    load_module(FluxTransformer2DModel, tmp_path, component, digests)
    assert bytes_read_by_this_process() - before < 0.01 * sum(path.stat().st_size for path in shards)
    with pytest.raises(ArtifactError, match=f"{shards[0].name}: sha256 mismatch"):
        load_module(FluxTransformer2DModel, tmp_path, component, {**digests, shards[0].name: "0" * 64})


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


@pytest.mark.parametrize(
    "backend, message",
    [
        ("torchao", "manifest.json: backend 'torchao' is not one this reader loads"),
        (
            "bitsandbytes",
            "manifest.json: text_encoder_2 was quantized with quanto, the recipe.s backend is bitsandbytes",
        ),
    ],
)
def test_unknown_or_mismatched_backend_is_refused(artifact_copy, backend, message):
    manifest_path = artifact_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["backend"] = backend
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        load_pipeline(artifact_copy)


def test_a_shard_missing_from_the_index_is_named(artifact_copy):
    index_path = artifact_copy / "transformer" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["extra.weight"] = "model-00001.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ArtifactError, match="transformer/model.safetensors.index.json: sha256 mismatch"):
        load_pipeline(artifact_copy)
    with pytest.raises(ArtifactError, match="transformer/model.safetensors.index.json: lists"):
        load_pipeline(artifact_copy, verify=False)
