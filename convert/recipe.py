"""The recipe: the one declarative input of a build.

Strict on purpose: a typo in a recipe (``precison``) must stop the build with the file,
line and a suggestion rather than silently fall back to a default that produces a
NaN-decoding bundle hours later.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from convert.errors import RecipeError
from convert.families import FAMILIES, PipelineFamily, get_family
from convert.recipe_rules import (
    MAX_DENOISE_STEPS,
    MAX_SEED,
    SAMPLE_IMAGES,
    VAE_SCALE_FACTOR,
    HubRepoId,
    Slug,
    SubFolder,
    Variant,
    card_tag,
    distinct,
    generator_name,
    git_revision,
    image_side,
    local_path,
    lora_scale,
    ov_properties,
    psnr_floor,
    scheduler_class,
    single_file_name,
    suggest,
)
from convert.recipe_yaml import read_yaml, short
from convert.roles import SourceRole

SCHEMA_VERSION = 1

WeightFormat = Literal["fp32", "fp16", "int8", "int4"]
Precision = Literal["f32", "f16", "bf16"]
Device = Literal["CPU", "GPU", "NPU"]
Fp16Fix = Literal["substitute", "runtime-scale", "rescale", "none"]

#: Components whose decode/encode the validation gate checks.
VAE_PARTS: tuple[str, ...] = ("vae_decoder", "vae_encoder")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HubSource(_Strict):
    repo: HubRepoId = Field(description="Hugging Face Hub repo id, e.g. 'stabilityai/stable-diffusion-xl-base-1.0'.")
    revision: Annotated[str, AfterValidator(git_revision)] = Field(
        default="main",
        description="Branch, tag or 40-hex commit; resolved to a commit before anything is downloaded.",
    )
    subfolder: SubFolder | None = Field(
        default=None, description="Folder inside the repo that holds the component (relative, no '..')."
    )
    variant: Variant | None = Field(
        default=None, description="Weights variant to download, e.g. 'fp16' (files named *.fp16.safetensors)."
    )


class LocalSource(_Strict):
    path: Annotated[Path, BeforeValidator(local_path)] = Field(
        description="Folder in diffusers layout; relative paths are relative to the recipe file and stay so in the bundle."
    )
    subfolder: SubFolder | None = Field(default=None, description="Folder inside `path` that holds the component.")
    variant: Variant | None = Field(default=None, description="Weights variant to load, e.g. 'fp16'.")

    def folder(self, recipe_dir: Path) -> Path:
        """Where the folder is on this machine; only resolve/fetch ask, so no absolute path is recorded."""
        return (recipe_dir / self.path.expanduser()).resolve()


class GeneratedSource(_Strict):
    generator: Annotated[str, AfterValidator(generator_name)] = Field(
        description="Name of a built-in generator in convert.testing (seeded random weights, no network)."
    )
    seed: int = Field(default=0, ge=0, lt=2**63, description="Seed for the generator; same seed, same bytes.")
    variant: Variant | None = Field(default=None, description="Weights variant the generator writes, e.g. 'fp16'.")


class Source(_Strict):
    """Exactly one of hub / local / generated; with `file`, one checkpoint file of it (kind `single_file`)."""

    hub: HubSource | None = Field(default=None, description="Download from the Hugging Face Hub, pinned to a commit.")
    local: LocalSource | None = Field(default=None, description="Use a folder on this machine.")
    generated: GeneratedSource | None = Field(default=None, description="Generate offline with seeded weights.")
    allow_pickle: bool = Field(
        default=False,
        description="Allow .bin/.ckpt/.pt weights (unpickling runs code). Off by default; safetensors only.",
    )
    license: str | None = Field(
        default=None, max_length=128, description="SPDX-like licence id of this source, for the model card."
    )
    file: Annotated[str, AfterValidator(single_file_name)] | None = Field(
        default=None,
        description="Kind single_file: this one .safetensors checkpoint in the repo/folder (original Stability/"
        "A1111/ComfyUI layout, or a LoRA), fetched alone; nothing else of the repo is read.",
    )
    config: Source | None = Field(
        default=None,
        description="Single-file base only: the diffusers repo/folder whose configs and tokenizers (never weights) "
        "describe the file; default: the family's pinned config source (SDXL base repo).",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        given = [k for k in ("hub", "local", "generated") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a source needs exactly one of 'hub', 'local', 'generated' (got {given or 'none'})")
        inner = self.hub or self.local
        if self.file is not None and (getattr(inner, "subfolder", None) or self.variant):
            raise ValueError("a single-file source names its file by path in 'file'; leave subfolder and variant out")
        if self.config is not None and self.file is None:
            raise ValueError("'config' describes a single-file checkpoint: set 'file' too, or leave 'config' out")
        if self.config is not None and (self.config.file is not None or self.config.config is not None):
            raise ValueError("config: a config source is a diffusers repo/folder, without 'file' or 'config'")
        return self

    @property
    def kind(self) -> str:
        return "single_file" if self.file else "hub" if self.hub else "local" if self.local else "generated"

    @property
    def variant(self) -> str | None:
        inner = self.hub or self.local or self.generated
        return inner.variant if inner is not None else None

    def describe(self) -> str:
        name = f"/{self.file}" if self.file else ""
        if self.hub:
            sub = f"/{self.hub.subfolder}" if self.hub.subfolder else ""
            return f"hub:{self.hub.repo}{sub}{name}@{self.hub.revision}"
        if self.local:
            return f"local:{self.local.path}{name}"
        assert self.generated is not None
        return f"generated:{self.generated.generator}(seed={self.generated.seed}){name}"


#: What a LoRA may target: a pipeline attribute diffusers' LoRA loader knows, checked against the family's
#: `lora_targets` by the recipe (SDXL: unet, text_encoder, text_encoder_2).
LoraTarget = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")]


class Lora(_Strict):
    """A LoRA fused into the weights before export (diffusers' load_lora_weights + fuse_lora)."""

    source: Source = Field(description="The LoRA file: a single-file source (`file:` names it), pinned like any source.")
    scale: Annotated[float, AfterValidator(lora_scale)] = Field(
        default=1.0, description="Fusion scale (LoRA strength), finite; 1.0 as its trainer meant it."
    )
    targets: list[LoraTarget] = Field(
        default_factory=lambda: ["unet"], min_length=1,
        description="Components it is fused into (the family's LoRA targets; SDXL: unet, text_encoder, text_encoder_2); "
        "each must match all of the file's keys for it (else an error).",
    )

    @field_validator("source")
    @classmethod
    def _one_file(cls, value: Source) -> Source:
        if value.file is None:
            raise ValueError("a LoRA source names its .safetensors file with 'file'")
        if value.config is not None:
            raise ValueError("a LoRA source has no 'config'")
        return value

    @field_validator("targets")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists a target twice")
        return value


class SchedulerOverride(_Strict):
    """The bundle's scheduler: e.g. trailing-timestep Euler for Lightning/Hyper-style few-step models."""

    class_name: Annotated[str, AfterValidator(scheduler_class)] = Field(
        description="A diffusers scheduler class, e.g. EulerDiscreteScheduler."
    )
    config: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Config keys set over the base's scheduler config, e.g. timestep_spacing: trailing."
    )


class Substitution(_Strict):
    source: Source = Field(description="Where the replacement component comes from.")
    reason: str = Field(
        default="", description="Why it is substituted; quoted in the model card (e.g. 'FP16-fixed VAE: ...')."
    )


class NNCFSettings(_Strict):
    """NNCF weight-compression knobs that change results; anything else keeps NNCF's defaults."""

    mode: Literal["int8_sym", "int8_asym", "int4_sym", "int4_asym"] | None = Field(
        default=None, description="NNCF CompressWeightsMode; default int8_asym for int8, int4_asym for int4."
    )
    group_size: int | None = Field(default=None, description="Group size for int4 (e.g. 64, 128); -1 per-channel.")
    ratio: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Share of layers in int4; the rest stay int8 (int4 only)."
    )
    all_layers: bool | None = Field(default=None, description="Compress first/last layers too (int4 only).")

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int | None) -> int | None:
        if value is not None and value <= 0 and value != -1:
            raise ValueError(f"{value} is not a group size: use a positive number of weights (e.g. 64, 128) or -1 per channel")
        if value is not None and value > 0 and value & (value - 1):
            # NNCF needs every layer's input channels divisible by it (SDXL's: multiples of 64, e.g. 320, 2816);
            # anything else failed after minutes of compression with a 213-line message
            raise ValueError(f"{value} is not a power of two: NNCF splits each layer's input channels into groups of "
                             f"this size (use e.g. 32, 64, 128, or -1 per channel)")
        return value


QuantizationMode = Literal["weights", "hybrid", "full"]

#: Gate floors per quantization mode, measured on the tiny pipelines (README "Quantization"):
#: (denoiser cosine vs the unquantized IR at f32, end-to-end SSIM, end-to-end PSNR dB).
#: Weight-only int8 is judged as before (the same IR at f32: f16/bf16 rounding only).
QUANT_FLOORS: dict[str, tuple[float, float, float]] = {"hybrid": (0.98, 0.85, 30.0), "full": (0.95, 0.85, 30.0)}


class CalibrationSettings(_Strict):
    """The denoiser inputs `nncf.quantize` calibrates on: recorded from an f32 run of the exported pipeline."""

    prompts: list[str] | None = Field(
        default=None, min_length=1, description="Prompts of the calibration run; default (null): the repository's "
        "list (convert/calibration_prompts.txt: varied real prompts: photos, art, text, people, scenes).",
    )
    count: int = Field(default=8, ge=1, le=512, description="How many of the prompts are run (the first ones).")
    steps: int | None = Field(
        default=None, ge=1, le=MAX_DENOISE_STEPS, description="Denoising steps per prompt (every step's denoiser call "
        "is one calibration sample); default (null): the gate's end-to-end steps (the family's or the recipe's)."
    )
    resolution: Annotated[int, AfterValidator(image_side)] | None = Field(
        default=None, description="Image side of the calibration run; default (null): the gate's end-to-end resolution.",
    )
    seed: int = Field(default=1000, ge=0, le=MAX_SEED - 512, description="Seed of the first prompt; prompt i uses seed + i "
                      "(apart from the gate's seeds, so the gate does not judge on the calibration data).")


class QuantizationSettings(_Strict):
    """How the denoiser is quantized beyond its weights (NNCF `nncf.quantize`, calibrated on the pipeline's own run)."""

    mode: QuantizationMode = Field(
        default="weights", description="weights: int8 weights only (nncf.compress_weights), computing in floating point: "
        "saves memory and disk, rarely time. hybrid: optimum-intel's hybrid mode: int8 weights for MatMul/Gather, "
        "int8 weights and activations for convolutions (nncf.quantize, SmoothQuant off). full: int8 weights and "
        "activations for every MatMul and convolution (nncf.quantize, transformer patterns, SmoothQuant), the "
        "fastest on CPUs with VNNI/AMX and the most lossy. hybrid and full keep the unquantized IR as the gate's "
        "reference and need weights: int8 and the end-to-end check.",
    )
    smooth_quant_alpha: float | None = Field(
        default=None, description="full only: SmoothQuant alpha for MatMuls (0-1: how much of the activation "
        "outliers moves into the weights); -1: off; default (null): NNCF's for transformers (0.95).",
    )
    keep_first_last: bool = Field(
        default=True, description="full only: leave the first and last convolution (conv_in, conv_out) unquantized, "
        "as is usual for diffusion models (their inputs/outputs are the latents themselves).",
    )
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings, description="The calibration run.")
    min_cosine: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Gate floor: cosine of the quantized denoiser's outputs vs the "
        "unquantized IR at f32 on captured calls; default (null): per mode (hybrid 0.98, full 0.95).",
    )
    min_ssim: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Gate floor: end-to-end SSIM vs the unquantized f32 images; "
        "default (null): 0.85 for hybrid and full.",
    )
    min_psnr_db: Annotated[float, AfterValidator(psnr_floor)] | None = Field(
        default=None, description="Gate floor: end-to-end PSNR vs the unquantized f32 images; default (null): 30 dB.",
    )

    @field_validator("smooth_quant_alpha")
    @classmethod
    def _alpha(cls, value: float | None) -> float | None:
        if value is not None and value != -1 and not 0.0 <= value <= 1.0:
            raise ValueError(f"{value} is not a SmoothQuant alpha: use 0 to 1, or -1 for off")
        return value

    @property
    def activations(self) -> bool:
        """Whether activations are quantized too (a calibration run and an unquantized reference)."""
        return self.mode != "weights"

    def floors(self) -> tuple[float, float, float]:
        """(min cosine, min SSIM, min PSNR dB) the gate applies to this quantization."""
        cosine, ssim, psnr = QUANT_FLOORS[self.mode]
        return (self.min_cosine if self.min_cosine is not None else cosine,
                self.min_ssim if self.min_ssim is not None else ssim,
                self.min_psnr_db if self.min_psnr_db is not None else psnr)


class ComponentSettings(_Strict):
    weights: WeightFormat = Field(default="fp32", description="Weight format of the exported IR.")
    nncf: NNCFSettings | None = Field(default=None, description="NNCF knobs for int8/int4 weights.")
    quantization: QuantizationSettings | None = Field(
        default=None, description="Denoiser only: int8 activations too (hybrid / full), calibrated on the pipeline's "
        "own f32 run and gated against the unquantized IR; default (null): weights only, as `weights` says.",
    )
    inference_precision: Annotated[list[Precision] | None, AfterValidator(distinct)] = Field(
        default=None,
        min_length=1,
        description="Precisions the target device runs this component at, each once; default: target.inference_precision.",
    )
    runtime_options: Annotated[dict[str, str], AfterValidator(ov_properties)] = Field(
        default_factory=dict, description="Extra keys written to the IR's rt_info runtime_options (e.g. ACTIVATIONS_SCALE_FACTOR)."
    )
    export: bool = Field(default=True, description="Set false to leave this component out of the bundle.")
    fp16_fix: Fp16Fix | None = Field(
        default=None,
        description="VAE parts only: how the part stays finite at f16. substitute: substitutions.vae; runtime-scale: "
        "the smallest power-of-two ACTIVATIONS_SCALE_FACTOR whose emulated f16 run passes (GPU targets); rescale: "
        "training-free weight rescale from measured activations; none. Default: substitute if substitutions.vae "
        "is set, else none.",
    )

    @model_validator(mode="after")
    def _nncf_fits(self) -> ComponentSettings:
        if self.nncf is not None and self.weights not in ("int8", "int4"):
            raise ValueError(f"'nncf' settings need weights int8 or int4, not {self.weights}")
        if self.nncf and self.nncf.mode and not self.nncf.mode.startswith(self.weights):
            raise ValueError(f"nncf.mode {self.nncf.mode} does not match weights {self.weights}")
        if self.nncf is not None and self.weights == "int8":
            int4_only = [k for k in ("group_size", "ratio", "all_layers") if getattr(self.nncf, k) is not None]
            if int4_only:  # NNCF refuses them for int8 only after minutes of compression, in 200 lines
                raise ValueError(f"nncf.{int4_only[0]} applies to int4 weights only; remove it or use weights: int4")
        quant = self.quantization
        if quant is not None and quant.activations:
            if self.weights != "int8":
                raise ValueError(f"quantization.mode {quant.mode} quantizes to int8: set weights: int8 (not {self.weights})")
            if quant.mode == "full" and self.nncf is not None:
                raise ValueError("nncf settings shape weight-only compression; quantization.mode full quantizes every "
                                 "weight with its activations: remove nncf (or use mode hybrid)")
        if quant is not None and quant.mode != "full":
            if quant.smooth_quant_alpha is not None:
                raise ValueError(f"quantization.smooth_quant_alpha applies to mode full only (not {quant.mode})")
            if "keep_first_last" in quant.model_fields_set:
                raise ValueError(f"quantization.keep_first_last applies to mode full only (not {quant.mode})")
        return self

    def quantized_activations(self) -> QuantizationSettings | None:
        """The quantization settings if activations are quantized (hybrid / full), else None."""
        return self.quantization if self.quantization is not None and self.quantization.activations else None


class Target(_Strict):
    device: Device = Field(default="GPU", description="Device the bundle is built for.")
    inference_precision: Annotated[list[Precision], AfterValidator(distinct)] = Field(
        default_factory=lambda: ["f16"],
        min_length=1,
        description="Precisions the device runs at, each once. Default: GPU and NPU [f16]; CPU [bf16, f32], what "
        "OpenVINO's CPU plugin computes by default: bf16 on CPUs with avx512_bf16 or AMX, f32 on the rest.",
    )

    @model_validator(mode="before")
    @classmethod
    def _cpu_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("device") == "CPU" and "inference_precision" not in data:
            return {**data, "inference_precision": ["bf16", "f32"]}
        return data


class EndToEndSettings(_Strict):
    """The whole exported pipeline at the target precision vs f32: the image a user would see."""

    prompts: list[str] = Field(
        default_factory=lambda: ["a photo of an astronaut riding a horse", "a watercolor of a lighthouse at dusk"],
        max_length=8, description="Prompts generated at f32 and at each target precision (same seeds). The f32 run also "
        "captures the text-encoder and UNet inputs their checks replay; empty: neither runs.",
    )
    steps: int | None = Field(
        default=None, ge=1, le=MAX_DENOISE_STEPS,
        description="Denoising steps per image; default (null): the pipeline family's (SDXL, SD3: 3 of a longer run). "
        "Distilled models (Turbo, Lightning, LCM) are gated at the steps they are run with (1-4).",
    )
    unet_calls: int = Field(
        default=3, ge=1, le=MAX_DENOISE_STEPS, description="Denoiser (UNet or transformer) calls of the first prompt "
        "replayed at each precision, evenly spaced, first and last included (all of them if there are fewer)."
    )
    guidance_scale: float | None = Field(
        default=None, ge=0.0, le=100.0, description="Classifier-free guidance scale; default (null): the family's (SDXL 5, "
        "SD3 4.5). Above 1 the denoiser runs a batch of 2 (guided and unguided), at 1 or below a batch of 1, as in use.",
    )
    seed: int = Field(default=0, ge=0, le=MAX_SEED - 7, description="Seed of the first prompt; prompt i uses "
                      "seed + i, and every seed must fit 32 bits: 0 .. 2^32-8.")
    resolution: Annotated[int, AfterValidator(image_side)] | None = Field(
        default=None, description="Image side; default validation.resolution, else the pipeline's native size."
    )
    gate: bool = Field(default=True, description="Fail the build on an image outside the limits below; false: report only.")
    max_non_finite: int = Field(default=0, ge=0, description="Non-finite values allowed in a target-precision image.")
    min_ssim: float | None = Field(
        default=0.5, ge=0.0, le=1.0,
        description="SSIM floor vs the f32 image (scikit-image, RGB): catches a destroyed image, not detail drift; null: off.",
    )
    min_psnr_db: Annotated[float, AfterValidator(psnr_floor)] | None = Field(
        default=None, description="PSNR floor vs the f32 image; off by default (denoising amplifies harmless rounding)."
    )


class ValidationSettings(_Strict):
    components: list[str] | None = Field(
        default=None, min_length=1,
        description="Submodels the gate checks at every target precision (text encoders and the denoiser on inputs "
        "captured from an f32 run of the bundle; VAE parts on encoded photos and denoised latents); at least one. "
        "Default (null): every submodel the pipeline family exports.",
    )
    min_cosine: float = Field(
        default=0.999, ge=0.0, le=1.0,
        description="Cosine similarity floor of text-encoder/UNet outputs at half precision vs the same IR at f32.",
    )
    max_non_finite: int = Field(default=0, ge=0, description="Non-finite output values allowed (SD.Next 'invalid=').")
    min_psnr_db: Annotated[float, AfterValidator(psnr_floor)] = Field(
        default=40.0, description="PSNR floor against the f32 decode of the original VAE (finite, >= 0)."
    )
    resolution: Annotated[int, AfterValidator(image_side)] | None = Field(
        default=None,
        description=f"Image side for the full-resolution decode, a multiple of {VAE_SCALE_FACTOR}; default: the pipeline's native size.",
    )
    full_resolution_images: int = Field(
        default=1, ge=0, description="How many of `images` are decoded at full resolution (slow at 1024); the rest at small_resolution."
    )
    small_resolution: Annotated[int, AfterValidator(image_side)] = Field(
        default=256, description=f"Image side for the other images and the denoising run, a multiple of {VAE_SCALE_FACTOR}."
    )
    check_original: bool = Field(
        default=True, description="Also run the original VAE at the same precisions, for the report (never gates)."
    )
    images: list[str] = Field(
        default_factory=lambda: ["astronaut", "chelsea", "coffee"], min_length=1,
        description="scikit-image sample images (shipped with it, no download) encoded to realistic latents.",
    )
    denoise_steps: int = Field(
        default=2, ge=0, le=MAX_DENOISE_STEPS, description="Steps of the exported pipeline that produce extra latents."
    )
    min_f16_headroom: float = Field(
        default=4.0, ge=1.0, description="fp16_fix runtime-scale/rescale: every f16 value stays below 65504 / this."
    )
    prompt: str = Field(default="a photo of an astronaut riding a horse", description="Prompt for the denoising run.")
    end_to_end: EndToEndSettings = Field(
        default_factory=EndToEndSettings, description="Whole-pipeline images at the target precision vs f32."
    )

    @field_validator("images")
    @classmethod
    def _known_images(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in SAMPLE_IMAGES:
                raise ValueError(f"unknown sample image '{short(name)}'{suggest(name, SAMPLE_IMAGES)}")
        return distinct(value)  # twice = every check twice, each reported twice

    @field_validator("components")
    @classmethod
    def _distinct_parts(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("lists a component twice")
        return value


class PublishSettings(_Strict):
    repo: HubRepoId = Field(description="Target Hub repo id ('org/name').")
    private: bool = Field(default=True, description="Create the repo private unless set false.")
    tags: list[Annotated[str, AfterValidator(card_tag)]] = Field(default_factory=list, description="Extra model-card tags.")


class Recipe(_Strict):
    schema_version: Literal[1] = Field(description="Recipe format version; this tool reads 1.")
    name: Slug = Field(
        description="Recipe name; names the output folder and the build: lowercase letters, digits, '.', '_', '-'."
    )
    description: str = Field(default="", description="One paragraph for the model card.")
    pipeline: str = Field(
        default="stable-diffusion-xl",
        description="Model family (convert/families): its components, loaders, exporters and validation inputs.",
        json_schema_extra={"enum": sorted(FAMILIES)},
    )
    base: Source = Field(description="The base pipeline: a diffusers repo/folder, or one single-file checkpoint (`file`).")
    substitutions: dict[str, Substitution] = Field(
        default_factory=dict, description="Components replaced before export, by diffusers name (e.g. 'vae')."
    )
    components: dict[str, ComponentSettings] = Field(
        default_factory=dict, description="Per-component export settings; unlisted components use the defaults."
    )
    lora: list[Lora] = Field(default_factory=list, description="LoRAs fused into the weights before export, in order.")
    scheduler: SchedulerOverride | None = Field(
        default=None, description="Replace the base's scheduler in the bundle (class and config keys)."
    )
    target: Target = Field(default_factory=Target, description="Device and precisions the bundle is built for.")
    validation: ValidationSettings = Field(default_factory=ValidationSettings, description="Validation gate settings.")
    publish: PublishSettings | None = Field(default=None, description="Where `--publish` uploads the bundle.")
    base_model: HubRepoId | None = Field(
        default=None, description="Upstream model id for the card's base_model; default: the base Hub repo."
    )

    @field_validator("pipeline")
    @classmethod
    def _known_family(cls, value: str) -> str:
        if value not in FAMILIES:
            raise ValueError(f"unknown pipeline family '{short(value)}'{suggest(value, list(FAMILIES))}")
        return value

    # Component names depend on the family: field validators read the already validated
    # `pipeline` (declared before them), so errors keep their field and YAML line.
    @field_validator("components")
    @classmethod
    def _known_components(cls, value: dict[str, ComponentSettings], info: ValidationInfo) -> dict[str, ComponentSettings]:
        family = _family_in(info)
        if family is None:
            return value
        for key, settings in value.items():
            if key not in family.components:
                raise ValueError(f"unknown component '{short(key)}'{suggest(key, family.components)}")
            if key in family.tokenizers and settings.weights != "fp32":
                raise ValueError(f"component '{key}' has no weights to store as {settings.weights}")
        return value

    @field_validator("substitutions")
    @classmethod
    def _known_substitutions(cls, value: dict[str, Substitution], info: ValidationInfo) -> dict[str, Substitution]:
        family = _family_in(info)
        if family is None:
            return value
        for key in value:
            if key in VAE_PARTS:  # exported parts of the one diffusers `vae`
                raise ValueError(f"cannot substitute '{key}' alone; did you mean 'vae'?")
            if key not in family.substitutable:
                raise ValueError(f"cannot substitute '{short(key)}'{suggest(key, family.substitutable)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        for part in self.validation.components or ():
            if part not in self.family.weighted:
                raise ValueError(f"validation.components lists {short(part)}, which a {self.pipeline} pipeline does not "
                                 f"have{suggest(part, self.family.weighted)}")
            if not self.settings_for(part).export:
                raise ValueError(f"validation.components lists {part} but components.{part}.export is false; "
                                 f"export it or list only exported submodels in validation.components")
        gate = self.family.gate
        if self.validation.end_to_end.prompts:
            if gate is None:
                raise ValueError(f"validation.end_to_end: a {self.pipeline} pipeline has no end-to-end run in its family "
                                 "record; set validation.end_to_end.prompts: [] (reported as not checked)")
            for part in gate.calls:
                if part not in self.family.optional and not self.settings_for(part).export:
                    raise ValueError(f"validation.end_to_end runs the whole pipeline, which calls {part}, but "
                                     f"components.{part}.export is false; export it or set validation.end_to_end.prompts: [] "
                                     "(reported as not checked)")
        if not self.gated_components():
            raise ValueError("validation.components: every submodel is switched off (components.*.export: false); "
                             "export at least one")
        if self.target.device != "CPU":  # OpenVINO's GPU and NPU plugins run f16 or f32 only
            for part in self.exported_components():
                if "bf16" in self.precisions_for(part) and not part.startswith("tokenizer"):
                    where = "components." + part if self.settings_for(part).inference_precision else "target"
                    raise ValueError(f"{where}.inference_precision: bf16 is a CPU precision; a {self.target.device} "
                                     "runs f16 or f32 (set target.device: CPU for bf16)")
        for part, settings in self.components.items():
            quant = settings.quantized_activations()
            if quant is None:
                continue
            if part != self.family.denoiser:
                raise ValueError(f"components.{part}.quantization.mode {quant.mode}: activations are quantized in the "
                                 f"denoiser ({self.family.denoiser}) only; text encoders and VAEs keep weight-only int8")
            if not self.validation.end_to_end.prompts:
                raise ValueError(f"components.{part}.quantization.mode {quant.mode} is judged by the end-to-end images "
                                 "vs the unquantized pipeline: validation.end_to_end.prompts cannot be empty")
            if part not in self.gated_components():
                raise ValueError(f"components.{part}.quantization.mode {quant.mode}: the gate must check {part} "
                                 f"against its unquantized IR; add it to validation.components")
        small, full = self.validation.small_resolution, self.validation.resolution
        if full is not None and small > full and "small_resolution" in self.validation.model_fields_set:
            raise ValueError(f"validation.small_resolution {small} is above validation.resolution {full}; "
                             f"set small_resolution to {full} or less")
        if self.base.file is not None and self.family.single_file is None:
            raise ValueError(f"base: pipeline {self.pipeline} cannot be read from a single file; use its diffusers repo")
        seen: dict[str, int] = {}
        for i, lora in enumerate(self.lora):
            first = seen.setdefault(lora.source.describe(), i)
            if first != i:  # fused twice = one LoRA at the summed scale, under two names in the card
                raise ValueError(f"lora.{i}: the same file as lora.{first} ({lora.source.describe()}); "
                                 "list it once with the strength you want")
            for target in lora.targets:
                if target not in self.family.lora_targets:
                    raise ValueError(f"lora.{i}.targets: {self.pipeline} has no {target} to fuse a LoRA into "
                                     f"(it has: {', '.join(self.family.lora_targets) or 'none'})")
        substitutes = [(SourceRole.substitution(k), s.source) for k, s in self.substitutions.items()]
        for role, source in substitutes:
            if source.file is not None:
                raise ValueError(f"{role}: a substitute is a diffusers component folder; 'file' is for the base and LoRAs")
        sources = [(SourceRole.base(), self.base), *substitutes, *((SourceRole.lora(i), lora.source) for i, lora in enumerate(self.lora))]
        for role, source in sources:
            if self.publish and source.hub and source.hub.repo.lower() == self.publish.repo.lower():
                raise ValueError(f"publish.repo {self.publish.repo} is also the {role} source; publishing replaces "
                                 "that repo's files: publish to a repo of your own")
        return self

    @property
    def family(self) -> PipelineFamily:
        return get_family(self.pipeline)

    @model_validator(mode="after")
    def _fp16_fixes_fit(self) -> Recipe:
        for part, settings in self.components.items():
            fix = settings.fp16_fix
            if fix is not None and part not in VAE_PARTS:
                raise ValueError(f"components.{part}.fp16_fix applies to {' and '.join(VAE_PARTS)} only")
            if fix == "substitute" and "vae" not in self.substitutions:
                raise ValueError(f"components.{part}.fp16_fix is 'substitute' but substitutions.vae is not set; "
                                 "add substitutions.vae or use rescale / runtime-scale")
            if fix == "runtime-scale" and "ACTIVATIONS_SCALE_FACTOR" in settings.runtime_options:
                raise ValueError(f"components.{part}: fp16_fix runtime-scale chooses ACTIVATIONS_SCALE_FACTOR; "
                                 "remove it from runtime_options")
            if fix == "runtime-scale" and self.target.device != "GPU":
                raise ValueError(f"components.{part}.fp16_fix runtime-scale needs target.device GPU "
                                 f"(only the GPU plugin applies ACTIVATIONS_SCALE_FACTOR), not {self.target.device}")
        return self

    def fp16_fix_for(self, part: str) -> str:
        """The part's fp16_fix, with the default filled in."""
        fix = self.settings_for(part).fp16_fix
        return fix or ("substitute" if "vae" in self.substitutions else "none")

    def settings_for(self, component: str) -> ComponentSettings:
        return self.components.get(component, ComponentSettings())

    def precisions_for(self, component: str) -> list[Precision]:
        return self.settings_for(component).inference_precision or list(self.target.inference_precision)

    def gated_components(self) -> list[str]:
        """Submodels the gate checks: the recipe's list, else every weighted submodel it exports."""
        if self.validation.components is not None:
            return list(self.validation.components)
        return [c for c in self.family.weighted if self.settings_for(c).export]

    def run_steps(self) -> int:
        """Denoising steps of the gate's end-to-end runs (the recipe's, else the family's)."""
        steps = self.validation.end_to_end.steps
        return steps if steps is not None else (self.family.gate.steps if self.family.gate else 3)

    def run_guidance(self) -> float:
        """Guidance scale of the gate's end-to-end runs (the recipe's, else the family's)."""
        scale = self.validation.end_to_end.guidance_scale
        return scale if scale is not None else (self.family.gate.guidance_scale if self.family.gate else 5.0)

    def guidance_batch(self) -> int:
        """The denoiser's batch in those runs: 2 under classifier-free guidance (scale > 1), else 1; always 1
        where the family embeds the guidance scale instead (LCM)."""
        cfg = self.family.gate.cfg if self.family.gate else True
        return 2 if cfg and self.run_guidance() > 1 else 1

    def quantized(self) -> dict[str, QuantizationSettings]:
        """Exported submodels whose activations are quantized (hybrid / full), with their settings."""
        return {part: quant for part in self.family.weighted
                if self.settings_for(part).export and (quant := self.settings_for(part).quantized_activations())}

    def exported_components(self) -> list[str]:
        return [c for c in self.family.components if self.settings_for(c).export]


def _family_in(info: ValidationInfo) -> PipelineFamily | None:
    """The family of the recipe being validated; None when `pipeline` itself was invalid (reported there)."""
    name = info.data.get("pipeline")
    return FAMILIES.get(name) if isinstance(name, str) else None


# ---------------------------------------------------------------------------- loading


def load_recipe(path: Path) -> Recipe:
    """Parse and validate a recipe file; every problem becomes a one-line RecipeError.

    Local source paths stay as written (relative to the recipe): they are resolved only
    where a folder is read, so nothing recorded from a recipe depends on where it lies.
    """
    data, root = read_yaml(path)
    if data is None:
        raise RecipeError("the recipe is empty", path=path, hint="start from recipes/tiny-sdxl-fp16fix.yaml")
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a YAML mapping of keys (schema_version, name, base, ...), not a {_yaml_kind(data)}",
                          path=path)
    version = data.get("schema_version")
    if "schema_version" in data and (type(version) is not int or version != SCHEMA_VERSION):
        at = f"line {_line_of(root, ['schema_version']) or 1}: "
        if type(version) is not int:
            raise RecipeError(f"{at}schema_version must be the number {SCHEMA_VERSION}, not {short(version)!r}", path=path)
        raise RecipeError(f"{at}schema_version {version} is not supported; this tool reads schema_version {SCHEMA_VERSION}",
                          path=path, hint="use the tool version the recipe was written for, or port the recipe to this one")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_explain(e, root), path=path, hint=None) from None


def _yaml_kind(data: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(data), type(data).__name__)


def _explain(error: ValidationError, root: yaml.Node | None) -> str:
    """First pydantic error as one line: field path, YAML line, what is wrong, a suggestion."""
    first = error.errors()[0]
    loc = [short(p) for p in first["loc"]]
    line = _line_of(root, loc)
    where = ".".join(loc) or "recipe"
    at = f"line {line}: " if line else ""
    more = f" (+{error.error_count() - 1} more)" if error.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        parent = loc[:-1]
        known = _fields_at(parent)
        owner = ".".join(parent) or "the recipe"
        return f"{at}unknown field '{loc[-1]}' in {owner}{suggest(loc[-1], known)}{more}"
    if first["type"] == "missing":
        return f"{at}missing required field '{where}'{more}"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "string_type" and isinstance(first.get("input"), (int, float, bool, datetime.date)):
        msg += f" (YAML read {short(first['input'])} as a {type(first['input']).__name__}: quote it)"
    return f"{at}{where}: {msg}{more}" if loc else f"{msg}{more}"


def _fields_at(loc: list[str]) -> list[str]:
    """Field names of the model at a location, for did-you-mean on unknown keys."""
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            # a dict key (component or substitution name): step into the value type
            if model is Recipe:
                break
            continue
        annotation = field.annotation
        nxt = _model_in(annotation)
        if nxt is None:
            return []
        model = nxt
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _line_of(root: yaml.Node | None, loc: list[str]) -> int | None:
    node = root
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for key, value in node.value:
                if key.value == part:
                    line = key.start_mark.line + 1
                    nxt = value
                    break
            if nxt is None:
                break
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            break
    return line


def find_recipe(name_or_path: str, search_dirs: list[Path]) -> Path:
    """A recipe is named by path or by name (recipes/<name>.yaml)."""
    if not name_or_path.strip():
        raise RecipeError("no recipe given", hint="pass a recipe name (recipes/<name>.yaml) or a path to a .yaml file")
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        return candidate
    if candidate.is_dir() and (len(candidate.parts) > 1 or not _named(name_or_path, search_dirs)):
        raise RecipeError("is a directory, not a recipe file", path=candidate, hint="pass a .yaml file or a recipe name")
    for folder in search_dirs:
        for suffix in (".yaml", ".yml"):
            path = folder / f"{name_or_path}{suffix}"
            if path.is_file():
                return path
    known = sorted({p.stem for d in search_dirs if d.is_dir() for p in d.glob("*.y*ml")})
    raise RecipeError(
        f"no recipe named '{short(name_or_path)}'{suggest(name_or_path, known) if known else ''}",
        hint=f"recipes are looked up in {', '.join(str(d) for d in search_dirs)}",
    )


def _named(name: str, search_dirs: list[Path]) -> bool:
    return any((folder / f"{name}{suffix}").is_file() for folder in search_dirs for suffix in (".yaml", ".yml"))


def recipe_digest(recipe: Recipe) -> str:
    """Stable hash of the recipe's meaning (not its formatting): keys the build id.

    Where a local source lies is not part of the meaning: its content is, pinned by resolve.
    So the same recipe and files give the same id in any checkout, even after a move.
    """
    data = recipe.model_dump(mode="json")
    sources = [data["base"], *(sub["source"] for sub in data["substitutions"].values()),
               *(lora["source"] for lora in data["lora"])]
    sources += [s["config"] for s in sources if s.get("config")]
    for source in sources:
        if source.get("local"):
            source["local"]["path"] = None
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def json_schema() -> dict[str, Any]:
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Diffusion pipeline to OpenVINO conversion recipe"
    return schema
