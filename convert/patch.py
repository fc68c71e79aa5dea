"""Stage 3: check substitutes fit the base pipeline, and say where every component's weights are.

A VAE from another model family loads without complaint and decodes garbage (or
nothing) hours later, so the fit checks run on the configs before any weight is read.

Memory: the full pipeline in fp32 is ~14 GiB for SDXL, more than half of what a build
may use. So only what validation needs is loaded here (the VAE and, if substituted, the
original VAE, both fp32: they are small and are the f32 reference). The UNet and the
text encoders are built without storage (on torch's meta device) so the pipeline object,
its configs and `vae_scale_factor` work as usual; the export stage loads the real
weights of one component at a time from `PatchedPipeline.weights`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from convert.errors import PatchError
from convert.fetch import FetchedSource, NotSafetensors, parse_weight_name, read_safetensors_header

log = logging.getLogger(__name__)

Config = Mapping[str, Any]
LoadDtype = Literal["fp32", "fp16"]

#: Pipeline attributes whose weights are read lazily (one at a time, by the export stage).
LAZY_COMPONENTS: tuple[str, ...] = ("text_encoder", "text_encoder_2", "unet")


@dataclass(frozen=True)
class WeightSource:
    """Where one component's weights live, and the dtype they are stored in."""

    component: str  # diffusers attribute: vae, unet, text_encoder, text_encoder_2
    folder: Path
    variant: str | None
    allow_pickle: bool
    stored_dtype: str | None  # "fp16", "bf16", "fp32" from the safetensors header; None if unknown

    def load(self, dtype: LoadDtype = "fp32") -> Any:
        """The component with real weights in `dtype` (eval mode)."""
        return load_component(self.component, self.folder, self.allow_pickle, dtype).eval()


@dataclass
class PatchedPipeline:
    """The pipeline to export (substitutes in place) plus the originals they replaced.

    `pipeline` is a real `StableDiffusionXLPipeline` whose VAE (fp32), tokenizers and
    scheduler are loaded; its UNet and text encoders have no storage (meta tensors):
    their weights are read from `weights` by the export stage, one component at a time.
    `originals` holds the original VAE (fp32) when the VAE is substituted.
    """

    pipeline: Any  # diffusers.StableDiffusionXLPipeline
    originals: dict[str, Any] = field(default_factory=dict)
    substituted: dict[str, str] = field(default_factory=dict)  # component -> source description
    checks: list[str] = field(default_factory=list)  # fit checks that passed, for the report
    weights: dict[str, WeightSource] = field(default_factory=dict)  # component -> its (substituted) weights


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


def read_config(folder: Path, component: str, filename: str = "config.json") -> dict[str, Any]:
    """A config of the fetched view; errors name the source's own file (the view is deleted after the build).

    Its bytes already match the source's hash, so downloading again cannot help: the source is broken.
    """
    path = folder / filename
    if not path.is_file():
        raise PatchError(f"{component}: no {filename} in {folder}", hint="the source must be in diffusers layout")
    fix = "fix the file in the local source, or use another revision of a Hub source"
    try:
        config = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PatchError(f"{component}: {filename} is not valid JSON ({str(e)[:120]}): {path.resolve()}", hint=fix) from None
    if not isinstance(config, dict):
        raise PatchError(f"{component}: {filename} is not a JSON object: {path.resolve()}", hint=fix)
    return config


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


_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16"}
_SAFETENSORS_DTYPES = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F64": "fp64"}


def load_component(component: str, folder: Path, allow_pickle: bool, dtype: LoadDtype = "fp32") -> Any:
    import torch

    try:
        return _loader(component).from_pretrained(
            folder,  # low_cpu_mem_usage (default): weights are read once, straight into their parameters
            variant=weights_variant(folder),
            use_safetensors=not allow_pickle,
            torch_dtype=getattr(torch, _TORCH_DTYPES[dtype]),
        )
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise PatchError(f"{component}: cannot load weights from {folder}: {str(e).splitlines()[0]}",
                         hint="check the source holds weights of this architecture") from e


def stored_dtype(folder: Path, variant: str | None) -> str | None:
    """Dtype of the first floating tensor in the variant's safetensors files, read from the header only.

    Decides whether a component may be loaded in fp16 without changing its values.
    """
    for path in sorted(folder.glob("*.safetensors")):
        if (parse_weight_name(path.name) or ("", None))[1] != variant:
            continue
        try:
            header = read_safetensors_header(path)
        except NotSafetensors as e:
            raise PatchError(f"{path.resolve()} is not a valid safetensors file: {e}",
                             hint="fix or replace the file in the source") from None
        for name, entry in header.items():
            if name != "__metadata__" and entry.get("dtype") in _SAFETENSORS_DTYPES:
                return _SAFETENSORS_DTYPES[entry["dtype"]]
    return None


def weight_source(component: str, folder: Path, allow_pickle: bool) -> WeightSource:
    variant = weights_variant(folder)
    return WeightSource(component, folder, variant, allow_pickle, stored_dtype(folder, variant))


def _empty_component(component: str, folder: Path) -> Any:
    """The component built from its config with parameters on the meta device (no memory, no init)."""
    from accelerate import init_empty_weights

    cls = _loader(component)
    with init_empty_weights(include_buffers=False):
        if component == "unet":
            return cls.from_config(read_config(folder, component))
        return cls(cls.config_class.from_pretrained(folder))


def _light_part(folder: Path, spec: Any, component: str) -> Any:
    """A tokenizer or scheduler, by the class model_index.json names."""
    import diffusers
    import transformers

    library, cls_name = spec
    module = {"diffusers": diffusers, "transformers": transformers}.get(library)
    if module is None or not hasattr(module, cls_name):
        raise PatchError(f"base: {component} class {library}.{cls_name} is not supported",
                         hint="the base must be a diffusers SDXL pipeline")
    return getattr(module, cls_name).from_pretrained(folder / component)


def patch(base: FetchedSource, substitutes: Mapping[str, FetchedSource], allow_pickle: Mapping[str, bool]) -> PatchedPipeline:
    """Check substitutes fit, load the small parts, and record where the big weights are."""
    from diffusers import StableDiffusionXLPipeline

    unet_config = read_config(base.path / "unet", "unet")
    checks: list[str] = []
    folders = {c: base.path / c for c in ("vae", *LAZY_COMPONENTS)}
    pickle = {c: allow_pickle.get("base", False) for c in folders}
    for component, fetched in substitutes.items():
        new_config = read_config(fetched.path, component)
        old_config = read_config(base.path / component, component)
        checks += FIT_CHECKS[component](new_config, old_config, unet_config)
        folders[component], pickle[component] = fetched.path, allow_pickle.get(component, False)
        log.info("substituted %s from %s", component, fetched.role)
    weights = {c: weight_source(c, folders[c], pickle[c]) for c in folders}
    originals = {"vae": load_component("vae", base.path / "vae", allow_pickle.get("base", False))} if "vae" in substitutes else {}
    index = read_config(base.path, "base", "model_index.json")
    try:
        parts = {c: _empty_component(c, folders[c]) for c in LAZY_COMPONENTS}
        parts |= {c: _light_part(base.path, index[c], c) for c in ("tokenizer", "tokenizer_2", "scheduler")}
        pipeline = StableDiffusionXLPipeline(
            vae=weights["vae"].load("fp32"), **parts,
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
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
        weights=weights,
    )
