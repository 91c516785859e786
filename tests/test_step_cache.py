"""Step caching per request on the trained toy model: each image's skips depend on its own residuals only, so it
renders the same bytes alone or in any batch, with any policy, LoRA stack or out-of-memory split beside it."""

from collections import Counter
from pathlib import Path

import bentoml
import pytest
import torch

from bench.gguf import store
from models.artifact import load_pipeline
from models.lora import describe_pairs, read_lora_file, write_adapter
from models.source import load_source_pipeline, resolve_source
from models.toy import SIZE, STEPS, TRAINED
from models.toy.scenes import held_out_prompts
from service.launcher import serve_command
from service.runtime.adapters import AdapterCache
from service.runtime.blocks import THRESHOLDS, RowCache, Rows, transformer_blocks
from service.runtime.placement import Placement
from service.runtime.render import Renderer
from service.runtime.result import Status
from service.schema import CachePolicy, LoraWeight, WorkItem
from tests.conftest import free_port, run_module
from tests.test_placement import OutOfMemoryAbove

PROMPTS = [scene.caption() for scene in held_out_prompts(4, seed=5)]


@pytest.fixture(scope="module")
def toy_pipe():
    return load_source_pipeline(resolve_source(str(TRAINED)), torch.bfloat16)


@pytest.fixture(scope="module")
def outlined(toy_pipe, tmp_path_factory) -> Path:
    """The toy's `outlined` adapter in the stored format."""
    file = TRAINED / "loras" / "outlined.safetensors"
    pairs, layout, _ = read_lora_file(file, toy_pipe.transformer)
    folder = tmp_path_factory.mktemp("adapters") / "outlined"
    write_adapter(folder, pairs, describe_pairs(pairs, "toy", file, layout))
    return folder


def renderer_for(pipe, adapter: Path) -> Renderer:
    adapters = AdapterCache(
        lambda name: adapter if name == "outlined" else None,
        lambda: ["outlined"],
        1 << 30,
        torch.device("cpu"),
        torch.bfloat16,
    )
    return Renderer(pipe, Placement.resident(torch.device("cpu")), adapters=adapters)


def item(k: int, cache: str, loras: tuple[str, ...] = ()) -> WorkItem:
    return WorkItem(
        prompt=PROMPTS[k],
        seed=k,
        width=SIZE,
        height=SIZE,
        steps=STEPS,
        cache=cache,
        loras=[LoraWeight(name=name) for name in loras],
    )


MIXED = [item(0, "off"), item(1, "fast"), item(2, "fast", ("outlined",)), item(3, "balanced")]


class BatchSizes:
    """The batch size of every call to the blocks after the first (their attention's rows)."""

    def __init__(self, pipe) -> None:
        self.sizes: list[int] = []
        self.handles = [
            block.attn.register_forward_pre_hook(self._add, with_kwargs=True)
            for block in transformer_blocks(pipe.transformer)[1:]
        ]

    def _add(self, module, args, kwargs) -> None:
        self.sizes.append(len(kwargs["hidden_states"]))

    def rows_per_block(self, blocks: int) -> float:
        return sum(self.sizes) / blocks

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def test_a_bf16_matmul_gives_each_row_the_same_bytes_in_any_batch():
    """On CPUs with AMX, oneDNN's bf16 kernels change with the number of rows: importing `models` caps it.
    (A single row takes a matrix-vector path of its own; a block's linears see batch × tokens rows.)"""
    torch.manual_seed(0)
    varied = []
    for width, out in ((64, 256), (512, 1536), (3072, 3072)):
        linear = torch.nn.Linear(width, out).to(torch.bfloat16)
        for rows in (2, 17, 256):
            x = torch.randn(8 * rows, width, dtype=torch.bfloat16)
            full = linear(x)
            varied += [(width, part) for part in (rows, 4 * rows) if not torch.equal(linear(x[:part]), full[:part])]
    assert not varied, f"rows that changed with the batch (width, rows): {varied}"


def test_a_batch_mixing_policies_and_stacks_gives_each_item_its_solo_bytes(toy_pipe, outlined):
    renderer = renderer_for(toy_pipe, outlined)
    counted = BatchSizes(toy_pipe)
    try:
        batched = renderer.render(MIXED)
        sizes = Counter(counted.sizes)
    finally:
        counted.close()
    assert all(result.ok for result in batched), [result.message for result in batched]
    assert any(0 < size < len(MIXED) for size in sizes), f"no step ran the remaining blocks for some rows: {sizes}"
    solo = [renderer.render([one])[0] for one in MIXED]
    assert [result.image for result in batched] == [result.image for result in solo]
    no_cache = Renderer(toy_pipe, Placement.resident(torch.device("cpu")))  # today's path: no hook at all
    assert solo[0].image == no_cache.render([MIXED[0]])[0].image
    assert len({result.image for result in batched}) == len(MIXED)


def test_fast_skips_the_remaining_blocks_at_most_steps(toy_pipe):
    renderer = Renderer(toy_pipe, Placement.resident(torch.device("cpu")), step_cache=CachePolicy.fast)
    remaining = len(transformer_blocks(toy_pipe.transformer)) - 1
    counted = BatchSizes(toy_pipe)
    try:
        unset = item(1, "off").model_copy(update={"cache": None})  # takes the renderer's default: fast
        assert renderer.render([unset])[0].ok
        fast_runs = counted.rows_per_block(remaining)
        counted.sizes.clear()
        assert renderer.render([item(1, "off")])[0].ok
        off_runs = counted.rows_per_block(remaining)
    finally:
        counted.close()
    assert off_runs == STEPS
    assert fast_runs < STEPS / 2, f"fast ran the remaining blocks {fast_runs} times in {STEPS} steps"


def test_each_row_decides_from_its_own_residuals():
    """A row whose first-block residual changes by half each step is never skipped, beside one that barely
    changes and is; and the steady row decides as it would alone."""
    steps, threshold = 12, THRESHOLDS[CachePolicy.fast]
    shared, alone = RowCache([threshold, threshold], Rows(2)), RowCache([threshold], Rows(1))
    decided_together, decided_alone = [], []
    base = torch.randn(2, 16, 8)
    for step in range(steps):
        steady = base[0] * (1 + 0.01 * step)
        wild = base[1] * (-0.5) ** step
        decided_together.append(shared.decide(torch.stack([steady, wild])))
        decided_alone.append(alone.decide(steady[None]))
    assert all(1 in rows for rows in decided_together), "the changing row was skipped"
    assert [0 in rows for rows in decided_together] == [0 in rows for rows in decided_alone]
    assert sum(0 in rows for rows in decided_together) < steps / 2, "the steady row was never skipped"
    assert shared.computed == [sum(0 in rows for rows in decided_together), steps]


def test_an_out_of_memory_split_keeps_every_items_bytes(toy_pipe, outlined):
    expected = [result.image for result in renderer_for(toy_pipe, outlined).render(MIXED)]
    renderer = renderer_for(toy_pipe, outlined)
    flaky = OutOfMemoryAbove(renderer, limit=2)
    assert [result.image for result in renderer.render(MIXED)] == expected
    assert flaky.batches == [4, 2, 2]


@pytest.mark.slow  # a server start: `make test-all`
def test_compiled_blocks_refuse_a_recipe_they_do_not_compile_at_start(tiny_tag):
    tag = tiny_tag("int8-bnb")
    result = run_module(
        *serve_command(free_port())[2:],
        env={"FLUX_ARTIFACT": tag, "FLUX_COMPILE": "blocks", "FLUX_GRPC_ADDRESS": f"127.0.0.1:{free_port()}"},
    )
    reason = f"FLUX_COMPILE=blocks: {tag} is int8-bnb, and only int8 blocks are compiled"
    assert reason in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]


@pytest.mark.slow  # compiling takes a minute or more here: `make test-all`
def test_compiled_blocks_give_an_image_the_same_bytes_alone_or_in_any_batch(toy_pipe, outlined):
    """The compiled code is specialized for one image and general for more, and the step cache runs it for any
    subset of rows: an image is the same bytes either way. A LoRA stack is refused, naming the field."""
    renderer = renderer_for(toy_pipe, outlined)
    plain = [one for one in MIXED if not one.loras]
    renderer.compile_blocks([plain[:1], plain[:2]])
    alone = [renderer.render([one])[0].image for one in plain]
    assert [result.image for result in renderer.render(plain)] == alone
    assert [result.image for result in renderer.render(plain[1:])] == alone[1:]
    refused = renderer.render(MIXED)[2]
    assert (refused.status, refused.field) == (Status.refused, "loras"), refused.message


@pytest.mark.slow  # quantizes the toy with every recipe: `make test-all`
@pytest.mark.parametrize("kind", ["int8", "int4", "fp8", "int8-bnb", "nf4", "fp4", "Q8_0", "Q4_0"])
def test_every_backend_keeps_each_items_solo_bytes_while_skipping(kind, tmp_path):
    stored = store(TRAINED, kind, tmp_path, f"step-cache-{kind.lower()}")
    pipe = load_pipeline(Path(bentoml.models.get(stored.tag).path))[0]
    renderer = Renderer(pipe, Placement.resident(torch.device("cpu")))
    plain = [one for one in MIXED if not one.loras]
    counted = BatchSizes(pipe)
    try:
        batched = renderer.render(plain)
        remaining_runs = counted.rows_per_block(len(transformer_blocks(pipe.transformer)) - 1)
    finally:
        counted.close()
    assert [result.image for result in batched] == [renderer.render([one])[0].image for one in plain]
    assert remaining_runs < len(plain) * STEPS, "nothing was skipped"
