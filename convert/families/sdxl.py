"""Stable Diffusion XL (base and finetunes): two CLIP text encoders, a UNet, a 4-channel VAE.

What optimum-intel 2.2's `get_diffusion_models_for_export_ext` does for SDXL, as data:
the submodels and their preparation, and the ACTIVATIONS_SCALE_FACTOR it writes for
force_upcast VAEs (the SDXL VAE overflows f16; see /work/shared/notes/fp16-numerics.md).
"""

from __future__ import annotations

from typing import Any

from convert.families.base import (
    CLIP_TOKENIZER_FILES,
    Config,
    GateSpec,
    LatentSpace,
    PipelineFamily,
    Shapes,
    SingleFile,
    SubmodelSpec,
    frozen,
    prepare_clip_hidden_states,
    prepare_unet,
    prepare_vae_decoder,
    prepare_vae_encoder,
    same_config,
    vae_fit,
    with_export_model_type,
)

#: what optimum-intel writes for SDXL VAEs with force_upcast
VAE_SCALE_FACTOR = "128.0"


def _prepare_text_encoder(model: Any, pipeline: Any) -> Any:
    """SDXL reads hidden states of every layer: export them, as optimum does."""
    return with_export_model_type(prepare_clip_hidden_states(model, pipeline), pipeline)


_prepare_unet = prepare_unet("tokenizer_2", "text_encoder_2")


def _vae_runtime_options(pipeline: Any) -> dict[str, str]:
    if getattr(pipeline.vae.config, "force_upcast", False):
        return {"ACTIVATIONS_SCALE_FACTOR": VAE_SCALE_FACTOR}
    return {}


def _pipeline_options(index: Config) -> dict[str, Any]:
    return {"force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True)),
            "add_watermarker": False}


def _sdxl_unet(shapes: Shapes) -> bool:
    """An SGM UNet with SDXL's added (text, time) embedding."""
    return "model.diffusion_model.label_emb.0.0.weight" in shapes and "model.diffusion_model.input_blocks.0.0.weight" in shapes


def is_sdxl_base(shapes: Shapes) -> bool:
    """Stability's SDXL base layout: CLIP-L as embedders.0, OpenCLIP-bigG as embedders.1."""
    return (_sdxl_unet(shapes) and "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight" in shapes
            and "conditioner.embedders.1.model.positional_embedding" in shapes)


def is_sdxl_refiner(shapes: Shapes) -> bool:
    """The refiner: OpenCLIP-bigG alone, as embedders.0."""
    return _sdxl_unet(shapes) and "conditioner.embedders.0.model.text_projection" in shapes


#: stabilityai/stable-diffusion-xl-base-1.0 at the commit its 1.0 release files were last changed
SDXL_BASE_REPO, SDXL_BASE_COMMIT = "stabilityai/stable-diffusion-xl-base-1.0", "462165984030d82259a11f4367a4eed129e94a7b"

_TEXT_ENCODER_FITS = same_config("text_encoder", "text encoder",
                                 ("hidden_size", "projection_dim", "num_hidden_layers", "vocab_size"),
                                 "substitute a text encoder of the same architecture")

SDXL = PipelineFamily(
    name="stable-diffusion-xl",
    description="Stable Diffusion XL (StableDiffusionXLPipeline): CLIP-L + OpenCLIP-bigG, UNet, 4-channel VAE",
    diffusers_class="StableDiffusionXLPipeline",
    optimum_class="OVStableDiffusionXLPipeline",
    genai_class="Text2ImagePipeline",
    submodels=(
        SubmodelSpec("text_encoder", "text_encoder", "feature-extraction", None, _prepare_text_encoder),
        SubmodelSpec("text_encoder_2", "text_encoder_2", "feature-extraction", None, _prepare_text_encoder),
        SubmodelSpec("unet", "unet", "semantic-segmentation", None, _prepare_unet),
        SubmodelSpec("vae_decoder", "vae", "semantic-segmentation", "vae-decoder", prepare_vae_decoder,
                     _vae_runtime_options),
        SubmodelSpec("vae_encoder", "vae", "semantic-segmentation", "vae-encoder", prepare_vae_encoder,
                     _vae_runtime_options),
    ),
    tokenizers=("tokenizer", "tokenizer_2"),
    loaders=frozen({
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
        "unet": ("diffusers", "UNet2DConditionModel"),
    }),
    denoiser="unet",
    fit_checks=frozen({
        "vae": vae_fit("UNet", "substitute a VAE trained for this pipeline family "
                               "(for SDXL: an SDXL VAE such as sdxl-vae-fp16-fix)"),
        "unet": same_config("unet", "unet",
                            ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type",
                             "addition_time_embed_dim", "projection_class_embeddings_input_dim"),
                            "substitute a UNet of the same architecture (an SDXL finetune)"),
        "text_encoder": _TEXT_ENCODER_FITS,
        "text_encoder_2": _TEXT_ENCODER_FITS,
    }),
    tokenizer_files=CLIP_TOKENIZER_FILES,
    latents=LatentSpace(channels=4, scaling_factor=0.13025),
    gate=GateSpec(calls=("text_encoder", "text_encoder_2", "unet", "vae_decoder"),
                  encoders=("text_encoder", "text_encoder_2"), latent_input="sample", steps=3, guidance_scale=5.0),
    tags=("stable-diffusion-xl",),
    pipeline_options=_pipeline_options,
    single_file=SingleFile(is_sdxl_base, SDXL_BASE_REPO, SDXL_BASE_COMMIT),
    lora_targets=("unet", "text_encoder", "text_encoder_2"),
)
