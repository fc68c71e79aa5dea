"""Stage 4: every submodel to OpenVINO IR, weights per component as the recipe says.

One submodel at a time (convert.export_worker): load only its weights, trace it with a
small example input, compress its weights in memory once the torch copy is gone, save,
free. A full SDXL build (for example) thus never holds more than the UNet (in fp16 where that cannot
change the result), instead of the whole pipeline plus optimum-intel's full-size trace.
Each IR gets its own weight format (fp16 compression or NNCF int8/int4) and the
recipe's runtime options. The bundle layout (folders, config.json files, model_index,
scheduler, tokenizers) is the one optimum-intel's `export_from_model` writes; no silent
default of optimum-intel applies (int8 for >1B-weight models, fp16 on save).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert.component_cache import ComponentCache, component_key
from convert.disk import is_no_space
from convert.errors import ConvertError, ExportError, first_line
from convert.patch import PatchedPipeline
from convert.recipe import ComponentSettings, Recipe

log = logging.getLogger(__name__)

OV_XML = "openvino_model.xml"
RT_INFO_KEY = "sdxl_openvino"  # our provenance section in each IR's rt_info

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportedComponent:
    name: str
    xml: Path
    weights: str
    runtime_options: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    cache_key: str | None = None
    reused: bool = False  # linked from the component cache instead of exported

    @property
    def bin(self) -> Path:
        return self.xml.with_suffix(".bin")


def export_pipeline(
    patched: PatchedPipeline, recipe: Recipe, out_dir: Path, build_id: str, progress: Progress | None = None,
    cache: ComponentCache | None = None, key_inputs: Mapping[str, dict[str, Any]] | None = None,
) -> list[ExportedComponent]:
    """Export all submodels into `out_dir` (a staging folder the caller owns).

    With a cache and the submodels' key inputs (convert.component_cache), a submodel whose key
    has an entry is linked from it instead of exported, and a fresh export is added to it.
    """
    from convert.optimum_compat import check_version

    notify = progress or (lambda _msg: None)
    check_version()
    started = time.monotonic()
    family = recipe.family
    write_pipeline_files(patched.pipeline, out_dir, family.tokenizers)
    exported: list[ExportedComponent] = []
    for name in family.weighted:
        settings = recipe.settings_for(name)
        if not settings.export:
            continue
        if family.submodel(name).component not in patched.weights:
            notify(f"export: {name} -> not in the source (optional in {family.name}), left out")
            continue
        t0 = time.monotonic()
        label = "fp32, quantized after calibration" if settings.quantized_activations() else settings.weights
        inputs = (key_inputs or {}).get(name)
        key = component_key(inputs) if inputs is not None else None
        if cache is not None and key is not None and cache.restore(key, out_dir / name):
            notify(f"export: {name} -> {label}, reused from the component cache ({key[:12]})")
            exported.append(ExportedComponent(name, out_dir / name / OV_XML, settings.weights,
                                              _ir_runtime_options(out_dir / name / OV_XML), time.monotonic() - t0,
                                              key, reused=True))
            continue
        notify(f"export: {name} -> {label}")
        xml, options = export_submodel(patched, name, settings, recipe.precisions_for(name), build_id, out_dir / name,
                                       key)
        if cache is not None and key is not None and inputs is not None:
            cache.store(key, out_dir / name, inputs)
        exported.append(ExportedComponent(name, xml, settings.weights, options, time.monotonic() - t0, key))
    exported += _export_tokenizers(patched.pipeline, recipe, out_dir, notify)
    log.info("exported %d components in %.1f s", len(exported), time.monotonic() - started)
    return exported


def write_pipeline_files(pipeline: Any, out_dir: Path, tokenizers: tuple[str, ...]) -> None:
    """model_index.json, scheduler and tokenizer files, as optimum-intel's export writes them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline.scheduler.save_pretrained(out_dir / "scheduler")
    for name in tokenizers:
        tokenizer = getattr(pipeline, name, None)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir / name)
    pipeline.save_config(out_dir)


def export_submodel(patched: PatchedPipeline, name: str, settings: ComponentSettings, precisions: list[str],
                    build_id: str, folder: Path, cache_key: str | None = None) -> tuple[Path, dict[str, str]]:
    """Trace, compress and save one submodel; returns its IR path and runtime options."""
    from convert.export_worker import build_submodel
    from convert.memory import release_memory

    folder.mkdir(parents=True, exist_ok=True)
    try:
        model = build_submodel(patched.family.submodel(name), patched, settings.weights, folder)
    except ConvertError:  # e.g. unreadable weights (PatchError): already one line with a hint
        raise
    except OSError as e:
        if is_no_space(e) or (e.filename and Path(e.filename).is_relative_to(folder)):
            raise  # a full disk or refused write in the bundle: the build names it with the space needed
        raise ExportError(f"{name}: conversion failed: {first_line(e)}", hint="run with -v for the traceback") from e
    except Exception as e:  # torch/optimum/OpenVINO raise many kinds; one line for the user
        raise ExportError(f"{name}: conversion failed: {first_line(e)}",
                          hint="run with -v for the traceback") from e
    model = compress_weights(model, name, settings)
    options = finish_ir(model, settings, precisions, build_id, cache_key)
    xml = folder / OV_XML
    save_atomically(model, xml, compress_to_fp16=settings.weights == "fp16")
    del model
    release_memory()
    return xml, options


def save_atomically(model: Any, xml: Path, compress_to_fp16: bool) -> None:
    """Write the IR under a temporary name, then rename: never a half-written openvino_model.*.

    OpenVINO reports a full disk as "iostream error" (and has already removed its partial
    file): the model's constant bytes against the free space tell a full disk from the rest.
    """
    import openvino as ov

    tmp = xml.with_name(xml.stem + ".tmp.xml")
    try:
        ov.save_model(model, tmp, compress_to_fp16=compress_to_fp16)
    except RuntimeError as e:
        for leftover in (tmp, tmp.with_suffix(".bin")):
            leftover.unlink(missing_ok=True)
        raise save_error(e, xml.parent, ir_bytes(model)) from e
    tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
    tmp.replace(xml)


def ir_bytes(model: Any) -> int:
    """Bytes of the model's constants: about the size of its .bin."""
    return sum(op.get_byte_size() for op in model.get_ops() if op.get_type_name() == "Constant")


def save_error(error: RuntimeError, folder: Path, need: int) -> Exception:
    """What a failed `ov.save_model` really was: ENOSPC, a refused write, or an export error."""
    if "iostream" in str(error):
        if shutil.disk_usage(folder).free < need:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))
        if not os.access(folder, os.W_OK):
            return OSError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
    return ExportError(f"{folder.name}: saving the IR failed: {first_line(error)}", hint="run with -v for the traceback")


def finish_ir(model: Any, settings: ComponentSettings, precisions: list[str], build_id: str,
              cache_key: str | None = None) -> dict[str, str]:
    """Recipe runtime options over optimum-intel's own, and our provenance, into the IR's rt_info.

    A cacheable IR records its component key instead of the build id: the same file is shared
    by every build whose inputs for it are the same (build.json maps the key to the build).
    """
    options = {k: str(v) for k, v in _existing_runtime_options(model).items()} | dict(settings.runtime_options)
    for key, value in options.items():
        model.set_rt_info(value, ["runtime_options", key])
    model.set_rt_info(settings.weights, [RT_INFO_KEY, "weights"])
    model.set_rt_info(",".join(precisions), [RT_INFO_KEY, "inference_precision"])
    if cache_key is not None:
        model.set_rt_info(cache_key, [RT_INFO_KEY, "component_key"])
    else:
        model.set_rt_info(build_id, [RT_INFO_KEY, "build_id"])
    return options


def _ir_runtime_options(xml: Path) -> dict[str, str]:
    """The runtime options a cached IR carries (what the export wrote), for build.json and the card."""
    import openvino as ov

    return {k: str(v) for k, v in _existing_runtime_options(ov.Core().read_model(xml)).items()}


def rewrite_ir(xml: Path, name: str, settings: ComponentSettings, precisions: list[str], build_id: str) -> dict[str, str]:
    """Apply the component's weight format and rt_info to an IR on disk, replacing it atomically."""
    import openvino as ov

    model = ov.Core().read_model(xml)
    model = compress_weights(model, name, settings)
    options = finish_ir(model, settings, precisions, build_id)
    save_atomically(model, xml, compress_to_fp16=settings.weights == "fp16")
    return options


def _existing_runtime_options(model: Any) -> dict[str, Any]:
    """optimum-intel's own runtime_options (e.g. ACTIVATIONS_SCALE_FACTOR for force_upcast VAEs) are kept."""
    if not model.has_rt_info(["runtime_options"]):
        return {}
    section = model.get_rt_info()["runtime_options"]
    return {key: section[key].astype(str) for key in section}


def nncf_arguments(settings: ComponentSettings) -> dict[str, Any]:
    """The recipe's NNCF knobs as `nncf.compress_weights` keyword arguments (pure; tested)."""
    import nncf

    knobs = settings.nncf
    mode_name = (knobs.mode if knobs and knobs.mode else f"{settings.weights}_asym").upper()
    kwargs: dict[str, Any] = {"mode": getattr(nncf.CompressWeightsMode, mode_name)}
    if knobs is not None:
        for key in ("group_size", "ratio", "all_layers"):
            value = getattr(knobs, key)
            if value is not None:
                kwargs[key] = value
    return kwargs


#: int8 weight compression runs in this many passes over disjoint sets of layers (see `compress_weights`) ...
INT8_PASSES = 4
#: ... when the weights to compress are at least this large. The passes bound the peak of big models; each
#: costs NNCF's fixed work again (the tiny UNet: 4 passes 9.0 s, one 5.3 s, the same constants), which a
#: few-MB model gains nothing from. The real UNets, transformers, T5 and OpenCLIP-bigG are GiBs, far above it;
#: CLIP-L (~235 MiB at fp16) and the VAE (~160 MiB) are below, where one call adds at most their int8 copy.
PASSES_FROM_BYTES = 256 * 2**20
_WEIGHTED_OPS = frozenset({"MatMul", "Convolution", "GroupConvolution", "ConvolutionBackpropData", "Gather"})


def compress_weights(model: Any, name: str, settings: ComponentSettings, passes: int = INT8_PASSES,
                     only: set[str] | None = None, passes_from_bytes: int = PASSES_FROM_BYTES) -> Any:
    """NNCF weight compression as the recipe says (fp32 stays; fp16 is applied on save).

    A denoiser with int8 activations (`quantization.mode` hybrid/full) is exported unquantized:
    the quantize stage calibrates on it, then quantizes it (`only`: hybrid's weight-only ops).

    int8 modes compress each layer from its own weights alone, so compressing the layers in
    `passes` disjoint batches gives the same model as one call; but between batches the
    replaced fp16/fp32 weights are released, so the originals and their int8 copies never
    coexist in full (one call on the SDXL UNet peaked at 9.4 GiB). Weights under
    `passes_from_bytes` take one call. int4 picks layers by
    global ranking (ratio, backup layers), so it runs in one call.
    """
    if settings.weights not in ("int8", "int4") or (only is None and settings.quantized_activations()):
        return model
    import nncf

    kwargs = nncf_arguments(settings)
    if sum(size for _, size in _weighted_ops(model, only)) < passes_from_bytes:
        passes = 1
    batches = weight_batches(model, passes, only) if settings.weights == "int8" else []
    if only is not None:  # the rest is ignored in every pass: its weights stay as they are
        batches = batches if len(batches) > 1 else [[op for batch in batches for op in batch]]
    try:
        if len(batches) < 2 and only is None:
            return nncf.compress_weights(model, **kwargs)
        every = weight_batches(model, 1)[0] if batches else []  # listed once: compressed ops no longer look weighted
        log.debug("%s: %s weights in %d pass(es)", name, settings.weights, len(batches))
        for batch in batches:
            chosen = set(batch)
            ignored = nncf.IgnoredScope(names=[op for op in every if op not in chosen], validate=False)
            model = nncf.compress_weights(model, ignored_scope=ignored, **kwargs)
            _release()
        if only is None:
            model.set_rt_info("[]", ["nncf", "weight_compression", "ignored_scope"])  # what the batches add up to
        return model
    except Exception as e:  # NNCF raises a zoo of types; surfaced with the component name
        raise ExportError(f"{name}: NNCF {settings.weights} compression failed: {type(e).__name__}: {e}",
                          hint=f"try other nncf settings for components.{name} or weights: fp16") from e


def weight_batches(model: Any, passes: int, only: set[str] | None = None) -> list[list[str]]:
    """Names of the ops with constant weights (of `only`, if given), in graph order, cut into `passes`
    batches of similar bytes."""
    weighted = _weighted_ops(model, only)
    total = sum(size for _, size in weighted)
    batches: list[list[str]] = [[] for _ in range(max(1, min(passes, len(weighted))))]
    done = 0
    for op_name, size in weighted:
        batches[min(len(batches) - 1, done * len(batches) // max(total, 1))].append(op_name)
        done += size
    return [b for b in batches if b]


def _weighted_ops(model: Any, only: set[str] | None = None) -> list[tuple[str, int]]:
    """(name, weight bytes) of the ops with constant weights (of `only`, if given), in graph order."""
    weighted: list[tuple[str, int]] = []
    for op in model.get_ordered_ops():
        if op.get_type_name() in _WEIGHTED_OPS and (only is None or op.get_friendly_name() in only):
            size = sum(_constant_bytes(op.input_value(i).get_node()) for i in range(op.get_input_size()))
            if size:
                weighted.append((op.get_friendly_name(), size))
    return weighted


def _constant_bytes(node: Any) -> int:
    """Bytes of a weight Constant feeding an op directly or through one Convert (fp16 decompression)."""
    if node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Constant":
        return 0
    shape = node.get_output_partial_shape(0)
    if not shape.is_static or len(shape) < 2:
        return 0
    count = 1
    for dim in shape.to_shape():
        count *= dim
    return count * node.get_output_element_type(0).size


def _release() -> None:
    from convert.memory import release_memory

    release_memory()


def _export_tokenizers(pipeline: Any, recipe: Recipe, out_dir: Path, notify: Progress) -> list[ExportedComponent]:
    from convert.optimum_compat import export_tokenizer

    done = []
    for name in recipe.family.tokenizers:
        if not recipe.settings_for(name).export or getattr(pipeline, name, None) is None:
            continue
        notify(f"export: {name} -> openvino-tokenizers")
        folder = out_dir / name
        export_tokenizer(getattr(pipeline, name), folder)
        xml = folder / "openvino_tokenizer.xml"
        if not xml.is_file():
            raise ExportError(f"{name}: openvino-tokenizers wrote no openvino_tokenizer.xml",
                              hint="check openvino-tokenizers matches the openvino version")
        done.append(ExportedComponent(name, xml, "n/a"))
    return done
