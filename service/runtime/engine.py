"""One artifact loaded, placed on its device and warmed up: what the worker service renders with. It knows no
protocol and no server; a configuration it cannot serve raises `CannotServe`. The worker imports this module
when it starts, so the server's other processes (the fronts, the arbiter) never load torch or diffusers."""

import json
from collections.abc import Callable
from pathlib import Path

from diffusers import FluxPipeline

from models.artifact import load_pipeline, read_manifest
from models.kernels import choose_dtype, kernel_note, refusal, runnable
from models.lora import architecture_id
from models.sizes import module_bytes
from service.observe import logger
from service.runtime.adapters import AdapterCache
from service.runtime.blocks import COMPILED_RECIPES, THRESHOLDS
from service.runtime.board import Board
from service.runtime.device import capability_of, device_and_budget, device_responds, hold_to_budget, peak_memory
from service.runtime.placement import Placement, Plan, PlanError, plan_placement
from service.runtime.prompts import PromptCache
from service.runtime.render import Renderer
from service.runtime.turns import DeviceTurns
from service.schema import WorkItem
from service.settings import RESOLUTION_BUCKETS, Settings

COMPONENTS = ("transformer", "text_encoder_2", "text_encoder", "vae")


class CannotServe(Exception):
    """This artifact cannot be served here as configured (the card, the recipe, the memory budget)."""


class Engine:
    """Loads the artifact at `folder`, plans its placement, warms up (and compiles, when asked)."""

    def __init__(
        self,
        settings: Settings,
        folder: Path,
        tag: str,
        lora_folder: Callable[[str, str], Path | None],
        lora_names: Callable[[str], list[str]],
    ) -> None:
        self.settings, self.tag = settings, tag
        self.device, budget = device_and_budget(settings.gpu_memory_gb)
        self.capability = capability_of(self.device, settings.capability)
        self.dtype = choose_dtype(settings.compute_dtype, self.capability)
        self._check_card(read_manifest(folder).recipe)
        pipe, self.manifest = load_pipeline(folder, dtype=self.dtype)
        if settings.compile == "blocks" and self.manifest.recipe not in COMPILED_RECIPES:
            raise CannotServe(
                f"FLUX_COMPILE=blocks: {tag} is {self.manifest.recipe}, and only {', '.join(COMPILED_RECIPES)} "
                "blocks are compiled; unset FLUX_COMPILE or serve one of those"
            )
        lora_bytes = settings.lora_cache_mb * 2**20
        self.plan = self._plan(pipe, budget, lora_bytes)
        hold_to_budget(self.device, budget)
        self.cache = PromptCache(
            self.manifest.hash_of("text_encoder", "text_encoder_2"), settings.prompt_cache_mb * 2**20
        )
        self.board = Board()
        self.turns = DeviceTurns({bucket: settings.latency_ms(bucket) / 1000 for bucket in RESOLUTION_BUCKETS})
        self.architecture = architecture_id(json.loads((folder / "transformer" / "config.json").read_text()))
        self.lora_names = lambda: lora_names(self.architecture)
        self.adapters = AdapterCache(
            lambda name: lora_folder(self.architecture, name),
            self.lora_names,
            lora_bytes,
            self.device,
            pipe.transformer.dtype,
        )
        self.renderer = Renderer(
            pipe, Placement(self.plan, self.device), self.cache, self.board, self.adapters, settings.step_cache
        )
        self.compile_s = self._warm_up()
        recipe = self.manifest.recipe
        logger.info("serving %s (%s, %s, %s: %s)", tag, recipe, self.device, self.dtype_name, self.kernels)

    def _check_card(self, recipe: str) -> None:
        """Refuse before loading a recipe this card cannot run, naming the recipes it can."""
        if (reason := refusal(recipe, self.capability, self.dtype)) is not None:
            raise CannotServe(
                f"{self.tag}: {reason}; recipes this card runs in {self.dtype_name}: "
                f"{', '.join(runnable(self.capability, self.dtype))}"
            )

    def _plan(self, pipe: FluxPipeline, budget: int, lora_bytes: int) -> Plan:
        """The placement plan for these weights (in the compute dtype) within `budget`."""
        weights = {name: module_bytes(getattr(pipe, name)) for name in COMPONENTS}
        try:
            plan = plan_placement(
                weights, budget, self.settings.max_resolution, self.settings.max_batch_size, reserved_bytes=lora_bytes
            )
        except PlanError as error:
            raise CannotServe(f"{self.tag}: {error}") from None
        logger.info("placement for %s: %s", self.tag, plan.describe())
        return plan

    def _warm_up(self) -> float | None:
        """One render at the warm-up size, then, with FLUX_COMPILE=blocks, the compiled blocks: the seconds
        compiling added to the start (None when not compiled)."""
        side = min(self.settings.warmup_size, self.settings.max_resolution)
        warm_up = WorkItem(prompt="warm-up", width=side, height=side, steps=self.settings.warmup_steps)
        self.renderer.render([warm_up])
        return self._compile(warm_up) if self.settings.compile == "blocks" else None

    def _compile(self, warm_up: WorkItem) -> float:
        """FLUX_COMPILE=blocks: compile the repeated blocks, warmed up once (one row runs as two: every batch
        runs the same code); the seconds it added to the start."""
        seconds = self.renderer.compile_blocks([[warm_up]])
        logger.info("compiled the transformer's blocks in %.1f s", seconds)
        return seconds

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def kernels(self) -> str:
        return kernel_note(self.manifest.recipe, self.capability, self.dtype)

    def responds(self) -> bool:
        return device_responds(self.device)

    def info(self) -> dict:
        """What is served, where, and how: `/info`'s answer."""
        cache = {
            "entries": len(self.cache.entries),
            "bytes": self.cache.bytes,
            "hits": self.cache.hits,
            "misses": self.cache.misses,
        }
        loras = {
            "architecture": self.architecture,
            "available": self.lora_names(),
            "cached": len(self.adapters.entries),
            "cache_bytes": self.adapters.bytes,
            "cache_limit_bytes": self.adapters.max_bytes,
        }
        variant = self.manifest.served_variant
        card = {
            "capability": ".".join(map(str, self.capability)) if self.capability else None,
            "compute_dtype": self.dtype_name,
            "kernels": self.kernels,
            "peak_memory_bytes": peak_memory(self.device),
        }
        return {
            "artifact": self.tag,
            "device": str(self.device),
            "card": card,
            "placement": self.plan.describe(),
            "max_side": self.settings.max_resolution,
            "prompt_cache": cache,
            "loras": loras,
            "step_cache": {"default": self.settings.step_cache, "thresholds": THRESHOLDS},
            "compiled_blocks": {"enabled": self.compile_s is not None, "compile_seconds": self.compile_s},
            "defaults": {
                "steps": variant.steps,
                "guidance": variant.guidance,
                "max_steps": variant.max_steps,
                "takes_guidance": variant.takes_guidance,
                "t5_tokens": variant.max_sequence_length,
            },
            **self.manifest.model_dump(exclude={"files"}),
        }
