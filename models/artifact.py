"""The artifact format: a folder of components plus `manifest.json`, and its one reader.

manifest.json                  schema version, source, recipe, variant, per-component dtype/bytes, sha256 per file
transformer/, text_encoder_2/, text_encoder/, vae/
                               config.json + model-0000N.safetensors shards + model.safetensors.index.json,
                               and quantization_map.json when quantized (see models/backends/)
tokenizer/, tokenizer_2/, scheduler/   as `save_pretrained` writes them
validation/contact_sheet.png   reference row above quantized row, when the quality gate ran
"""

import hashlib
import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.models.modeling_utils import ModelMixin
from pydantic import BaseModel
from transformers import AutoConfig, CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from models.backends import BACKENDS, rebuild
from models.tensors import INDEX, read_shards
from models.variants import VARIANTS, Variant

SCHEMA_VERSION = 2  # 2: every module component in shards; bitsandbytes backend
MANIFEST = "manifest.json"
STORE_RECORD = "model.yaml"  # written by BentoML's model store beside the artifact, not part of it
QUANTIZATION_MAP = "quantization_map.json"
COMPONENT_CLASSES = {
    "scheduler": FlowMatchEulerDiscreteScheduler,
    "vae": AutoencoderKL,
    "text_encoder": CLIPTextModel,
    "tokenizer": CLIPTokenizer,
    "text_encoder_2": T5EncoderModel,
    "tokenizer_2": T5TokenizerFast,
    "transformer": FluxTransformer2DModel,
}


class ArtifactError(ValueError):
    """An artifact that cannot be trusted or read; the message names the file."""


class Component(BaseModel):
    class_name: str
    dtype: str | None = None  # torch dtype of the unquantized tensors; None for tokenizers and schedulers
    quantization: dict[str, str | int | bool | None] | None = None  # backend, weights, ...; None when kept as is
    bytes: int


class Manifest(BaseModel):
    schema_version: int = SCHEMA_VERSION
    source: str
    source_revision: str
    recipe: str
    backend: str
    variant: str = "dev"  # FLUX.1 dev or schnell (models.architecture.VARIANTS): the service's defaults and bounds
    t5_tokens: int | None = None  # T5 tokens the model reads, when fewer than its variant's (the toy model)
    components: dict[str, Component]
    files: dict[str, str]  # relative path -> sha256
    libraries: dict[str, str]
    quality: dict | None = None  # the quantize step's PSNR/SSIM against the unquantized model
    estimated_peak_gib_1024: float | None = None  # GPU peak, everything resident, one 1024² image

    def hash_of(self, *components: str) -> str:
        """One sha256 over the files of these components: changes whenever any of their bytes do."""
        digest = hashlib.sha256()
        for path, file_hash in sorted(self.files.items()):
            if path.split("/")[0] in components:
                digest.update(f"{path}:{file_hash}\n".encode())
        return digest.hexdigest()

    @property
    def served_variant(self) -> Variant:
        return VARIANTS[self.variant].reading(self.t5_tokens)

    @property
    def total_bytes(self) -> int:
        return sum(component.bytes for component in self.components.values())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def write_config(module: torch.nn.Module, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(module, ModelMixin):
        module.save_config(folder)
    else:
        module.config.save_pretrained(folder)


def empty_model(cls: type, folder: Path) -> torch.nn.Module:
    """A component built from its config with parameters on the meta device (buffers are real)."""
    with init_empty_weights():
        model = (
            cls.from_config(cls.load_config(folder))
            if issubclass(cls, ModelMixin)
            else cls(AutoConfig.from_pretrained(folder))
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # T5's embedding is one tensor under two names, stored once
    return model


def hash_files(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; not a FLUX artifact folder")
    raw = json.loads(path.read_text())
    version = raw.get("schema_version", 0)
    if version > SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: schema version {version} is newer than this reader ({SCHEMA_VERSION}); upgrade flux-serve"
        )
    if version < SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: schema version {version} is older than this reader ({SCHEMA_VERSION}) "
            f"and is not loaded; quantize the checkpoint again with `python -m quantize`"
        )
    return Manifest.model_validate(raw)


def check_listing(folder: Path, manifest: Manifest) -> None:
    """The folder holds exactly the files the manifest lists: none missing, none unknown."""
    present = {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}
    for relative in sorted(set(manifest.files) - present):
        raise ArtifactError(f"{folder / relative}: listed in the manifest but missing")
    for relative in sorted(present - set(manifest.files) - {MANIFEST, STORE_RECORD}):
        raise ArtifactError(f"{folder / relative}: not listed in the manifest (unknown file in the artifact)")


def verify_small_files(folder: Path, manifest: Manifest) -> None:
    """The sha256 of every file but the weight shards (those are checked as they are read)."""
    for relative, expected in manifest.files.items():
        if not relative.endswith(".safetensors") and sha256_file(folder / relative) != expected:
            raise ArtifactError(f"{folder / relative}: sha256 mismatch (truncated or altered file)")


def shard_sha256s(manifest: Manifest, component: str) -> dict[str, str]:
    return {
        relative.split("/", 1)[1]: digest
        for relative, digest in manifest.files.items()
        if relative.startswith(f"{component}/") and relative.endswith(".safetensors")
    }


def check_quantization_map(path: Path, expected_weights: str) -> dict:
    """The map's weight types must be what the manifest's recipe says."""
    quantization = json.loads(path.read_text())
    found = {entry.get("weights") for entry in quantization.values()}
    if found != {expected_weights}:
        raise ArtifactError(f"{path}: weights {sorted(found)} but the manifest's recipe says {expected_weights}")
    return quantization


def load_module(
    cls: type,
    folder: Path,
    component: Component,
    sha256s: dict[str, str] | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.nn.Module:
    """A component from its config, shards (checked against `sha256s` as read) and quantization map, computing
    in `dtype`: its bf16 tensors (quantized layers' scales too) are cast, except that under float16 the modules
    transformers keeps in float32 (`_keep_in_fp32_modules`: T5's `wo`, whose outputs overflow float16) get float32."""
    keep_in_fp32 = getattr(cls, "_keep_in_fp32_modules", None) or []
    try:
        state = cast_state(read_shards(folder, sha256s), dtype, keep_in_fp32)
    except (OSError, ValueError) as error:  # unreadable shard or index
        raise ArtifactError(str(error)) from error
    model, taken = empty_model(cls, folder), set()
    if component.quantization:
        quantization = check_quantization_map(folder / QUANTIZATION_MAP, component.quantization["weights"])
        check_kept_layers(folder, quantization, keep_in_fp32)
        taken = rebuild(model, state, quantization, component.quantization["backend"], dtype)
    tied = _tied_aliases(model)
    missing = set(model.load_state_dict(state, strict=False, assign=True).missing_keys) - tied - taken
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # assigning replaced the tied tensor under one of its names
    if missing:
        raise ArtifactError(f"{folder / INDEX}: tensors missing: {sorted(missing)[:5]}")
    return model.eval()


def check_kept_layers(folder: Path, quantization: dict, keep_in_fp32: list[str]) -> None:
    """4-bit layers where transformers keeps full precision compute garbage (their input is cast to uint8):
    artifacts written before the 4-bit recipes kept them are refused, not served."""
    for name, entry in quantization.items():
        if entry["weights"] in ("nf4", "fp4") and name.split(".")[-1] in keep_in_fp32:
            raise ArtifactError(
                f"{folder / QUANTIZATION_MAP}: {name} is {entry['weights']}, and transformers casts "
                f"its input to the 4-bit weight's uint8; quantize the checkpoint again (the 4-bit "
                f"recipes now keep it in bf16)"
            )


def cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype, keep_in_fp32: list[str]) -> dict[str, torch.Tensor]:
    """bf16 tensors in `dtype` (float32 for `keep_in_fp32` modules under float16); other dtypes as stored."""
    if dtype == torch.bfloat16:
        return state

    def target(name: str) -> torch.dtype:
        kept = dtype == torch.float16 and any(part in keep_in_fp32 for part in name.split("."))
        return torch.float32 if kept else dtype

    return {
        name: tensor.to(target(name)) if tensor.dtype == torch.bfloat16 else tensor for name, tensor in state.items()
    }


def _tied_aliases(model: torch.nn.Module) -> set[str]:
    named = model.named_parameters(remove_duplicate=False)
    unique = set(dict(model.named_parameters()))
    return {name for name, _ in named if name not in unique}


def load_component(
    name: str, folder: Path, manifest: Manifest, verify: bool, dtype: torch.dtype = torch.bfloat16
) -> object:
    cls = COMPONENT_CLASSES[name]
    if issubclass(cls, torch.nn.Module):
        sha256s = shard_sha256s(manifest, name) if verify else None
        return load_module(cls, folder / name, manifest.components[name], sha256s, dtype)
    return cls.from_pretrained(folder / name)


def load_pipeline(
    folder: Path, verify: bool = True, dtype: torch.dtype = torch.bfloat16
) -> tuple[FluxPipeline, Manifest]:
    """Read an artifact folder into a FluxPipeline on the CPU, computing in `dtype` (bf16, or float16 for
    GPUs without bf16), every byte read once: the listing and the small files are checked first, each
    weight shard's sha256 while it is turned into tensors."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.backend not in BACKENDS:
        raise ArtifactError(
            f"{folder / MANIFEST}: backend {manifest.backend!r} is not one this reader loads {sorted(BACKENDS)}"
        )
    for name, component in manifest.components.items():
        if component.quantization and component.quantization["backend"] != manifest.backend:
            raise ArtifactError(
                f"{folder / MANIFEST}: {name} was quantized with {component.quantization['backend']}, "
                f"the recipe's backend is {manifest.backend}"
            )
    if verify:
        check_listing(folder, manifest)
        verify_small_files(folder, manifest)
    components = {name: load_component(name, folder, manifest, verify, dtype) for name in COMPONENT_CLASSES}
    return FluxPipeline(**components), manifest
