"""The record a model family is: everything stage code would otherwise hard-code per family.

A family is data plus a few small functions (how a submodel is prepared for tracing, how a
substitute is checked to fit). Stages read it from the recipe (`Recipe.family`) and never
name a family themselves, so adding one is one record, its offline generator, a recipe
and tests (README "Model families").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from convert.errors import PatchError

Config = Mapping[str, Any]
#: (loaded component, pipeline) -> the module to trace (optimum's per-submodel preparation).
Prepare = Callable[[Any, Any], Any]
#: (substitute's config, original's config, denoiser's config) -> the checks that passed, for the report.
FitCheck = Callable[[Config, Config, Config], list[str]]


#: tensor name -> shape, from a safetensors header (no weight is read to detect an architecture)
Shapes = Mapping[str, tuple[int, ...]]


def no_runtime_options(_pipeline: Any) -> dict[str, str]:
    return {}


def load_with_diffusers(pipeline_class: str, file: Path, config: Path, torch_dtype: Any) -> Any:
    """diffusers' own single-file loader, offline, with the configs of a local diffusers folder."""
    import diffusers

    return getattr(diffusers, pipeline_class).from_single_file(
        str(file), config=str(config), local_files_only=True, torch_dtype=torch_dtype)


@dataclass(frozen=True)
class SingleFile:
    """How a family is read from one original-layout (Stability/A1111/ComfyUI) checkpoint file."""

    signature: Callable[[Shapes], bool]  # pure: does a file with these tensors hold this family?
    config_repo: str  # default config source: configs and tokenizers only, never its weights
    config_commit: str  # pinned: a moved branch must not change what a file is read as
    load: Callable[[str, Path, Path, Any], Any] = load_with_diffusers  # (pipeline class, file, config, dtype)


@dataclass(frozen=True)
class SubmodelSpec:
    """How one bundle folder is made from one pipeline component (mirrors optimum-intel's export)."""

    name: str  # bundle folder and optimum submodel name
    component: str  # pipeline attribute holding the weights
    task: str  # optimum exporter task for the export config
    model_type: str | None  # explicit optimum model type; None: from the model
    prepare: Prepare
    #: runtime options optimum-intel writes into this submodel's rt_info, from the loaded pipeline
    runtime_options: Callable[[Any], dict[str, str]] = no_runtime_options


@dataclass(frozen=True)
class LatentSpace:
    """What the VAE decoder's input is; defaults apply where a VAE config leaves a field out."""

    channels: int
    scaling_factor: float
    shift_factor: float | None = None  # SD3/Flux VAEs: decoder input = latents / scaling_factor + shift_factor


#: optimum-intel's VAE submodels and their (input, output) tensor names, the same in every family it exports.
VAE_IO: Mapping[str, tuple[str, str]] = MappingProxyType({
    "vae_decoder": ("latent_sample", "sample"), "vae_encoder": ("sample", "latent_parameters")})


@dataclass(frozen=True)
class GateSpec:
    """What the validation gate needs to run a family's pipeline as users run it, and judge each part.

    Every name the gate uses comes from here: validate/ names no submodel and no tensor itself.
    """

    #: optimum pipeline attributes that run an exported submodel, in the order the pipeline calls them
    calls: tuple[str, ...]
    #: text encoders whose captured calls are replayed at each target precision
    encoders: tuple[str, ...]
    #: the denoiser's latent input (its batch is the guidance batch): "sample" (UNet), "hidden_states" (MMDiT)
    latent_input: str
    #: how the family is run by default; a recipe's validation.end_to_end may override each
    steps: int = 3
    guidance_scale: float = 5.0
    #: diffusers scheduler class the pipeline is run with by default (None: the bundle's own)
    scheduler: str | None = None
    #: guidance > 1 doubles the denoiser's batch (classifier-free guidance); False: the pipeline embeds the
    #: guidance scale as a denoiser input instead (LCM), and the batch stays 1
    cfg: bool = True
    vae_io: Mapping[str, tuple[str, str]] = field(default_factory=lambda: VAE_IO)

    def checked(self, denoiser: str) -> tuple[str, ...]:
        """Submodels replayed on calls captured from the f32 run, in call order."""
        return tuple(p for p in self.calls if p in self.encoders or p == denoiser)


@dataclass(frozen=True)
class PipelineFamily:
    name: str  # the recipe's `pipeline:` value
    description: str  # one line for docs and errors
    diffusers_class: str  # diffusers pipeline class (model_index.json `_class_name`)
    optimum_class: str  # optimum.intel class that loads the bundle
    genai_class: str | None  # openvino_genai class that loads the bundle; None: openvino-genai cannot run it
    submodels: tuple[SubmodelSpec, ...]  # weighted submodels, in export order
    tokenizers: tuple[str, ...]  # pipeline attributes converted with openvino-tokenizers
    loaders: Mapping[str, tuple[str, str]]  # weight-bearing pipeline attribute -> (library, class)
    denoiser: str  # the attribute whose config gives sample_size (unet / transformer)
    fit_checks: Mapping[str, FitCheck]  # substitutable attributes and how a substitute is checked
    tokenizer_files: tuple[str, ...]  # file names the fetch allow-list takes from tokenizer folders
    latents: LatentSpace
    tags: tuple[str, ...]  # model-card tags besides openvino and the task
    #: constructor arguments of the diffusers pipeline besides its components, from model_index.json
    pipeline_options: Callable[[Config], dict[str, Any]] = lambda _index: {}
    optional: tuple[str, ...] = ()  # pipeline attributes a source may lack, passed as None (SD3 without T5)
    task: str = "text-to-image"  # or "image-to-image": the Hub pipeline tag, the card snippet, the denoise run
    single_file: SingleFile | None = None  # None: only diffusers-layout sources
    lora_targets: tuple[str, ...] = ()  # attributes diffusers' LoRA loader fuses into; () = no `lora` patch
    gate: GateSpec | None = None  # None: no end-to-end run and no replayed submodels (a build error if one is asked)

    @property
    def weighted(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.submodels)

    @property
    def components(self) -> tuple[str, ...]:
        """Everything a recipe may configure, in export order."""
        return self.weighted + self.tokenizers

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(c for c in self.components if c not in self.optional)

    @property
    def substitutable(self) -> tuple[str, ...]:
        return tuple(self.fit_checks)

    @property
    def lazy(self) -> tuple[str, ...]:
        """Weight-bearing attributes read one at a time by the export stage (the VAE is loaded for validation)."""
        return tuple(c for c in self.loaders if c != "vae")

    @property
    def folders(self) -> tuple[str, ...]:
        """diffusers folders a base source needs; weights are fetched for those in `loaders`."""
        return (*sorted((*self.loaders, *self.tokenizers)), "scheduler")

    def submodel(self, name: str) -> SubmodelSpec:
        for spec in self.submodels:
            if spec.name == name:
                return spec
        raise KeyError(f"{self.name} has no submodel {name!r}")

    def native_resolution(self, pipeline: Any) -> int:
        return int(getattr(pipeline, self.denoiser).config.sample_size) * int(pipeline.vae_scale_factor)

    def decoder_latents(self, latents: Any, vae_config: Config) -> tuple[Any, str]:
        """Pipeline latents in the decoder's input space, as the diffusers pipeline computes them, and how."""
        scaling = float(vae_config.get("scaling_factor") or self.latents.scaling_factor)
        shift = vae_config.get("shift_factor", self.latents.shift_factor)
        if shift is None:
            return latents / scaling, f"latents / {scaling}"
        return latents / scaling + float(shift), f"latents / {scaling} + {float(shift)}"

    def usage(self) -> list[str]:
        """The model card's Python snippet."""
        load = [f"from optimum.intel import {self.optimum_class}",
                f'pipe = {self.optimum_class}.from_pretrained("<this folder or repo>")']
        if self.task == "image-to-image":
            return ["from diffusers.utils import load_image", *load,
                    'image = pipe("a photo of an astronaut riding a horse", image=load_image("input.png")).images[0]']
        return [*load, 'image = pipe("a photo of an astronaut riding a horse").images[0]']


# ----------------------------------------------------------------------------- shared submodel preparation


def prepare_vae_encoder(vae: Any, _pipeline: Any) -> Any:
    vae.forward = lambda sample: {"latent_parameters": vae.encode(x=sample)["latent_dist"].parameters}
    return vae


def prepare_vae_decoder(vae: Any, _pipeline: Any) -> Any:
    vae.forward = lambda latent_sample: vae.decode(z=latent_sample)
    return vae


def prepare_clip_hidden_states(model: Any, _pipeline: Any) -> Any:
    """Pipelines that read hidden states of every CLIP layer: export them, as optimum does."""
    model.config.output_hidden_states = True
    if hasattr(model, "text_model"):
        model.text_model.config.output_hidden_states = True
    return model


def as_is(model: Any, _pipeline: Any) -> Any:
    return model


def with_export_model_type(model: Any, _pipeline: Any) -> Any:
    """optimum's exporter model type on the config (UNets and CLIP towers of SD 1.x/SDXL pipelines)."""
    from convert.optimum_compat import diffusers_submodel_type

    model.config.export_model_type = diffusers_submodel_type(model)
    return model


def prepare_unet(tokenizer: str, text_encoder: str) -> Prepare:
    """The config fields optimum adds before exporting a UNet (they shape its inputs): the prompt length of
    `tokenizer`, the projection width of `text_encoder` (SDXL: the second pair; SD 1.x: the only one)."""

    def prepare(model: Any, pipeline: Any) -> Any:
        model.config.model_max_length = getattr(getattr(pipeline, tokenizer), "model_max_length", None)
        model.config.requires_aesthetics_score = getattr(pipeline.config, "requires_aesthetics_score", False)
        model.config.time_cond_proj_dim = getattr(model.config, "time_cond_proj_dim", None)
        model.config.text_encoder_projection_dim = getattr(pipeline, text_encoder).config.projection_dim
        return with_export_model_type(model, pipeline)

    return prepare


# ----------------------------------------------------------------------------- fit checks (pure)


def require(ok: bool, component: str, message: str, hint: str) -> None:
    if not ok:
        raise PatchError(f"substituted {component} does not fit: {message}", hint=hint)


def vae_fit(denoiser_label: str, hint: str) -> FitCheck:
    """Latent channels, scaling and block structure equal the original's; channels fit the denoiser."""

    def check(new: Config, old: Config, denoiser: Config) -> list[str]:
        new_latent, den_in = new.get("latent_channels"), denoiser.get("in_channels")
        require(new_latent == den_in, "vae", f"latent_channels {new_latent} but the {denoiser_label} takes {den_in}", hint)
        require(new_latent == old.get("latent_channels"), "vae",
                f"latent_channels {new_latent} but the original VAE has {old.get('latent_channels')}", hint)
        new_scale, old_scale = new.get("scaling_factor"), old.get("scaling_factor")
        require(new_scale is not None and old_scale is not None and abs(float(new_scale) - float(old_scale)) < 1e-6,
                "vae", f"scaling_factor {new_scale} but the original VAE uses {old_scale} (a VAE of another model family)",
                hint)
        new_shift, old_shift = new.get("shift_factor"), old.get("shift_factor")
        require(new_shift == old_shift or (new_shift is not None and old_shift is not None
                                           and abs(float(new_shift) - float(old_shift)) < 1e-6),
                "vae", f"shift_factor {new_shift} but the original VAE uses {old_shift}", hint)
        new_blocks, old_blocks = new.get("block_out_channels", []), old.get("block_out_channels", [])
        require(len(new_blocks) == len(old_blocks), "vae",
                f"{len(new_blocks)} resolution levels but the original has {len(old_blocks)} (latent-to-pixel ratio differs)",
                hint)
        for key in ("down_block_types", "up_block_types"):
            require(list(new.get(key, [])) == list(old.get(key, [])), "vae",
                    f"{key} {new.get(key)} differ from the original's {old.get(key)}", hint)
        return [
            f"vae latent_channels {new_latent} == {denoiser_label.lower()} in_channels {den_in}",
            f"vae scaling_factor {new_scale} == original",
            f"vae block structure ({len(new_blocks)} levels, {new.get('up_block_types')}) == original",
        ]

    return check


def same_config(component: str, label: str, keys: tuple[str, ...], hint: str) -> FitCheck:
    """The substitute's config equals the original's on the keys that shape its inputs and outputs."""

    def check(new: Config, old: Config, _denoiser: Config) -> list[str]:
        for key in keys:
            require(new.get(key) == old.get(key), component, f"{key} {new.get(key)} != original {old.get(key)}", hint)
        return [f"{label} {', '.join(keys)} == original"]

    return check


CONFIG_FILES: tuple[str, ...] = ("config.json", "scheduler_config.json", "model_index.json")
CLIP_TOKENIZER_FILES: tuple[str, ...] = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


__all__ = [
    "CLIP_TOKENIZER_FILES", "CONFIG_FILES", "Config", "FitCheck", "LatentSpace", "PipelineFamily", "Prepare",
    "Shapes", "SingleFile", "load_with_diffusers",
    "SubmodelSpec", "as_is", "frozen", "no_runtime_options", "prepare_clip_hidden_states", "prepare_unet",
    "prepare_vae_decoder", "prepare_vae_encoder", "require", "same_config", "vae_fit", "with_export_model_type",
]  # fmt: skip
