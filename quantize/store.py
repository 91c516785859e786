"""Quantize a source checkpoint with a recipe and store the artifact in the BentoML model store."""

import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import bentoml
import torch

from models.artifact import MANIFEST, Manifest, hash_files, write_components
from models.sizes import BYTES_PER_WEIGHT
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
    check_free_disk(expected_artifact_bytes(source_bytes, recipe), [Path(tempfile.gettempdir()), store_path()])
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        folder = Path(model.path)  # staged in a temporary folder; moved into the store only on success
        try:
            step("writing components")
            components = write_components(pipe, folder, quantized)
            step("hashing files")
            manifest = Manifest(source=source.id, source_revision=source.revision, recipe=recipe.name,
                                backend=recipe.backend, components=components, files=hash_files(folder),
                                libraries={library: version(library) for library in LIBRARIES})
            (folder / MANIFEST).write_text(manifest.model_dump_json(indent=2))
            step("storing in the BentoML model store")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # BentoML leaves a failed staging folder behind
            raise
    return StoredArtifact(tag=str(model.tag), manifest=manifest, source_bytes=source_bytes)


def store_path() -> Path:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.bentoml_home.get())


def expected_artifact_bytes(source_bytes: dict[str, int | None], recipe: Recipe) -> int:
    """Quantized components shrink by the recipe's bytes per weight; the rest is copied as is."""
    shrink = BYTES_PER_WEIGHT[recipe.weights.removeprefix("q")] / BYTES_PER_WEIGHT["bf16"]
    return int(sum((size or 0) * (shrink if name in recipe.components else 1) for name, size in source_bytes.items()))


def check_free_disk(needed: int, folders: list[Path], margin: float = 1.1) -> None:
    """The artifact is staged in TMPDIR, then copied into the store: each needs room for it."""
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free < needed * margin:
            raise InsufficientDisk(f"{folder}: {free / 1e9:.1f} GB free, the artifact needs about "
                                   f"{needed * margin / 1e9:.1f} GB")


class InsufficientDisk(OSError):
    """Not enough free disk to write the artifact; raised before anything is written."""
