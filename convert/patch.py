"""Stage 3: load the base pipeline with diffusers and substitute components, checking they fit.

A VAE from another model family loads without complaint and decodes garbage (or
nothing) hours later, so the fit checks run on the configs before any weight is read.
The original components are kept: validation compares against the original VAE's f32 decode.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert.errors import PatchError
from convert.fetch import FetchedSource, parse_weight_name

log = logging.getLogger(__name__)

Config = Mapping[str, Any]


@dataclass
class PatchedPipeline:
    """The pipeline to export (substitutes in place) plus the originals they replaced."""

    pipeline: Any  # diffusers.StableDiffusionXLPipeline
    originals: dict[str, Any] = field(default_factory=dict)
    substituted: dict[str, str] = field(default_factory=dict)  # component -> source description
    checks: list[str] = field(default_factory=list)  # fit checks that passed, for the report


# ----------------------------------------------------------------------------- fit checks (pure)


def _require(ok: bool, component: str, message: str, hint: str) -> None:
    if not ok:
        raise PatchError(f"substituted {component} does not fit: {message}", hint=hint)


def check_vae_fits(new: Config, old: Config, unet: Config) -> list[str]:
    hint = "substitute a VAE trained for this pipeline family (for SDXL: an SDXL VAE such as sdxl-vae-fp16-fix)"
    new_latent, unet_in = new.get("latent_channels"), unet.get("in_channels")
    _require(new_latent == unet_in, "vae", f"latent_channels {new_latent} but the UNet takes {unet_in}", hint)
    _require(
        new_latent == old.get("latent_channels"),
        "vae",
        f"latent_channels {new_latent} but the original VAE has {old.get('latent_channels')}",
        hint,
    )
    new_scale, old_scale = new.get("scaling_factor"), old.get("scaling_factor")
    _require(
        new_scale is not None and old_scale is not None and abs(float(new_scale) - float(old_scale)) < 1e-6,
        "vae",
        f"scaling_factor {new_scale} but the original VAE uses {old_scale} (a VAE of another model family)",
        hint,
    )
    new_blocks, old_blocks = new.get("block_out_channels", []), old.get("block_out_channels", [])
    _require(
        len(new_blocks) == len(old_blocks),
        "vae",
        f"{len(new_blocks)} resolution levels but the original has {len(old_blocks)} (latent-to-pixel ratio differs)",
        hint,
    )
    for key in ("down_block_types", "up_block_types"):
        _require(
            list(new.get(key, [])) == list(old.get(key, [])),
            "vae",
            f"{key} {new.get(key)} differ from the original's {old.get(key)}",
            hint,
        )
    return [
        f"vae latent_channels {new_latent} == unet in_channels {unet_in}",
        f"vae scaling_factor {new_scale} == original",
        f"vae block structure ({len(new_blocks)} levels, {new.get('up_block_types')}) == original",
    ]


def check_unet_fits(new: Config, old: Config, _unet: Config) -> list[str]:
    keys = ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type", "addition_time_embed_dim",
            "projection_class_embeddings_input_dim")
    for key in keys:
        _require(new.get(key) == old.get(key), "unet", f"{key} {new.get(key)} != original {old.get(key)}",
                 "substitute a UNet of the same architecture (an SDXL finetune)")
    return [f"unet {', '.join(keys)} == original"]


def check_text_encoder_fits(new: Config, old: Config, _unet: Config) -> list[str]:
    keys = ("hidden_size", "projection_dim", "num_hidden_layers", "vocab_size")
    for key in keys:
        _require(new.get(key) == old.get(key), "text_encoder", f"{key} {new.get(key)} != original {old.get(key)}",
                 "substitute a text encoder of the same architecture")
    return [f"text encoder {', '.join(keys)} == original"]


FIT_CHECKS: dict[str, Callable[[Config, Config, Config], list[str]]] = {
    "vae": check_vae_fits,
    "unet": check_unet_fits,
    "text_encoder": check_text_encoder_fits,
    "text_encoder_2": check_text_encoder_fits,
}


# ----------------------------------------------------------------------------- loading (I/O)


def read_config(folder: Path, component: str) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise PatchError(f"{component}: no config.json in {folder}", hint="the source must be in diffusers layout")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PatchError(f"{component}: {path} is not valid JSON ({e})", hint="re-download the source") from e


def weights_variant(folder: Path) -> str | None:
    """The variant of the (single) weight set the fetch stage linked into a component folder."""
    for p in folder.iterdir():
        parsed = parse_weight_name(p.name)
        if parsed is not None and parsed[1] is not None:
            return parsed[1]
    return None


def _loader(component: str) -> Any:
    import diffusers
    import transformers

    loaders = {
        "vae": diffusers.AutoencoderKL,
        "unet": diffusers.UNet2DConditionModel,
        "text_encoder": transformers.CLIPTextModel,
        "text_encoder_2": transformers.CLIPTextModelWithProjection,
    }
    return loaders[component]


def load_component(component: str, folder: Path, allow_pickle: bool) -> Any:
    import torch

    try:
        return _loader(component).from_pretrained(
            folder,
            variant=weights_variant(folder),
            use_safetensors=not allow_pickle,
            torch_dtype=torch.float32,
        )
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise PatchError(f"{component}: cannot load weights from {folder}: {str(e).splitlines()[0]}",
                         hint="check the source holds weights of this architecture") from e


def patch(base: FetchedSource, substitutes: Mapping[str, FetchedSource], allow_pickle: Mapping[str, bool]) -> PatchedPipeline:
    """Load the base pipeline with every substitute already in place (no reload round trip)."""
    from diffusers import StableDiffusionXLPipeline
    import torch

    unet_config = read_config(base.path / "unet", "unet")
    replaced: dict[str, Any] = {}
    checks: list[str] = []
    for component, fetched in substitutes.items():
        new_config = read_config(fetched.path, component)
        old_config = read_config(base.path / component, component)
        checks += FIT_CHECKS[component](new_config, old_config, unet_config)
        replaced[component] = load_component(component, fetched.path, allow_pickle.get(component, False))
        log.info("substituted %s from %s", component, fetched.role)
    originals = {c: load_component(c, base.path / c, allow_pickle.get("base", False)) for c in substitutes}
    try:
        pipeline = StableDiffusionXLPipeline.from_pretrained(
            base.path,
            **replaced,
            variant=weights_variant(base.path / "unet"),
            use_safetensors=not allow_pickle.get("base", False),
            torch_dtype=torch.float32,
            add_watermarker=False,
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise PatchError(f"base: cannot load the pipeline from {base.path}: {str(e).splitlines()[0]}",
                         hint="check the base source is a diffusers SDXL pipeline") from e
    return PatchedPipeline(
        pipeline=pipeline,
        originals=originals,
        substituted={c: f.role for c, f in substitutes.items()},
        checks=checks,
    )
