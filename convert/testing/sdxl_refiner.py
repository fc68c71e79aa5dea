"""A seeded, offline tiny SDXL refiner: img2img, one text encoder (OpenCLIP-G), aesthetic-score conditioning.

Same building blocks as the tiny SDXL base (convert.testing.sdxl); what differs is what the
refiner family differs in: no `text_encoder`/`tokenizer`, the UNet's cross-attention is the
second encoder's width only, and its added conditioning carries an aesthetic score (five
time ids instead of six). The VAE is the FP16-fixed tiny one, as a refiner recipe substitutes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from convert.testing.sdxl import (
    _PIPELINE_SHAPES,
    _SDXL_SCHEDULER,
    _cast,
    _sdxl_unet_config,
    _seeded,
    _text_encoder,
    build_overflow_vae,
    build_tokenizers,
    fix_vae_for_fp16,
    write_pipeline,
)

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLImg2ImgPipeline


def build_tiny_sdxl_refiner(seed: int = 0) -> StableDiffusionXLImg2ImgPipeline:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    shape = _PIPELINE_SHAPES["tiny"]
    _, tokenizer_2 = build_tokenizers()
    text_encoder_2 = _text_encoder(shape.text_encoder_2, tokenizer_2, True, seed, torch.float32)
    unet_config = _sdxl_unet_config(
        cross_attention_dim=shape.text_encoder_2.hidden_size,
        addition_time_embed_dim=shape.addition_time_embed_dim,
        projection_class_embeddings_input_dim=5 * shape.addition_time_embed_dim + shape.text_encoder_2.projection_dim,
        **shape.unet,
    )
    unet = _seeded(lambda: UNet2DConditionModel(**unet_config), "unet", seed, torch.float32)
    vae = _cast(fix_vae_for_fp16(build_overflow_vae(shape.vae, seed)), torch.float32)
    return StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=EulerDiscreteScheduler(**_SDXL_SCHEDULER), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False,
    )  # fmt: skip


def tiny_sdxl_refiner(out_dir: Path, seed: int) -> Path:
    return write_pipeline(build_tiny_sdxl_refiner(seed), out_dir)  # type: ignore[arg-type]
