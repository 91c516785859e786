"""Quantize a source checkpoint with a recipe and store the artifact in the BentoML model store."""

from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import bentoml
import torch

from models.artifact import MANIFEST, Manifest, hash_files, write_components
from models.source import Source, load_source_pipeline
from quantize.recipes import Recipe, apply_recipe

LIBRARIES = ("torch", "diffusers", "transformers", "optimum-quanto", "safetensors")


@dataclass(frozen=True)
class StoredArtifact:
    tag: str
    manifest: Manifest
    source_bytes: dict[str, int]  # per component, before quantization


def _module_bytes(module: object) -> int | None:
    if not isinstance(module, torch.nn.Module):
        return None
    unique = {tensor.data_ptr(): tensor for tensor in module.state_dict().values()}
    return sum(tensor.numel() * tensor.element_size() for tensor in unique.values())


def quantize_to_store(source: Source, recipe: Recipe, name: str, step=lambda description: None) -> StoredArtifact:
    """Load, quantize, write, hash and store; nothing reaches the store unless every step succeeds."""
    step("loading source checkpoint")
    pipe = load_source_pipeline(source)
    source_bytes = {name: _module_bytes(module) for name, module in pipe.components.items()}
    step(f"quantizing {', '.join(recipe.components)} to {recipe.weights}")
    quantized = apply_recipe(pipe, recipe)
    labels = {"recipe": recipe.name, "backend": recipe.backend, "source": source.slug}
    metadata = {"source": source.id, "source_revision": source.revision}
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        folder = Path(model.path)
        step("writing components")
        components = write_components(pipe, folder, quantized)
        step("hashing files")
        manifest = Manifest(source=source.id, source_revision=source.revision, recipe=recipe.name,
                            backend=recipe.backend, components=components, files=hash_files(folder),
                            libraries={library: version(library) for library in LIBRARIES})
        (folder / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        step("storing in the BentoML model store")
    return StoredArtifact(tag=str(model.tag), manifest=manifest, source_bytes=source_bytes)
