"""`python -m bench.gguf SOURCE`: GGUF artifacts beside our recipes: bytes, fidelity to bf16, load time.

SOURCE is a diffusers FLUX folder (e.g. `python -m models medium --out build/flux-medium`). Its transformer
is written as GGUF files with the gguf package (the layout city96's files have), each stored with the `gguf`
recipe (blocks kept), then rendered with the quality gate's prompts and seeds against the bf16 source.
"""

import argparse
import tempfile
import time
from pathlib import Path

import bentoml
from rich.console import Console
from rich.table import Table

from models.artifact import load_pipeline
from models.gguf_file import gguf_from_diffusers
from models.source import load_source_pipeline, resolve_source
from quantize.recipes import RECIPES
from quantize.store import StoredArtifact, quantize_to_store
from quantize.validate import compare, render


def store(source_folder: Path, kind: str, work: Path, name: str) -> StoredArtifact:
    """`kind`: a GGML type (a GGUF file stored with the gguf recipe) or one of our recipes (from the bf16 source)."""
    if kind in RECIPES:
        source, recipe = resolve_source(str(source_folder)), RECIPES[kind]
    else:
        path = gguf_from_diffusers(source_folder / "transformer", work / f"{name}.gguf", kind)
        source, recipe = resolve_source(str(path), base=str(source_folder)), RECIPES["gguf"]
    return quantize_to_store(source, recipe, name, gate=None)


def measure(source_folder: Path, kind: str, work: Path, reference, size: int, steps: int) -> dict:
    stored = store(source_folder, kind, work, f"bench-{kind.lower()}")
    folder = Path(bentoml.models.get(stored.tag).path)
    started = time.perf_counter()
    pipe = load_pipeline(folder)[0]  # every shard's sha256 checked, as the service loads it
    load_s = time.perf_counter() - started
    quality = compare(reference, render(pipe, size, steps), size, steps)
    return {
        "type": kind,
        "load_s": load_s,
        "components": {name: c.bytes for name, c in stored.manifest.components.items()},
        **quality.model_dump(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gguf", description=__doc__)
    parser.add_argument("source", type=Path, help="a diffusers FLUX folder")
    parser.add_argument(
        "--types",
        default="Q8_0,Q5_0,Q4_1,Q4_0,int8,nf4",
        help="GGML types the gguf package writes, and recipes of ours to set beside them",
    )
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    reference = render(load_source_pipeline(resolve_source(str(args.source))), args.size, args.steps)
    with tempfile.TemporaryDirectory() as work:
        results = [
            measure(args.source, kind, Path(work), reference, args.size, args.steps) for kind in args.types.split(",")
        ]
    table = Table(title=f"gguf artifacts of {args.source.name}, quality vs bf16 at {args.size}², {args.steps} steps")
    for column in (
        "GGUF type / recipe",
        "transformer bytes",
        "whole artifact",
        "image PSNR",
        "image SSIM",
        "latent PSNR",
        "latent SSIM",
        "load (sha256 checked)",
    ):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r["type"],
            f"{r['components']['transformer']:,}",
            f"{sum(r['components'].values()):,}",
            f"{r['image_psnr_db']:.2f} dB",
            f"{r['image_ssim']:.4f}",
            f"{r['latent_psnr_db']:.2f} dB",
            f"{r['latent_ssim']:.4f}",
            f"{r['load_s']:.2f} s",
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
