"""Images in, read back by the checker (`python -m bench.quality` runs it on every recipe).

img2img: a generator's picture of one held-out scene, asked for with the caption of another (the same object
in another colour, or in another shape), over strengths: the share where the checker still reads the input,
and the share where it reads the prompt.

Inpainting: a picture of one object in a corner; the mask is the opposite corner's quarter; the prompt asks
for a held-out object there. The prompt names only the new object (and the background): the toy binds
attributes poorly when a caption names several objects, so a prompt naming both would measure that, not
inpainting; the kept object is the input's, outside the mask. Judged: both objects found as asked
(`all`), the new one alone (`new`); outside the mask, the picture's PSNR against the input, beside the VAE
round trip's (encode by sampling, decode: the bound). The variant whose prompt names both objects is
reported beside it. Rendered by diffusers' `FluxImg2ImgPipeline` and `FluxInpaintPipeline` on the
recipe's modules: alone, the service renders their pixels (tests/test_images_in.py).
"""

import math
import random
from dataclasses import dataclass, replace

import numpy as np
import torch
from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline
from PIL import Image

from models.toy import SIZE, STEPS
from models.toy.checker import judge, read
from models.toy.scenes import COLOURS, HELD_OUT, POSITIONS, SHAPES, Look, Scene, Thing, held_out_prompts, looks

STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)
OPPOSITE = {
    "top left": "bottom right",
    "top right": "bottom left",
    "bottom left": "top right",
    "bottom right": "top left",
}
BATCH = 20


def img2img_pairs(count: int) -> list[tuple[Scene, Scene]]:
    """(the input's scene, the asked scene): every other pair changes the colour, the others the shape."""
    rng = random.Random(11)
    pairs = []
    for index, scene in enumerate(held_out_prompts(count, things=1, seed=11)):
        thing = scene.things[0]
        if index % 2 == 0:
            changed = replace(thing, colour=rng.choice([c for c in COLOURS if c != thing.colour]), look=Look())
        else:
            changed = replace(thing, shape=rng.choice([s for s in SHAPES if s != thing.shape]), look=Look())
        pairs.append((scene, Scene(scene.background, (changed,))))
    return pairs


def reads(asked: list[Scene], images: list[Image.Image]) -> float:
    return float(np.mean([judge(scene, read(image)).all for scene, image in zip(asked, images, strict=True)]))


def batched(pipeline, prompts: list[str], seeds: list[int], **inputs) -> list[Image.Image]:
    """`pipeline` over the prompts in batches of BATCH (list inputs split alongside), one generator a seed."""
    images = []
    for start in range(0, len(prompts), BATCH):
        chunk = slice(start, start + BATCH)
        given = {name: value[chunk] if isinstance(value, list) else value for name, value in inputs.items()}
        images += pipeline(
            prompts[chunk],
            generator=[torch.Generator().manual_seed(seed) for seed in seeds[chunk]],
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            max_sequence_length=40,
            **given,
        ).images
    return images


def img2img_curve(pipe, pairs: list[tuple[Scene, Scene]], strengths=STRENGTHS) -> list[dict]:
    """Per strength, the share of pictures read as the input and as the prompt."""
    img2img = FluxImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    pictures = [scene.draw() for scene, _ in pairs]
    prompts, seeds = [asked.caption() for _, asked in pairs], list(range(len(pairs)))
    rows = []
    for strength in strengths:
        images = batched(img2img, prompts, seeds, image=pictures, strength=strength)
        rows.append(
            {
                "strength": strength,
                "reads_input": reads([scene for scene, _ in pairs], images),
                "reads_prompt": reads([asked for _, asked in pairs], images),
            }
        )
    return rows


@dataclass(frozen=True)
class Repaint:
    """One inpainting case: the input (one object), the object asked where the mask is, the mask."""

    kept: Scene
    new: Thing

    @property
    def both(self) -> Scene:
        return Scene(self.kept.background, (*self.kept.things, self.new))

    @property
    def asking_new(self) -> str:
        return Scene(self.kept.background, (self.new,)).caption()

    def mask(self) -> Image.Image:
        """White over the new object's quarter of the picture."""
        x, y = POSITIONS[self.new.position]
        mask = Image.new("L", (SIZE, SIZE), 0)
        left, top = (x // (SIZE // 2)) * (SIZE // 2), (y // (SIZE // 2)) * (SIZE // 2)
        mask.paste(255, (left, top, left + SIZE // 2, top + SIZE // 2))
        return mask


def repaint_cases(count: int) -> list[Repaint]:
    """Held-out objects in a corner, each with a training object at the opposite corner to keep."""
    rng = random.Random(12)
    corners = [triple for triple in sorted(HELD_OUT) if triple[2] != "centre"]
    cases = []
    for _ in range(count):
        colour, shape, place = rng.choice(corners)
        new = Thing(colour, shape, place, rng.choice(("small", "large")))
        while (kept := Thing(rng.choice(list(COLOURS)), rng.choice(SHAPES), OPPOSITE[place], "small")).combination in (
            HELD_OUT
        ):
            pass
        things, light = looks([kept], rng)
        cases.append(Repaint(Scene(rng.choice(["black", "white", "gray"]), things, light), new))
    return cases


def psnr_outside(images: list[np.ndarray], references: list[np.ndarray], masks: list[np.ndarray]) -> float:
    """PSNR over the kept pixels (mask black) of all pictures together."""
    errors = [
        ((a.astype(float) - b.astype(float))[m == 0] ** 2) for a, b, m in zip(images, references, masks, strict=True)
    ]
    mse = float(np.mean(np.concatenate([e.ravel() for e in errors])))
    return 10 * math.log10(255**2 / mse) if mse else float("inf")


@torch.no_grad()
def vae_round_trip(pipe, pictures: list[Image.Image], seeds: list[int]) -> list[np.ndarray]:
    """Each picture encoded as the image pipelines encode it (a posterior sample) and decoded."""
    out = []
    for picture, seed in zip(pictures, seeds, strict=True):
        image = pipe.image_processor.preprocess(picture, height=SIZE, width=SIZE).to(pipe.transformer.dtype)
        latents = pipe.vae.encode(image).latent_dist.sample(torch.Generator().manual_seed(seed))
        decoded = pipe.vae.decode(latents.to(pipe.vae.dtype)).sample
        out.append(np.asarray(pipe.image_processor.postprocess(decoded.float(), output_type="pil")[0]))
    return out


def inpainting(pipe, cases: list[Repaint]) -> dict:
    """The share of pictures with the kept object and the new one as asked, prompts naming the new object
    (`all`, `new`) and both (`all_naming_both`); PSNR outside the mask, and the VAE round trip's."""
    inpaint = FluxInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    pictures, masks = [case.kept.draw() for case in cases], [case.mask() for case in cases]
    seeds = list(range(len(cases)))
    common = {"image": pictures, "mask_image": masks, "strength": 1.0}
    images = batched(inpaint, [case.asking_new for case in cases], seeds, **common)
    naming_both = batched(inpaint, [case.both.caption() for case in cases], seeds, **common)
    arrays, inputs = [np.asarray(i) for i in images], [np.asarray(p) for p in pictures]
    mask_arrays = [np.asarray(m) for m in masks]
    only_new = [Scene(case.kept.background, (case.new,)) for case in cases]
    new_found = [
        any(judge(asked, Scene(seen.background, (thing,))).all for thing in seen.things)
        for asked, seen in zip(only_new, (read(image) for image in images), strict=True)
    ]
    return {
        "all": reads([case.both for case in cases], images),
        "new": float(np.mean(new_found)),
        "all_naming_both": reads([case.both for case in cases], naming_both),
        "psnr_outside_db": psnr_outside(arrays, inputs, mask_arrays),
        "vae_round_trip_psnr_outside_db": psnr_outside(vae_round_trip(pipe, pictures, seeds), inputs, mask_arrays),
    }


def curve_markdown(rows: list[dict], pairs: int) -> str:
    lines = [f"| strength ({pairs} pictures) | reads the input | reads the prompt |", "|---|---|---|"]
    lines += [f"| {r['strength']} | {r['reads_input']:.1%} | {r['reads_prompt']:.1%} |" for r in rows]
    return "\n".join(lines) + "\n"


def inpainting_markdown(rows: dict[str, dict], cases: int) -> str:
    lines = [
        f"| recipe | inpainting: both as asked ({cases}) | new object | prompt naming both | PSNR outside the mask "
        "| VAE round trip | img2img 0.6: reads the prompt |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['all']:.1%} | {r['new']:.1%} | {r['all_naming_both']:.1%} | {r['psnr_outside_db']:.1f} dB "
            f"| {r['vae_round_trip_psnr_outside_db']:.1f} dB | {r['img2img_0.6']['reads_prompt']:.1%} |"
        )
    return "\n".join(lines) + "\n"
