"""Community checkpoints: one original-layout file, LoRAs fused in, a scheduler override.

Stage 3a, between fetch and patch: a single-file base (and any LoRA) becomes an ordinary
diffusers folder in the build's staging area, written by diffusers' own loaders
(`from_single_file` with the configs of a pinned config source, `load_lora_weights` +
`fuse_lora`); the patch, export and validation stages then read it like any diffusers
source, so the fused weights are what gets exported and the baked-in VAE is the original
the validation gate compares a substitute against. No key mapping is written here.

What a file is, is decided before any weight is read: from tensor names and shapes in its
header (`detect_architecture`, pure), against the family records' signatures.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convert.errors import PatchError
from convert.families import FAMILIES, PipelineFamily
from convert.families.base import Shapes
from convert.fetch import FetchedSource, NotSafetensors, read_safetensors_header
from convert.recipe import Lora, Recipe, SchedulerOverride
from convert.recipe_rules import suggest
from convert.roles import SourceRole

log = logging.getLogger(__name__)

#: Architectures we recognise but do not convert from a single file: (label, test on the tensor names).
_OTHER_ARCHITECTURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("a FLUX", ("double_blocks.0.img_attn.qkv.weight", "model.diffusion_model.double_blocks.0.img_attn.qkv.weight")),
    ("an SD3 / SD3.5", ("joint_blocks.0.context_block.adaLN_modulation.1.bias",
                     "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias")),
    ("an SD 2.x", ("cond_stage_model.model.token_embedding.weight",)),
    ("an SD 1.x", ("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
                "cond_stage_model.transformer.embeddings.position_embedding.weight")),
    ("a diffusers-layout UNet file, not a full", ("down_blocks.0.resnets.0.conv1.weight",)),
)
_LORA_KEY = re.compile(r"(lora_down|lora\.down|lora_A|lora_up|lora\.up|lora_B)")


def shapes_of(header: Mapping[str, Any]) -> Shapes:
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def detect_architecture(shapes: Shapes, families: Mapping[str, PipelineFamily] = FAMILIES) -> str:
    """The family name whose single-file signature the tensors match, else what they look like
    ("an SD 1.x", completed by "checkpoint" in messages)."""
    for family in families.values():
        if family.single_file is not None and family.single_file.signature(shapes):
            return family.name
    if any(_LORA_KEY.search(k) for k in list(shapes)[:64]):
        return "a LoRA, not a full"
    for label, keys in _OTHER_ARCHITECTURES:
        if any(k in shapes for k in keys):
            return label
    if any(k.startswith("model.diffusion_model.") for k in shapes) and not any(k.startswith("first_stage_model.") for k in shapes):
        return "a UNet-only (no VAE, no text encoders)"
    return "an unrecognised"


def check_architecture(file: Path, family: PipelineFamily) -> Shapes:
    """The file's shapes, once its tensors are those of the recipe's family; else one line naming what it is."""
    try:
        shapes = shapes_of(read_safetensors_header(file))
    except NotSafetensors as e:
        raise PatchError(f"base: {file.name} is not a valid safetensors file: {e}", hint="fetch it again") from None
    found = detect_architecture(shapes)
    if found != family.name:
        fix = (f"set pipeline: {found} in the recipe" if found in FAMILIES
               else f"this tool reads {family.description.split(' (')[0]} single files; use a checkpoint of that family")
        raise PatchError(f"base: {file.name} is {found if found not in FAMILIES else 'a ' + found} checkpoint, "
                         f"not a {family.name} one", hint=fix)
    return shapes


def check_config_source(config: Path, family: PipelineFamily) -> None:
    """The config source describes the recipe's family (a refiner config cannot describe a base file)."""
    index_path = config / "model_index.json"
    try:
        found = json.loads(index_path.read_bytes()).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise PatchError(f"base.config: cannot read model_index.json of the config source ({e})",
                         hint="point base.config at a diffusers repo/folder of the file's family") from None
    if found != family.diffusers_class:
        raise PatchError(f"base.config: the config source is a {found}, but the file is {family.name} "
                         f"({family.diffusers_class})",
                         hint=f"use the config of a {family.diffusers_class} (default: {_default(family)})")


def _default(family: PipelineFamily) -> str:
    assert family.single_file is not None
    return f"{family.single_file.config_repo}@{family.single_file.config_commit[:12]}"


def _torch_dtype(shapes_header: Mapping[str, Any]) -> Any:
    import torch

    dtypes = {e["dtype"] for k, e in shapes_header.items() if k != "__metadata__"}
    return torch.float16 if "F16" in dtypes else torch.bfloat16 if "BF16" in dtypes else torch.float32


# ----------------------------------------------------------------------------- LoRA


@dataclass(frozen=True)
class FusedLora:
    role: SourceRole
    scale: float
    modules: dict[str, int]  # target -> LoRA modules fused into it


#: LyCORIS layer kinds diffusers' LoRA loader cannot read (their key parts), by name.
_LYCORIS = {"LoHa": ("hada_w1_a", "hada_w2_a"), "LoKr": ("lokr_w1", "lokr_w2"), "(IA)^3": ("on_input",)}


def unsupported_lora_keys(header: Mapping[str, Any]) -> str | None:
    """Why a LoRA file cannot be fused faithfully, from its keys; None if it is a plain LoRA.

    diffusers fuses a kohya DoRA file's low-rank matrices and drops its magnitude vectors
    (`.dora_scale`) with a warning: a different model than its author trained, shipped silently.
    """
    keys = [k for k in header if k != "__metadata__"]
    if keys and not any("lora" in k.lower() or any(f".{p}" in k for ps in _LYCORIS.values() for p in ps) for k in keys):
        found = detect_architecture(shapes_of(header))
        what = f"a {found} checkpoint" if found in FAMILIES else f"{found} checkpoint"
        return f"holds no LoRA layers (none of its {len(keys)} tensor names says lora); it looks like {what}"
    dora = sum(1 for k in keys if k.endswith(("dora_scale", "lora_magnitude_vector", "lora_magnitude_vector.weight")))
    if dora:
        return (f"is a DoRA LoRA: {dora} of its {len(keys)} tensors are DoRA magnitudes (.dora_scale) that diffusers' "
                f"loader drops while it fuses the rest; DoRA is not supported")
    for kind, parts in _LYCORIS.items():
        found = sum(1 for k in keys if any(f".{p}" in k or k.endswith(p) for p in parts))
        if found:
            return f"holds LyCORIS {kind} layers ({found} tensors), which diffusers' LoRA loader cannot fuse"
    return None


def lora_modules(state_dict: Mapping[str, Any]) -> dict[str, int]:
    """LoRA layers per pipeline component in diffusers' converted state dict (one down/A matrix per layer)."""
    counts: dict[str, int] = {}
    for key in state_dict:
        if key.endswith(("down.weight", "lora_A.weight")):
            component = key.split(".", 1)[0]
            counts[component] = counts.get(component, 0) + 1
    return counts


def fuse_lora(pipe: Any, lora: Lora, fetched: FetchedSource) -> FusedLora:
    """Load one LoRA with diffusers, check every one of its layers found its place, fuse it, drop the adapter.

    diffusers only warns when LoRA keys match nothing or part of a model; a LoRA for another
    architecture would silently change nothing (or half a model), so both are errors here.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    role, file = fetched.role, fetched.path / str(lora.source.file)
    fix = "use a LoRA trained for this model family, or fix its targets in the recipe"
    unsupported = unsupported_lora_keys(read_safetensors_header(file))
    if unsupported:
        raise PatchError(f"{role}: {lora.source.file} {unsupported}", hint="use a plain LoRA of this file (kohya or "
                         "peft, without DoRA or LyCORIS), e.g. re-exported by its trainer")
    try:
        state, _alphas = pipe.lora_state_dict(str(file))
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise PatchError(f"{role}: diffusers cannot read {lora.source.file} as a LoRA ({_first(e)})", hint=fix) from e
    found = lora_modules(state)
    stray = {c: n for c, n in found.items() if c not in lora.targets}
    if stray:
        raise PatchError(f"{role}: {lora.source.file} also holds {', '.join(f'{n} {c}' for c, n in stray.items())} "
                         f"LoRA layers, outside its targets {lora.targets}", hint="add them to targets, or use another file")
    adapter = role.folder_name
    try:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=adapter)
    except (ValueError, KeyError, RuntimeError) as e:
        total = sum(found.values())
        mismatch = re.search(r"size mismatch for (\S+?): copying a param with shape (.+?) from checkpoint, "
                             r"the shape in current model is (.+?)\.?$", str(e), re.M)
        if mismatch:  # the names fit, the shapes do not: a LoRA of another architecture
            layer, theirs, ours = mismatch.groups()
            raise PatchError(f"{role}: the LoRA layers of {lora.source.file} have the shapes of another model "
                             f"({layer}: {theirs} in the LoRA, {ours} in the model)", hint=fix) from e
        raise PatchError(f"{role}: 0 of {total} LoRA layers of {lora.source.file} matched the model "
                         f"({_first(e)})", hint=fix) from e
    matched: dict[str, int] = {}
    for target in lora.targets:
        component = getattr(pipe, target, None)
        matched[target] = 0 if component is None else sum(
            1 for m in component.modules() if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {}))
        if found.get(target, 0) == 0 or matched[target] != found[target]:
            raise PatchError(f"{role}: {matched[target]} of {found.get(target, 0)} LoRA layers of {lora.source.file} "
                             f"matched the {target}", hint=fix)
    pipe.fuse_lora(components=list(lora.targets), lora_scale=lora.scale, adapter_names=[adapter])
    pipe.unload_lora_weights()
    log.info("%s: fused %s at scale %s", role, matched, lora.scale)
    return FusedLora(role, lora.scale, matched)


def _first(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


# ----------------------------------------------------------------------------- the stage


def needs_materializing(recipe: Recipe) -> bool:
    return recipe.base.file is not None or bool(recipe.lora)


def materialize(recipe: Recipe, fetched: Mapping[SourceRole, FetchedSource], dest: Path) -> tuple[FetchedSource, list[FusedLora]]:
    """The base as a diffusers folder at `dest`: read from its single file (or diffusers folder), LoRAs fused."""
    import diffusers

    family, base = recipe.family, fetched[SourceRole.base()]
    if recipe.base.file is not None:
        assert family.single_file is not None  # the recipe validator checked it
        file = base.path / recipe.base.file
        check_architecture(file, family)
        config = fetched[SourceRole.config()].path
        check_config_source(config, family)
        dtype = _torch_dtype(read_safetensors_header(file))
        try:
            pipe = family.single_file.load(family.diffusers_class, file, config, dtype)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            raise PatchError(f"base: diffusers cannot read {file.name} with the config source's configs ({_first(e)})",
                             hint="check base.config describes this checkpoint (same family and sizes)") from e
    else:
        pipe = getattr(diffusers, family.diffusers_class).from_pretrained(base.path)
    fused = [fuse_lora(pipe, lora, fetched[SourceRole.lora(i)]) for i, lora in enumerate(recipe.lora)]
    pipe.save_pretrained(dest, safe_serialization=True)
    del pipe
    return FetchedSource(role=SourceRole.base(), path=dest, commit=base.commit, files=base.files), fused


def apply_scheduler(pipeline: Any, override: SchedulerOverride | None) -> None:
    """Replace the pipeline's scheduler (its config keys carried over, the recipe's set on top)."""
    if override is None:
        return
    import diffusers

    cls = getattr(diffusers, override.class_name, None)
    if cls is None:
        raise PatchError(f"scheduler: diffusers has no {override.class_name}",
                         hint="name a diffusers scheduler class such as EulerDiscreteScheduler")
    try:
        pipeline.scheduler = cls.from_config(pipeline.scheduler.config, **override.config)
    except (TypeError, ValueError) as e:
        raise PatchError(f"scheduler: cannot build {override.class_name} ({_first(e)})",
                         hint="check the scheduler config keys") from e


MAX_TRAIN_TIMESTEPS = 10_000  # SDXL and SD 1.5 train on 1000; 10^9 made diffusers allocate 8.4 GB


def check_scheduler(override: SchedulerOverride) -> str | None:
    """Why `override` cannot be built, as one phrase naming the key (None: it builds and sets timesteps).

    Before anything is downloaded: diffusers' `from_config` ignores unknown keys (a typo silently
    kept the base's value while the card claimed the typo), some classes need packages that are
    not installed, and a bad value only surfaced after the export.
    """
    import inspect

    import diffusers

    name = override.class_name
    cls = getattr(diffusers, name, None)
    if name.startswith("Flax") or not isinstance(cls, type) or not hasattr(cls, "from_config"):
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("Flax"))
        return f"class_name: diffusers has no PyTorch scheduler {name}{suggest(name, known)}"
    backends = getattr(cls, "_backends", None)  # diffusers' stand-in for a class whose packages are missing
    if backends:
        return (f"class_name: {name} needs the packages {', '.join(backends)}, not all installed here; "
                "choose another scheduler")
    try:
        parameters = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError, ImportError) as e:  # a dummy object standing in for a missing package
        return f"class_name: {name} cannot be used here ({_first(e)})"
    keys = [k for k in parameters if k not in ("self", "args", "kwargs")]
    for key in override.config:
        if key not in keys:
            return f"config.{key}: {name} has no such setting{suggest(key, keys)}"
    steps = override.config.get("num_train_timesteps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or not 1 <= steps <= MAX_TRAIN_TIMESTEPS):
        return f"config.num_train_timesteps: {steps!r} is not a number of steps from 1 to {MAX_TRAIN_TIMESTEPS}"
    try:
        scheduler = cls(**override.config)
        scheduler.set_timesteps(4)
    except Exception as e:  # diffusers raises ValueError, NotImplementedError, ImportError (torchsde) alike
        return f"config: {name} refuses these settings ({_first(e)})"
    return None

