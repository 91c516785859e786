"""Quantize a source checkpoint with a recipe and store the artifact in the BentoML model store."""

import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import bentoml

from models.architecture import MODULES
from models.artifact import COMPONENT_CLASSES, MANIFEST, Component, Manifest, folder_bytes, hash_files, load_pipeline
from models.sizes import resident_peak_bytes
from models.source import Source, SourceError, load_source_pipeline
from models.toy import SIZE as TOY_SIZE
from models.toy import STEPS as TOY_STEPS
from models.toy import is_trained_toy
from models.toy.checker import adherence
from quantize.recipes import Recipe
from quantize.stream import Progress, write_component
from quantize.validate import PROMPTS, TOY_PROMPTS, TOY_SCENES, QualityReport, compare, contact_sheet, render

CONTACT_SHEET = "validation/contact_sheet.png"  # reference row above the quantized row

LIBRARIES = ("torch", "diffusers", "transformers", "optimum-quanto", "bitsandbytes", "safetensors")


@dataclass(frozen=True)
class StoredArtifact:
    tag: str
    manifest: Manifest
    source_bytes: dict[str, int]  # per module component, in the source's files


@dataclass(frozen=True)
class Gate:
    """Render-and-compare settings; `min_psnr_db` None records the metrics without judging them."""

    size: int = 256
    steps: int = 4
    min_psnr_db: float | None = None
    min_adherence: float | None = None  # the trained toy model only: share of the checker's prompts drawn as asked


class QualityGateFailed(RuntimeError):
    """The quantized pipeline's images fell below the bar; nothing was stored."""


def quantize_to_store(
    source: Source,
    recipe: Recipe,
    name: str,
    step=lambda description: None,
    gate: Gate | None = Gate(),
    progress: Progress = lambda *_: None,
) -> StoredArtifact:
    """Stream, quantize, validate, hash and store; nothing reaches the store unless every step succeeds."""
    if recipe.quantizer.keeps_source_blocks and not source.is_gguf:
        raise SourceError(
            f"recipe {recipe.name} keeps the blocks of a GGUF file: {source.id} is not a .gguf transformer"
        )
    if gate and gate.min_adherence is not None and not is_trained_toy(source.path):
        raise SourceError(
            f"--min-adherence needs a model whose pictures the checker reads (the trained toy model: python -m "
            f"models toy --out DIR); {source.id} is not one"
        )
    source_bytes = {component: source.tensors(component).bf16_bytes() for component in MODULES}
    check_free_disk(expected_artifact_bytes(source_bytes, recipe), [Path(tempfile.gettempdir()), store_path()])
    labels = {"recipe": recipe.name, "backend": recipe.backend, "source": source.slug, "variant": source.variant.name}
    metadata = {"source": source.id, "source_revision": source.revision}
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        folder = Path(model.path)  # staged in a temporary folder; moved into the store only on success
        try:
            components = write_artifact(source, recipe, folder, step, progress)
            manifest = Manifest(
                source=source.id,
                source_revision=source.revision,
                recipe=recipe.name,
                backend=recipe.backend,
                variant=source.variant.name,
                t5_tokens=source.variant.max_sequence_length,
                components=components,
                files={},
                libraries={library: version(library) for library in LIBRARIES},
                estimated_peak_gib_1024=estimated_peak_gib(components),
            )
            (folder / MANIFEST).write_text(manifest.model_dump_json(indent=2))
            if gate:
                manifest.quality = run_gate(source, folder, gate, step).model_dump()
            step("hashing files")
            manifest.files = hash_files(folder)
            (folder / MANIFEST).write_text(manifest.model_dump_json(indent=2))
            step("storing in the BentoML model store")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # BentoML leaves a failed staging folder behind
            raise
    return StoredArtifact(tag=str(model.tag), manifest=manifest, source_bytes=source_bytes)


def write_artifact(source: Source, recipe: Recipe, folder: Path, step, progress: Progress) -> dict[str, Component]:
    """Every component: modules streamed (quantized per the recipe), tokenizers and scheduler copied."""
    components = {}
    for name in COMPONENT_CLASSES:
        target = folder / name
        if name in MODULES:
            step(f"writing {name}" + (f" ({recipe.weights})" if name in recipe.components else ""))
            quantization = write_component(source, name, target, recipe, progress)
            dtype = "bfloat16"
        else:
            COMPONENT_CLASSES[name].from_pretrained(source.path / name).save_pretrained(target)
            quantization, dtype = None, None
        components[name] = Component(
            class_name=COMPONENT_CLASSES[name].__name__,
            dtype=dtype,
            quantization=quantization,
            bytes=folder_bytes(target),
        )
    return components


def run_gate(source: Source, folder: Path, gate: Gate, step) -> QualityReport:
    """Render with the unquantized source, then with the artifact as the service will load it; compare. The
    trained toy model is rendered at its own size and steps, on held-out prompts, and read back by the checker."""
    toy = is_trained_toy(source.path)
    prompts, size, steps = (TOY_PROMPTS, TOY_SIZE, TOY_STEPS) if toy else (PROMPTS, gate.size, gate.steps)
    step(f"rendering {len(prompts)} reference images ({size}², {steps} steps)")
    reference = render(load_source_pipeline(source), size, steps, prompts, batch=len(prompts))
    step("rendering the same prompts and seeds with the artifact")
    candidate = render(load_pipeline(folder, verify=False)[0], size, steps, prompts, batch=len(prompts))
    quality = compare(reference, candidate, size, steps, prompts)
    if toy:
        quality.reference_adherence = adherence(TOY_SCENES, reference.images)["all"]
        quality.adherence = adherence(TOY_SCENES, candidate.images)["all"]
    (folder / CONTACT_SHEET).parent.mkdir(parents=True, exist_ok=True)
    (folder / CONTACT_SHEET).write_bytes(contact_sheet(reference, candidate))
    judge_quality(quality, gate)
    return quality


def judge_quality(quality: QualityReport, gate: Gate) -> None:
    if gate.min_psnr_db is not None and quality.image_psnr_db < gate.min_psnr_db:
        raise QualityGateFailed(
            f"image PSNR {quality.image_psnr_db:.2f} dB is below --min-psnr "
            f"{gate.min_psnr_db:.2f} dB (SSIM {quality.image_ssim:.4f}); nothing was stored"
        )
    if gate.min_adherence is not None and quality.adherence < gate.min_adherence:
        raise QualityGateFailed(
            f"adherence {quality.adherence:.2f} (the checker found {quality.adherence:.0%} of the gate's prompts "
            f"drawn as asked; unquantized {quality.reference_adherence:.0%}) is below --min-adherence "
            f"{gate.min_adherence:.2f}; nothing was stored"
        )


def estimated_peak_gib(components: dict) -> float:
    """GPU peak with everything resident, one 1024² image (the serving planner's memory model)."""
    return round(resident_peak_bytes({name: c.bytes for name, c in components.items()}, 1024) / 1024**3, 2)


def store_path() -> Path:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.bentoml_home.get())


def expected_artifact_bytes(source_bytes: dict[str, int], recipe: Recipe) -> int:
    """Quantized components shrink by the recipe's bytes per weight (of bf16's 2); the rest is copied."""
    shrink = recipe.bytes_per_weight / 2
    return int(sum(size * (shrink if name in recipe.components else 1) for name, size in source_bytes.items()))


def check_free_disk(needed: int, folders: list[Path], margin: float = 1.1) -> None:
    """The artifact is staged in TMPDIR, then copied into the store: each needs room for it."""
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free < needed * margin:
            raise InsufficientDisk(
                f"{folder}: {free / 1e9:.1f} GB free, the artifact needs about {needed * margin / 1e9:.1f} GB"
            )


class InsufficientDisk(OSError):
    """Not enough free disk to write the artifact; raised before anything is written."""
