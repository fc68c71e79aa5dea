"""The SDXL refiner: image-to-image, one text encoder (OpenCLIP-G), aesthetic-score conditioning.

SDXL's pieces (convert.families.sdxl) without `text_encoder`/`tokenizer`: the same UNet
preparation (optimum reads `requires_aesthetics_score` from the pipeline config, which
widens the UNet's added time ids), the same force_upcast VAE and its runtime option.
optimum-intel runs the bundle (OVStableDiffusionXLImg2ImgPipeline); openvino-genai 2026.4
does not know the pipeline class.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from convert.families.base import Config, SingleFile, frozen
from convert.families.sdxl import SDXL, is_sdxl_refiner

#: stabilityai/stable-diffusion-xl-refiner-1.0, pinned (configs and tokenizers only are read)
SDXL_REFINER_REPO, SDXL_REFINER_COMMIT = ("stabilityai/stable-diffusion-xl-refiner-1.0",
                                          "5d4cfe854c9a9a87939ff3653551c2b3c99a4356")


def _pipeline_options(index: Config) -> dict[str, Any]:
    return {"requires_aesthetics_score": bool(index.get("requires_aesthetics_score", True)),
            "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", False)),
            "add_watermarker": False}


SDXL_REFINER = dataclasses.replace(
    SDXL,
    name="stable-diffusion-xl-refiner",
    description="SDXL refiner (StableDiffusionXLImg2ImgPipeline): OpenCLIP-bigG only, UNet, 4-channel VAE",
    diffusers_class="StableDiffusionXLImg2ImgPipeline",
    optimum_class="OVStableDiffusionXLImg2ImgPipeline",
    genai_class=None,  # openvino-genai 2026.4: "Unsupported image to image generation pipeline 'StableDiffusionXLImg2ImgPipeline'"
    submodels=tuple(s for s in SDXL.submodels if s.name != "text_encoder"),
    tokenizers=("tokenizer_2",),
    loaders=frozen({k: v for k, v in SDXL.loaders.items() if k != "text_encoder"}),
    fit_checks=frozen({k: v for k, v in SDXL.fit_checks.items() if k != "text_encoder"}),
    tags=("stable-diffusion-xl", "refiner"),
    pipeline_options=_pipeline_options,
    optional=("text_encoder", "tokenizer"),
    task="image-to-image",
    single_file=SingleFile(is_sdxl_refiner, SDXL_REFINER_REPO, SDXL_REFINER_COMMIT),
    lora_targets=("unet", "text_encoder_2"),
    # img2img: the input image goes through the VAE encoder before the UNet runs
    gate=dataclasses.replace(SDXL.gate, calls=("text_encoder_2", "vae_encoder", "unet", "vae_decoder"),
                             encoders=("text_encoder_2",)),
)
