"""Quantization recipes as data, and the one function that quantizes a Linear layer with a recipe."""

from dataclasses import dataclass, field, replace
from fnmatch import fnmatch

import torch
from diffusers import FluxPipeline
from transformers import T5EncoderModel

from models.backends import BACKENDS, Backend
from models.sizes import DEFAULT_GROUP_SIZE, bytes_per_weight, linear_layers, parameter_counts

QUANTIZABLE = ("transformer", "text_encoder_2", "text_encoder")
FP32_IN_FLOAT16 = {"text_encoder_2": tuple(T5EncoderModel._keep_in_fp32_modules)}  # as transformers keeps them


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    backend: str  # a name in models.backends.BACKENDS: "quanto", "bitsandbytes" or "gguf"
    weights: str  # quanto: qint8, qint4, qfloat8_e4m3fn; bitsandbytes: int8, nf4, fp4; gguf: the file's own types
    group_size: int | None = None  # quanto int4 group / bitsandbytes 4-bit block (None: the default)
    double_quant: bool = False  # bitsandbytes 4-bit: quantize the block scales too
    components: tuple[str, ...] = ("transformer", "text_encoder_2")
    # per component, module-name patterns (fnmatch) left in bf16: the final projection is the most sensitive
    keep: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"transformer": ("proj_out",)})

    @property
    def quantizer(self) -> Backend:
        return BACKENDS[self.backend]

    @property
    def weight_format(self) -> str:
        return {"qint8": "int8", "qint4": "int4", "qfloat8_e4m3fn": "float8"}.get(self.weights, self.weights)

    @property
    def groups(self) -> int | None:
        """The group/block size in force, for 4-bit formats."""
        return self.group_size or DEFAULT_GROUP_SIZE.get(self.weight_format)

    @property
    def bytes_per_weight(self) -> float:
        return bytes_per_weight(self.weight_format, self.groups, self.double_quant)

    def tailored(
        self, components: tuple[str, ...] | None, keep: dict[str, tuple[str, ...]], group_size: int | None = None
    ) -> "Recipe":
        """This recipe on other components, keeping more modules in bf16, or with another group size."""
        unknown = (set(components or ()) | set(keep)) - set(QUANTIZABLE)
        if unknown:
            raise ValueError(f"unknown component(s) {sorted(unknown)}: use {', '.join(QUANTIZABLE)}")
        if self.quantizer.keeps_source_blocks and set(components or self.components) != set(self.components):
            raise ValueError("--components: recipe gguf keeps a GGUF transformer's blocks and quantizes nothing else")
        if group_size is not None and self.groups is None:
            raise ValueError(f"--group-size: recipe {self.name} ({self.weights}) has no groups")
        if group_size is not None and (group_size < 32 or group_size & (group_size - 1)):
            raise ValueError(f"--group-size {group_size}: must be a power of two, at least 32")
        merged = {
            name: tuple(dict.fromkeys(self.keep.get(name, ()) + keep.get(name, ())))
            for name in set(self.keep) | set(keep)
        }
        return replace(
            self, components=components or self.components, keep=merged, group_size=group_size or self.group_size
        )

    def quantizes(self, component: str, name: str, module: torch.nn.Module) -> bool:
        """Whether this Linear is quantized: not kept in bf16, and its rows split into whole groups."""
        return isinstance(module, torch.nn.Linear) and self.quantizes_linear(component, name, module.in_features)

    def quantizes_linear(self, component: str, name: str, in_features: int) -> bool:
        if self.quantizer.keeps_source_blocks or component not in self.components:
            return False
        if any(fnmatch(name, pattern) for pattern in self.keep.get(component, ())):
            return False
        return self.groups is None or in_features % self.groups == 0

    def memory_bytes(self, preset_name: str, component: str, dtype: torch.dtype = torch.bfloat16) -> int:
        """A component's weights as loaded to compute in `dtype`: quantized Linear layers at the recipe's bytes,
        the rest at 2 bytes, and under float16 T5's kept `wo` layers at 4 (models.artifact.cast_state)."""
        linear, other = parameter_counts(preset_name, component)
        total = other * 2
        blocks_kept = self.quantizer.keeps_source_blocks and component in self.components  # at Q8_0's size, the largest
        for name, (weights, in_features) in linear_layers(preset_name, component).items():
            if blocks_kept or self.quantizes_linear(component, name, in_features):
                total += weights * self.bytes_per_weight
            else:
                in_fp32 = dtype == torch.float16 and name.split(".")[-1] in FP32_IN_FLOAT16.get(component, ())
                total += weights * (4 if in_fp32 else 2)
        return int(total)

    def manifest_entry(self, kept: list[str]) -> dict:
        """What the manifest records for a component quantized with this recipe."""
        return {
            "backend": self.backend,
            "weights": self.weights,
            "group_size": self.groups,
            "double_quant": self.double_quant,
            "kept_in_bf16": ",".join(kept),
        }


# T5's `wo` casts its input to the weight's dtype unless that is int8 (transformers' fp16 guard): a 4-bit
# weight is uint8, so a 4-bit `wo` would get its input truncated to integers. transformers' own bitsandbytes
# loading keeps it unquantized; so do the 4-bit recipes.
KEEP_4BIT = {"transformer": ("proj_out",), "text_encoder_2": ("*.wo",)}

RECIPES = {
    recipe.name: recipe
    for recipe in (
        Recipe("int8", "optimum-quanto int8 weights, per-channel scales", "quanto", "qint8"),
        Recipe("int4", "optimum-quanto int4 weights, groups of 128 with scale and shift", "quanto", "qint4"),
        Recipe("fp8", "optimum-quanto float8 (e4m3) weights", "quanto", "qfloat8_e4m3fn"),
        Recipe("int8-bnb", "bitsandbytes LLM.int8() weights", "bitsandbytes", "int8"),
        Recipe(
            "nf4",
            "bitsandbytes NF4, blocks of 64, double-quantized scales (QLoRA)",
            "bitsandbytes",
            "nf4",
            double_quant=True,
            keep=KEEP_4BIT,
        ),
        Recipe("fp4", "bitsandbytes FP4, blocks of 64", "bitsandbytes", "fp4", keep=KEEP_4BIT),
        Recipe(
            "gguf",
            "a GGUF file's own blocks, served as they are (sizes: Q8_0; Q4_0 is 0.53×)",
            "gguf",
            "gguf",
            components=("transformer",),
            keep={},
        ),
    )
}


def quantize_model(model: torch.nn.Module, component: str, recipe: Recipe) -> None:
    """Quantize a component already in memory, in place (benchmarks and tests; artifacts are streamed)."""
    for name, module in list(model.named_modules()):
        if recipe.quantizes(component, name, module):
            quantized = recipe.quantizer.quantize(module, recipe)[0]
            model.set_submodule(name, recipe.quantizer.for_inference(quantized))


def apply_recipe(pipe: FluxPipeline, recipe: Recipe) -> None:
    for component in recipe.components:
        quantize_model(getattr(pipe, component), component, recipe)
