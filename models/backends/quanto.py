"""optimum-quanto: int8, int4 (groups with scale and shift) and float8 weights.

quantization map entry:
    {"weights": "qint8" | "qint4" | "qfloat8_e4m3fn", "activations": "none", "group_size": 128 | null}
"""

import torch
from optimum.quanto import AbsmaxOptimizer, MaxOptimizer, qtypes, quantize_weight
from optimum.quanto.nn import quantize_module

from models.backends import Backend, LinearFormat, register_backend


@register_backend
class Quanto(Backend):
    name = "quanto"

    def quantize(self, linear: torch.nn.Linear, recipe: LinearFormat) -> tuple[torch.nn.Module, dict]:
        module = quantize_module(linear, weights=recipe.weights)
        module.weight_group_size = recipe.groups
        module.weight = torch.nn.Parameter(_weight(linear.weight.data, recipe), requires_grad=False)
        return module.train(linear.training), {
            "weights": recipe.weights,
            "activations": "none",
            "group_size": recipe.groups,
        }

    def for_inference(self, module: torch.nn.Module) -> torch.nn.Module:
        module.weight = torch.nn.Parameter(module.weight.optimize(), requires_grad=False)
        return module

    def rebuild(self, linear, name, entry, state, dtype) -> torch.nn.Module:
        module = quantize_module(linear, weights=entry["weights"])  # its tensors load with load_state_dict
        module.weight_group_size = entry.get("group_size")
        return module

    def dequantize(self, module: torch.nn.Module) -> torch.Tensor:
        return module.weight.dequantize().float()


def _weight(weight: torch.Tensor, recipe: LinearFormat) -> torch.Tensor:
    """What quanto's `freeze` computes, in its kernel-agnostic layout: packing int4 for a CPU kernel and
    unpacking it to save costs seconds per layer. Loading (or `optimize`) picks the kernel."""
    qtype = qtypes[recipe.weights]
    if qtype.bits == 8:
        scale = AbsmaxOptimizer()(weight, qtype=qtype, axis=0)
        return quantize_weight(weight, qtype, axis=0, scale=scale, optimized=False)
    scale, shift = MaxOptimizer()(weight, qtype=qtype, axis=0, group_size=recipe.groups)
    return quantize_weight(weight, qtype, axis=0, scale=scale, shift=shift, group_size=recipe.groups, optimized=False)
