"""One submodel to an in-memory OpenVINO model: load its weights, trace it small, free the torch copy.

Why not optimum-intel's `export_from_model` on the whole pipeline: it needs every
component in memory at once (an SDXL pipeline is ~7 GiB in fp16, ~14 GiB in fp32),
deep-copies the VAE twice and traces the UNet with a [2, 4, 127, 127] dummy, which
peaked at 15.7 GiB here. What differs per model family (which submodels, how each is
prepared, its runtime options) is the family's `SubmodelSpec` registry (convert.families). This module does what optimum's `export_pytorch` does for
one submodel (same export config, so the same input/output names, dynamic axes,
model patcher and rt_info) with three changes that do not change the graph's results:

* only this submodel is loaded, in fp16 where its IR ends up with fp16 weights anyway or
  where the stored weights are fp16 (lossless), using OpenVINO's 16-bit tracing patch
  exactly as optimum-cli does for fp16 checkpoints;
* the example input is small (spatial sides reduced to 32..39, keeping the side modulo 8,
  so the traced branches are the same) while every spatial axis stays dynamic;
* the OpenVINO model is returned instead of saved, so weight compression can run on it
  in memory after the torch module is gone (see `convert.export`).

Parity with optimum's own export is tested in tests/test_export_parity.py and measured at
full size by scripts/bench.py.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from convert.families import SubmodelSpec
from convert.memory import release_memory
from convert.patch import LoadDtype, PatchedPipeline, WeightSource

log = logging.getLogger(__name__)

SMALL_SIDE = 32  # example-input sides above this are reduced to SMALL_SIDE + side % 8


def load_dtype(weights: str, source: WeightSource) -> LoadDtype:
    """fp16 only where it cannot change the exported values.

    fp16 IR weights are rounded to fp16 on save anyway; int8/int4 scales are computed from
    the weights, so those load fp16 only when the stored weights already are fp16.
    The VAE always loads fp32: it is small, and traced in f32 like optimum does it.
    """
    if source.component == "vae":
        return "fp32"
    if weights == "fp16" or (weights in ("int8", "int4") and source.stored_dtype == "fp16"):
        return "fp16"
    return "fp32"


def small_example(dummy: dict[str, Any]) -> dict[str, Any]:
    """Reduce the spatial sides of 4-D float example inputs; sides keep their value modulo 8."""
    import torch

    def shrink(side: int) -> int:
        return side if side < SMALL_SIDE + 8 else SMALL_SIDE + side % 8

    out = {}
    for key, value in dummy.items():
        if isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point():
            b, c, h, w = value.shape
            value = torch.randn(b, c, shrink(h), shrink(w), dtype=value.dtype, generator=torch.Generator().manual_seed(0))
        out[key] = value
    return out


def export_config(spec: SubmodelSpec, module: Any) -> Any:
    """optimum-intel's OpenVINO export config for this submodel (names, dynamic axes, patcher)."""
    import optimum.exporters.openvino.model_configs  # noqa: F401  registers the OpenVINO configs
    from optimum.exporters.tasks import TasksManager

    kwargs = {"model_type": spec.model_type} if spec.model_type else {}
    constructor = TasksManager.get_exporter_config_constructor(
        model=module, exporter="openvino", library_name="diffusers", task=spec.task, **kwargs
    )
    return constructor(module.config, int_dtype="int64", float_dtype="fp32")


def trace(module: Any, config: Any, sixteen_bit: bool) -> Any:
    """`optimum.exporters.openvino.convert.export_pytorch` without the save, on a small example."""
    import torch
    from openvino import convert_model
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder
    from optimum.utils import DEFAULT_DUMMY_SHAPES

    from convert import optimum_compat as compat

    config.stateful = False
    shapes = {k: v for k, v in DEFAULT_DUMMY_SHAPES.items() if k not in ("height", "width")}
    with torch.no_grad():
        if hasattr(module, "config"):
            module.config.torchscript = False
            module.config.return_dict = True
        module.eval()
        dummy = small_example(config.generate_dummy_inputs(framework="pt", **shapes))
        dummy, dict_inputs = compat.remove_none_from_dummy_inputs(config.rename_ambiguous_inputs(dummy))
        patcher = config.patch_model_for_export(module, model_kwargs=None)
        patcher.patched_forward = _tuple_forward(patcher, list(dummy), dict_inputs)
        with patcher:
            input_info = compat.input_info(module, config, dummy)
            ov_model = _convert(module, dummy, input_info, patcher, sixteen_bit, TorchScriptPythonDecoder, convert_model)
    ov_model.validate_nodes_and_infer_types()
    for tensor, name in zip(ov_model.outputs, config.outputs, strict=False):
        tensor.get_tensor().set_names({name})
    for tensor, info in zip(ov_model.inputs, input_info, strict=True):
        tensor.get_tensor().set_names({info.name})
    compat.finish_traced(ov_model, getattr(config, "runtime_options", {}))
    return ov_model


def _tuple_forward(patcher: Any, keys: list[str], dict_inputs: list[tuple[str, list[str]]]) -> Callable[..., Any]:
    """TorchScript needs positional tensors in and a tuple out (optimum's ts_patched_forward)."""
    patched = patcher.patched_forward
    order = [p for p in inspect.signature(patcher.orig_forward).parameters if p in keys]

    @functools.wraps(patched)
    def forward(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        kwargs.update(zip(order, args, strict=False))
        for name, nested in dict_inputs:
            kwargs[name] = dict(zip(nested, kwargs[name], strict=True))
        outputs = patched(**kwargs)
        return tuple(v if not isinstance(v, list) else tuple(v) for v in outputs.values())

    return forward


def _convert(module: Any, dummy: dict[str, Any], input_info: list[Any], patcher: Any, sixteen_bit: bool,
             decoder_cls: Any, convert_model: Any) -> Any:
    from convert.optimum_compat import make_16bit_traceable, unpatch_16bit

    kwargs: dict[str, Any] = {"trace_kwargs": {"check_trace": False}}  # optimum skips the check for diffusers
    if getattr(patcher, "module_extensions", None) is not None:
        kwargs["module_extensions"] = patcher.module_extensions
    if sixteen_bit:
        make_16bit_traceable(module)
    try:
        decoder = decoder_cls(module, example_input=dummy, **kwargs)
        return convert_model(decoder, example_input=dummy, input=[(i.shape, i.type) for i in input_info],
                             extension=getattr(patcher, "conversion_extensions", None))
    finally:
        if sixteen_bit:
            unpatch_16bit(module)


_CONFIG_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def save_component_config(module: Any, folder: Path, stored_dtype: str | None) -> None:
    """config.json as optimum writes it: `save_config` (diffusers) or `config.save_pretrained` (transformers).

    transformers records the dtype the model was loaded in; we write the dtype the source
    stores, so the file does not depend on our (lossless) choice of loading dtype.
    """
    if hasattr(module, "save_config"):
        module.save_config(folder)
        _drop_load_path(folder / "config.json")
        return
    loaded = module.config.dtype
    module.config.dtype = _CONFIG_DTYPES.get(stored_dtype or "", loaded)
    try:
        module.config.save_pretrained(folder)
    finally:
        module.config.dtype = loaded


def _drop_load_path(config: Path) -> None:
    """diffusers records where the module was loaded from (`_name_or_path`): here a staging folder of
    the machine that built it. A published file must not carry it, and a cached one must not
    differ between two checkouts; loaders do not need it."""
    data = json.loads(config.read_text())
    if data.pop("_name_or_path", None) is not None:
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_submodel(spec: SubmodelSpec, patched: PatchedPipeline, weights: str, folder: Path) -> Any:
    """The OpenVINO model of one submodel, its config.json written to `folder`; the torch copy is freed.

    The returned model may share memory with torch tensors that only it still references:
    they are released as its constants are replaced (weight compression) or when it is deleted.
    """
    source = patched.weights[spec.component]
    dtype = load_dtype(weights, source)
    log.info("%s: loading %s weights as %s (stored %s)", spec.name, source.component, dtype, source.stored_dtype)
    module = spec.prepare(source.load(dtype), patched.pipeline)
    config = export_config(spec, module)
    config.runtime_options = spec.runtime_options(patched.pipeline)  # what optimum-intel writes for this family
    save_component_config(module, folder, source.stored_dtype)  # before tracing, as optimum does (tracing sets return_dict etc.)
    ov_model = trace(module, config, sixteen_bit=dtype == "fp16")
    del module, config
    release_memory()
    return ov_model
