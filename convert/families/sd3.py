"""Stable Diffusion 3 / 3.5 (Medium, Large): CLIP-L + OpenCLIP-G + T5, an MMDiT transformer, a 16-channel VAE.

What optimum-intel 2.2's `get_sd3_models_for_export` does, as data: explicit exporter
model types for every text encoder and the transformer, and ACTIVATIONS_SCALE_FACTOR 8
for T5 only (optimum writes none for the SD3 VAE: whether it holds in f16 is for the gate
to show per build). T5 is optional, as in diffusers (`text_encoder_3=None`).
"""

from __future__ import annotations

from typing import Any

from convert.families.base import (
    CLIP_TOKENIZER_FILES,
    GateSpec,
    LatentSpace,
    PipelineFamily,
    SubmodelSpec,
    as_is,
    frozen,
    prepare_clip_hidden_states,
    prepare_vae_decoder,
    prepare_vae_encoder,
    same_config,
    vae_fit,
)

T5_SCALE_FACTOR = "8.0"  # optimum-intel's runtime option for the SD3 T5 encoder


def _prepare_transformer(model: Any, pipeline: Any) -> Any:
    """The config fields optimum adds before exporting an SD3 transformer (they shape its dummy inputs)."""
    model.config.text_encoder_projection_dim = model.config.joint_attention_dim
    model.config.requires_aesthetics_score = getattr(pipeline.config, "requires_aesthetics_score", False)
    model.config.time_cond_proj_dim = None
    return model


def _t5_runtime_options(_pipeline: Any) -> dict[str, str]:
    return {"ACTIVATIONS_SCALE_FACTOR": T5_SCALE_FACTOR}


_CLIP_FITS = same_config("text_encoder", "text encoder", ("hidden_size", "projection_dim", "num_hidden_layers", "vocab_size"),
                         "substitute a text encoder of the same architecture")

SD3 = PipelineFamily(
    name="stable-diffusion-3",
    description="Stable Diffusion 3/3.5 (StableDiffusion3Pipeline): CLIP-L + OpenCLIP-G + T5, MMDiT, 16-channel VAE",
    diffusers_class="StableDiffusion3Pipeline",
    optimum_class="OVStableDiffusion3Pipeline",
    genai_class="Text2ImagePipeline",
    submodels=(
        SubmodelSpec("text_encoder", "text_encoder", "feature-extraction", "clip-text-with-projection",
                     prepare_clip_hidden_states),
        SubmodelSpec("text_encoder_2", "text_encoder_2", "feature-extraction", "clip-text-with-projection",
                     prepare_clip_hidden_states),
        SubmodelSpec("text_encoder_3", "text_encoder_3", "feature-extraction", "t5-encoder-model", as_is,
                     _t5_runtime_options),
        SubmodelSpec("transformer", "transformer", "semantic-segmentation", "sd3-transformer", _prepare_transformer),
        SubmodelSpec("vae_decoder", "vae", "semantic-segmentation", "vae-decoder", prepare_vae_decoder),
        SubmodelSpec("vae_encoder", "vae", "semantic-segmentation", "vae-encoder", prepare_vae_encoder),
    ),
    tokenizers=("tokenizer", "tokenizer_2", "tokenizer_3"),
    loaders=frozen({
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
        "text_encoder_3": ("transformers", "T5EncoderModel"),
        "transformer": ("diffusers", "SD3Transformer2DModel"),
    }),
    denoiser="transformer",
    fit_checks=frozen({
        "vae": vae_fit("transformer", "substitute a VAE trained for this pipeline family (an SD3 16-channel VAE)"),
        "transformer": same_config("transformer", "transformer",
                                   ("in_channels", "out_channels", "patch_size", "joint_attention_dim",
                                    "pooled_projection_dim", "caption_projection_dim"),
                                   "substitute a transformer of the same architecture (a finetune of this model)"),
        "text_encoder": _CLIP_FITS,
        "text_encoder_2": _CLIP_FITS,
        "text_encoder_3": same_config("text_encoder_3", "T5 encoder", ("d_model", "vocab_size", "num_layers"),
                                      "substitute a T5 encoder of the same architecture"),
    }),
    tokenizer_files=(*CLIP_TOKENIZER_FILES, "spiece.model"),
    latents=LatentSpace(channels=16, scaling_factor=1.5305, shift_factor=0.0609),
    tags=("stable-diffusion-3",),
    optional=("text_encoder_3", "tokenizer_3"),
    # SD3.5 Medium/Large model cards: 40 steps at guidance 4.5; the gate samples 3 steps of that run
    gate=GateSpec(calls=("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder"),
                  encoders=("text_encoder", "text_encoder_2", "text_encoder_3"), latent_input="hidden_states",
                  steps=3, guidance_scale=4.5),
)
