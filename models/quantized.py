"""Quantized Linear layers of each backend, as the artifact stores them and as they are rebuilt.

A component's `quantization_map.json` names each quantized Linear with its settings:
    optimum-quanto: {"weights": "qint8" | "qint4" | "qfloat8_e4m3fn", "activations": "none", "group_size": 128 | null}
    bitsandbytes:   {"weights": "int8" | "nf4" | "fp4"}   (4-bit block size and double quantization
                    travel in the packed `weight.quant_state.*` tensor, as bitsandbytes writes it)
    gguf:           {"weights": "gguf", "ggml_type": "Q8_0" | "Q4_0" | "Q4_K" | ...}   (the weight is the
                    file's raw blocks, uint8, one row of bytes per output row)
diffusers refuses bitsandbytes on the CPU, so its modules are built here directly, on any device.
"""

import bitsandbytes as bnb
import torch
from bitsandbytes.nn import Int8Params, Params4bit
from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter
from gguf import GGMLQuantizationType
from optimum.quanto.nn import quantize_module

BACKENDS = ("quanto", "bitsandbytes", "gguf")
BNB_WEIGHTS = ("int8", "nf4", "fp4")


def bnb_int8_linear(linear: torch.nn.Linear, weight: torch.Tensor, scales: torch.Tensor) -> bnb.nn.Linear8bitLt:
    """LLM.int8(): int8 rows `weight` with their absmax `scales` (SCB), in place of `linear`."""
    module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                 has_fp16_weights=False, device="meta")
    module.weight = Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    module.weight.CB, module.weight.SCB = weight, scales
    return module


def bnb_4bit_linear(linear: torch.nn.Linear, packed: torch.Tensor, stats: dict[str, torch.Tensor],
                    dtype: torch.dtype = torch.bfloat16) -> bnb.nn.Linear4bit:
    """nf4/fp4: packed 4-bit `weight` and its quantization state (absmax, maps, packed settings), computing in `dtype`."""
    module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               compute_dtype=dtype, device="meta")
    module.weight = Params4bit.from_prequantized(packed, stats, device=packed.device, module=module)
    return module


def gguf_linear(linear: torch.nn.Linear, blocks: torch.Tensor, ggml_type: str, dtype: torch.dtype) -> GGUFLinear:
    """diffusers' GGUF Linear over raw GGML blocks: dequantized at each call, computing in `dtype`."""
    module = GGUFLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                        compute_dtype=dtype, device="meta")
    module.weight = GGUFParameter(blocks, quant_type=GGMLQuantizationType[ggml_type])
    return module


def rebuild(model: torch.nn.Module, state: dict[str, torch.Tensor], quantization: dict[str, dict],
            backend: str, dtype: torch.dtype = torch.bfloat16) -> set[str]:
    """Swap each mapped Linear of a meta-device `model` for its quantized module. bitsandbytes modules
    take their tensors out of `state` (their names are returned); quanto's load with `load_state_dict`."""
    before = set(state)
    for name, entry in quantization.items():
        linear = model.get_submodule(name)
        if backend == "quanto":
            module = quantize_module(linear, weights=entry["weights"])
            module.weight_group_size = entry.get("group_size")
        elif backend == "gguf":
            module = gguf_linear(linear, state.pop(f"{name}.weight"), entry["ggml_type"], dtype)
        elif entry["weights"] == "int8":
            module = bnb_int8_linear(linear, state.pop(f"{name}.weight"), state.pop(f"{name}.SCB"))
            state.pop(f"{name}.weight_format", None)
        else:
            prefix = f"{name}.weight."
            stats = {key.removeprefix(prefix): state.pop(key) for key in [k for k in state if k.startswith(prefix)]}
            module = bnb_4bit_linear(linear, state.pop(f"{name}.weight"), stats, dtype)
        if backend != "quanto" and f"{name}.bias" in state:
            module.bias = torch.nn.Parameter(state.pop(f"{name}.bias"), requires_grad=False)
        model.set_submodule(name, module)
    return before - set(state)
