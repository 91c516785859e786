"""`python -m bench.planner`: what the serving planner decides for FLUX.1-dev on common 16 GB-class cards.

Per card and recipe: refused at start (the kernel rules of models/kernels.py), or the placement
`plan_placement` picks at up to 1024², batches up to 8, with the weights as they are loaded in the card's
compute dtype (on T4/V100 float16, with T5's `wo` layers in float32). Estimates from the memory model, not
measurements: no GPU has run them.
"""

from dataclasses import dataclass, replace

import torch
from rich.console import Console
from rich.table import Table

from models.kernels import choose_dtype, kernel_note, refusal, sm
from models.sizes import GIB
from quantize.recipes import RECIPES, Recipe
from service.runtime.placement import PlanError, plan_placement

COMPONENTS = ("transformer", "text_encoder_2", "text_encoder", "vae")


@dataclass(frozen=True)
class Card:
    name: str
    memory_gib: float
    capability: tuple[int, int]


CARDS = (
    Card("12 GB, sm80+ (RTX 3060/4070)", 12, (8, 6)),
    Card("16 GB, sm80+ (RTX 4060 Ti/4080, A4000)", 16, (8, 9)),
    Card("T4 16 GB (sm75)", 15, (7, 5)),
    Card("V100 16 GB (sm70)", 16, (7, 0)),
    Card("24 GB, sm80+ (L4, RTX 4090)", 24, (8, 9)),
)  # a T4 shows 15 GiB to CUDA
COLUMNS = (
    RECIPES["int8"],
    RECIPES["int8-bnb"],
    RECIPES["int4"],
    RECIPES["nf4"],
    replace(RECIPES["gguf"], weights="Q4_0"),
)
FUSED = {name: kernel_note(name, (9, 0), torch.bfloat16) for name in RECIPES}  # what an sm90 card runs


def decision(card: Card, recipe: Recipe, resolution: int = 1024, batch: int = 8) -> str:
    dtype = choose_dtype("auto", card.capability)
    if (reason := refusal(recipe.name, card.capability, dtype)) is not None:
        return f"refused: {reason.split(';')[0]}"
    weights = {component: recipe.memory_bytes("full", component, dtype) for component in COMPONENTS}
    try:
        plan = plan_placement(weights, int(card.memory_gib * GIB), resolution, batch)
    except PlanError:
        return "does not fit"
    tiled = f", VAE tiled from {plan.vae_tiling_above}²" if plan.vae_tiling_above else ""
    slow = "" if kernel_note(recipe.name, card.capability, dtype) == FUSED[recipe.name] else " (no fused kernel)"
    return f"{plan.strategy}, batch {plan.max_batch[resolution]}{tiled}{slow}"


def main() -> None:
    table = Table(title="planner, FLUX.1-dev up to 1024², batches up to 8 (estimates)")
    table.add_column("card (compute dtype)")
    for recipe in COLUMNS:
        transformer, t5 = (recipe.memory_bytes("full", c) / 1e9 for c in ("transformer", "text_encoder_2"))
        label = f"{recipe.name} {recipe.weights}" if recipe.quantizer.keeps_source_blocks else recipe.name
        table.add_column(f"{label} ({transformer:.1f} + {t5:.1f} GB)")
    for card in CARDS:
        dtype = str(choose_dtype("auto", card.capability)).removeprefix("torch.")
        table.add_row(f"{card.name}: {sm(card.capability)}, {dtype}", *(decision(card, recipe) for recipe in COLUMNS))
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
