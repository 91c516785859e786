"""Where a FLUX checkpoint comes from: a local diffusers folder or a Hugging Face repo id in the local cache."""

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxPipeline
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError


class SourceError(ValueError):
    """The checkpoint named on the command line cannot be found or read."""


@dataclass(frozen=True)
class Source:
    id: str  # what the user named: a folder path or a repo id
    revision: str  # the hub commit hash, or a content fingerprint for a folder
    path: Path

    @property
    def slug(self) -> str:
        """A model-store name for it: `black-forest-labs/FLUX.1-dev` -> `flux.1-dev`."""
        name = re.sub(r"[^a-z0-9._-]+", "-", Path(self.id).name.lower()).strip("-.")
        return name if name.startswith("flux") else f"flux-{name}"


def folder_fingerprint(folder: Path) -> str:
    """sha256 over every file's path and size and every JSON file's bytes (cheap for 30 GB of weights)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}:{path.stat().st_size}\n".encode())
        if path.suffix == ".json":
            digest.update(path.read_bytes())
    return "sha256:" + digest.hexdigest()


def resolve_source(name: str, revision: str | None = None) -> Source:
    """A folder is used as is; anything else is a hub repo id (HF_TOKEN and HF_HUB_OFFLINE are honoured)."""
    folder = Path(name)
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise SourceError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
        return Source(id=str(folder.resolve()), revision=folder_fingerprint(folder), path=folder.resolve())
    try:
        snapshot = Path(snapshot_download(name, revision=revision))
    except (HFValidationError, LocalEntryNotFoundError, OSError) as error:
        raise SourceError(f"{name}: neither a local folder nor a repo id found in the Hugging Face cache ({error})") from error
    return Source(id=name, revision=snapshot.name, path=snapshot)


def load_source_pipeline(source: Source, dtype: torch.dtype = torch.bfloat16) -> FluxPipeline:
    return FluxPipeline.from_pretrained(source.path, dtype=dtype)
