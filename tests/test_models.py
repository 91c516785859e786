"""What a FLUX model is: architecture fidelity, local tokenizers, source resolution."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from models.architecture import PRESETS, build_module
from models.single_file import SingleFileTransformer
from models.sizes import parameter_counts
from models.source import SourceError, resolve_source
from models.tokenizers import build_clip_tokenizer, build_t5_tokenizer


def test_full_preset_is_flux_dev_sized():
    transformer = sum(parameter_counts("full", "transformer"))
    t5 = sum(parameter_counts("full", "text_encoder_2"))
    assert 11.8e9 < transformer < 12.0e9  # FLUX.1-dev: 11.9 B
    assert 4.6e9 < t5 < 4.9e9  # T5-XXL encoder: 4.76 B


def test_medium_has_real_layer_shapes():
    medium = PRESETS["medium"].transformer_config()
    full = PRESETS["full"].transformer_config()
    assert (medium["num_layers"], medium["num_single_layers"]) == (1, 1)
    for key in ("attention_head_dim", "num_attention_heads", "joint_attention_dim", "pooled_projection_dim"):
        assert medium[key] == full[key]


def test_tokenizers_are_built_locally_and_round_trip(tmp_path):
    clip, t5 = build_clip_tokenizer(), build_t5_tokenizer()
    assert clip("a red fox").input_ids[0] == clip.bos_token_id
    assert t5.unk_token_id not in t5("a red fox, 3 birds!").input_ids
    t5.save_pretrained(tmp_path)
    assert type(t5).from_pretrained(tmp_path)("a red fox").input_ids == t5("a red fox").input_ids


def test_folder_source_is_fingerprinted(tiny_source):
    first, second = resolve_source(str(tiny_source)), resolve_source(str(tiny_source))
    assert first.revision == second.revision and first.revision.startswith("sha256:")
    assert first.slug == "flux-tiny"


def test_repo_id_resolves_through_the_local_hf_cache(tiny_source, tmp_path, monkeypatch):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-dev"
    shutil.copytree(tiny_source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    source = resolve_source("black-forest-labs/FLUX.1-dev")
    assert (source.revision, source.slug) == (commit, "flux.1-dev")
    assert (source.path / "model_index.json").is_file()


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="no-such/model"):
        resolve_source("no-such/model")
    with pytest.raises(SourceError, match="model_index.json"):
        resolve_source(str(tmp_path))


def test_single_file_layout_reads_as_diffusers_converts_it(single_file):
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    streamed = SingleFileTransformer(single_file)
    converted = convert_flux_transformer_checkpoint_to_diffusers(load_file(single_file))
    with torch.device("meta"):
        expected = build_module("medium", "transformer").state_dict()
    assert set(streamed.keys()) == set(converted) == set(expected)
    for name in converted:
        assert torch.equal(streamed.get(name), converted[name]), name
        assert streamed.get(name).shape == expected[name].shape
