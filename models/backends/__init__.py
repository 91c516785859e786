"""Quantization backends behind one registry, as optimum-quanto's `register_qmodule` swaps modules by a table.

Each backend is one module here and says, for a Linear layer: how it is quantized (`quantize`), how it is
rebuilt from an artifact's tensors and quantization-map entry (`rebuild`), and its weight as a dense tensor
(`dequantize`, for references and LoRA checks). A component's `quantization_map.json` names each quantized
Linear with its backend's entry (see each module's docstring). Adding a backend is a module here, imported
below, plus its recipe rows in `quantize/recipes.py`.
"""

from typing import ClassVar, Protocol

import torch


class LinearFormat(Protocol):
    """What a recipe says of one quantized Linear (quantize.recipes.Recipe is one)."""

    weights: str
    groups: int | None
    double_quant: bool


class Backend:
    name: ClassVar[str]
    # the source's own quantized blocks are kept as they are (a GGUF file's); nothing is quantized here
    keeps_source_blocks: ClassVar[bool] = False

    def quantize(self, linear: torch.nn.Linear, recipe: LinearFormat) -> tuple[torch.nn.Module, dict]:
        """The quantized module for a Linear with real weights, and its quantization-map entry."""
        raise NotImplementedError(f"backend {self.name} quantizes nothing itself")

    def for_inference(self, module: torch.nn.Module) -> torch.nn.Module:
        """A module just quantized in memory, as loading its artifact would give it (the kernel picked)."""
        return module

    def rebuild(
        self, linear: torch.nn.Linear, name: str, entry: dict, state: dict[str, torch.Tensor], dtype: torch.dtype
    ) -> torch.nn.Module:
        """The quantized module in place of a meta-device `linear`, computing in `dtype`; tensors it takes
        are popped from `state` (what stays is loaded with `load_state_dict`)."""
        raise NotImplementedError

    def dequantize(self, module: torch.nn.Module) -> torch.Tensor:
        """The module's weight as a dense float32 tensor."""
        raise NotImplementedError


BACKENDS: dict[str, Backend] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    BACKENDS[cls.name] = cls()
    return cls


def rebuild(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    quantization: dict[str, dict],
    backend: str,
    dtype: torch.dtype = torch.bfloat16,
) -> set[str]:
    """Swap each mapped Linear of a meta-device `model` for its quantized module; the state keys taken."""
    before = set(state)
    for name, entry in quantization.items():
        model.set_submodule(name, BACKENDS[backend].rebuild(model.get_submodule(name), name, entry, state, dtype))
    return before - set(state)


def take_bias(module: torch.nn.Module, name: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The Linear's bias from `state`, when it has one."""
    if f"{name}.bias" in state:
        module.bias = torch.nn.Parameter(state.pop(f"{name}.bias"), requires_grad=False)
    return module


from models.backends import bitsandbytes, gguf, quanto  # noqa: E402, F401 - each registers itself
