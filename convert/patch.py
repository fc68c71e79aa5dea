"""Stage 3: check substitutes fit the base pipeline, and say where every component's weights are.

A VAE from another model family loads without complaint and decodes garbage (or
nothing) hours later, so the fit checks run on the configs before any weight is read.

Memory: the full pipeline in fp32 is ~14 GiB for SDXL, more than half of what a build
may use. So only what validation needs is loaded here (the VAE and, if substituted, the
original VAE, both fp32: they are small and are the f32 reference). The denoiser and the
text encoders are built without storage (on torch's meta device) so the pipeline object,
its configs and `vae_scale_factor` work as usual; the export stage loads the real
weights of one component at a time from `PatchedPipeline.weights`. Which components,
loader classes and fit checks apply is the family's record (convert.families).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from convert.errors import PatchError
from convert.families import PipelineFamily, family_of_class
from convert.fetch import FetchedSource, NotSafetensors, parse_weight_name, read_safetensors_header

log = logging.getLogger(__name__)

Config = Mapping[str, Any]
LoadDtype = Literal["fp32", "fp16"]

@dataclass(frozen=True)
class WeightSource:
    """Where one component's weights live, and the dtype they are stored in."""

    component: str  # diffusers attribute: vae, unet, transformer, text_encoder, ...
    loader: tuple[str, str]  # (library, class) that loads it
    folder: Path
    variant: str | None
    allow_pickle: bool
    stored_dtype: str | None  # "fp16", "bf16", "fp32" from the safetensors header; None if unknown

    def load(self, dtype: LoadDtype = "fp32") -> Any:
        """The component with real weights in `dtype` (eval mode)."""
        return load_component(self.component, self.loader, self.folder, self.allow_pickle, dtype).eval()


@dataclass
class PatchedPipeline:
    """The pipeline to export (substitutes in place) plus the originals they replaced.

    `pipeline` is a real diffusers pipeline of the family's class whose VAE (fp32),
    tokenizers and scheduler are loaded; its denoiser and text encoders have no storage
    (meta tensors): their weights are read from `weights` by the export stage, one
    component at a time. `originals` holds the original VAE (fp32) when the VAE is substituted.
    """

    pipeline: Any  # the family's diffusers pipeline class
    family: PipelineFamily
    originals: dict[str, Any] = field(default_factory=dict)
    substituted: dict[str, str] = field(default_factory=dict)  # component -> source description
    checks: list[str] = field(default_factory=list)  # fit checks that passed, for the report
    weights: dict[str, WeightSource] = field(default_factory=dict)  # component -> its (substituted) weights


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


def _loader(component: str, loader: tuple[str, str]) -> Any:
    import diffusers
    import transformers

    library, cls_name = loader
    module = {"diffusers": diffusers, "transformers": transformers}[library]
    if not hasattr(module, cls_name):
        raise PatchError(f"{component}: {library} has no class {cls_name}", hint=f"update {library}")
    return getattr(module, cls_name)


_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16"}
_SAFETENSORS_DTYPES = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F64": "fp64"}


def load_component(component: str, loader: tuple[str, str], folder: Path, allow_pickle: bool,
                   dtype: LoadDtype = "fp32") -> Any:
    import torch

    cls = _loader(component, loader)
    try:
        return cls.from_pretrained(
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


def weight_source(component: str, loader: tuple[str, str], folder: Path, allow_pickle: bool) -> WeightSource:
    variant = weights_variant(folder)
    return WeightSource(component, loader, folder, variant, allow_pickle, stored_dtype(folder, variant))


def _empty_component(component: str, loader: tuple[str, str], folder: Path) -> Any:
    """The component built from its config with parameters on the meta device (no memory, no init)."""
    from accelerate import init_empty_weights

    cls = _loader(component, loader)
    with init_empty_weights(include_buffers=False):
        if loader[0] == "diffusers":
            return cls.from_config(read_config(folder, component))
        return cls(cls.config_class.from_pretrained(folder))


def _light_part(folder: Path, spec: Any, component: str, family: PipelineFamily) -> Any:
    """A tokenizer or scheduler, by the class model_index.json names."""
    import diffusers
    import transformers

    library, cls_name = spec
    module = {"diffusers": diffusers, "transformers": transformers}.get(library)
    if module is None or not hasattr(module, cls_name):
        raise PatchError(f"base: {component} class {library}.{cls_name} is not supported",
                         hint=f"the base must be a diffusers {family.diffusers_class}")
    return getattr(module, cls_name).from_pretrained(folder / component)


def patch(base: FetchedSource, substitutes: Mapping[str, FetchedSource], allow_pickle: Mapping[str, bool],
          family: PipelineFamily) -> PatchedPipeline:
    """Check substitutes fit, load the small parts, and record where the big weights are."""
    import diffusers

    index = read_config(base.path, "base", "model_index.json")
    check_family(index, family)
    present = [c for c in family.loaders if _in_source(index, base.path, c, family)]
    denoiser_config = read_config(base.path / family.denoiser, family.denoiser)
    checks: list[str] = []
    folders = {c: base.path / c for c in present}
    pickle = {c: allow_pickle.get("base", False) for c in folders}
    for component, fetched in substitutes.items():
        new_config = read_config(fetched.path, component)
        old_config = read_config(base.path / component, component)
        checks += family.fit_checks[component](new_config, old_config, denoiser_config)
        folders[component], pickle[component] = fetched.path, allow_pickle.get(component, False)
        log.info("substituted %s from %s", component, fetched.role)
    weights = {c: weight_source(c, family.loaders[c], folders[c], pickle[c]) for c in folders}
    originals = ({"vae": load_component("vae", family.loaders["vae"], base.path / "vae", allow_pickle.get("base", False))}
                 if "vae" in substitutes else {})
    light = [c for c in (*family.tokenizers, "scheduler") if _in_source(index, base.path, c, family)]
    try:
        parts: dict[str, Any] = {c: None for c in family.optional}
        parts |= {c: _empty_component(c, family.loaders[c], folders[c]) for c in family.lazy if c in folders}
        parts |= {c: _light_part(base.path, index[c], c, family) for c in light}
        pipeline = getattr(diffusers, family.diffusers_class)(
            vae=weights["vae"].load("fp32"), **parts, **family.pipeline_options(index)
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise PatchError(f"base: cannot load the pipeline from {base.path}: {str(e).splitlines()[0]}",
                         hint=f"check the base source is a diffusers {family.diffusers_class}") from e
    for tokenizer in family.tokenizers:
        encoder = tokenizer.replace("tokenizer", "text_encoder")  # diffusers pairs them by name
        if parts.get(tokenizer) is not None and encoder in folders:
            tok = parts[tokenizer]
            problem = vocabulary_problem(len(tok), len(set(tok.all_special_ids)),
                                         read_config(folders[encoder], encoder).get("vocab_size"))
            if problem:
                raise PatchError(f"base: {tokenizer} {problem}, so it cannot feed {encoder}",
                                 hint=f"check {tokenizer}/ holds its vocabulary files (tokenizer.json, or vocab.json "
                                      "and merges.txt) from the same model")
    return PatchedPipeline(
        pipeline=pipeline,
        family=family,
        originals=originals,
        substituted={c: f.role.key for c, f in substitutes.items()},
        checks=checks,
        weights=weights,
    )


def vocabulary_problem(tokens: int, special: int, vocab_size: object) -> str | None:
    """Why a tokenizer cannot feed its text encoder, or None.

    transformers builds a CLIP tokenizer from tokenizer_config.json alone when the vocabulary
    files are missing: its special tokens only, every prompt `<|endoftext|>`, and the build would
    still pass. Fewer tokens than the encoder's vocab_size is fine (T5: 32100 of 32128 rows; the
    full-size test shapes pair a small vocabulary with SDXL-sized encoders); more is not.
    """
    if tokens <= special:
        return f"holds only its {tokens} special tokens (its vocabulary files are missing)"
    if isinstance(vocab_size, int) and 0 < vocab_size < tokens:
        return f"has {tokens} tokens, more than the vocab_size {vocab_size}"
    return None


def check_family(index: Config, family: PipelineFamily) -> None:
    """The base's model_index.json names the pipeline class of the recipe's family."""
    found = index.get("_class_name")
    if found is not None and found != family.diffusers_class:
        other = family_of_class(str(found))
        fix = f"set pipeline: {other.name} in the recipe" if other else "use a base of this family"
        raise PatchError(f"base: model_index.json names {found}, but the recipe's pipeline {family.name} "
                         f"is a {family.diffusers_class}", hint=fix)


def _in_source(index: Config, root: Path, component: str, family: PipelineFamily) -> bool:
    """Whether the base has this component; a missing required one is an error here, not deep in diffusers."""
    entry = index.get(component)
    present = isinstance(entry, (list, tuple)) and entry[0] is not None and (root / component).is_dir()
    if not present and component not in family.optional:
        raise PatchError(f"base: no {component} in {root}", hint=f"a {family.diffusers_class} needs it; check the base source")
    return present
