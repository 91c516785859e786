"""Components written module by module from the source's safetensors: memory holds one layer and one shard.

Each component is built on the meta device from its config; each module's tensors are read, quantized
if the recipe says so, added to the shard being written, and dropped before the next module is read.
"""

import ctypes
import ctypes.util
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from models.artifact import COMPONENT_CLASSES, QUANTIZATION_MAP, empty_model, write_config
from models.backends.gguf import blocks_shape
from models.gguf_file import GGUFTransformer
from models.source import Source, SourceError
from models.tensors import SHARD_BYTES, ShardWriter, TensorFiles
from quantize.recipes import Recipe

Progress = Callable[[str, int, int], None]  # component, modules done, modules in all
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform == "linux" else None


def write_component(
    source: Source,
    component: str,
    folder: Path,
    recipe: Recipe,
    progress: Progress = lambda *_: None,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = SHARD_BYTES,
) -> dict | None:
    """Write one component as config + shards (+ quantization map); returns its manifest entry."""
    model = empty_model(COMPONENT_CLASSES[component], source.path / component)
    tensors = source.tensors(component)
    keeps_blocks = recipe.quantizer.keeps_source_blocks and isinstance(tensors, GGUFTransformer)
    aliases = _aliases(model)
    writer, quantization, kept, seen = ShardWriter(folder, shard_bytes), {}, [], set()
    modules = [(name, module) for name, module in model.named_modules() if _own_tensors(module)]
    for done, (name, module) in enumerate(modules, 1):
        meta = {key: tensor for key, tensor in _own_tensors(module).items() if id(tensor) not in seen}
        seen |= {id(tensor) for tensor in meta.values()}
        if not meta:  # a tied module, written under its first name
            continue
        if keeps_blocks and isinstance(module, torch.nn.Linear) and tensors.is_quantized(f"{name}.weight"):
            state, quantization[name] = _gguf_blocks(tensors, name, module, dtype)
            writer.add({f"{name}.{key}": tensor for key, tensor in state.items()})
            progress(component, done, len(modules))
            continue
        state = {key: _cast(_read(tensors, aliases[id(tensor)], tensor), dtype) for key, tensor in meta.items()}
        for key, tensor in state.items():
            setattr(
                module, key, torch.nn.Parameter(tensor, requires_grad=False) if key in module._parameters else tensor
            )
        if recipe.quantizes(component, name, module):
            quantized, quantization[name] = recipe.quantizer.quantize(module, recipe)
            state = quantized.state_dict()
        elif isinstance(module, torch.nn.Linear) and component in recipe.components:
            kept.append(name)
        writer.add({f"{name}.{key}" if name else key: tensor for key, tensor in state.items()})
        for key, tensor in meta.items():
            setattr(module, key, tensor)  # back to meta: the real tensors now live only in the shard
        _release_freed_memory()
        progress(component, done, len(modules))
    writer.close()
    write_config(model, folder)
    if quantization:
        (folder / QUANTIZATION_MAP).write_text(json.dumps(quantization, indent=2, sort_keys=True))
        return recipe.manifest_entry(kept)
    return None


def _gguf_blocks(
    tensors: GGUFTransformer, name: str, linear: torch.nn.Linear, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict]:
    """A Linear's GGML blocks as they are in the file (the bias in `dtype`), and its quantization-map entry."""
    ggml_type = tensors.ggml_type(f"{name}.weight")
    blocks = tensors.blocks(f"{name}.weight")
    if tuple(blocks.shape) != blocks_shape(linear, ggml_type):
        raise SourceError(
            f"{_where(tensors)}: {name}.weight ({ggml_type.name}) has {tuple(blocks.shape)} bytes, "
            f"the config says {linear.out_features}x{linear.in_features} weights"
        )
    state = {"weight": blocks}
    if linear.bias is not None:
        state["bias"] = _cast(_read(tensors, [f"{name}.bias"], linear.bias), dtype)
    return state, {"weights": "gguf", "ggml_type": ggml_type.name}


def _release_freed_memory() -> None:
    """glibc keeps the freed temporaries of quantization in its arenas (int4 reached 5.8 GiB RSS on the
    full transformer); giving them back after each layer keeps the peak at a layer plus a shard."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _own_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers held by the module itself, not by its children."""
    persistent = {k: b for k, b in module._buffers.items() if k not in module._non_persistent_buffers_set}
    return {k: p for k, p in {**module._parameters, **persistent}.items() if p is not None}


def _aliases(model: torch.nn.Module) -> dict[int, list[str]]:
    """Every name of each tensor: T5's shared embedding is also `encoder.embed_tokens.weight`."""
    names: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(tensor), []).append(name)
    return names


def _read(tensors: TensorFiles, names: list[str], like: torch.Tensor) -> torch.Tensor:
    """The tensor under any of its names, with the shape the config gives it."""
    found = [name for name in names if name in tensors]
    if not found:
        raise SourceError(f"{_where(tensors)}: no tensor {' or '.join(names)}")
    tensor = tensors.get(found[0])
    if tensor.shape != like.shape:
        raise SourceError(
            f"{tensors.files.get(found[0], _where(tensors))}: {found[0]} has shape {tuple(tensor.shape)}, "
            f"the config says {tuple(like.shape)}"
        )
    return tensor


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _where(tensors: TensorFiles) -> Path:
    return sorted(set(tensors.files.values()))[0].parent
