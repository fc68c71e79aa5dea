"""The recipe: the one declarative input of a build.

Strict on purpose: a typo in a recipe (``precison``) must stop the build with the file,
line and a suggestion rather than silently fall back to a default that produces a
NaN-decoding bundle hours later.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from convert.errors import RecipeError

SCHEMA_VERSION = 1

WeightFormat = Literal["fp32", "fp16", "int8", "int4"]
Precision = Literal["f32", "f16", "bf16"]
Device = Literal["CPU", "GPU", "NPU"]

#: Exported submodels of an SDXL pipeline, in export order; tokenizers are converted with openvino-tokenizers.
SDXL_COMPONENTS: tuple[str, ...] = (
    "text_encoder",
    "text_encoder_2",
    "unet",
    "vae_decoder",
    "vae_encoder",
    "tokenizer",
    "tokenizer_2",
)
#: Components that carry weights (tokenizers have none to compress).
WEIGHTED_COMPONENTS: tuple[str, ...] = SDXL_COMPONENTS[:5]
#: diffusers pipeline attributes that a recipe may substitute.
SUBSTITUTABLE: tuple[str, ...] = ("vae", "unet", "text_encoder", "text_encoder_2")
#: Components whose decode/encode the validation gate checks.
VAE_PARTS: tuple[str, ...] = ("vae_decoder", "vae_encoder")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HubSource(_Strict):
    repo: str = Field(description="Hugging Face Hub repo id, e.g. 'stabilityai/stable-diffusion-xl-base-1.0'.")
    revision: str = Field(
        default="main",
        description="Branch, tag or 40-hex commit; resolved to a commit before anything is downloaded.",
    )
    subfolder: str | None = Field(default=None, description="Folder inside the repo that holds the component.")
    variant: str | None = Field(
        default=None, description="Weights variant to download, e.g. 'fp16' (files named *.fp16.safetensors)."
    )

    @field_validator("repo")
    @classmethod
    def _repo_shape(cls, value: str) -> str:
        if value.count("/") != 1 or any(not part for part in value.split("/")):
            raise ValueError(f"'{value}' is not a Hub repo id; write it as 'owner/name'")
        return value


class LocalSource(_Strict):
    path: Path = Field(description="Folder in diffusers layout; relative paths are relative to the recipe file.")
    subfolder: str | None = Field(default=None, description="Folder inside `path` that holds the component.")
    variant: str | None = Field(default=None, description="Weights variant to load, e.g. 'fp16'.")


class GeneratedSource(_Strict):
    generator: str = Field(
        description="Name of a built-in generator in convert.synthetic (seeded random weights, no network)."
    )
    seed: int = Field(default=0, description="Seed for the generator; same seed, same bytes.")
    variant: str | None = Field(default=None, description="Weights variant the generator writes, e.g. 'fp16'.")


class Source(_Strict):
    """Exactly one of hub / local / generated."""

    hub: HubSource | None = Field(default=None, description="Download from the Hugging Face Hub, pinned to a commit.")
    local: LocalSource | None = Field(default=None, description="Use a folder on this machine.")
    generated: GeneratedSource | None = Field(default=None, description="Generate offline with seeded weights.")
    allow_pickle: bool = Field(
        default=False,
        description="Allow .bin/.ckpt/.pt weights (unpickling runs code). Off by default; safetensors only.",
    )
    license: str | None = Field(default=None, description="SPDX-like licence id of this source, for the model card.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        given = [k for k in ("hub", "local", "generated") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a source needs exactly one of 'hub', 'local', 'generated' (got {given or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return "hub" if self.hub else "local" if self.local else "generated"

    @property
    def variant(self) -> str | None:
        inner = self.hub or self.local or self.generated
        return inner.variant if inner is not None else None

    def describe(self) -> str:
        if self.hub:
            sub = f"/{self.hub.subfolder}" if self.hub.subfolder else ""
            return f"hub:{self.hub.repo}{sub}@{self.hub.revision}"
        if self.local:
            return f"local:{self.local.path}"
        assert self.generated is not None
        return f"generated:{self.generated.generator}(seed={self.generated.seed})"


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


class ComponentSettings(_Strict):
    weights: WeightFormat = Field(default="fp32", description="Weight format of the exported IR.")
    nncf: NNCFSettings | None = Field(default=None, description="NNCF knobs for int8/int4 weights.")
    inference_precision: list[Precision] | None = Field(
        default=None,
        description="Precisions the target device runs this component at; default: target.inference_precision.",
    )
    runtime_options: dict[str, str] = Field(
        default_factory=dict, description="Extra keys written to the IR's rt_info runtime_options (e.g. ACTIVATIONS_SCALE_FACTOR)."
    )
    export: bool = Field(default=True, description="Set false to leave this component out of the bundle.")

    @model_validator(mode="after")
    def _nncf_fits(self) -> ComponentSettings:
        if self.nncf is not None and self.weights not in ("int8", "int4"):
            raise ValueError(f"'nncf' settings need weights int8 or int4, not {self.weights}")
        if self.nncf and self.nncf.mode and not self.nncf.mode.startswith(self.weights):
            raise ValueError(f"nncf.mode {self.nncf.mode} does not match weights {self.weights}")
        return self


class Target(_Strict):
    device: Device = Field(default="GPU", description="Device the bundle is built for.")
    inference_precision: list[Precision] = Field(
        default_factory=lambda: ["f16"],
        min_length=1,
        description="Precisions the device runs at (GPU: f16; recent Xeons: bf16/f16; older CPUs: f32).",
    )


class ValidationSettings(_Strict):
    components: list[Literal["vae_decoder", "vae_encoder"]] = Field(
        default_factory=lambda: ["vae_decoder", "vae_encoder"], description="VAE parts the gate decodes/encodes."
    )
    max_non_finite: int = Field(default=0, ge=0, description="Non-finite output values allowed (SD.Next 'invalid=').")
    min_psnr_db: float = Field(default=40.0, description="PSNR floor against the f32 decode of the original VAE.")
    resolution: int | None = Field(
        default=None, description="Image side for the full-resolution decode; default: the pipeline's native size."
    )
    full_resolution_images: int = Field(
        default=1, ge=0, description="How many of `images` are decoded at full resolution (slow at 1024); the rest at small_resolution."
    )
    small_resolution: int = Field(default=256, ge=8, description="Image side for the other images and the denoising run.")
    check_original: bool = Field(
        default=True, description="Also run the original VAE at the same precisions, for the report (never gates)."
    )
    images: list[str] = Field(
        default_factory=lambda: ["astronaut", "chelsea", "coffee"],
        description="scikit-image sample images encoded to realistic latents.",
    )
    denoise_steps: int = Field(default=2, ge=0, description="Steps of the exported pipeline that produce extra latents.")
    prompt: str = Field(default="a photo of an astronaut riding a horse", description="Prompt for the denoising run.")


class PublishSettings(_Strict):
    repo: str = Field(description="Target Hub repo id ('org/name').")
    private: bool = Field(default=True, description="Create the repo private unless set false.")
    tags: list[str] = Field(default_factory=list, description="Extra model-card tags.")


class Recipe(_Strict):
    schema_version: Literal[1] = Field(description="Recipe format version; this tool reads 1.")
    name: str = Field(description="Recipe name; names the output folder and the build.")
    description: str = Field(default="", description="One paragraph for the model card.")
    pipeline: Literal["stable-diffusion-xl"] = Field(
        default="stable-diffusion-xl", description="Pipeline family; selects loaders and exporters."
    )
    base: Source = Field(description="The base pipeline (diffusers layout).")
    substitutions: dict[str, Substitution] = Field(
        default_factory=dict, description="Components replaced before export, by diffusers name (e.g. 'vae')."
    )
    components: dict[str, ComponentSettings] = Field(
        default_factory=dict, description="Per-component export settings; unlisted components use the defaults."
    )
    target: Target = Field(default_factory=Target, description="Device and precisions the bundle is built for.")
    validation: ValidationSettings = Field(default_factory=ValidationSettings, description="Validation gate settings.")
    publish: PublishSettings | None = Field(default=None, description="Where `--publish` uploads the bundle.")
    base_model: str | None = Field(
        default=None, description="Upstream model id for the card's base_model; default: the base Hub repo."
    )

    @field_validator("components")
    @classmethod
    def _known_components(cls, value: dict[str, ComponentSettings]) -> dict[str, ComponentSettings]:
        for key, settings in value.items():
            if key not in SDXL_COMPONENTS:
                raise ValueError(f"unknown component '{key}'{_suggest(key, SDXL_COMPONENTS)}")
            if key.startswith("tokenizer") and settings.weights != "fp32":
                raise ValueError(f"component '{key}' has no weights to store as {settings.weights}")
        return value

    @field_validator("substitutions")
    @classmethod
    def _known_substitutions(cls, value: dict[str, Substitution]) -> dict[str, Substitution]:
        for key in value:
            if key not in SUBSTITUTABLE:
                raise ValueError(f"cannot substitute '{key}'{_suggest(key, SUBSTITUTABLE)}")
        return value

    def settings_for(self, component: str) -> ComponentSettings:
        return self.components.get(component, ComponentSettings())

    def precisions_for(self, component: str) -> list[Precision]:
        return self.settings_for(component).inference_precision or list(self.target.inference_precision)

    def exported_components(self) -> list[str]:
        return [c for c in SDXL_COMPONENTS if self.settings_for(c).export]


def _suggest(word: str, choices: tuple[str, ...] | list[str]) -> str:
    """A did-you-mean that also matches the last part of snake_case names (precison -> inference_precision)."""
    aliases: dict[str, str] = {}
    for choice in choices:
        aliases.setdefault(choice, choice)
        aliases.setdefault(choice.rsplit("_", 1)[-1], choice)
    close = difflib.get_close_matches(word, list(aliases), n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{aliases[close[0]]}'?"
    return f"; expected one of: {', '.join(choices)}"


# ---------------------------------------------------------------------------- loading


def load_recipe(path: Path) -> Recipe:
    """Parse and validate a recipe file; every problem becomes a one-line RecipeError."""
    if not path.is_file():
        raise RecipeError("recipe file not found", path=path, hint="check the name or pass a path to a .yaml file")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise RecipeError(f"{line}not valid YAML ({getattr(e, 'problem', e)})", path=path) from e
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a YAML mapping of keys (schema_version, name, base, ...)", path=path)
    data = _resolve_local_paths(data, path.parent)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_explain(e, root), path=path, hint=None) from e


def _resolve_local_paths(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Local source paths are relative to the recipe, so a recipe works from any cwd."""

    def fix(source: Any) -> None:
        if isinstance(source, dict) and isinstance(source.get("local"), dict):
            local = source["local"]
            if isinstance(local.get("path"), str) and not Path(local["path"]).is_absolute():
                local["path"] = str((base_dir / local["path"]).resolve())

    fix(data.get("base"))
    subs = data.get("substitutions")
    if isinstance(subs, dict):
        for sub in subs.values():
            if isinstance(sub, dict):
                fix(sub.get("source"))
    return data


def _explain(error: ValidationError, root: yaml.Node | None) -> str:
    """First pydantic error as one line: field path, YAML line, what is wrong, a suggestion."""
    first = error.errors()[0]
    loc = [str(p) for p in first["loc"]]
    line = _line_of(root, loc)
    where = ".".join(loc) or "recipe"
    at = f"line {line}: " if line else ""
    more = f" (+{error.error_count() - 1} more)" if error.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        parent = loc[:-1]
        known = _fields_at(parent)
        owner = ".".join(parent) or "the recipe"
        return f"{at}unknown field '{loc[-1]}' in {owner}{_suggest(loc[-1], known)}{more}"
    if first["type"] == "missing":
        return f"{at}missing required field '{where}'{more}"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{at}{where}: {msg}{more}"


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
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        return candidate
    for folder in search_dirs:
        for suffix in (".yaml", ".yml"):
            path = folder / f"{name_or_path}{suffix}"
            if path.is_file():
                return path
    known = sorted({p.stem for d in search_dirs if d.is_dir() for p in d.glob("*.y*ml")})
    raise RecipeError(
        f"no recipe named '{name_or_path}'{_suggest(name_or_path, known) if known else ''}",
        hint=f"recipes are looked up in {', '.join(str(d) for d in search_dirs)}",
    )


def recipe_digest(recipe: Recipe) -> str:
    """Stable hash of the recipe's meaning (not its formatting): keys the build id."""
    canonical = json.dumps(recipe.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def json_schema() -> dict[str, Any]:
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "SDXL OpenVINO conversion recipe"
    return schema
