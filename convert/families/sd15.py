"""Stable Diffusion 1.x (1.5 and its finetunes) and its LCM-distilled form: one CLIP-L text encoder, a UNet
without added conditioning, a 4-channel VAE, 512x512.

What optimum-intel 2.2's `get_diffusion_models_for_export_ext` does for `StableDiffusionPipeline`
and `LatentConsistencyModelPipeline`, as data: the text encoder exported as is (no hidden states
of every layer: SD 1.x reads the last one), the UNet's config fields taken from the pipeline
(`time_cond_proj_dim` gives an LCM UNet its guidance-embedding input `timestep_cond`), and no
VAE runtime option except for v-prediction schedulers (SD 2.1's overflow), which optimum marks
with ACTIVATIONS_SCALE_FACTOR 8. Whether a given SD 1.x VAE holds at f16 is for the gate to show.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
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
    prepare_unet,
    prepare_vae_decoder,
    prepare_vae_encoder,
    same_config,
    vae_fit,
    with_export_model_type,
)

#: what optimum-intel writes for the VAE of a v-prediction SD pipeline (SD 2.x)
V_PREDICTION_VAE_SCALE_FACTOR = "8.0"
#: stable-diffusion-v1-5/stable-diffusion-v1-5 (the maintained mirror of runwayml's), pinned; configs only are read
SD15_REPO, SD15_COMMIT = "stable-diffusion-v1-5/stable-diffusion-v1-5", "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"
#: diffusers components of an SD 1.x repo the bundle does not carry (optimum and openvino-genai run without them)
_NO_SAFETY_CHECKER: dict[str, Any] = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _vae_runtime_options(pipeline: Any) -> dict[str, str]:
    if getattr(pipeline.scheduler.config, "prediction_type", None) == "v_prediction":
        return {"ACTIVATIONS_SCALE_FACTOR": V_PREDICTION_VAE_SCALE_FACTOR}
    return {}


def _pipeline_options(_index: Config) -> dict[str, Any]:
    return dict(_NO_SAFETY_CHECKER)


def is_sd1(shapes: Shapes) -> bool:
    """Stability's SD 1.x layout: CLIP-L as cond_stage_model.transformer, an LDM UNet without added
    conditioning taking 4 latent channels (9 is the inpainting model), no guidance embedding (LCM)."""
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    clip = ("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in shapes
            or "cond_stage_model.transformer.embeddings.position_embedding.weight" in shapes)
    return (clip and conv_in is not None and len(conv_in) == 4 and conv_in[1] == 4
            and "model.diffusion_model.label_emb.0.0.weight" not in shapes
            and not any("cond_proj" in k for k in shapes))


def _load_single_file(pipeline_class: str, file: Path, config: Path, torch_dtype: Any) -> Any:
    """diffusers' single-file loader; the safety checker (not in the file, its weights never fetched) left out."""
    import diffusers

    return getattr(diffusers, pipeline_class).from_single_file(
        str(file), config=str(config), local_files_only=True, torch_dtype=torch_dtype, **_NO_SAFETY_CHECKER)


SD15 = PipelineFamily(
    name="stable-diffusion-v1",
    description="Stable Diffusion 1.x (StableDiffusionPipeline): CLIP-L, UNet, 4-channel VAE, 512x512",
    diffusers_class="StableDiffusionPipeline",
    optimum_class="OVStableDiffusionPipeline",
    genai_class="Text2ImagePipeline",
    submodels=(
        SubmodelSpec("text_encoder", "text_encoder", "feature-extraction", None, with_export_model_type),
        SubmodelSpec("unet", "unet", "semantic-segmentation", None, prepare_unet("tokenizer", "text_encoder")),
        SubmodelSpec("vae_decoder", "vae", "semantic-segmentation", "vae-decoder", prepare_vae_decoder,
                     _vae_runtime_options),
        SubmodelSpec("vae_encoder", "vae", "semantic-segmentation", "vae-encoder", prepare_vae_encoder,
                     _vae_runtime_options),
    ),
    tokenizers=("tokenizer",),
    loaders=frozen({
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "unet": ("diffusers", "UNet2DConditionModel"),
    }),
    denoiser="unet",
    fit_checks=frozen({
        "vae": vae_fit("UNet", "substitute a VAE trained for this pipeline family "
                               "(for SD 1.x: an SD 1.x VAE such as sd-vae-ft-mse)"),
        "unet": same_config("unet", "unet", ("in_channels", "out_channels", "cross_attention_dim", "time_cond_proj_dim"),
                            "substitute a UNet of the same architecture (an SD 1.x finetune)"),
        "text_encoder": same_config("text_encoder", "text encoder", ("hidden_size", "num_hidden_layers", "vocab_size"),
                                    "substitute a text encoder of the same architecture (CLIP ViT-L/14)"),
    }),
    tokenizer_files=CLIP_TOKENIZER_FILES,
    latents=LatentSpace(channels=4, scaling_factor=0.18215),
    # the SD 1.5 model card's call: guidance 7.5 (the gate samples 3 steps of that run)
    gate=GateSpec(calls=("text_encoder", "unet", "vae_decoder"), encoders=("text_encoder",), latent_input="sample",
                  steps=3, guidance_scale=7.5),
    tags=("stable-diffusion",),
    pipeline_options=_pipeline_options,
    single_file=SingleFile(is_sd1, SD15_REPO, SD15_COMMIT, _load_single_file),
    lora_targets=("unet", "text_encoder"),
)

#: An LCM-distilled SD 1.x (SimianLuo/LCM_Dreamshaper_v7, FastSD CPU's default): the guidance scale is an
#: input of the UNet (`timestep_cond`), not a second batch, and it runs in 4 steps with LCMScheduler.
SD15_LCM = dataclasses.replace(
    SD15,
    name="latent-consistency-model",
    description="LCM-distilled SD 1.x (LatentConsistencyModelPipeline): CLIP-L, guidance-embedded UNet, 4 steps",
    diffusers_class="LatentConsistencyModelPipeline",
    optimum_class="OVLatentConsistencyModelPipeline",
    fit_checks=frozen({**SD15.fit_checks, "unet": same_config(
        "unet", "unet", ("in_channels", "out_channels", "cross_attention_dim", "time_cond_proj_dim"),
        "substitute an LCM-distilled UNet of the same architecture (time_cond_proj_dim set)")}),
    # FastSD CPU runs LCM models at 4 steps, guidance 1 (LCM_Dreamshaper_v7's card: 4 steps at 8); either way
    # batch 1. The scheduler is the bundle's own: LCM repos (and the tiny generator) carry LCMScheduler.
    gate=dataclasses.replace(SD15.gate, steps=4, guidance_scale=1.0, cfg=False),
    tags=("stable-diffusion", "lcm"),
    single_file=None,  # diffusers folders only: an LCM single file is not detected (is_sd1 refuses its cond_proj)
)
