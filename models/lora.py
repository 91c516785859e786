"""The LoRA adapter format and its one reader.

A LoRA file in any layout diffusers' `FluxPipeline.lora_state_dict` converts (kohya `lora_unet_…`, ComfyUI
`diffusion_model.…`, XLabs, peft/diffusers `transformer.…`) is read through diffusers' own converters into
one low-rank pair per targeted Linear of the transformer, checked against the base's architecture, and
stored as a folder:

    lora.json              what it is: architecture, per-target rank and scale (alpha / rank), sha256s
    adapter.safetensors    `<module>.lora_A` (rank × in) and `<module>.lora_B` (out × rank), as converted

A target's update is scale · B(A(x)); a request's own scale multiplies it (diffusers' `set_adapters` weight).
"""

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxPipeline
from pydantic import BaseModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from models.artifact import sha256_file

LORA_SCHEMA_VERSION = 1
LORA_MANIFEST = "lora.json"
ADAPTER_FILE = "adapter.safetensors"
REFUSED_VARIANTS = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "hada_w1": "LoHa", "lokr_w1": "LoKr"}
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.")
ARCHITECTURE_KEYS = (
    "in_channels",
    "num_layers",
    "num_single_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "pooled_projection_dim",
    "guidance_embeds",
)


class LoraError(ValueError):
    """A LoRA file or stored adapter that cannot be used; the message names the file and the reason."""


class Target(BaseModel):
    rank: int
    scale: float  # alpha / rank (1.0 when the file states no alpha)


class LoraManifest(BaseModel):
    schema_version: int = LORA_SCHEMA_VERSION
    architecture: str  # architecture_id of the transformer it was checked against
    source_file: str
    source_sha256: str
    layout: str  # kohya, comfyui, xlabs, diffusers
    dtype: str
    rank: int  # the largest target rank
    targets: dict[str, Target]
    text_encoder_tensors_dropped: int = 0
    files: dict[str, str]  # relative path -> sha256


@dataclass
class LowRank:
    down: torch.Tensor  # A: rank × in
    up: torch.Tensor  # B: out × rank
    scale: float


def architecture_id(transformer_config: dict) -> str:
    """Names a transformer's shapes: adapters checked against one fit every artifact of the same id."""
    shape = {key: transformer_config.get(key) for key in ARCHITECTURE_KEYS}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:10]
    width = shape["num_attention_heads"] * shape["attention_head_dim"]
    return f"flux-{shape['num_layers']}x{shape['num_single_layers']}-{width}-{digest}"


def detect_layout(keys: list[str]) -> str:
    if any(key.startswith("lora_unet_") for key in keys):
        return "kohya"
    if any(key.startswith("diffusion_model.") for key in keys):
        return "comfyui"
    if any("processor" in key for key in keys):
        return "xlabs"
    return "diffusers"


def raw_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as error:
        raise LoraError(f"{path}: not a readable safetensors file ({error})") from None


def refuse_variants(path: Path, keys: list[str]) -> None:
    for marker, variant in REFUSED_VARIANTS.items():
        if any(marker in key for key in keys):
            raise LoraError(
                f"{path}: a {variant} adapter ('{marker}' tensors); only plain LoRA (A and B per "
                f"layer) is served: its decomposition would be silently dropped"
            )


def converted_pairs(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, float], float | None]:
    """diffusers' conversion of the file to peft keys (`<component>.<module>.lora_A.weight`), the transformer's
    alphas, and the alpha of its targets that state none."""
    try:
        state, alphas = FluxPipeline.lora_state_dict(str(path), return_alphas=True)
    except Exception as error:  # noqa: BLE001 - diffusers raises many kinds for files it cannot convert
        raise unconvertible(path, error) from None
    alphas = {key: value for key, value in (alphas or {}).items() if not key.startswith(TEXT_ENCODER_PREFIXES)}
    return state, {key: float(value) for key, value in alphas.items()}, unstated_alpha(alphas)


def unconvertible(path: Path, error: Exception) -> LoraError:
    """diffusers' refusal, with its message (or its kind, when it has none: a bare `assert` in a converter)."""
    why = str(error).strip()[:300] or f"{type(error).__name__}, no message: the file's keys match no layout it knows"
    return LoraError(f"{path}: diffusers cannot read it as a FLUX LoRA ({why})")


def unstated_alpha(alphas: dict) -> float | None:
    """The alpha diffusers + PEFT give the targets a file states none for: `get_peft_kwargs` takes the most
    common stated value as `collections.Counter` counts the values it was handed. Read from a file those are
    tensors, which count by identity, so that is the first alpha stated (in the converted state's order); plain
    numbers count by value. None when the file states none: alpha = rank (scale 1)."""
    return float(Counter(alphas.values()).most_common(1)[0][0]) if alphas else None


def split_pairs(
    path: Path,
    state: dict[str, torch.Tensor],
    alphas: dict[str, float],
    unstated: float | None,
    drop_text_encoder: bool,
) -> tuple[dict[str, LowRank], int]:
    """The transformer's low-rank pairs by module name, and how many text-encoder tensors were dropped."""
    text_encoder = [key for key in state if key.startswith(TEXT_ENCODER_PREFIXES)]
    if text_encoder and not drop_text_encoder:
        raise LoraError(
            f"{path}: {len(text_encoder)} tensors train the text encoder (e.g. {text_encoder[0]}); this "
            f"server caches prompt embeddings and applies LoRAs to the transformer only. Add it with "
            f"--drop-text-encoder to serve its transformer part"
        )
    pairs: dict[str, LowRank] = {}
    for key in sorted(set(state) - set(text_encoder)):
        module, _, kind = key.removeprefix("transformer.").rpartition(".lora_")
        if kind not in ("A.weight", "B.weight") or not key.startswith("transformer."):
            raise LoraError(
                f"{path}: tensor {key!r} is not a LoRA pair of the transformer (bias, norm or full "
                f"weights are not served)"
            )
        if kind == "B.weight":
            continue
        down, up = state[key], state.get(f"transformer.{module}.lora_B.weight")
        if up is None:
            raise LoraError(f"{path}: {module} has lora_A but no lora_B")
        rank = down.shape[0]
        fallback = unstated if unstated is not None else float(rank)
        alpha = alphas.get(f"transformer.{module}.alpha", alphas.get(f"{module}.alpha", fallback))
        pairs[module] = LowRank(down, up, alpha / rank)
    if not pairs:
        raise LoraError(f"{path}: no LoRA pairs for the FLUX transformer")
    return pairs, len(text_encoder)


def check_targets(path: Path, pairs: dict[str, LowRank], transformer: torch.nn.Module) -> None:
    """Every target is a Linear of `transformer` (shapes only: a meta-device model will do) with matching shapes."""
    for module, pair in pairs.items():
        try:
            layer = transformer.get_submodule(module)
        except AttributeError:
            raise LoraError(
                f"{path}: targets {module!r}, which this FLUX transformer does not have (a LoRA "
                f"for another model or another architecture?)"
            ) from None
        if not isinstance(layer, torch.nn.Linear):
            raise LoraError(f"{path}: targets {module!r}, a {type(layer).__name__}; only Linear layers are served")
        rank = pair.down.shape[0]
        expected = {"lora_A": (rank, layer.in_features), "lora_B": (layer.out_features, rank)}
        for name, tensor in (("lora_A", pair.down), ("lora_B", pair.up)):
            if tuple(tensor.shape) != expected[name]:
                raise LoraError(
                    f"{path}: {module}.{name} has shape {tuple(tensor.shape)}, the base's layer "
                    f"needs {expected[name]} (rank {rank}, {layer.in_features} in, "
                    f"{layer.out_features} out)"
                )


def read_lora_file(
    path: Path, transformer: torch.nn.Module, drop_text_encoder: bool = False
) -> tuple[dict[str, LowRank], str, int]:
    """A LoRA file's transformer pairs, checked against `transformer`; its layout; text-encoder tensors dropped."""
    path = Path(path)
    keys = raw_keys(path)
    refuse_variants(path, keys)
    pairs, dropped = split_pairs(path, *converted_pairs(path), drop_text_encoder)
    check_targets(path, pairs, transformer)
    return pairs, detect_layout(keys), dropped


def describe_pairs(
    pairs: dict[str, LowRank], architecture: str, source: Path, layout: str, dropped: int = 0
) -> LoraManifest:
    """The manifest of `pairs` read from `source`; `write_adapter` fills in the stored file's sha256."""
    dtypes = {str(pair.down.dtype).removeprefix("torch.") for pair in pairs.values()}
    return LoraManifest(
        architecture=architecture,
        source_file=source.name,
        source_sha256=sha256_file(source),
        layout=layout,
        dtype=dtypes.pop() if len(dtypes) == 1 else "mixed",
        rank=max(p.down.shape[0] for p in pairs.values()),
        targets={module: Target(rank=pair.down.shape[0], scale=pair.scale) for module, pair in pairs.items()},
        text_encoder_tensors_dropped=dropped,
        files={},
    )


def write_adapter(folder: Path, pairs: dict[str, LowRank], manifest: LoraManifest) -> LoraManifest:
    """The adapter folder: the pairs, then the manifest with their sha256 (written last: its presence means done)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, pair in pairs.items():
        tensors |= {f"{module}.lora_A": pair.down.clone(), f"{module}.lora_B": pair.up.clone()}  # kohya shares A
    save_file(tensors, folder / ADAPTER_FILE)
    manifest = manifest.model_copy(update={"files": {ADAPTER_FILE: sha256_file(folder / ADAPTER_FILE)}})
    (folder / LORA_MANIFEST).write_text(manifest.model_dump_json(indent=2))
    return manifest


def read_lora_manifest(folder: Path) -> LoraManifest:
    path = Path(folder) / LORA_MANIFEST
    if not path.is_file():
        raise LoraError(f"{path}: missing; not a stored LoRA adapter")
    manifest = LoraManifest.model_validate_json(path.read_text())
    if manifest.schema_version != LORA_SCHEMA_VERSION:
        raise LoraError(f"{path}: schema version {manifest.schema_version}, this reader reads {LORA_SCHEMA_VERSION}")
    return manifest


def load_adapter(folder: Path) -> tuple[LoraManifest, dict[str, LowRank]]:
    """A stored adapter's pairs, its file checked against the manifest's sha256."""
    folder = Path(folder)
    manifest = read_lora_manifest(folder)
    path = folder / ADAPTER_FILE
    if not path.is_file() or sha256_file(path) != manifest.files.get(ADAPTER_FILE):
        raise LoraError(f"{path}: missing or sha256 mismatch (truncated or altered file)")
    tensors = load_file(path)
    return manifest, {
        module: LowRank(tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"], target.scale)
        for module, target in manifest.targets.items()
    }
