"""LoRA stacks per request on any base (bf16, quanto, bitsandbytes), with different stacks in one batch.

The base weights are never touched: for the length of one pipeline call, each Linear some item's stack
targets gets a forward hook that adds, row by row, scale · B(A(x)) of every adapter in that row's stack,
in the compute dtype and in stack order (as PEFT adds its active adapters). Rows are computed one at a time,
so an image is the same alone or in any batch; a batch without LoRAs runs with no hook at all.
Adapters live in a device-memory LRU bounded in bytes, read from the store on a miss.
"""

import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from models.lora import LoraError, LowRank, load_adapter
from service.observe import LORA_CACHE, LORA_LOAD_SECONDS, logger
from service.runtime.blocks import Rows
from service.runtime.result import Result, Status, failure
from service.schema import WorkItem

Pairs = dict[str, LowRank]  # module name -> its low-rank pair
Stack = list[tuple[Pairs, float]]  # (adapter, request scale) in the order the request lists them


def human_bytes(count: int) -> str:
    """1234567 -> '1.2 MB', 28672 -> '28.0 KB', 0 -> '0 B'."""
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def pair_bytes(pairs: Pairs) -> int:
    return sum(t.numel() * t.element_size() for pair in pairs.values() for t in (pair.down, pair.up))


class AdapterCache:
    """Adapters resident on the device, least recently used evicted first, within `max_bytes`. `find` gives
    the stored folder of an adapter name (NAME: its latest version) or None; `names` what requests may use."""

    def __init__(
        self,
        find: Callable[[str], Path | None],
        names: Callable[[], list[str]],
        max_bytes: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.find, self.names, self.max_bytes, self.device, self.dtype = find, names, max_bytes, device, dtype
        self.entries: OrderedDict[Path, Pairs] = OrderedDict()  # by stored folder: a new version is a new entry
        self.bytes = 0

    def refusal(self, item: WorkItem) -> Result | None:
        """Why `item`'s stack cannot run here (an adapter name this store does not have), else None."""
        for index, lora in enumerate(item.loras):
            if self.find(lora.name) is None:
                return failure(
                    Status.refused,
                    f"no LoRA adapter {lora.name!r} for this artifact (available: {', '.join(self.names()) or 'none'})",
                    field=f"loras[{index}].name",
                )
        return None

    def load(self, items: list[WorkItem]) -> dict[str, str]:
        """Put every adapter the items name on the device, evicting others as needed to stay within the bound.
        Returns the names that could not be read, with why: each is logged and counted once per batch, and not
        remembered (a later batch tries again: a file put right serves at once)."""
        broken, kept = {}, set()
        for name in dict.fromkeys(lora.name for item in items for lora in item.loras):
            folder = self.find(name)
            try:
                if folder is None:
                    raise LoraError("it was removed from the store")
                self._load(folder)
                kept.add(folder)
            except LoraError as error:
                LORA_CACHE.labels(result="unreadable").inc()
                logger.error("LoRA adapter %r cannot be read: %s", name, error)
                broken[name] = str(error)
        self._evict(keep=kept)
        return broken

    def stacks(self, items: list[WorkItem]) -> list[Stack]:
        """Each item's stack, from the adapters `load` put on the device."""
        return [[(self.entries[self.find(lora.name)], lora.scale) for lora in item.loras] for item in items]

    def _load(self, folder: Path) -> None:
        if folder in self.entries:
            LORA_CACHE.labels(result="hit").inc()
            self.entries.move_to_end(folder)
            return
        LORA_CACHE.labels(result="miss").inc()
        started = time.perf_counter()
        _, pairs = load_adapter(folder)
        self.entries[folder] = {
            module: LowRank(pair.down.to(self.device, self.dtype), pair.up.to(self.device, self.dtype), pair.scale)
            for module, pair in pairs.items()
        }
        self.bytes += pair_bytes(self.entries[folder])
        LORA_LOAD_SECONDS.observe(time.perf_counter() - started)

    def _evict(self, keep: set[Path]) -> None:
        for name in [name for name in self.entries if name not in keep]:
            if self.bytes <= self.max_bytes:
                break
            self.bytes -= pair_bytes(self.entries.pop(name))
        if self.bytes > self.max_bytes:
            logger.warning(
                "one batch's LoRA adapters take %s, over FLUX_LORA_CACHE_MB (%s)",
                human_bytes(self.bytes),
                human_bytes(self.max_bytes),
            )


def add_low_rank(
    updates: dict[int, list[tuple[LowRank, float]]], rows: Rows, module: torch.nn.Module, args: tuple, output
) -> torch.Tensor:
    """Forward hook: the output's k-th row, batch row `rows.current[k]`, gains scale · B(A(x)) for each (pair,
    scale) of that batch row."""
    inputs = args[0]
    for k, row in enumerate(rows.current):
        for pair, scale in updates.get(row, ()):
            x = inputs[k : k + 1].to(pair.down.dtype)
            output[k : k + 1] += (F.linear(F.linear(x, pair.down), pair.up) * scale).to(output.dtype)
    return output


@contextmanager
def stacks_applied(transformer: torch.nn.Module, stacks: list[Stack], rows: Rows):
    """`transformer` computes batch row i with stacks[i] added for the duration of the block; `rows` says which
    batch rows a forward computes (the step cache runs some blocks for a subset)."""
    updates: dict[str, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for row, stack in enumerate(stacks):
        for pairs, weight in stack:
            for module, pair in pairs.items():
                updates[module][row].append((pair, weight * pair.scale))
    handles = [
        transformer.get_submodule(module).register_forward_hook(partial(add_low_rank, by_row, rows))
        for module, by_row in updates.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
