"""Quantize a source checkpoint with a recipe and store the artifact in the BentoML model store."""

import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import bentoml
import torch

from models.artifact import MANIFEST, Manifest, hash_files, write_components
from models.sizes import BYTES_PER_WEIGHT, module_bytes, resident_peak_bytes
from models.source import Source, load_source_pipeline
from quantize.recipes import Recipe, apply_recipe
from quantize.validate import PROMPTS, compare, contact_sheet, render

CONTACT_SHEET = "validation/contact_sheet.png"  # reference row above the quantized row

LIBRARIES = ("torch", "diffusers", "transformers", "optimum-quanto", "safetensors")


@dataclass(frozen=True)
class StoredArtifact:
    tag: str
    manifest: Manifest
    source_bytes: dict[str, int]  # per component, before quantization


@dataclass(frozen=True)
class Gate:
    """Render-and-compare settings; `min_psnr_db` None records the metrics without judging them."""

    size: int = 256
    steps: int = 4
    min_psnr_db: float | None = None


class QualityGateFailed(RuntimeError):
    """The quantized pipeline's images fell below the bar; nothing was stored."""


def quantize_to_store(source: Source, recipe: Recipe, name: str, step=lambda description: None,
                      gate: Gate | None = Gate()) -> StoredArtifact:
    """Load, quantize, validate, write, hash and store; nothing reaches the store unless every step succeeds."""
    step("loading source checkpoint")
    pipe = load_source_pipeline(source)
    source_bytes = {name: module_bytes(module) if isinstance(module, torch.nn.Module) else None
                    for name, module in pipe.components.items()}
    if gate:
        step(f"rendering {len(PROMPTS)} reference images ({gate.size}², {gate.steps} steps)")
        reference = render(pipe, gate.size, gate.steps)
    step(f"quantizing {', '.join(recipe.components)} to {recipe.weights}")
    quantized = apply_recipe(pipe, recipe)
    quality = sheet = None
    if gate:
        step("rendering the same prompts and seeds with the quantized pipeline")
        candidate = render(pipe, gate.size, gate.steps)
        quality, sheet = compare(reference, candidate, gate.size, gate.steps), contact_sheet(reference, candidate)
        if gate.min_psnr_db is not None and quality.image_psnr_db < gate.min_psnr_db:
            raise QualityGateFailed(f"image PSNR {quality.image_psnr_db:.2f} dB is below --min-psnr "
                                    f"{gate.min_psnr_db:.2f} dB (SSIM {quality.image_ssim:.4f}); nothing was stored")
    labels = {"recipe": recipe.name, "backend": recipe.backend, "source": source.slug}
    metadata = {"source": source.id, "source_revision": source.revision}
    check_free_disk(expected_artifact_bytes(source_bytes, recipe), [Path(tempfile.gettempdir()), store_path()])
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        folder = Path(model.path)  # staged in a temporary folder; moved into the store only on success
        try:
            step("writing components")
            components = write_components(pipe, folder, quantized)
            if sheet:
                (folder / CONTACT_SHEET).parent.mkdir(parents=True, exist_ok=True)
                (folder / CONTACT_SHEET).write_bytes(sheet)
            step("hashing files")
            manifest = Manifest(source=source.id, source_revision=source.revision, recipe=recipe.name,
                                backend=recipe.backend, components=components, files=hash_files(folder),
                                libraries={library: version(library) for library in LIBRARIES},
                                quality=quality.model_dump() if quality else None,
                                estimated_peak_gib_1024=estimated_peak_gib(components))
            (folder / MANIFEST).write_text(manifest.model_dump_json(indent=2))
            step("storing in the BentoML model store")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # BentoML leaves a failed staging folder behind
            raise
    return StoredArtifact(tag=str(model.tag), manifest=manifest, source_bytes=source_bytes)


def estimated_peak_gib(components: dict) -> float:
    """GPU peak with everything resident, one 1024² image (the serving planner's memory model)."""
    return round(resident_peak_bytes({name: c.bytes for name, c in components.items()}, 1024) / 1024**3, 2)


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
