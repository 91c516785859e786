"""The quality gate: the same prompts and seeds through the reference and the quantized pipeline, compared."""

import io
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FluxPipeline
from PIL import Image
from pydantic import BaseModel
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from models.architecture import pipeline_variant, vae_in_float32
from models.toy.scenes import held_out_prompts

PROMPTS = (
    ("a lighthouse on a cliff at dawn, oil painting", 1),
    ("a red fox in fresh snow, photograph", 2),
    ("a bowl of ramen, studio lighting, top view", 3),
)
TOY_SCENES = held_out_prompts(20, things=1, seed=11)  # the trained toy model's gate: prompts it never saw drawn
TOY_PROMPTS = tuple((scene.caption(), seed) for seed, scene in enumerate(TOY_SCENES))


@dataclass
class Renders:
    images: list[np.ndarray]  # uint8 HxWx3
    latents: list[np.ndarray]  # final latents, C x h x w, float32


class QualityReport(BaseModel):
    size: int
    steps: int
    image_psnr_db: float  # mean over the prompts
    image_ssim: float
    latent_psnr_db: float
    latent_ssim: float
    per_prompt: list[dict]
    adherence: float | None = None  # the toy model: share of held-out prompts the checker finds drawn as asked
    reference_adherence: float | None = None  # the same, unquantized


@torch.no_grad()
def render(
    pipe: FluxPipeline, size: int, steps: int, prompts: tuple[tuple[str, int], ...] = PROMPTS, batch: int = 1
) -> Renders:
    """Prompts with their seeds, `batch` at a time; latents kept before decoding so both can be compared.

    Both sides decode in float32 (the VAE is not quantized, so the comparison is unchanged).
    """
    pipe.set_progress_bar_config(disable=True)
    vae_in_float32(pipe.vae)
    images, latents = [], []
    variant = pipeline_variant(pipe)
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        packed = pipe(
            [prompt for prompt, _ in chunk],
            height=size,
            width=size,
            num_inference_steps=steps,
            output_type="latent",
            guidance_scale=variant.guidance,
            max_sequence_length=variant.max_sequence_length,
            generator=[torch.Generator().manual_seed(seed) for _, seed in chunk],
        ).images
        unpacked = pipe._unpack_latents(packed, size, size, pipe.vae_scale_factor)
        decoded = pipe.vae.decode(
            unpacked / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor, return_dict=False
        )[0]
        images += [np.asarray(image) for image in pipe.image_processor.postprocess(decoded, output_type="pil")]
        latents += [latent.float().numpy() for latent in unpacked]
    return Renders(images, latents)


def compare(
    reference: Renders, candidate: Renders, size: int, steps: int, prompts: tuple[tuple[str, int], ...] = PROMPTS
) -> QualityReport:
    rows = []
    for (prompt, seed), ref_image, image, ref_latent, latent in zip(
        prompts, reference.images, candidate.images, reference.latents, candidate.latents, strict=True
    ):
        latent_range = float(ref_latent.max() - ref_latent.min()) or 1.0
        rows.append(
            {
                "prompt": prompt,
                "seed": seed,
                "image_psnr_db": _finite(peak_signal_noise_ratio(ref_image, image, data_range=255)),
                "image_ssim": float(structural_similarity(ref_image, image, channel_axis=2, data_range=255)),
                "latent_psnr_db": _finite(peak_signal_noise_ratio(ref_latent, latent, data_range=latent_range)),
                "latent_ssim": float(
                    structural_similarity(ref_latent, latent, channel_axis=0, data_range=latent_range)
                ),
            }
        )
    mean = lambda key: float(np.mean([row[key] for row in rows]))  # noqa: E731
    return QualityReport(
        size=size,
        steps=steps,
        image_psnr_db=mean("image_psnr_db"),
        image_ssim=mean("image_ssim"),
        latent_psnr_db=mean("latent_psnr_db"),
        latent_ssim=mean("latent_ssim"),
        per_prompt=rows,
    )


def _finite(psnr: float) -> float:
    """Identical inputs have infinite PSNR; JSON has no infinity, so cap it at 100 dB."""
    return float(min(psnr, 100.0))


def contact_sheet(reference: Renders, candidate: Renders) -> bytes:
    """PNG: the reference row above the quantized row."""
    rows = [np.concatenate(renders.images, axis=1) for renders in (reference, candidate)]
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate(rows, axis=0)).save(buffer, format="PNG")
    return buffer.getvalue()
