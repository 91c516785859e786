"""Quantization recipes as data, applied by one function."""

from dataclasses import dataclass

from diffusers import FluxPipeline
from optimum.quanto import freeze, qfloat8, qint4, qint8, quantize

QTYPES = {qtype.name: qtype for qtype in (qint8, qint4, qfloat8)}  # "qint8", "qint4", "qfloat8_e4m3fn"


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    weights: str  # an optimum-quanto weight type
    backend: str = "quanto"
    components: tuple[str, ...] = ("transformer", "text_encoder_2")
    keep: tuple[str, ...] = ("proj_out",)  # module name patterns left in bf16


RECIPES = {
    recipe.name: recipe
    for recipe in (
        Recipe("int8", "optimum-quanto int8 weights for the transformer and T5 (per-channel scales)", "qint8"),
        Recipe("int4", "optimum-quanto int4 weights for the transformer and T5 (group-wise scales)", "qint4"),
        Recipe("fp8", "optimum-quanto float8 (e4m3) weights for the transformer and T5", "qfloat8_e4m3fn"),
    )
}


def apply_recipe(pipe: FluxPipeline, recipe: Recipe) -> dict[str, dict[str, str]]:
    """Quantize the recipe's components in place; returns what was done to each, for the manifest."""
    for name in recipe.components:
        module = getattr(pipe, name)
        quantize(module, weights=QTYPES[recipe.weights], exclude=list(recipe.keep))
        freeze(module)
    return {name: {"backend": recipe.backend, "weights": recipe.weights} for name in recipe.components}
