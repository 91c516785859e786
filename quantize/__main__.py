"""`python -m quantize SOURCE --recipe int8|int4 [--name NAME]`: prints a size table, then the tag alone."""

import argparse
import sys

from rich.console import Console
from rich.table import Table

from models.source import SourceError, resolve_source
from quantize.recipes import RECIPES
from quantize.store import StoredArtifact, quantize_to_store


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m quantize", description=__doc__)
    parser.add_argument("source", help="a diffusers FLUX folder, or a Hugging Face repo id in the local cache")
    parser.add_argument("--recipe", required=True, choices=sorted(RECIPES), help="how to quantize")
    parser.add_argument("--name", help="model-store name (default: <source>-<recipe>)")
    parser.add_argument("--revision", help="hub revision when SOURCE is a repo id")
    return parser.parse_args(argv)


def size_table(stored: StoredArtifact) -> Table:
    table = Table(title=f"{stored.tag}  ({stored.manifest.recipe}, {stored.manifest.backend})")
    for column in ("component", "quantization", "source bytes", "artifact bytes", "ratio"):
        table.add_column(column, justify="left" if column in ("component", "quantization") else "right")
    for name, component in stored.manifest.components.items():
        before = stored.source_bytes.get(name)
        quantization = component.quantization["weights"] if component.quantization else component.dtype or "-"
        table.add_row(name, quantization, f"{before:,}" if before else "-", f"{component.bytes:,}",
                      f"{component.bytes / before:.3f}" if before else "-")
    table.add_row("total", "", f"{sum(b for b in stored.source_bytes.values() if b):,}",
                  f"{stored.manifest.total_bytes:,}", "")
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = Console(stderr=True)
    try:
        source = resolve_source(args.source, args.revision)
    except SourceError as error:
        progress.print(f"[red]error:[/red] {error}")
        return 2
    recipe = RECIPES[args.recipe]
    with progress.status("starting") as status:
        def step(description: str) -> None:
            progress.log(description)
            status.update(description)
        stored = quantize_to_store(source, recipe, args.name or f"{source.slug}-{recipe.name}", step)
    Console(width=120).print(size_table(stored))
    print(stored.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
