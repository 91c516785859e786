"""The quality gate: the same prompts and seeds through the reference and the quantized pipeline, compared."""

import io
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FluxPipeline
from PIL import Image
from pydantic import BaseModel
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from models.architecture import decode_in_float32, variant_of

PROMPTS = (
    ("a lighthouse on a cliff at dawn, oil painting", 1),
    ("a red fox in fresh snow, photograph", 2),
    ("a bowl of ramen, studio lighting, top view", 3),
)


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


@torch.no_grad()
def render(pipe: FluxPipeline, size: int, steps: int) -> Renders:
    """Fixed prompts and seeds; latents kept before decoding so both can be compared.

    Both sides decode in float32 (the VAE is not quantized, so the comparison is unchanged).
    """
    pipe.set_progress_bar_config(disable=True)
    decode_in_float32(pipe.vae)
    images, latents = [], []
    variant = variant_of(pipe.transformer.config)
    for prompt, seed in PROMPTS:
        packed = pipe(
            prompt,
            height=size,
            width=size,
            num_inference_steps=steps,
            output_type="latent",
            guidance_scale=variant.guidance,
            max_sequence_length=variant.max_sequence_length,
            generator=torch.Generator().manual_seed(seed),
        ).images
        unpacked = pipe._unpack_latents(packed, size, size, pipe.vae_scale_factor)
        decoded = pipe.vae.decode(
            unpacked / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor, return_dict=False
        )[0]
        images.append(np.asarray(pipe.image_processor.postprocess(decoded, output_type="pil")[0]))
        latents.append(unpacked[0].float().numpy())
    return Renders(images, latents)


def compare(reference: Renders, candidate: Renders, size: int, steps: int) -> QualityReport:
    rows = []
    for (prompt, seed), ref_image, image, ref_latent, latent in zip(
        PROMPTS, reference.images, candidate.images, reference.latents, candidate.latents, strict=True
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
