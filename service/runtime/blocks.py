"""How the transformer's blocks run for one batch: which rows are in play, step caching per row, compiled blocks.

Step caching is a first-block cache (ParaAttention's, as diffusers' `FirstBlockCacheConfig` applies it) with
the decision made per row. At every step the first block runs for every row; a row whose first-block residual
changed, relative to the one of the last step it computed, by less than its policy's threshold reuses what the
remaining blocks added at that step; the other rows run the remaining blocks together, as a smaller batch. A
row's pixels so depend on its own request only: the same bytes alone or in any batch. The hooks sit in
diffusers' hook registry, as its first-block cache does; the decisions and the cached residuals are per row.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from diffusers.hooks import HookRegistry, ModelHook

from service.schema import CachePolicy

# Relative change of a row's first-block residual under which its remaining blocks are skipped (Nunchaku's
# double first-block cache uses 0.09 / 0.12 on FLUX.1-dev); measured on the toy model by `python -m bench.cache`.
THRESHOLDS: dict[CachePolicy, float | None] = {CachePolicy.off: None, CachePolicy.balanced: 0.1, CachePolicy.fast: 0.2}
HOOK = "flux_step_cache"
# Recipes whose blocks FLUX_COMPILE=blocks compiles (`python -m bench.cache` measures them); others are refused.
COMPILED_RECIPES = ("int8",)


class Rows:
    """The rows of a batch the blocks compute now: all of them, or the subset that runs the remaining blocks."""

    def __init__(self, count: int) -> None:
        self.current = list(range(count))

    @contextmanager
    def only(self, rows: list[int]) -> Iterator[None]:
        everything, self.current = self.current, rows
        try:
            yield
        finally:
            self.current = everything


def relative_change(residual: torch.Tensor, previous: torch.Tensor) -> float:
    """Mean absolute change of one row's residual over the mean magnitude of the previous one."""
    return ((residual - previous).abs().float().mean() / previous.abs().float().mean()).item()


class RowCache:
    """One pipeline call's per-row state, by batch row: thresholds, the last computed first-block residuals, what
    the remaining blocks added then; and which positions of this step's rows (`rows.current`: the rows that have
    started) compute the remaining blocks."""

    def __init__(self, thresholds: list[float | None], rows: Rows) -> None:
        self.thresholds, self.rows = thresholds, rows
        self.head_residual: list[torch.Tensor | None] = [None] * len(thresholds)
        self.tail_residual: list[torch.Tensor | None] = [None] * len(thresholds)
        self.head_output: torch.Tensor | None = None
        self.computing: list[int] = []
        self.computed = [0] * len(thresholds)

    def decide(self, residual: torch.Tensor) -> list[int]:
        """The positions, in this call's rows (`rows.current`), that run the remaining blocks this step; their
        residuals become the reference."""
        computing = []
        for position, row in enumerate(self.rows.current):
            threshold, previous = self.thresholds[row], self.head_residual[row]
            if previous is None or threshold is None or relative_change(residual[position], previous) > threshold:
                computing.append(position)
                self.head_residual[row] = residual[position].clone()  # a view would keep the whole batch's tensor
                self.computed[row] += 1
        return computing


class HeadBlock(ModelHook):
    """The first block: runs for every row, then decides per row; a skipping row gets its cached tail added."""

    def __init__(self, cache: RowCache) -> None:
        super().__init__()
        self.cache = cache

    def new_forward(self, module: torch.nn.Module, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        context, hidden = self.fn_ref.original_forward(**kwargs)
        cache = self.cache
        cache.computing = cache.decide(hidden - kwargs["hidden_states"])
        cache.head_output = hidden
        skipping = [position for position in range(len(hidden)) if position not in cache.computing]
        if skipping:
            hidden = hidden.clone()
            for position in skipping:
                hidden[position] += cache.tail_residual[cache.rows.current[position]]
        return context, hidden


class RemainingBlock(ModelHook):
    """Every later block: runs for the computing rows only (all of them: unchanged); the last one records what
    the remaining blocks added for each computing row."""

    def __init__(self, cache: RowCache, last: bool) -> None:
        super().__init__()
        self.cache, self.last = cache, last

    def new_forward(self, module: torch.nn.Module, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        cache, context, hidden = self.cache, kwargs["encoder_hidden_states"], kwargs["hidden_states"]
        positions, current = cache.computing, cache.rows.current
        if len(positions) == len(hidden):
            context, hidden = self.fn_ref.original_forward(**kwargs)
        elif positions:
            subset = {name: kwargs[name][positions] for name in ("hidden_states", "encoder_hidden_states", "temb")}
            with cache.rows.only([current[position] for position in positions]):
                sub_context, sub_hidden = self.fn_ref.original_forward(**(kwargs | subset))
            context, hidden = context.clone(), hidden.clone()
            context[positions], hidden[positions] = sub_context, sub_hidden
        if self.last:
            for position in positions:
                cache.tail_residual[current[position]] = hidden[position] - cache.head_output[position]
        return context, hidden


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


@contextmanager
def step_cache(transformer: torch.nn.Module, policies: list[CachePolicy], rows: Rows) -> Iterator[RowCache | None]:
    """Per-row step caching on `transformer` for one pipeline call; nothing at all when every policy is off."""
    thresholds = [THRESHOLDS[policy] for policy in policies]
    if all(threshold is None for threshold in thresholds):
        yield None
        return
    cache, blocks = RowCache(thresholds, rows), transformer_blocks(transformer)
    hooks = [HeadBlock(cache), *(RemainingBlock(cache, k == len(blocks) - 1) for k in range(1, len(blocks)))]
    for block, hook in zip(blocks, hooks, strict=True):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, HOOK)
    try:
        yield cache
    finally:
        for block in blocks:
            block._diffusers_hook.remove_hook(HOOK, recurse=False)


def compile_blocks(transformer: torch.nn.Module) -> None:
    """`torch.compile` of each repeated block's forward (regional compilation), shapes dynamic: the step cache
    runs them for any number of rows. The step cache's hooks stay outside the compiled code.

    torch.compile specializes a batch of one (its code for one row rounds differently from its code for any
    other number: an image alone and in a batch would differ), so one row runs as two (`never_alone`)."""
    for block in transformer_blocks(transformer):
        block.forward = partial(never_alone, torch.compile(block.forward, dynamic=True))


BATCHED = ("hidden_states", "encoder_hidden_states", "temb")  # a block's inputs with a batch dimension


def never_alone(forward: Callable, **inputs):
    """`forward` on a batch of one row as on two (the row twice), so it runs the code every batch runs; the
    first row's outputs."""
    if len(inputs["hidden_states"]) > 1:
        return forward(**inputs)
    doubled = {name: torch.cat([value, value]) if name in BATCHED else value for name, value in inputs.items()}
    outputs = forward(**doubled)
    return tuple(output[:1] for output in outputs) if isinstance(outputs, tuple) else outputs[:1]


def modulation_row_by_row(transformer: torch.nn.Module) -> None:
    """Every Linear given one row per image (the modulation and embedding layers: 2-D inputs, batch × features)
    computes each image's row on its own, as two rows (the row twice), and keeps the first. On CPUs without
    native bf16 such a matmul rounds differently with its number of rows (one row takes a matrix-vector path;
    2 and 4 rows differ too), so an image alone would differ from the same image in a batch. The token layers
    (batch × tokens rows) keep one call."""
    if getattr(transformer, "modulation_row_by_row", False):  # a second renderer on the same pipeline
        return
    transformer.modulation_row_by_row = True
    for module in transformer.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = partial(row_by_row, module.forward)


def row_by_row(forward: Callable, inputs: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if inputs.dim() != 2:
        return forward(inputs, *args, **kwargs)
    return torch.cat([forward(torch.cat([row, row]), *args, **kwargs)[:1] for row in inputs.split(1)])
