"""Which GPUs run which artifact: the compute capability and compute dtype each recipe's kernels need.

Read from the libraries' sources and docs: optimum-quanto 0.2.7 (`WeightQBitsTensor.create`,
`WeightQBytesTensor.create`), bitsandbytes ("LLM.int8() requires Turing or newer"), diffusers 0.42 (the GGUF
Linear dequantizes at each call; its optional CUDA kernels are off by default). No GPU has run them here:
these are the libraries' rules, not measurements. A CPU has no compute capability and runs every recipe.
"""

from dataclasses import dataclass

import torch

Capability = tuple[int, int]
NATIVE_BF16 = (8, 0)  # Ampere: below it (T4 sm75, V100 sm70) bf16 is emulated, so fp16 is the compute dtype


@dataclass(frozen=True)
class Kernels:
    fused: str  # the kernel that runs where the card allows it
    fused_from: Capability = (0, 0)  # below this, or in another dtype than `fused_dtypes`, `fallback` runs instead
    fallback: str = ""
    fused_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
    requires: Capability = (0, 0)  # below this nothing runs: the recipe is refused


KERNELS = {
    "int8": Kernels("quanto int8 weights: dequantized, then a 16-bit matmul"),
    "int4": Kernels(
        "TinyGemm int4 (bf16 activations, group 128, CUDA ≥ 12.1)",
        fused_from=NATIVE_BF16,
        fallback="quanto's generic path: every weight dequantized at every call (slow)",
        fused_dtypes=(torch.bfloat16,),
    ),
    "fp8": Kernels(
        "Marlin FP8 (quanto's CUDA extension, compiled at run time: needs a compiler)",
        fused_from=NATIVE_BF16,
        fallback="quanto's generic path: float8 weights upcast at every call",
    ),
    "int8-bnb": Kernels("LLM.int8() int8 matmul (cuBLASLt)", requires=(7, 5)),
    "nf4": Kernels("bitsandbytes 4-bit dequantize + matmul"),
    "fp4": Kernels("bitsandbytes 4-bit dequantize + matmul"),
    "gguf": Kernels("diffusers' GGUF Linear: blocks dequantized at every call"),
}


def sm(capability: Capability) -> str:
    return f"sm{capability[0]}{capability[1]}"


def choose_dtype(choice: str, capability: Capability | None) -> torch.dtype:
    """`auto`: bf16 on a CPU and on sm80+, float16 on older GPUs; otherwise the named dtype."""
    if choice != "auto":
        return getattr(torch, choice)
    return torch.float16 if capability is not None and capability < NATIVE_BF16 else torch.bfloat16


def refusal(recipe: str, capability: Capability | None, dtype: torch.dtype) -> str | None:
    """Why a card of `capability` (None: a CPU) cannot run `recipe` in `dtype`; None when it can."""
    if capability is None:
        return None
    if dtype == torch.bfloat16 and capability < NATIVE_BF16:
        return (
            f"{sm(capability)} has no native bf16 (it needs {sm(NATIVE_BF16)}+): set FLUX_COMPUTE_DTYPE=float16 or auto"
        )
    kernels = KERNELS[recipe]
    if capability < kernels.requires:
        return (
            f"recipe {recipe} runs {kernels.fused}, which needs {sm(kernels.requires)}+; this card is {sm(capability)}"
        )
    return None


def runnable(capability: Capability | None, dtype: torch.dtype) -> list[str]:
    """The recipes a card of `capability` runs in `dtype`."""
    return [recipe for recipe in KERNELS if refusal(recipe, capability, dtype) is None]


def kernel_note(recipe: str, capability: Capability | None, dtype: torch.dtype) -> str:
    """What computes this recipe's layers on the card (for /info and the start-up log)."""
    if capability is None:
        return "CPU kernels"
    kernels = KERNELS[recipe]
    fused = capability >= kernels.fused_from and dtype in kernels.fused_dtypes
    return kernels.fused if fused else kernels.fallback
