"""Seeded, offline tiny Stable Diffusion 1.x pipelines: plain (PNDM, guidance 7.5) and LCM-distilled.

SD 1.5's architecture in miniature: one CLIP text tower (CLIPTextModel, no projection read),
a UNet whose cross-attention takes the encoder's last hidden state and which has no added
(text, time) conditioning, and a 4-channel VAE with SD 1.x's scaling factor 0.18215. The LCM
form differs where LCM_Dreamshaper_v7 differs: the UNet's `time_cond_proj_dim` (the guidance
scale enters as an embedding, not as a second batch) and LCMScheduler. The VAE is a plain seeded
one (SD 1.x VAEs are not known to overflow f16 as SDXL's does): the gate shows that per build.

The single-file form writes the same weights under Stability's SD 1.x checkpoint keys
(`model.diffusion_model.`, `first_stage_model.`, `cond_stage_model.transformer.`), with the
inverse of the mapping diffusers reads, as convert.testing.single_file does for SDXL.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from convert.testing.sdxl import _PIPELINE_SHAPES, _atomic_dir, _seeded, _text_encoder, build_tokenizers, write_pipeline
from convert.testing.single_file import ldm_unet_vae_views, write_configs

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

#: the tiny single file's name
CHECKPOINT = "tiny-sd15.safetensors"
#: SD 1.5 unet/config.json's layout (attention levels, then one without; conv proj_in), 2 levels, narrow. Two:
#: at the gate's 32x32 a third level would run attention at 1x1, where this exporter's small trace (39x39)
#: gives a graph that fails shape inference (optimum-cli's 127x127 trace does not); real sizes never get there.
_TINY_UNET: Mapping[str, Any] = MappingProxyType({
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64], "attention_head_dim": 4, "norm_num_groups": 8,
})  # fmt: skip
_TINY_VAE: Mapping[str, Any] = MappingProxyType({  # SD 1.5 vae/config.json, 4 levels, narrow
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 32, 64, 64], "norm_num_groups": 8, "sample_size": 64, "scaling_factor": 0.18215,
})  # fmt: skip
_TIME_COND_PROJ_DIM = 32  # LCM_Dreamshaper_v7: 256
_SCALED_LINEAR: Mapping[str, Any] = MappingProxyType({
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "steps_offset": 1,
})  # fmt: skip


def _parts(seed: int, *, lcm: bool) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    tokenizer, _ = build_tokenizers()
    shape = _PIPELINE_SHAPES["tiny"].text_encoder
    text_encoder = _text_encoder(shape, tokenizer, False, seed, torch.float32)
    unet_config = {**_TINY_UNET, "cross_attention_dim": shape.hidden_size,
                   "time_cond_proj_dim": _TIME_COND_PROJ_DIM if lcm else None}
    unet = _seeded(lambda: UNet2DConditionModel(**unet_config), "unet", seed, torch.float32)
    vae = _seeded(lambda: AutoencoderKL(**_TINY_VAE), "vae", seed, torch.float32)
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet,
            "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def build_tiny_sd15_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A few-MB SD 1.5-shaped pipeline (f32, 64x64 native) with SD 1.5's PNDM scheduler."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    scheduler = PNDMScheduler(**_SCALED_LINEAR, set_alpha_to_one=False, skip_prk_steps=True)
    return StableDiffusionPipeline(**_parts(seed, lcm=False), scheduler=scheduler)


def build_tiny_sd15_lcm_pipeline(seed: int = 0) -> Any:
    """The same pipeline LCM-distilled in shape: a guidance-embedding UNet and LCMScheduler."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    scheduler = LCMScheduler(**_SCALED_LINEAR, clip_sample=False, set_alpha_to_one=True, original_inference_steps=50)
    return LatentConsistencyModelPipeline(**_parts(seed, lcm=True), scheduler=scheduler)


def original_sd1_views(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """The pipeline's weights under SD 1.x checkpoint keys (views: no copy)."""
    out = ldm_unet_vae_views(pipe)
    for key, value in pipe.text_encoder.state_dict().items():
        if not key.endswith("position_ids"):
            out[f"cond_stage_model.transformer.{key}"] = value
    return {k: v.detach() for k, v in out.items()}


def tiny_sd15(out_dir: Path, seed: int) -> Path:
    return write_pipeline(build_tiny_sd15_pipeline(seed), out_dir)  # type: ignore[arg-type]


def tiny_sd15_lcm(out_dir: Path, seed: int) -> Path:
    return write_pipeline(build_tiny_sd15_lcm_pipeline(seed), out_dir)  # type: ignore[arg-type]


def tiny_sd15_single_file(out_dir: Path, seed: int) -> Path:
    """A folder holding only `tiny-sd15.safetensors`: the tiny SD 1.5 pipeline in the original layout."""
    from safetensors.torch import save_file

    with _atomic_dir(out_dir) as tmp:
        views = original_sd1_views(build_tiny_sd15_pipeline(seed))
        save_file({k: v.contiguous().clone() for k, v in views.items()}, str(tmp / CHECKPOINT), metadata={"format": "pt"})
    return out_dir


def tiny_sd15_config(out_dir: Path, seed: int) -> Path:
    """The tiny single file's config source: the pipeline's configs and tokenizer, no weights."""
    with _atomic_dir(out_dir) as tmp:
        write_configs(build_tiny_sd15_pipeline(seed), tmp)
    return out_dir
