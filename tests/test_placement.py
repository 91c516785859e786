"""Fitting 16 GB: the placement planner, the prompt-embedding cache, out-of-memory splitting."""

import bentoml
import pytest
import torch

from models.artifact import load_pipeline
from models.sizes import bytes_per_weight, expected_bytes
from models.sizes import GIB
from service.launcher import serve_command
from service.runtime.placement import SAFETY_MARGIN, STRATEGIES, Placement, Plan, PlanError, plan_placement
from service.runtime.prompts import PromptCache
from service.runtime.render import OUT_OF_MEMORY, Renderer
from service.schema import WorkItem
from tests.conftest import free_port, run_module

COMPONENTS = ("transformer", "text_encoder_2", "text_encoder", "vae")


def flux_dev_weights(weight_format: str) -> dict[str, int]:
    """FLUX.1-dev's bytes per component when the transformer and T5 are in `weight_format`."""
    quantized = bytes_per_weight(weight_format, double_quant=True)
    return {c: expected_bytes("full", c, quantized if c in ("transformer", "text_encoder_2") else 2.0)
            for c in COMPONENTS}


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
        ranks = [STRATEGIES.index(plan_placement(flux_dev_weights(recipe), gb * GIB, 2048, 8).strategy)
                 for gb in (12, 16, 24, 40, 80)]
        assert ranks == sorted(ranks, reverse=True)


def test_a_configuration_that_cannot_fit_is_refused():
    with pytest.raises(PlanError, match=r"4.0 GiB cannot render 2048²"):
        plan_placement(flux_dev_weights("int8"), 4 * GIB, 2048, 1)


def test_the_service_refuses_to_start_when_the_plan_does_not_fit(tiny_int8_tag):
    result = run_module(*serve_command(free_port())[2:], env={"FLUX_ARTIFACT": tiny_int8_tag, "FLUX_GPU_MEMORY_GB": "0.5"})
    assert result.returncode != 0
    assert f"{tiny_int8_tag}: 0.5 GiB cannot render 2048²" in result.stderr


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
    first = renderer.render(requests("a red fox", "a blue jay"))
    assert (len(t5_calls), len(clip_calls), cache.misses) == (1, 1, 2)
    again = renderer.render(requests("a red fox", "a blue jay"))
    assert (len(t5_calls), len(clip_calls), cache.hits) == (1, 1, 2)
    uncached = Renderer(tiny_pipe, Placement.resident(torch.device("cpu"))).render(requests("a red fox", "a blue jay"))
    assert first == again == uncached


def test_prompt_cache_stays_within_its_byte_limit(tiny_pipe):
    one_entry = 512 * tiny_pipe.text_encoder_2.config.d_model * 2 + tiny_pipe.text_encoder.config.projection_dim * 2
    cache = PromptCache("tiny", max_bytes=2 * one_entry)
    Renderer(tiny_pipe, Placement.resident(torch.device("cpu")), cache).render(requests("a", "b", "c"))
    assert len(cache.entries) == 2 and cache.bytes <= 2 * one_entry
    assert cache.get("a") is None and cache.get("c") is not None  # least recently used went first


class OutOfMemoryAbove:
    """A pipeline that runs out of memory above `limit` images per call, as a small GPU would."""

    def __init__(self, pipe, limit: int) -> None:
        self.pipe, self.limit, self.batches = pipe, limit, []

    def __call__(self, **kwargs):
        self.batches.append(len(kwargs["prompt_embeds"]))
        if len(kwargs["prompt_embeds"]) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return self.pipe(**kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def test_out_of_memory_splits_the_batch_and_still_gives_the_same_images(tiny_pipe):
    expected = Renderer(tiny_pipe, Placement.resident(torch.device("cpu"))).render(requests(*"abcde"))
    flaky = OutOfMemoryAbove(tiny_pipe, limit=2)
    renderer = Renderer(flaky, Placement.resident(torch.device("cpu")))
    assert renderer.render(requests(*"abcde")) == expected
    assert flaky.batches == [5, 2, 3, 1, 2]  # 5 fails; halves 2 and 3; 3 fails; halves 1 and 2


def test_what_fails_alone_is_reported_and_the_renderer_keeps_working(tiny_pipe):
    renderer = Renderer(OutOfMemoryAbove(tiny_pipe, limit=0), Placement.resident(torch.device("cpu")))
    assert renderer.render(requests("too big", "also")) == [OUT_OF_MEMORY, OUT_OF_MEMORY]
    renderer.pipe.limit = 8
    assert renderer.render(requests("fits"))[0][:4] == b"\x89PNG"


@pytest.mark.parametrize("strategy", ["t5-on-demand", "take-turns", "sequential-offload"])
def test_images_are_identical_whatever_the_placement(tiny_pipe, strategy):
    resident = Renderer(tiny_pipe, Placement.resident(torch.device("cpu"))).render(requests("a fox", "a jay"))
    plan = Plan(strategy, budget_bytes=16 * GIB, vae_tiling_above=None, max_batch={512: 1})
    assert Renderer(tiny_pipe, Placement(plan, torch.device("cpu"))).render(requests("a fox", "a jay")) == resident
