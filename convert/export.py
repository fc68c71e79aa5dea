"""Stage 4: every submodel to OpenVINO IR, weights per component as the recipe says.

optimum-intel exports the in-memory pipeline (substitutes included) at fp32 — we pass
an explicit fp32 config so none of its silent defaults (int8 for >1B-weight models,
fp16 compression on save) applies — then each IR is rewritten with its own weight
format (fp16 compression or NNCF int8/int4) and the recipe's runtime options.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert.errors import ExportError
from convert.patch import PatchedPipeline
from convert.recipe import ComponentSettings, Recipe, WEIGHTED_COMPONENTS

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

    @property
    def bin(self) -> Path:
        return self.xml.with_suffix(".bin")


def export_pipeline(
    patched: PatchedPipeline, recipe: Recipe, out_dir: Path, build_id: str, progress: Progress | None = None
) -> list[ExportedComponent]:
    """Export all submodels into `out_dir` (a staging folder the caller owns)."""
    notify = progress or (lambda _msg: None)
    notify("export: tracing submodels with optimum-intel (fp32)")
    started = time.monotonic()
    _export_fp32(patched.pipeline, out_dir)
    trace_seconds = time.monotonic() - started
    exported: list[ExportedComponent] = []
    for name in WEIGHTED_COMPONENTS:
        xml = out_dir / name / OV_XML
        settings = recipe.settings_for(name)
        if not settings.export:
            _drop(out_dir / name)
            continue
        if not xml.is_file():
            raise ExportError(f"{name}: optimum-intel wrote no {xml.name}", hint="run with -v to see the exporter log")
        notify(f"export: {name} -> {settings.weights}")
        t0 = time.monotonic()
        options = rewrite_ir(xml, name, settings, recipe.precisions_for(name), build_id)
        exported.append(ExportedComponent(name, xml, settings.weights, options, time.monotonic() - t0))
    exported += _export_tokenizers(patched.pipeline, recipe, out_dir, notify)
    log.info("exported %d components in %.1f s (trace %.1f s)", len(exported), time.monotonic() - started, trace_seconds)
    return exported


def _export_fp32(pipeline: Any, out_dir: Path) -> None:
    from optimum.exporters.openvino import export_from_model
    from optimum.intel import OVConfig

    try:
        export_from_model(pipeline, Path(out_dir), task="text-to-image", ov_config=OVConfig(dtype="fp32"))
    except Exception as e:  # optimum raises bare Exceptions of many kinds; one line for the user
        raise ExportError(f"optimum-intel export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                          hint="run with -v for the traceback") from e


def _drop(folder: Path) -> None:
    import shutil

    if folder.exists():
        shutil.rmtree(folder)


def rewrite_ir(xml: Path, name: str, settings: ComponentSettings, precisions: list[str], build_id: str) -> dict[str, str]:
    """Apply the component's weight format and rt_info, then replace the IR files atomically."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(xml)
    model = compress_weights(model, name, settings)
    options = {k: str(v) for k, v in _existing_runtime_options(model).items()} | dict(settings.runtime_options)
    for key, value in options.items():
        model.set_rt_info(value, ["runtime_options", key])
    model.set_rt_info(settings.weights, [RT_INFO_KEY, "weights"])
    model.set_rt_info(",".join(precisions), [RT_INFO_KEY, "inference_precision"])
    model.set_rt_info(build_id, [RT_INFO_KEY, "build_id"])
    tmp = xml.with_name(xml.stem + ".tmp.xml")
    ov.save_model(model, tmp, compress_to_fp16=settings.weights == "fp16")
    del model
    tmp.replace(xml)
    tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
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


def compress_weights(model: Any, name: str, settings: ComponentSettings) -> Any:
    if settings.weights not in ("int8", "int4"):
        return model  # fp32 stays; fp16 is applied by save_model(compress_to_fp16=True)
    import nncf

    try:
        return nncf.compress_weights(model, **nncf_arguments(settings))
    except Exception as e:  # NNCF raises a zoo of types; surfaced with the component name
        raise ExportError(f"{name}: NNCF {settings.weights} compression failed: {type(e).__name__}: {e}",
                          hint=f"try other nncf settings for components.{name} or weights: fp16") from e


def _export_tokenizers(pipeline: Any, recipe: Recipe, out_dir: Path, notify: Progress) -> list[ExportedComponent]:
    from optimum.exporters.openvino.convert import export_tokenizer

    done = []
    for name in ("tokenizer", "tokenizer_2"):
        if not recipe.settings_for(name).export:
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
