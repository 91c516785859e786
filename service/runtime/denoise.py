"""The denoising loop, built from FluxPipeline's own parts, where each row of a batch starts where it asks.

All rows of one call share the N-step schedule (same size, steps and guidance). A text-to-image row starts at
step 0 from its seed's noise, as `FluxPipeline` draws it. An image row (img2img, strength s) starts at step
`first_step(N, s)` from its image's latents (sampled from the VAE's posterior with its seed's generator, then
that generator's noise mixed in to that step's σ), as `FluxImg2ImgPipeline` starts it: it joins the running
batch at that step, and before it the transformer does not compute it. An inpainting row is an image row whose
kept region (outside its mask) is put back after every step, noised to the next step's σ, as
`FluxInpaintPipeline` does. Every operation is row by row or elementwise, so a row's bytes do not depend on its
companions, and a text-to-image batch gets FluxPipeline's bytes.

Where it differs from diffusers' pipelines: the inpainting pipeline also encodes the masked image (for
64-channel "Fill" transformers, which are not served); that draws from the generator after the noise and
changes nothing else, so it is skipped.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from service.pictures import MAX_SIDE, read_image, read_mask
from service.runtime.blocks import Rows
from service.schema import Conditioning


@dataclass
class Start:
    """One row in the loop: its packed latents, the first step it takes and, when inpainting, what it keeps."""

    latents: torch.Tensor
    step: int = 0
    image_latents: torch.Tensor | None = None  # the kept picture's latents (inpainting)
    noise: torch.Tensor | None = None  # the noise that re-noises them at each step
    mask: torch.Tensor | None = None  # 1 where the row is repainted


def first_step(steps: int, strength: float) -> int:
    """The steps a strength skips, as diffusers' image pipelines count them (`get_timesteps`)."""
    return int(max(steps - min(steps * strength, steps), 0))


class Denoiser:
    """FluxPipeline's parts for one call: the schedule, each row's start, and the loop."""

    def __init__(self, pipe: FluxPipeline) -> None:
        self.pipe = pipe
        self.masks = VaeImageProcessor(  # FluxInpaintPipeline's mask processor
            vae_scale_factor=pipe.vae_scale_factor * 2,
            vae_latent_channels=pipe.vae.config.latent_channels,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(channels, latent height, latent width) before packing."""
        factor = self.pipe.vae_scale_factor * 2
        return self.pipe.transformer.config.in_channels // 4, 2 * (height // factor), 2 * (width // factor)

    def schedule(self, steps: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        """FluxPipeline's timesteps (set on its scheduler, whose `sigmas` the loop reads)."""
        _, latent_height, latent_width = self.latent_shape(height, width)
        config = self.pipe.scheduler.config
        mu = calculate_shift(
            (latent_height // 2) * (latent_width // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        sigmas = np.linspace(1.0, 1 / steps, steps)
        return retrieve_timesteps(self.pipe.scheduler, steps, device, sigmas=sigmas, mu=mu)[0]

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        channels, height, width = latents.shape[1:]
        return self.pipe._pack_latents(latents, 1, channels, height, width)

    @torch.no_grad()
    def start(
        self,
        conditioning: Conditioning | None,
        generator: torch.Generator,
        size: tuple[int, int, int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> Start:
        """A row's start for a (height, width, steps) call, after `schedule`: noise, or its image noised."""
        height, width, steps = size
        channels, latent_height, latent_width = self.latent_shape(height, width)
        if conditioning is None:
            return Start(self.pipe.prepare_latents(1, channels, height, width, dtype, device, generator)[0])
        pipe, vae = self.pipe, self.pipe.vae
        picture = read_image(conditioning.image_bytes, MAX_SIDE)
        image = pipe.image_processor.preprocess(picture, height=height, width=width).to(device=device, dtype=dtype)
        image_latents = vae.encode(image).latent_dist.sample(generator)
        image_latents = (image_latents - vae.config.shift_factor) * vae.config.scaling_factor
        noise = randn_tensor(
            (1, channels, latent_height, latent_width), generator=generator, device=device, dtype=dtype
        )
        step = first_step(steps, conditioning.strength)
        sigma = pipe.scheduler.sigmas.to(device=device, dtype=image_latents.dtype)[step]
        start = Start(self.pack(sigma * noise + (1.0 - sigma) * image_latents), step)
        if conditioning.mask is None:
            return start
        mask = self.masks.preprocess(read_mask(conditioning.mask_bytes, MAX_SIDE), height=height, width=width)
        mask = torch.nn.functional.interpolate(mask, size=(latent_height, latent_width)).to(device=device, dtype=dtype)
        start.mask = self.pack(mask.repeat(1, channels, 1, 1))
        start.image_latents, start.noise = self.pack(image_latents), self.pack(noise)
        return start

    @torch.no_grad()
    def run(
        self,
        starts: list[Start],
        text: tuple[torch.Tensor, torch.Tensor],
        size: tuple[int, int],
        guidance: float,
        rows: Rows,
        after_step: Callable[[int, list[int]], bool],
    ) -> torch.Tensor:
        """The rows' latents after the schedule set by `schedule`; `after_step(step, rows)` is called after every
        step with the rows it computed, and stops the loop by returning False. `rows` tells the transformer's
        hooks (LoRA stacks, step cache) which batch rows each call computes."""
        pipe, transformer, scheduler = self.pipe, self.pipe.transformer, self.pipe.scheduler
        embeds, pooled = text
        device, latents = embeds.device, [start.latents for start in starts]
        _, latent_height, latent_width = self.latent_shape(*size)
        image_ids = pipe._prepare_latent_image_ids(1, latent_height // 2, latent_width // 2, device, latents[0].dtype)
        text_dtype = pipe.text_encoder.dtype if pipe.text_encoder is not None else transformer.dtype
        text_ids = torch.zeros(embeds.shape[1], 3).to(device=device, dtype=text_dtype)
        with_guidance = transformer.config.guidance_embeds
        timesteps = scheduler.timesteps
        for step, timestep in enumerate(timesteps):
            active = [row for row, start in enumerate(starts) if start.step <= step]
            if not active:  # every row starts later (image rows): nothing to compute yet
                continue
            hidden = torch.cat([latents[row] for row in active])
            with rows.only(active), transformer.cache_context("cond"):
                velocity = transformer(
                    hidden_states=hidden,
                    timestep=timestep.expand(len(active)).to(hidden.dtype) / 1000,
                    guidance=torch.full([1], guidance, device=device, dtype=torch.float32).expand(len(active))
                    if with_guidance
                    else None,
                    pooled_projections=pooled[active],
                    encoder_hidden_states=embeds[active],
                    txt_ids=text_ids,
                    img_ids=image_ids,
                    joint_attention_kwargs={},
                    return_dict=False,
                )[0]
            delta = scheduler.sigmas[step + 1] - scheduler.sigmas[step]  # the Euler step of FlowMatchEuler's `step`
            hidden = (hidden.to(torch.float32) + delta * velocity).to(velocity.dtype)
            for position, row in enumerate(active):
                latents[row] = self.keep(starts[row], hidden[position : position + 1], step, len(timesteps))
            if not after_step(step, active):
                break
        return torch.cat(latents)

    def keep(self, start: Start, latents: torch.Tensor, step: int, steps: int) -> torch.Tensor:
        """An inpainting row's latents with its kept region put back, noised to the next step's σ."""
        if start.mask is None:
            return latents
        kept = start.image_latents
        if step < steps - 1:
            sigma = self.pipe.scheduler.sigmas.to(device=kept.device, dtype=kept.dtype)[step + 1]
            kept = sigma * start.noise + (1.0 - sigma) * kept
        return (1 - start.mask) * kept + start.mask * latents
