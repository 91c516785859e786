"""Quantization recipes as data, applied by one function."""

from dataclasses import dataclass, field, replace

import torch
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
    # per component, module-name patterns (fnmatch) left in bf16: the final projection is the most sensitive
    keep: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"transformer": ("proj_out",)})

    def tailored(self, components: tuple[str, ...] | None, keep: dict[str, tuple[str, ...]]) -> "Recipe":
        """This recipe on other components, or keeping more modules in bf16."""
        unknown = set(components or ()) | set(keep)
        unknown -= {"transformer", "text_encoder_2", "text_encoder"}
        if unknown:
            raise ValueError(f"unknown component(s) {sorted(unknown)}: use transformer, text_encoder_2, text_encoder")
        merged = {name: tuple(dict.fromkeys(self.keep.get(name, ()) + keep.get(name, ()))) for name in
                  set(self.keep) | set(keep)}
        return replace(self, components=components or self.components, keep=merged)


RECIPES = {
    recipe.name: recipe
    for recipe in (
        Recipe("int8", "optimum-quanto int8 weights for the transformer and T5 (per-channel scales)", "qint8"),
        Recipe("int4", "optimum-quanto int4 weights for the transformer and T5 (group-wise scales)", "qint4"),
        Recipe("fp8", "optimum-quanto float8 (e4m3) weights for the transformer and T5", "qfloat8_e4m3fn"),
    )
}


def quantize_component(module: torch.nn.Module, component: str, recipe: Recipe) -> None:
    """Quantize one component's weights in place, keeping the recipe's patterns for it in bf16."""
    quantize(module, weights=QTYPES[recipe.weights], exclude=list(recipe.keep.get(component, ())) or None)
    freeze(module)


def apply_recipe(pipe: FluxPipeline, recipe: Recipe) -> dict[str, dict[str, str]]:
    """Quantize the recipe's components in place; returns what was done to each, for the manifest."""
    for name in recipe.components:
        quantize_component(getattr(pipe, name), name, recipe)
    return {name: {"backend": recipe.backend, "weights": recipe.weights, "kept_in_bf16": ",".join(recipe.keep.get(name, ()))}
            for name in recipe.components}
