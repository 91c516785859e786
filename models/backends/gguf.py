"""GGUF: a GGUF file's own blocks, kept as they are and served by diffusers' `GGUFLinear` (dequantized at
every call). Nothing is quantized here: the blocks come from the source file (quantize/stream.py).

quantization map entry: {"weights": "gguf", "ggml_type": "Q8_0" | "Q4_0" | "Q4_K" | ...} (the weight is the
file's raw blocks, uint8, one row of bytes per output row)
"""

import torch
from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter, dequantize_gguf_tensor
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from models.backends import Backend, register_backend, take_bias


@register_backend
class GGUF(Backend):
    name = "gguf"
    keeps_source_blocks = True

    def rebuild(self, linear, name, entry, state, dtype) -> torch.nn.Module:
        return take_bias(gguf_linear(linear, state.pop(f"{name}.weight"), entry["ggml_type"], dtype), name, state)

    def dequantize(self, module: torch.nn.Module) -> torch.Tensor:
        return dequantize_gguf_tensor(module.weight).float()


def gguf_linear(linear: torch.nn.Linear, blocks: torch.Tensor, ggml_type: str, dtype: torch.dtype) -> GGUFLinear:
    """diffusers' GGUF Linear over raw GGML blocks: dequantized at each call, computing in `dtype`."""
    module = GGUFLinear(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=dtype, device="meta"
    )
    module.weight = GGUFParameter(blocks, quant_type=GGMLQuantizationType[ggml_type])
    return module


def blocks_shape(linear: torch.nn.Linear, ggml_type: GGMLQuantizationType) -> tuple[int, int] | None:
    """The bytes a Linear's weight takes in `ggml_type` (rows × bytes per row), or None if its rows split
    into no whole number of blocks."""
    block, size = GGML_QUANT_SIZES[ggml_type]
    return None if linear.in_features % block else (linear.out_features, linear.in_features // block * size)
