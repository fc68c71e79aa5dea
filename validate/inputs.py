"""Realistic validation inputs: random latents can miss the overflow, real ones don't.

Two sources, both in the decoder's input space (pipeline latents / scaling_factor, plus
shift_factor where the family's VAE has one):
latents from encoding real photographs with the reference (original) VAE, and
latents produced by a short denoising run of the exported pipeline itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from convert.families import PipelineFamily

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputSet:
    name: str  # e.g. "images@1024", "denoise@256"
    description: str
    latents: np.ndarray  # [N, C, h, w] float32, decoder input
    images: np.ndarray | None = None  # [N, 3, H, W] float32 in [-1, 1], encoder input


def sample_images(names: list[str], size: int) -> np.ndarray:
    """scikit-image's bundled photographs, centre-cropped square, resized, scaled to [-1, 1]."""
    from PIL import Image
    from skimage import data

    batch = []
    for name in names:
        loader = getattr(data, name, None)
        if loader is None:
            raise ValueError(f"unknown scikit-image sample image '{name}' (try astronaut, chelsea, coffee)")
        array = np.asarray(loader())
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        array = array[..., :3]
        h, w = array.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        image = Image.fromarray(array[top : top + side, left : left + side]).resize((size, size), Image.BICUBIC)
        batch.append(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
    return np.stack(batch)


def encode_images(vae: Any, images: np.ndarray) -> np.ndarray:
    """Latent means from the reference VAE in f32 (what the decoder sees after / scaling_factor)."""
    import torch

    with torch.no_grad():
        posterior = vae.float().encode(torch.from_numpy(images)).latent_dist
        return posterior.mean.numpy().astype(np.float32)


def image_set(vae: Any, names: list[str], size: int) -> InputSet:
    images = sample_images(names, size)
    return InputSet(
        name=f"images@{size}",
        description=f"scikit-image {', '.join(names)} at {size}x{size}, encoded by the original VAE (f32)",
        latents=encode_images(vae, images),
        images=images,
    )


def run_inputs(family: PipelineFamily, size: int) -> dict[str, Any]:
    """What the pipeline call takes besides prompt, steps and guidance, as its users call it.

    text-to-image takes the size; image-to-image takes it from its input image (the astronaut
    photo; all steps run: strength 1).
    """
    if family.task != "image-to-image":
        return {"height": size, "width": size}
    from PIL import Image

    photo = (sample_images(["astronaut"], size)[0].transpose(1, 2, 0) + 1.0) * 127.5
    return {"image": Image.fromarray(photo.round().clip(0, 255).astype(np.uint8)), "strength": 1.0}


def denoised_set(bundle_dir: Path, family: PipelineFamily, prompt: str, steps: int, size: int, seed: int = 0) -> InputSet:
    """Run the exported pipeline itself (the family's optimum-intel class) for a few steps and take its latents.

    At f32, one part compiled at a time (`pipeline_run.run_at_f32`): optimum's own compile of
    every part at once took 13.3 GiB for the full-size flagship's 256x256 run.
    """
    import openvino as ov

    from validate.pipeline_run import load_pipeline, run_at_f32

    pipe = load_pipeline(bundle_dir, family.optimum_class)
    turns = run_at_f32(pipe, ov.Core())
    result = pipe(
        prompt,
        num_inference_steps=steps,
        output_type="latent",
        generator=np.random.RandomState(seed),
        **run_inputs(family, size),
    )
    latents = np.asarray(result.images, dtype=np.float32)
    decoder_input, how = family.decoder_latents(latents, pipe.vae_decoder.config)
    turns.release()
    del pipe
    return InputSet(
        name=f"denoise@{size}",
        description=f"{steps}-step run of the exported pipeline at {size}x{size} ('{prompt}'), {how}",
        latents=decoder_input,
    )
