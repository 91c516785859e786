"""`python -m quantize SOURCE --recipe RECIPE [--name NAME]`: prints a size table, then the tag alone.

`python -m quantize lora add FILE --name NAME --base ARTIFACT` stores a LoRA adapter (see quantize/lora.py).

SOURCE is a diffusers FLUX folder, a Hugging Face repo id in the local cache, or the single-file
`flux1-dev.safetensors` (with --base for the rest of the pipeline). Weights are streamed module by module.
"""

import argparse
import signal
import sys

from rich.console import Console
from rich.table import Table

from models.source import DEFAULT_BASE, SourceError, resolve_source
from quantize import lora
from quantize.recipes import RECIPES
from quantize.store import Gate, InsufficientDisk, QualityGateFailed, StoredArtifact, quantize_to_store

COMPONENTS = ("transformer", "text_encoder_2", "text_encoder", "vae")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m quantize", description=__doc__)
    parser.add_argument(
        "source",
        nargs="?",
        help="a diffusers FLUX folder, a repo id in the local Hugging Face cache, "
        "or a single-file transformer (.safetensors)",
    )
    parser.add_argument(
        "--base",
        default=DEFAULT_BASE,
        help="for a single-file SOURCE: the diffusers folder or repo id giving the other components "
        "and the configs (default: %(default)s)",
    )
    parser.add_argument("--recipe", choices=sorted(RECIPES), help="how to quantize")
    parser.add_argument("--list-recipes", action="store_true", help="show each recipe and its bytes for FLUX.1-dev")
    parser.add_argument("--components", help="comma-separated components to quantize (default: the recipe's)")
    parser.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="COMPONENT=PATTERN[,PATTERN]",
        help="module names (fnmatch) to keep in bf16, e.g. transformer=x_embedder,context_embedder",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        help="int4 group / nf4, fp4 block size (power of two ≥ 32); "
        "Linear layers whose inputs don't split into whole groups stay in bf16",
    )
    parser.add_argument("--min-psnr", type=float, help="fail (store nothing) below this image PSNR in dB")
    parser.add_argument(
        "--min-adherence",
        type=float,
        help="the trained toy model: fail (store nothing) when the checker finds fewer than this share (0–1) of "
        "the gate's held-out prompts drawn as asked",
    )
    parser.add_argument(
        "--skip-validation",
        action="store_true",
        help="no reference-vs-quantized renders (for the full model on a small machine)",
    )
    parser.add_argument(
        "--validation-size", type=int, default=256, help="side of the validation images (the toy model: its 64)"
    )
    parser.add_argument("--validation-steps", type=int, default=4)
    parser.add_argument("--name", help="model-store name (default: <source>-<recipe>)")
    parser.add_argument("--revision", help="hub revision when SOURCE is a repo id")
    args = parser.parse_args(argv)
    if not args.list_recipes and not (args.source and args.recipe):
        parser.error("SOURCE and --recipe are required (or --list-recipes)")
    return args


def parse_keep(values: list[str]) -> dict[str, tuple[str, ...]]:
    keep: dict[str, tuple[str, ...]] = {}
    for value in values:
        component, _, patterns = value.partition("=")
        if not patterns:
            raise ValueError(f"--keep {value!r}: expected COMPONENT=PATTERN[,PATTERN]")
        keep[component] = keep.get(component, ()) + tuple(patterns.split(","))
    return keep


def recipe_table() -> Table:
    """Every recipe with the bytes it gives FLUX.1-dev, from the real architecture counted on the meta device."""
    table = Table(title="recipes (bytes for FLUX.1-dev)")
    for column in ("recipe", "what", "transformer", "T5 encoder", "whole artifact"):
        table.add_column(column, justify="left" if column in ("recipe", "what") else "right")
    for recipe in RECIPES.values():
        sizes = {c: recipe.memory_bytes("full", c) for c in COMPONENTS}
        table.add_row(
            recipe.name,
            recipe.description,
            f"{sizes['transformer'] / 1e9:.2f} GB",
            f"{sizes['text_encoder_2'] / 1e9:.2f} GB",
            f"{sum(sizes.values()) / 1e9:.2f} GB",
        )
    return table


def size_table(stored: StoredArtifact) -> Table:
    table = Table(title=f"{stored.tag}  ({stored.manifest.recipe}, {stored.manifest.backend})")
    for column in ("component", "quantization", "source bytes (bf16)", "artifact bytes", "ratio"):
        table.add_column(column, justify="left" if column in ("component", "quantization") else "right")
    for name, component in stored.manifest.components.items():
        before = stored.source_bytes.get(name)
        quantization = component.quantization["weights"] if component.quantization else component.dtype or "-"
        table.add_row(
            name,
            quantization,
            f"{before:,}" if before else "-",
            f"{component.bytes:,}",
            f"{component.bytes / before:.3f}" if before else "-",
        )
    table.add_row(
        "total", "", f"{sum(b for b in stored.source_bytes.values() if b):,}", f"{stored.manifest.total_bytes:,}", ""
    )
    return table


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lora"]:
        return lora.main(argv[1:])
    args = parse_args(argv)
    if args.list_recipes:
        Console(width=140).print(recipe_table())
        return 0
    progress = Console(stderr=True, soft_wrap=True)  # paths in errors stay whole, copyable
    try:
        source = resolve_source(args.source, args.revision, args.base)
    except SourceError as error:
        progress.print(f"[red]error:[/red] {error}")
        return 2
    try:
        recipe = RECIPES[args.recipe].tailored(
            tuple(args.components.split(",")) if args.components else None, parse_keep(args.keep), args.group_size
        )
    except ValueError as error:
        progress.print(f"[red]error:[/red] {error}")
        return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a terminated run cleans up like Ctrl-C
    try:
        with progress.status("starting") as status:

            def step(description: str) -> None:
                progress.log(description)
                status.update(description)

            def module_done(component: str, done: int, total: int) -> None:
                status.update(f"writing {component}: module {done}/{total}")

            gate = (
                None
                if args.skip_validation
                else Gate(args.validation_size, args.validation_steps, args.min_psnr, args.min_adherence)
            )
            stored = quantize_to_store(
                source, recipe, args.name or f"{source.slug}-{recipe.name}", step, gate, module_done
            )
    except (InsufficientDisk, SourceError) as error:
        progress.print(f"[red]error:[/red] {error}")
        return 2
    except QualityGateFailed as error:
        progress.print(f"[red]quality gate failed:[/red] {error}")
        return 3
    except KeyboardInterrupt:
        progress.print("[red]interrupted:[/red] nothing was stored")
        return 130
    Console(width=120).print(size_table(stored))
    quality = stored.manifest.quality
    if quality:
        print(
            f"quality vs unquantized ({quality['size']}², {quality['steps']} steps, {len(quality['per_prompt'])} "
            f"prompts): image PSNR {quality['image_psnr_db']:.2f} dB, SSIM {quality['image_ssim']:.4f}; "
            f"latent PSNR {quality['latent_psnr_db']:.2f} dB, SSIM {quality['latent_ssim']:.4f}"
        )
    if quality and quality.get("adherence") is not None:
        print(
            f"adherence: the checker finds {quality['adherence']:.0%} of {len(quality['per_prompt'])} held-out "
            f"prompts drawn as asked (unquantized: {quality['reference_adherence']:.0%})"
        )
    print(f"estimated GPU peak at 1024², everything resident: {stored.manifest.estimated_peak_gib_1024:.2f} GiB")
    print(stored.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
