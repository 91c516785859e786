"""The artifact format: a folder of components plus `manifest.json`, and its one reader.

    manifest.json                         schema version, source, recipe, per-component dtype/bytes, sha256 per file
    transformer/, text_encoder_2/         quantized: config.json + model.safetensors + quantization_map.json
    text_encoder/, vae/, tokenizer*/, scheduler/   as `save_pretrained` writes them
"""

import hashlib
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.models.modeling_utils import ModelMixin
from optimum.quanto import quantization_map, requantize
from pydantic import BaseModel
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

SCHEMA_VERSION = 1
BACKENDS = ("quanto",)  # what this reader can rebuild
MANIFEST = "manifest.json"
WEIGHTS, QUANTIZATION_MAP = "model.safetensors", "quantization_map.json"
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
    quantization: dict[str, str] | None = None  # e.g. {"weights": "qint8"}, None when kept as is
    bytes: int


class Manifest(BaseModel):
    schema_version: int = SCHEMA_VERSION
    source: str
    source_revision: str
    recipe: str
    backend: str
    components: dict[str, Component]
    files: dict[str, str]  # relative path -> sha256
    libraries: dict[str, str]
    quality: dict | None = None  # the quantize step's PSNR/SSIM against the unquantized model
    estimated_peak_gib_1024: float | None = None  # GPU peak, everything resident, one 1024² image

    @property
    def total_bytes(self) -> int:
        return sum(component.bytes for component in self.components.values())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _dtype_name(module) -> str | None:
    parameter = next(module.parameters(), None) if isinstance(module, torch.nn.Module) else None
    return str(parameter.dtype).removeprefix("torch.") if parameter is not None else None


def _unique_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tied aliases (T5's shared embedding): safetensors refuses tensors that share memory."""
    seen, unique = set(), {}
    for name, tensor in state_dict.items():
        key = (tensor.data_ptr(), tensor.shape)
        if key not in seen:
            seen.add(key)
            unique[name] = tensor.contiguous()
    return unique


def save_quantized(module: torch.nn.Module, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(module, ModelMixin):
        module.save_config(folder)
    else:
        module.config.save_pretrained(folder)
    save_file(_unique_tensors(module.state_dict()), folder / WEIGHTS, metadata={"format": "pt"})
    (folder / QUANTIZATION_MAP).write_text(json.dumps(quantization_map(module), indent=2, sort_keys=True))


def write_components(pipe: FluxPipeline, folder: Path, quantized: dict[str, dict[str, str]]) -> dict[str, Component]:
    """Write every pipeline component under `folder`; `quantized` names the quanto-quantized ones."""
    components = {}
    for name in COMPONENT_CLASSES:
        module, target = getattr(pipe, name), folder / name
        if name in quantized:
            save_quantized(module, target)
        else:
            module.save_pretrained(target)
        components[name] = Component(class_name=type(module).__name__, dtype=_dtype_name(module),
                                     quantization=quantized.get(name), bytes=_folder_bytes(target))
    return components


def hash_files(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): sha256_file(path)
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST}


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; not a FLUX artifact folder")
    raw = json.loads(path.read_text())
    if raw.get("schema_version", 0) > SCHEMA_VERSION:
        raise ArtifactError(f"{path}: schema version {raw['schema_version']} is newer than this reader "
                            f"({SCHEMA_VERSION}); upgrade flux-serve")
    return Manifest.model_validate(raw)


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Every file the manifest lists exists and has its recorded sha256."""
    for relative, expected in manifest.files.items():
        path = folder / relative
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        if sha256_file(path) != expected:
            raise ArtifactError(f"{path}: sha256 mismatch (truncated or altered file)")


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """int8 matmul kernels crash on data that is not 16-byte aligned, as safetensors may leave it."""
    return tensor if tensor.data_ptr() % 16 == 0 else tensor.clone()


def _empty_model(cls: type, folder: Path) -> torch.nn.Module:
    with torch.device("meta"):
        if issubclass(cls, ModelMixin):
            return cls.from_config(cls.load_config(folder))
        return cls(AutoConfig.from_pretrained(folder))


def check_quantization_map(path: Path, expected_weights: str | None) -> dict:
    """The map's weight types must be what the manifest's recipe says."""
    quantization = json.loads(path.read_text())
    found = {entry.get("weights") for entry in quantization.values()}
    if expected_weights and found != {expected_weights}:
        raise ArtifactError(f"{path}: weights {sorted(found)} but the manifest's recipe says {expected_weights}")
    return quantization


def load_quantized(cls: type, folder: Path, dtype: torch.dtype, expected_weights: str | None = None) -> torch.nn.Module:
    quantization = check_quantization_map(folder / QUANTIZATION_MAP, expected_weights)
    state_dict = {name: _aligned(tensor) for name, tensor in load_file(folder / WEIGHTS).items()}
    model = _empty_model(cls, folder).to(dtype)
    requantize(model, state_dict, quantization, device=torch.device("cpu"))
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # T5's shared embedding was saved once
    missing = set(model.state_dict()) - set(state_dict) - _tied_aliases(model)
    if missing:
        raise ArtifactError(f"{folder / WEIGHTS}: tensors missing: {sorted(missing)[:5]}")
    return model.eval()


def _tied_aliases(model: torch.nn.Module) -> set[str]:
    every = model.state_dict()
    return set(every) - set(_unique_tensors(every))


def load_component(name: str, folder: Path, component: Component) -> object:
    cls = COMPONENT_CLASSES[name]
    dtype = getattr(torch, component.dtype) if component.dtype else None
    if component.quantization:
        return load_quantized(cls, folder / name, dtype, component.quantization.get("weights"))
    if dtype is None:
        return cls.from_pretrained(folder / name)
    return cls.from_pretrained(folder / name, dtype=dtype).eval()


def load_pipeline(folder: Path, verify: bool = True) -> tuple[FluxPipeline, Manifest]:
    """Read an artifact folder into a FluxPipeline on the CPU, checking every file's sha256 first."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.backend not in BACKENDS:
        raise ArtifactError(f"{folder / MANIFEST}: backend {manifest.backend!r} is not one this reader loads {BACKENDS}")
    if verify:
        verify_files(folder, manifest)
    components = {name: load_component(name, folder, manifest.components[name]) for name in COMPONENT_CLASSES}
    return FluxPipeline(**components), manifest
