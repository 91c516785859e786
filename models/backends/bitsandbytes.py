"""bitsandbytes: LLM.int8() rows, and nf4/fp4 blocks. diffusers refuses bitsandbytes on the CPU, so the modules
are built here directly, on any device.

quantization map entry: {"weights": "int8" | "nf4" | "fp4"} (4-bit block size and double quantization travel
in the packed `weight.quant_state.*` tensor, as bitsandbytes writes it)
"""

import bitsandbytes as bnb
import torch
from bitsandbytes.nn import Int8Params, Params4bit

from models.backends import Backend, LinearFormat, register_backend, take_bias


@register_backend
class BitsAndBytes(Backend):
    name = "bitsandbytes"

    def quantize(self, linear: torch.nn.Linear, recipe: LinearFormat) -> tuple[torch.nn.Module, dict]:
        weight = linear.weight.data
        if recipe.weights == "int8":
            rows, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
            module = int8_linear(linear, rows, scales)
        else:
            packed, state = bnb.functional.quantize_4bit(
                weight, blocksize=recipe.groups, quant_type=recipe.weights, compress_statistics=recipe.double_quant
            )
            module = four_bit_linear(linear, packed, state.as_dict(packed=True))
        if linear.bias is not None:
            module.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        return module.train(linear.training), {"weights": recipe.weights}  # LLM.int8() trains differently

    def rebuild(self, linear, name, entry, state, dtype) -> torch.nn.Module:
        if entry["weights"] == "int8":
            module = int8_linear(linear, state.pop(f"{name}.weight"), state.pop(f"{name}.SCB"))
            state.pop(f"{name}.weight_format", None)
        else:
            prefix = f"{name}.weight."
            stats = {key.removeprefix(prefix): state.pop(key) for key in [k for k in state if k.startswith(prefix)]}
            module = four_bit_linear(linear, state.pop(f"{name}.weight"), stats, dtype)
        return take_bias(module, name, state)

    def dequantize(self, module: torch.nn.Module) -> torch.Tensor:
        weight = module.weight
        if isinstance(module, bnb.nn.Linear8bitLt):
            return weight.CB.float() * weight.SCB.float()[:, None] / 127
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()


def int8_linear(linear: torch.nn.Linear, weight: torch.Tensor, scales: torch.Tensor) -> bnb.nn.Linear8bitLt:
    """LLM.int8(): int8 rows `weight` with their absmax `scales` (SCB), in place of `linear`."""
    module = bnb.nn.Linear8bitLt(
        linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False, device="meta"
    )
    module.weight = Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    module.weight.CB, module.weight.SCB = weight, scales
    return module


def four_bit_linear(
    linear: torch.nn.Linear, packed: torch.Tensor, stats: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16
) -> bnb.nn.Linear4bit:
    """nf4/fp4: packed 4-bit `weight` and its quantization state (absmax, maps, settings), computing in `dtype`."""
    module = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=dtype, device="meta"
    )
    module.weight = Params4bit.from_prequantized(packed, stats, device=packed.device, module=module)
    return module
