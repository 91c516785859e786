"""Where a FLUX checkpoint comes from, and its tensors read one at a time.

Three layouts: a local diffusers folder, a Hugging Face repo id in the local cache (a diffusers folder
too), or a single-file transformer, the original `flux1-dev.safetensors` or a GGUF file (`*.gguf`), beside
a diffusers `base` that provides the text encoders, VAE, tokenizers, scheduler and configs (its
transformer weights are not read).
"""

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxPipeline
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

from models.gguf_file import GGUFTransformer
from models.single_file import SingleFileTransformer
from models.tensors import TensorFiles
from models.variants import Variant, variant_of

DEFAULT_BASE = "black-forest-labs/FLUX.1-dev"


class SourceError(ValueError):
    """The checkpoint named on the command line cannot be found or read."""


@dataclass(frozen=True)
class Source:
    id: str  # what the user named: a folder path, a repo id, or a single file
    revision: str  # the hub commit hash, or a content fingerprint for local files
    path: Path  # the diffusers folder
    transformer_file: Path | None = None  # the single-file transformer that replaces path/transformer

    @property
    def slug(self) -> str:
        """A model-store name for it: `black-forest-labs/FLUX.1-dev` -> `flux.1-dev`."""
        stem = Path(self.id).name.lower().removesuffix(".safetensors").removesuffix(".gguf")
        name = re.sub(r"[^a-z0-9._-]+", "-", stem).strip("-.")
        return name if name.startswith("flux") else f"flux-{name}"

    @property
    def is_gguf(self) -> bool:
        return self.transformer_file is not None and self.transformer_file.suffix == ".gguf"

    @property
    def variant(self) -> Variant:
        tokenizer = self.path / "tokenizer_2" / "tokenizer_config.json"
        t5_tokens = json.loads(tokenizer.read_text()).get("model_max_length") if tokenizer.is_file() else None
        return variant_of(json.loads((self.path / "transformer" / "config.json").read_text()), t5_tokens)

    def tensors(self, component: str) -> TensorFiles:
        """A component's weights, by the names its diffusers/transformers class uses."""
        if component == "transformer" and self.transformer_file:
            if self.is_gguf:
                try:
                    return GGUFTransformer(self.transformer_file)
                except ValueError as error:
                    raise SourceError(str(error)) from error
            return SingleFileTransformer(self.transformer_file)
        files = sorted((self.path / component).glob("*.safetensors"))
        if not files:
            raise SourceError(f"{self.path / component}: no .safetensors weights")
        return TensorFiles(files)


def fingerprint(paths: list[Path], root: Path) -> str:
    """sha256 over every file's path and size and every JSON file's bytes (cheap for 30 GB of weights)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(f"{path.relative_to(root).as_posix()}:{path.stat().st_size}\n".encode())
        if path.suffix == ".json":
            digest.update(path.read_bytes())
    return "sha256:" + digest.hexdigest()


def folder_fingerprint(folder: Path) -> str:
    return fingerprint([p for p in folder.rglob("*") if p.is_file()], folder)


def resolve_source(name: str, revision: str | None = None, base: str = DEFAULT_BASE) -> Source:
    """A folder is used as is, a `.safetensors` or `.gguf` file is a single-file transformer on `base`,
    anything else is a hub repo id looked up in the cache (HF_TOKEN and HF_HUB_OFFLINE are honoured)."""
    path = Path(name)
    if path.is_file():
        if path.suffix not in (".safetensors", ".gguf"):
            raise SourceError(f"{path}: a single-file checkpoint must be a .safetensors or .gguf file")
        pipeline = resolve_source(base)
        revision = fingerprint([path], path.parent) + f"+{pipeline.revision}"
        return Source(id=str(path.resolve()), revision=revision, path=pipeline.path, transformer_file=path.resolve())
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise SourceError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
        return Source(id=str(path.resolve()), revision=folder_fingerprint(path), path=path.resolve())
    try:
        snapshot = Path(snapshot_download(name, revision=revision))
    except (HFValidationError, LocalEntryNotFoundError, OSError) as error:
        raise SourceError(
            f"{name}: neither a local folder or file nor a repo id found in the Hugging Face cache ({error})"
        ) from error
    return Source(id=name, revision=snapshot.name, path=snapshot)


def load_source_pipeline(source: Source, dtype: torch.dtype = torch.bfloat16) -> FluxPipeline:
    """The whole unquantized pipeline in memory (the quality gate's reference)."""
    if source.transformer_file:
        from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

        gguf = dict(quantization_config=GGUFQuantizationConfig(compute_dtype=dtype)) if source.is_gguf else {}
        transformer = FluxTransformer2DModel.from_single_file(
            source.transformer_file, config=str(source.path), subfolder="transformer", dtype=dtype, **gguf
        )
        return FluxPipeline.from_pretrained(source.path, transformer=transformer, dtype=dtype)
    return FluxPipeline.from_pretrained(source.path, dtype=dtype)
