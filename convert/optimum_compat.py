"""Every use of optimum-intel's (and OpenVINO's) private export helpers, in one place, behind a version check.

The memory-lean exporter (convert.export_worker) does what optimum-intel's `export_pytorch`
does, one submodel at a time. That needs helpers optimum-intel does not promise to keep
(leading underscores, module layout, OpenVINO's 16-bit tracing patch). They are imported
here only, and only for the versions the parity tests verified (tests/test_export_parity.py
for SDXL, tests/test_sd3.py for SD3): any other version stops the export with one line,
instead of exporting a graph that might differ from optimum-intel's without anyone noticing.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

from convert.errors import ExportError

#: optimum-intel versions (prefixes) whose private helpers the parity tests verified.
VERIFIED_OPTIMUM_INTEL: tuple[str, ...] = ("2.2.",)


def check_version() -> str:
    """The installed optimum-intel version, if the exporter was verified against it."""
    try:
        version = importlib.metadata.version("optimum-intel")
    except importlib.metadata.PackageNotFoundError as e:
        raise ExportError("optimum-intel is not installed", hint="run `just setup`") from e
    if not version.startswith(VERIFIED_OPTIMUM_INTEL):
        raise ExportError(
            f"optimum-intel {version} is not one the exporter was verified with "
            f"({', '.join(v + 'x' for v in VERIFIED_OPTIMUM_INTEL)})",
            hint="install the pinned version (constraints.txt, `just setup`), or run the parity tests and add it "
                 "to VERIFIED_OPTIMUM_INTEL in convert/optimum_compat.py",
        )
    return version


def diffusers_submodel_type(model: Any) -> str:
    """optimum's exporter model type of a diffusers submodel (it sets `config.export_model_type` from it)."""
    from optimum.exporters.utils import _get_diffusers_submodel_type

    return str(_get_diffusers_submodel_type(model))


def remove_none_from_dummy_inputs(dummy: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, list[str]]]]:
    from optimum.exporters.openvino.utils import remove_none_from_dummy_inputs as remove

    return remove(dummy)  # type: ignore[no-any-return]


def input_info(module: Any, config: Any, dummy: dict[str, Any]) -> list[Any]:
    """optimum's names, shapes (dynamic axes) and types of the traced model's inputs."""
    from optimum.exporters.openvino.utils import _get_input_info

    return list(_get_input_info(module, config, dummy))


def finish_traced(ov_model: Any, runtime_options: dict[str, str]) -> None:
    """The version info and runtime options optimum writes into a traced diffusers submodel, then its cleanup."""
    from optimum.exporters.openvino.convert import _add_runtime_options_to_rt_info, _add_version_info_to_model
    from optimum.exporters.openvino.utils import clear_class_registry

    _add_version_info_to_model(ov_model, "diffusers")
    _add_runtime_options_to_rt_info(ov_model, runtime_options)
    clear_class_registry()


def make_16bit_traceable(module: Any) -> None:
    """OpenVINO's patch that traces fp16/bf16 weights as optimum-cli does for 16-bit checkpoints."""
    from openvino.frontend.pytorch.patch_model import __make_16bit_traceable

    __make_16bit_traceable(module)


def unpatch_16bit(module: Any) -> None:
    from openvino.frontend.pytorch.patch_model import unpatch_model

    unpatch_model(module, "_openvino_module_extension_patch_orig_forward")


def export_tokenizer(tokenizer: Any, folder: Path) -> None:
    """openvino-tokenizers conversion with the options optimum-intel uses for pipelines."""
    from optimum.exporters.openvino.convert import export_tokenizer as export

    export(tokenizer, folder)


def hybrid_quantization_configs(model: Any, samples: int, sym: bool) -> tuple[list[str], Any]:
    """optimum-intel's hybrid quantization of a diffusion denoiser, in its two halves.

    Returns the weighted MatMul/Gather ops that get weight-only int8 (every other weighted op,
    the convolutions, is left to the second half) and the `OVQuantizationConfig` of that second
    half: int8 weights and activations with those ops ignored and SmoothQuant off, as
    `_get_hybrid_mixed_quantization_config` builds it for `--quant-mode`/`--dataset` exports.
    """
    from optimum.intel import OVWeightQuantizationConfig
    from optimum.intel.openvino.quantization import _collect_ops_with_weights, _get_hybrid_mixed_quantization_config

    mixed = _get_hybrid_mixed_quantization_config(model, OVWeightQuantizationConfig(bits=8, sym=sym, num_samples=samples))
    return list(_collect_ops_with_weights(model)), mixed.full_quantization_config


def full_quantization_config(samples: int, smooth_quant_alpha: float | None, ignored: list[str]) -> Any:
    """optimum-intel's `OVQuantizationConfig` for int8 weights and activations (transformer patterns, mixed preset)."""
    from optimum.intel import OVQuantizationConfig

    return OVQuantizationConfig(bits=8, num_samples=samples, smooth_quant_alpha=smooth_quant_alpha,
                                ignored_scope={"names": ignored} if ignored else None)


def run_full_quantization(model: Any, config: Any, dataset: Any) -> Any:
    """optimum-intel's own `nncf.quantize` call for a config (weights may already be int8: hybrid's first half)."""
    from optimum.intel.openvino.quantization import _full_quantization

    return _full_quantization(model, config, dataset, verify_not_optimized=False)
