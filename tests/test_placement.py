"""Fitting 16 GB: the placement planner, the prompt-embedding cache, out-of-memory splitting."""

import gc
import re
import weakref

import bentoml
import pytest
import torch

from models.artifact import load_pipeline
from models.sizes import GIB, bytes_per_weight, expected_bytes
from service.launcher import serve_command
from service.runtime import placement as placement_module
from service.runtime.placement import SAFETY_MARGIN, STRATEGIES, Placement, Plan, PlanError, plan_placement
from service.runtime.prompts import PromptCache
from service.runtime.render import Renderer
from service.runtime.result import Status
from service.schema import WorkItem
from tests.conftest import free_port, run_module

COMPONENTS = ("transformer", "text_encoder_2", "text_encoder", "vae")


def flux_dev_weights(weight_format: str) -> dict[str, int]:
    """FLUX.1-dev's bytes per component when the transformer and T5 are in `weight_format`."""
    quantized = bytes_per_weight(weight_format, double_quant=True)
    return {
        c: expected_bytes("full", c, quantized if c in ("transformer", "text_encoder_2") else 2.0) for c in COMPONENTS
    }


# recipe, budget GB -> strategy, batch at 1024², VAE tiling from (for 1024² max resolution, batches up to 8)
PLANS = {
    ("int8", 16): ("take-turns", 4, None),
    ("int8", 24): ("resident", 8, None),
    ("int8", 80): ("resident", 8, None),
    ("int4", 16): ("resident", 8, None),
    ("int4", 24): ("resident", 8, None),
    ("int4", 80): ("resident", 8, None),
    ("nf4", 16): ("resident", 8, None),
    ("nf4", 24): ("resident", 8, None),
    ("nf4", 80): ("resident", 8, None),
    ("int8", 12): ("sequential-offload", 8, None),
    ("nf4", 12): ("resident", 2, None),
}


@pytest.mark.parametrize("recipe, budget_gb", sorted(PLANS))
def test_plans_for_flux_dev(recipe, budget_gb):
    plan = plan_placement(flux_dev_weights(recipe), budget_gb * GIB, max_resolution=1024, max_batch=8)
    assert (plan.strategy, plan.max_batch[1024], plan.vae_tiling_above) == PLANS[(recipe, budget_gb)]
    assert plan.peak_bytes <= budget_gb * GIB - SAFETY_MARGIN
    batches = [plan.max_batch[r] for r in sorted(plan.max_batch)]
    assert batches == sorted(batches, reverse=True)  # never a bigger batch at a bigger size


def test_more_memory_never_needs_a_costlier_strategy():
    for recipe in ("int8", "int4", "nf4"):
        ranks = [
            STRATEGIES.index(plan_placement(flux_dev_weights(recipe), gb * GIB, 2048, 8).strategy)
            for gb in (12, 16, 24, 40, 80)
        ]
        assert ranks == sorted(ranks, reverse=True)


def test_a_configuration_that_cannot_fit_is_refused():
    with pytest.raises(PlanError, match=r"4.0 GiB cannot render 2048²"):
        plan_placement(flux_dev_weights("int8"), 4 * GIB, 2048, 1)


@pytest.mark.slow  # over half a minute: `make test-all`
def test_the_service_stops_when_the_plan_does_not_fit(tiny_int8_tag):
    """The worker plans at start-up (not at import) and stops the whole server, naming the reason."""
    result = run_module(
        *serve_command(free_port())[2:],
        env={
            "FLUX_ARTIFACT": tiny_int8_tag,
            "FLUX_GPU_MEMORY_GB": "0.5",
            "FLUX_GRPC_ADDRESS": f"127.0.0.1:{free_port()}",
        },
    )
    # BentoML names the worker's process "[:1]" or "[service:FluxWorker:1]", depending on the machine
    critical = rf"\[CRITICAL\] \[(service:FluxWorker)?:1\] {re.escape(tiny_int8_tag)}: 0\.5 GiB cannot render 2048²"
    assert re.search(critical, result.stdout + result.stderr), result.stdout[-2000:]


@pytest.fixture(scope="module")
def tiny_pipe(tiny_int8_tag):
    return load_pipeline(bentoml.models.get(tiny_int8_tag).path)[0]


def requests(*prompts: str, size: int = 64) -> list[WorkItem]:
    return [WorkItem(prompt=p, width=size, height=size, steps=2, seed=i) for i, p in enumerate(prompts)]


def count_calls(pipe, method: str, monkeypatch) -> list[int]:
    """Count the pipeline's calls of one of its text-encoder steps."""
    calls, original = [], getattr(pipe, method)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe, method, counted)
    return calls


def test_prompt_cache_hit_skips_both_encoders_and_gives_the_same_image(tiny_pipe, monkeypatch):
    cache = PromptCache("tiny", max_bytes=1 << 30)
    renderer = Renderer(tiny_pipe, Placement.resident(torch.device("cpu")), cache)
    t5_calls = count_calls(tiny_pipe, "_get_t5_prompt_embeds", monkeypatch)
    clip_calls = count_calls(tiny_pipe, "_get_clip_prompt_embeds", monkeypatch)
    first = images(renderer.render(requests("a red fox", "a blue jay")))
    assert (len(t5_calls), len(clip_calls), cache.misses) == (1, 1, 2)
    again = images(renderer.render(requests("a red fox", "a blue jay")))
    assert (len(t5_calls), len(clip_calls), cache.hits) == (1, 1, 2)
    uncached = images(
        Renderer(tiny_pipe, Placement.resident(torch.device("cpu"))).render(requests("a red fox", "a blue jay"))
    )
    assert first == again == uncached


def test_prompt_cache_stays_within_its_byte_limit(tiny_pipe):
    one_entry = 512 * tiny_pipe.text_encoder_2.config.d_model * 2 + tiny_pipe.text_encoder.config.projection_dim * 2
    cache = PromptCache("tiny", max_bytes=2 * one_entry)
    Renderer(tiny_pipe, Placement.resident(torch.device("cpu")), cache).render(requests("a", "b", "c"))
    assert len(cache.entries) == 2 and cache.bytes <= 2 * one_entry
    assert cache.get("a") is None and cache.get("c") is not None  # least recently used went first


class OutOfMemoryAbove:
    """The renderer's denoising loop running out of memory above `limit` rows per call, as a small GPU would:
    each failing attempt first allocates activations, held by its frame, like a real forward pass."""

    def __init__(self, renderer: Renderer, limit: int) -> None:
        self.denoiser, self.limit, self.batches = renderer.denoiser, limit, []
        self.activations: list[weakref.ref] = []  # of every failed attempt's tensor
        self.alive_at_retry: list[bool] = []  # was the previous failed attempt's tensor still alive at each retry?
        renderer.denoiser = self

    def run(self, starts, *args, **kwargs):
        if self.activations:
            gc.collect()  # only what is unreachable goes; a tensor held by a live traceback stays
            self.alive_at_retry.append(self.activations[-1]() is not None)
        self.batches.append(len(starts))
        if len(starts) > self.limit:
            activations = torch.empty(len(starts), 1 << 20)  # 4 MiB per image
            self.activations.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return self.denoiser.run(starts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.denoiser, name)


def flaky_renderer(pipe, limit: int) -> tuple[Renderer, OutOfMemoryAbove]:
    renderer = Renderer(pipe, Placement.resident(torch.device("cpu")))
    return renderer, OutOfMemoryAbove(renderer, limit)


def images(results) -> list[bytes]:
    return [result.image for result in results]


def test_out_of_memory_splits_the_batch_and_still_gives_the_same_images(tiny_pipe):
    expected = Renderer(tiny_pipe, Placement.resident(torch.device("cpu"))).render(requests(*"abcde"))
    renderer, flaky = flaky_renderer(tiny_pipe, limit=2)
    assert images(renderer.render(requests(*"abcde"))) == images(expected)
    assert flaky.batches == [5, 2, 3, 1, 2]  # 5 fails; halves 2 and 3; 3 fails; halves 1 and 2


def test_a_failed_attempts_tensors_are_freed_before_the_retry(tiny_pipe):
    """Recovery runs outside the except clause: the traceback no longer pins the failed attempt's frames."""
    renderer, flaky = flaky_renderer(tiny_pipe, limit=1)
    renderer.render(requests(*"abcd"))
    assert flaky.alive_at_retry and not any(flaky.alive_at_retry), flaky.alive_at_retry


def test_what_fails_alone_is_does_not_fit_and_the_renderer_keeps_working(tiny_pipe):
    renderer, flaky = flaky_renderer(tiny_pipe, limit=0)
    results = renderer.render(requests("too big", "also"))
    assert [r.status for r in results] == [Status.does_not_fit] * 2
    assert "does not fit in device memory even alone" in results[0].message
    flaky.limit = 8
    assert renderer.render(requests("fits"))[0].image[:4] == b"\x89PNG"


def test_cancelled_and_out_of_memory_are_different_outcomes(tiny_pipe):
    renderer, flaky = flaky_renderer(tiny_pipe, limit=1)
    items = requests("left", "stays", "too")
    for index, item in enumerate(items):
        item.request_id = f"r{index}"
    renderer.board.cancel("r0")
    flaky.limit = 0
    assert [r.status for r in renderer.render(items)] == [Status.cancelled, Status.does_not_fit, Status.does_not_fit]


def test_a_full_prompt_cache_hit_moves_nothing(tiny_pipe, monkeypatch):
    """take-turns moves T5 in and the transformer out to encode; with every prompt cached it must not."""
    moves = []
    monkeypatch.setattr(placement_module, "move", lambda module, device: moves.append(type(module).__name__))
    plan = Plan("take-turns", budget_bytes=16 * GIB, vae_tiling_above=None, max_batch={512: 4})
    renderer = Renderer(tiny_pipe, Placement(plan, torch.device("cpu")), PromptCache("tiny", 1 << 30))
    moves.clear()  # the initial placement
    renderer.render(requests("a fox", "a jay"))
    assert moves == ["FluxTransformer2DModel", "T5EncoderModel", "T5EncoderModel", "FluxTransformer2DModel"]
    moves.clear()
    renderer.render(requests("a jay", "a fox"))
    assert moves == []


def test_int8_bitsandbytes_state_follows_an_explicit_move(tiny_tag):
    """LLM.int8() keeps its int8 weights in `layer.state` after the first forward, which a parent's .to() does
    not move. On a CPU the move cpu -> meta shows it (on a GPU, cuda -> cpu is the move that matters)."""
    import bitsandbytes as bnb

    pipe, _ = load_pipeline(bentoml.models.get(tiny_tag("int8-bnb")).path)
    t5 = pipe.text_encoder_2
    t5(torch.ones(1, 8, dtype=torch.long))  # first forward: CB/SCB move into layer.state
    layers = [m for m in t5.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert layers and all(layer.state.CB is not None and layer.state.SCB is not None for layer in layers)
    placement_module.move(t5, torch.device("meta"))
    assert {p.device.type for p in t5.parameters()} == {"meta"}
    assert {layer.state.CB.device.type for layer in layers} == {"meta"}
    assert {layer.state.SCB.device.type for layer in layers} == {"meta"}


@pytest.mark.parametrize("strategy", ["t5-on-demand", "take-turns", "sequential-offload"])
def test_images_are_identical_whatever_the_placement(tiny_pipe, strategy):
    resident = Renderer(tiny_pipe, Placement.resident(torch.device("cpu"))).render(requests("a fox", "a jay"))
    plan = Plan(strategy, budget_bytes=16 * GIB, vae_tiling_above=None, max_batch={512: 1})
    placed = Renderer(tiny_pipe, Placement(plan, torch.device("cpu"))).render(requests("a fox", "a jay"))
    assert images(placed) == images(resident)
