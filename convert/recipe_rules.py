"""Rules for recipe values that become folder names, file names, URLs or gate thresholds.

Each is checked when the recipe loads (exit 2), so a hostile or mistaken value never reaches
a path join, a Hub request or a validation run that ends in a traceback an hour later.
Light on purpose: no torch, no huggingface_hub until a Hub id is actually checked.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Annotated, Any

from pydantic import AfterValidator

from convert.recipe_yaml import short
from convert.testing import GENERATORS

#: Names of the offline generators (convert.testing, a light module: loading a recipe never imports torch).
GENERATOR_NAMES: tuple[str, ...] = GENERATORS
#: scikit-image sample images shipped inside its wheel (no download) that validate.inputs can
#: turn into RGB: eagle and friends need pooch and the network; horse and the phantom are not uint8.
SAMPLE_IMAGES: tuple[str, ...] = (
    "astronaut", "brick", "camera", "cell", "chelsea", "checkerboard", "clock", "coffee", "coins", "colorwheel",
    "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon", "page",
    "retina", "rocket", "text",
)
#: The VAEs of every family here map 8x8 pixels to one latent: image sides must be multiples of it.
VAE_SCALE_FACTOR = 8
MAX_IMAGE_SIDE = 4096
MAX_DENOISE_STEPS = 50
MAX_NAME_LENGTH = 64
#: Folders of the artifacts tree that are not bundles (see convert.workspace): a recipe named
#: like one would write its bundles among failed builds or generated sources.
RESERVED_NAMES: tuple[str, ...] = ("broken", "sources", "logs", "cache")

# ----------------------------------------------------------------------------- value rules
# Recipe values end up in folder names, file names and URLs: each is checked at load.

_SLUG = re.compile(r"[a-z0-9][a-z0-9._-]*")
_VARIANT = re.compile(r"[A-Za-z0-9_]{1,32}")
_OV_PROPERTY = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


def _unprintable(value: str, *, allow_space: bool = True) -> bool:
    return any(not c.isprintable() or (c.isspace() and not allow_space) for c in value)


def slug(value: str) -> str:
    if len(value) > MAX_NAME_LENGTH or not _SLUG.fullmatch(value) or ".." in value:
        raise ValueError(
            f"'{short(value)}' is not a safe name: use lowercase letters, digits, '.', '_' and '-', "
            f"start with a letter or digit, no '..', at most {MAX_NAME_LENGTH} characters (it names folders)"
        )
    if value in RESERVED_NAMES:
        raise ValueError(f"'{value}' is reserved for the artifacts folder's own {value}/ folder; choose another name")
    return value


def relative_subfolder(value: str) -> str:
    parts = value.rstrip("/").split("/")
    if (not value or value.startswith("/") or "\\" in value or _unprintable(value)
            or any(part in ("", ".", "..") for part in parts)):
        raise ValueError(f"'{short(value)}' is not a relative folder: write it like 'vae' or 'a/b', without '..' or a leading '/'")
    return "/".join(parts)


def variant_token(value: str) -> str:
    if not _VARIANT.fullmatch(value):
        raise ValueError(f"'{short(value)}' is not a variant: letters, digits and '_' only, like 'fp16'")
    return value


def git_revision(value: str) -> str:
    if not value or len(value) > 255 or _unprintable(value, allow_space=False) or ".." in value:
        raise ValueError(f"'{short(value)}' is not a revision: a branch, tag or commit, without spaces or '..', "
                         "at most 255 characters")
    return value


def single_file_name(value: str) -> str:
    """A checkpoint file path inside a repo/folder: relative, safetensors only (pickle formats run code)."""
    relative_subfolder(value)
    lower = value.lower()
    if lower.endswith((".ckpt", ".pt", ".pth", ".bin", ".pkl")):
        raise ValueError(f"'{short(value)}' is a pickle checkpoint (loading it runs code); refusing it: "
                         "use a .safetensors release of the model (or convert it on a machine you trust)")
    if not lower.endswith(".safetensors"):
        raise ValueError(f"'{short(value)}' is not a .safetensors file")
    return value


MAX_LORA_SCALE = 16.0


def lora_scale(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{value} is not a LoRA scale: use a finite number such as 1.0 or 0.8")
    if value == 0:  # fuses nothing, yet the card would say "LoRA fused"
        raise ValueError("a LoRA at scale 0 changes nothing: remove the entry, or give its strength (e.g. 1.0)")
    if abs(value) > MAX_LORA_SCALE:  # fused weights far past the model's own: garbage or inf, not a style
        raise ValueError(f"LoRA scale {value:g} is outside -{MAX_LORA_SCALE:g}..{MAX_LORA_SCALE:g}; "
                         "LoRA strengths are usually 0.5 to 1.5")
    return value


def scheduler_class(value: str) -> str:
    if not re.fullmatch(r"[A-Z][A-Za-z0-9]*Scheduler", value):
        raise ValueError(f"'{short(value)}' is not a diffusers scheduler class name (like EulerDiscreteScheduler)")
    return value


def generator_name(value: str) -> str:
    if value not in GENERATOR_NAMES:
        raise ValueError(f"unknown generator '{short(value)}'{suggest(value, GENERATOR_NAMES)}")
    return value


def hub_repo_id(value: str) -> str:
    """owner/name, checked by huggingface_hub's own validator (imported here: it reads the
    environment once on import, and tests set HF_ENDPOINT before it)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    shape = f"'{short(value)}' is not a Hub repo id; write it as 'owner/name'"
    if value.count("/") != 1 or any(not part for part in value.split("/")) or not value.isascii():
        raise ValueError(shape)
    try:
        validate_repo_id(value)
    except HFValidationError as e:
        reason = str(e).split(":")[0].rstrip(".")
        raise ValueError(f"{shape} ({short(reason, 160)})") from None
    return value


def image_side(value: int) -> int:
    if value <= 0 or value > MAX_IMAGE_SIDE:
        raise ValueError(f"{value} is not an image side: use a multiple of {VAE_SCALE_FACTOR} from "
                         f"{VAE_SCALE_FACTOR} to {MAX_IMAGE_SIDE}")
    if value % VAE_SCALE_FACTOR:
        low = value - value % VAE_SCALE_FACTOR
        nearest = f"{low} or {low + VAE_SCALE_FACTOR}" if low else f"{VAE_SCALE_FACTOR}"
        raise ValueError(f"{value} is not a multiple of {VAE_SCALE_FACTOR} (the VAE's scale factor); use {nearest}")
    return value


def psnr_floor(value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{value} is not a PSNR floor: use a finite number of dB >= 0 (e.g. 40)")
    return value


def local_path(value: Any) -> Any:
    if isinstance(value, str) and (not value.strip() or _unprintable(value)):
        raise ValueError("a local source needs the path of a folder (relative to the recipe), without control characters")
    return value


def card_tag(value: str) -> str:
    if not value.strip() or len(value) > 128 or _unprintable(value):
        raise ValueError(f"'{short(value)}' is not a tag: one line of text, at most 128 characters")
    return value


def ov_properties(value: dict[str, str]) -> dict[str, str]:
    """Keys become element names in the IR's rt_info XML: OpenVINO property names only."""
    for key, option in value.items():
        if not _OV_PROPERTY.fullmatch(key):
            raise ValueError(f"'{short(key)}' is not an OpenVINO property name (upper-case letters, digits and '_', "
                             "like ACTIVATIONS_SCALE_FACTOR)")
        if _unprintable(option):
            raise ValueError(f"{key}: the value must be one line of printable text")
        if key in _GATE_CHOSEN_PROPERTIES:  # else the gate judges one precision and the bundle runs another
            raise ValueError(f"{key} is chosen by inference_precision (target or component), which the gate runs; "
                             "remove it from runtime_options")
        if key in _POSITIVE_NUMBER_PROPERTIES and not _positive_number(option):
            raise ValueError(f"{key}: {short(option)!r} is not a positive number (e.g. 8 or 128.0)")
    return value


#: runtime_options the recipe must not set by hand: they change the precision a device computes at
_GATE_CHOSEN_PROPERTIES = frozenset({"INFERENCE_PRECISION_HINT", "EXECUTION_MODE_HINT"})

#: runtime_options that OpenVINO parses as numbers when it compiles the IR (found late otherwise: after the export)
_POSITIVE_NUMBER_PROPERTIES = frozenset({"ACTIVATIONS_SCALE_FACTOR"})


def _positive_number(text: str) -> bool:
    try:
        number = float(text)
    except ValueError:
        return False
    return math.isfinite(number) and number > 0


MAX_SEED = 2**32 - 1  # numpy and the schedulers' generators take 32-bit seeds


def distinct(values: list[Any] | None) -> list[Any] | None:
    """A list given in a recipe must not name the same thing twice (every check would run twice)."""
    if values is not None:
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"lists {', '.join(repeated)} more than once; name each once")
    return values


Slug = Annotated[str, AfterValidator(slug)]
HubRepoId = Annotated[str, AfterValidator(hub_repo_id)]
SubFolder = Annotated[str, AfterValidator(relative_subfolder)]
Variant = Annotated[str, AfterValidator(variant_token)]


def suggest(word: str, choices: tuple[str, ...] | list[str]) -> str:
    """A did-you-mean that also matches the last part of snake_case names (precison -> inference_precision)."""
    aliases: dict[str, str] = {}
    for choice in choices:
        aliases.setdefault(choice, choice)
        aliases.setdefault(choice.rsplit("_", 1)[-1], choice)
    close = difflib.get_close_matches(word, list(aliases), n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{aliases[close[0]]}'?"
    return f"; expected one of: {', '.join(choices)}"
