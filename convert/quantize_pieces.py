"""Quantize a denoiser too big for `nncf.quantize` in one go, piece by piece, and join the pieces again.

`nncf.quantize` holds several copies of the model it quantizes (the compiled statistics model,
SmoothQuant's rescaled weights, the transformed graph): 36.4 GiB for the full-size SDXL UNet at
f32, 15.2 bytes per parameter (BENCHMARKS.md "Issue 21 on the device Xeon"). The gate already
runs such a model as sequential pieces (`validate/pieces.py`); here every piece is quantized on
the values that reach it when the unquantized model runs the calibration calls, with the same
NNCF parameters, and the quantized pieces are joined back into one model with the original
inputs, outputs and runtime options. What NNCF does is local to a layer (min/max statistics of
an activation, SmoothQuant per MatMul, fast bias correction per layer), so the joined model is
what one call would give, at the memory of the largest piece.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

GIB = 1024**3
#: f32 weight bytes per piece: nncf.quantize then needs about 15.2 / 4 of this (3.8 GiB) on top of the
#: rest of the build; the SDXL UNet (10.3 GB at f32) becomes 10 pieces, SD3.5 Medium's transformer 3.
PIECE_WEIGHT_BYTES = 1 * GIB

Quantize = Callable[[Any, list[dict[str, Any]], list[str]], Any]  # (piece, its samples, ignored names) -> quantized


def f32_weight_bytes(model: Any) -> int:
    """Bytes of the model's floating-point weights at f32 (what NNCF's statistics model compiles)."""
    total = 0
    for op in model.get_ops():
        if op.get_type_name() == "Constant" and op.get_output_element_type(0).is_real():
            total += math.prod(op.get_output_shape(0)) * 4
    return total


def pieces_needed(model: Any, piece_bytes: int = PIECE_WEIGHT_BYTES) -> int:
    return max(1, math.ceil(f32_weight_bytes(model) / piece_bytes))


def quantize_in_pieces(model: Any, samples: Sequence[dict[str, Any]], parts: int, quantize: Quantize,
                       ignored: Sequence[str] = (), notify: Callable[[str], None] = lambda _: None) -> Any:
    """`model` quantized as `parts` sequential pieces by `quantize`, joined into one model again.

    Each piece sees the values the unquantized model hands it for every sample (float activations,
    as `nncf.quantize` of the whole model calibrates); `ignored` names that fall in a piece are
    passed on to it (a UNet's first and last convolution).
    """
    import openvino as ov

    from convert.memory import release_memory
    from validate.host import compile_on_host
    from validate.pieces import split

    pieces = split(model, parts)
    values: list[dict[str, np.ndarray]] = [dict(s) for s in samples]
    needed_later = [set().union(*(p.inputs for p in pieces[i + 1:])) for i in range(len(pieces))]
    core = ov.Core()
    quantized = []
    for index, piece in enumerate(pieces):
        names = {op.get_friendly_name() for op in piece.model.get_ops()}
        piece_samples = [{name: v[name] for name in piece.inputs} for v in values]
        # as the gate compiles (validate/host.py: the AVX2 register-pool retry)
        compiled = compile_on_host(core, piece.model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).compiled
        request = compiled.create_infer_request()
        for v, inputs in zip(values, piece_samples, strict=True):
            request.infer(inputs)
            for i, (kind, key) in enumerate(piece.outputs):
                if kind == "cut":
                    v[str(key)] = np.array(request.get_output_tensor(i).data, copy=True)
        del request, compiled
        for v in values:  # what no later piece reads
            for name in [n for n in v if n not in needed_later[index]]:
                del v[name]
        notify(f"quantize: piece {index + 1}/{len(pieces)} ({len(names)} ops)")
        # a clone holds only what the piece reaches: a weight subgraph shared with another piece would
        # otherwise show NNCF consumers outside the graph it builds
        quantized.append(quantize(piece.model.clone(), piece_samples, [n for n in ignored if n in names]))
        del piece_samples
        release_memory()
    return join(model, pieces, quantized)


def join(original: Any, pieces: Sequence[Any], quantized: Sequence[Any]) -> Any:
    """One model from the quantized pieces: each cut input wired to the output it was cut from."""
    import openvino as ov

    sources: dict[str, Any] = {}
    params: dict[str, Any] = {}
    outs: dict[int, Any] = {}
    for piece, model in zip(pieces, quantized, strict=True):
        results = {r.get_friendly_name(): r for r in model.get_results()}
        for param in model.get_parameters():
            name = param.output(0).get_any_name()
            if name in sources:
                param.output(0).replace(sources[name])
            else:  # the submodel's own input, first read here
                params[name] = param
                sources[name] = param.output(0)
        for (kind, key), result in zip(piece.outputs, piece.model.get_results(), strict=True):
            joined = results[result.get_friendly_name()]
            if kind == "cut":
                sources[str(key)] = joined.input_value(0)
            else:
                outs[int(key)] = joined
    order = [p.output(0).get_any_name() for p in original.get_parameters()]
    model = ov.Model([outs[i] for i in sorted(outs)], [params[name] for name in order], original.get_friendly_name())
    _copy_rt_info(original, model)
    for piece_model in quantized[:1]:  # NNCF's record of what it did (the same parameters in every piece)
        _copy_rt_info(piece_model, model, only=("nncf",))
    model.validate_nodes_and_infer_types()
    return model


def _copy_rt_info(source: Any, dest: Any, only: Sequence[str] | None = None) -> None:
    """The model-level runtime info (optimum's runtime options and version info, NNCF's record)."""

    def walk(value: Any, path: list[str]) -> None:
        inner = value.value if hasattr(value, "value") else value  # an OVAny holds a str or a dict of OVAny
        if isinstance(inner, dict):
            for key, item in inner.items():
                walk(item, [*path, key])
        else:
            dest.set_rt_info(inner, path)

    rt = source.get_rt_info()
    for key in rt:
        if only is None or key in only:
            walk(rt[key], [key])
