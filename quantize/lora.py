"""`python -m quantize lora add FILE.safetensors --name NAME --base ARTIFACT`: check a LoRA file against an
artifact's transformer and store it in the BentoML model store (kind=lora), so it travels like artifacts
(Bentos, `bentoml models export/import`). A refused file stores nothing."""

import argparse
import json
import shutil
from pathlib import Path

import bentoml
from diffusers import FluxTransformer2DModel
from rich.console import Console

from models.artifact import empty_model
from models.lora import LoraError, LoraManifest, architecture_id, describe_pairs, read_lora_file, write_adapter


def add_lora(path: Path, name: str, base_tag: str, drop_text_encoder: bool = False) -> tuple[str, LoraManifest]:
    """Check `path` against `base_tag`'s transformer, then store it; returns the new tag and its manifest."""
    path = Path(path)
    try:
        base = Path(bentoml.models.get(base_tag).path) / "transformer"
    except bentoml.exceptions.NotFound:
        raise LoraError(f"--base {base_tag}: no such artifact in the BentoML model store") from None
    pairs, layout, dropped = read_lora_file(path, empty_model(FluxTransformer2DModel, base), drop_text_encoder)
    architecture = architecture_id(json.loads((base / "config.json").read_text()))
    manifest = describe_pairs(pairs, architecture, path, layout, dropped)
    labels = {
        "kind": "lora",
        "architecture": architecture,
        "rank": str(manifest.rank),
        "targets": str(len(pairs)),
        "layout": layout,
    }
    with bentoml.models.create(
        name, labels=labels, metadata={"base": base_tag, "source_sha256": manifest.source_sha256}
    ) as model:
        try:
            manifest = write_adapter(Path(model.path), pairs, manifest)
        except BaseException:
            shutil.rmtree(model.path, ignore_errors=True)
            raise
    return str(model.tag), manifest


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantize lora", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="check a LoRA file against an artifact and store it")
    add.add_argument("file", type=Path, help="the LoRA (.safetensors): kohya, ComfyUI, XLabs or diffusers layout")
    add.add_argument("--name", required=True, help="model-store name; requests use it in `loras[].name`")
    add.add_argument("--base", required=True, help="the artifact tag it is checked against (its architecture)")
    add.add_argument(
        "--drop-text-encoder",
        action="store_true",
        help="store the transformer part of a LoRA that also trains the text encoder",
    )
    args = parser.parse_args(argv)
    try:
        tag, manifest = add_lora(args.file, args.name, args.base, args.drop_text_encoder)
    except LoraError as error:
        Console(stderr=True).print(f"[red]refused:[/red] {error}; nothing was stored")
        return 2
    Console(stderr=True).print(
        f"{args.file.name}: {manifest.layout} layout, {len(manifest.targets)} targets, rank "
        f"{manifest.rank}, {manifest.dtype}, for {manifest.architecture}"
    )
    print(tag)
    return 0
