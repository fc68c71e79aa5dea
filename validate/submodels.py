"""Text encoders and UNet at every target precision, on inputs the bundle itself produced.

A black image on an FP16 device does not only come from the VAE: a UNet whose activations
overflow (distilled and quantized fine-tunes) or a text encoder does it too. Random inputs
can miss that, so every call here replays what an f32 run of the bundle's own pipeline fed
the submodel (its tokenizers, its scheduler's timesteps, the guidance batch of 2), and the
fidelity yardstick is the same IR at f32 on the same inputs: cosine similarity of outputs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from validate.metrics import F16_MAX, NO_VALUES, Counted, FiniteCount, count_non_finite, flat_counts, headroom

if TYPE_CHECKING:  # OpenVINO stays out of the report's (and --plan's) imports
    from validate.pipeline_run import Call, PartRequest

log = logging.getLogger(__name__)

#: Module-path prefixes that tracing wraps a model in (optimum's `model`, CLIP's `text_model`, the test
#: wrapper's `unet` attribute): torch module attributes in op names, not submodel names.
_WRAPPERS = ("model", "text_model", "unet")
_SUBBLOCKS = ("resnets", "attentions", "upsamplers", "downsamplers")


def fix_hint(component: str, substitutable: bool = False) -> str:
    """What to try when `component` fails at half precision."""
    hint = f"run it at f32 on the target (components.{component}.inference_precision: [f32])"
    return hint + (f" or substitute one without the overflow (substitutions.{component})" if substitutable else "")


def submodel_block(friendly_name: str) -> str | None:
    """Headroom group of a UNet or text-encoder op, from the module path in its friendly name.

    `__module.model.up_blocks.2.resnets.1.conv2/aten::_convolution/Add` -> `up_blocks.2.resnets.1`,
    `__module.model.mid_block.attentions.0...` -> `mid_block.attentions.0`,
    `__module.text_model.encoder.layers.3.mlp.fc2/...` -> `encoder.layers.3`,
    `__module.model.conv_in/...` -> `conv_in`. Ops without a module path (inputs, int8
    weight decompression) have no block.
    """
    if not friendly_name.startswith("__module."):
        return None
    parts = friendly_name.removeprefix("__module.").split("/", 1)[0].split(".")
    while len(parts) > 1 and parts[0] in _WRAPPERS:
        parts = parts[1:]
    if not parts or not parts[0]:
        return None
    if parts[0] in _WRAPPERS:  # ops of the wrapper module itself (e.g. the UNet's emb + aug_emb)
        return "top-level"
    if parts[0].endswith("_blocks") and len(parts) > 1 and parts[1].isdigit():
        keep = 4 if len(parts) > 3 and parts[2] in _SUBBLOCKS and parts[3].isdigit() else 2
    elif parts[0] == "mid_block":
        keep = 3 if len(parts) > 2 and parts[1] in _SUBBLOCKS and parts[2].isdigit() else 1
    elif parts[0] == "encoder" and len(parts) > 2 and parts[1] in ("layers", "block") and parts[2].isdigit():
        keep = 3  # CLIP's encoder.layers.N, T5's encoder.block.N
    else:
        keep = 1
    return ".".join(parts[:keep])


@dataclass(frozen=True)
class SubmodelResult(Counted):
    """One submodel at one precision over its captured calls; numbers rounded as reported."""

    component: str
    precision: str
    execution: str  # "native: ..." or "emulated: ..."
    device: str
    inputs: str  # which captured calls, in words
    calls: int
    counts: FiniteCount  # over every output of every call
    min_cosine: float | None  # worst output of the worst call vs f32 of the same IR; None: non-finite
    max_abs_activation: dict[str, float] = field(default_factory=dict)  # per block, f32 run
    first_overflow: str | None = None  # block where values first exceed the format's range
    failures: list[str] = field(default_factory=list)
    quantized: str | None = None  # "int8 full"/"int8 hybrid": compared with the unquantized IR at f32

    @property
    def passed(self) -> bool:
        return not self.failures

    def headrooms(self) -> dict[str, float]:
        return {block: round(headroom(v), 3) for block, v in self.max_abs_activation.items()}

    def to_json(self) -> dict[str, Any]:
        return flat_counts(asdict(self)) | {"invalid": self.invalid, "passed": self.passed, "f16_headroom": self.headrooms()}


def cosine(x: np.ndarray, y: np.ndarray) -> float:
    """Cosine similarity of two arrays in float64; NaN if either holds a non-finite value."""
    a, b = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.nan
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


def with_taps(model: Any) -> tuple[Any, list[str]]:
    """A copy of `model` with one extra output per tapped op, max |x| over the whole tensor,
    placed before the model's own outputs (`precision.taps_first`: outputs 0..n-1 are the taps).

    Tapped ops are the emulation's rounding points inside a named block, in graph order.
    Taps are a bare ReduceMax(|x|) (`activation_maxima`'s NaN-safe taps cost the int8 tiny
    UNet ~60% more compile time); overflow shows as inf before any NaN, so the first op
    past the range is found either way.
    """
    import openvino as ov
    import openvino.opset13 as ops

    from validate.precision import rounding_ops, taps_first

    clone = model.clone()
    names, taps = [], []
    for node in rounding_ops(clone):
        if submodel_block(node.get_friendly_name()) is None:
            continue
        for out in node.outputs():
            rank = out.get_partial_shape().rank
            if out.get_element_type() == ov.Type.f32 and rank.is_static:
                names.append(node.get_friendly_name())
                taps.append(ops.reduce_max(ops.abs(out), list(range(rank.get_length())), False).output(0))
    return taps_first(clone, taps), names


def fold_maxima(per_op: dict[str, float], names: Sequence[str], values: Sequence[float]) -> None:
    """Fold one inference's tap values into `per_op` (NaN sticks)."""
    for name, value in zip(names, values, strict=True):
        per_op[name] = value if math.isnan(value) else max(per_op.get(name, 0.0), value)


def per_block(per_op: dict[str, float]) -> dict[str, float]:
    """Op maxima grouped into blocks, in order of each block's first op."""
    blocks: dict[str, float] = {}
    for name, value in per_op.items():
        block = submodel_block(name) or "?"
        blocks[block] = max(blocks.get(block, 0.0), value)
    return blocks


def block_maxima(core: Any, model: Any, calls: Sequence[Call]) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Max |activation| per block over `calls`, and every tapped op's max in graph order.

    On an EmulatedModel the taps see each value before it is rounded: where the format's
    range was first left. One tapped compile, one inference per call.
    """
    from validate.host import compile_on_host
    from validate.pieces import pieces_for, run_pieces, split
    from validate.precision import EmulatedModel, with_static_shapes

    if not calls:
        return {}, []
    emulated = model if isinstance(model, EmulatedModel) else None
    tapped, names = with_taps(emulated.model if emulated else model)
    extra = dict(emulated.extra_inputs) if emulated else {}
    static = with_static_shapes(tapped, calls[0].inputs)
    per_op: dict[str, float] = {}
    parts = pieces_for(static, "f32")
    if parts > 1:  # too big to compile whole at f32 (an fp16 UNet): the same taps, piece by piece
        split_graph = split(static, parts)
        for call in calls:
            values = run_pieces(core, split_graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}, {**call.inputs, **extra})
            fold_maxima(per_op, names, [float(v) for v in values[:len(names)]])
        return per_block(per_op), list(per_op.items())
    request = compile_on_host(core, static, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).compiled.create_infer_request()
    for call in calls:
        request.infer({**call.inputs, **extra})
        fold_maxima(per_op, names, [float(request.get_output_tensor(i).data) for i in range(len(names))])
    return per_block(per_op), list(per_op.items())


def first_beyond(per_op: Sequence[tuple[str, float]], limit: float = F16_MAX) -> str | None:
    """Block of the first op (graph order) whose max |activation| exceeds `limit` or is NaN."""
    for name, value in per_op:
        if math.isnan(value) or value > limit:
            return submodel_block(name)
    return None


def check_submodel(core: Any, model: Any, component: str, request: PartRequest, calls: Sequence[Call], *,
                   inputs: str, min_cosine: float, max_non_finite: int,
                   maxima: tuple[dict[str, float], list[tuple[str, float]]] | None = None,
                   substitutable: bool = False, quantized: str | None = None) -> SubmodelResult:
    """Replay `calls` (recorded at f32 from the same IR) through `request` and judge the outputs.

    At f32 the recorded outputs are the run itself (cosine 1 by definition, not re-run), unless
    the calls were recorded from the unquantized IR (`quantized`: e.g. "int8 full").
    """
    mode = request.mode
    counts = NO_VALUES
    worst = 1.0
    for call in calls:
        outputs = call.outputs if mode.precision == "f32" and quantized is None else request.run(call.inputs)
        for name, ref in call.outputs.items():
            counts += count_non_finite(outputs[name])
            c = cosine(outputs[name], ref)
            worst = c if math.isnan(c) or c < worst else worst  # NaN sticks: min() would drop it
    blocks, per_op = maxima if maxima is not None else ({}, [])
    first = None
    failures: list[str] = []
    name = f"{component} {mode.precision}"
    if counts.invalid > max_non_finite:
        first = first_beyond(per_op)
        if first is None and mode.emulated:  # rounding, not f32 range, pushed it over: look at the emulated run
            request.release()  # its tapped twin compiles next; never both at once
            first = first_beyond(block_maxima(core, request.runnable, calls[:1])[1])
        where = _where(first, blocks)
        failures.append(f"{name}: {counts.invalid}/{counts.total} output values non-finite on {inputs} (NaN {counts.nan}, "
                        f"inf {counts.posinf + counts.neginf}){where}; {fix_hint(component, substitutable)}")
    elif (math.isnan(worst) or worst < min_cosine) and quantized is not None:
        failures.append(f"{name} ({quantized}): cosine similarity {worst:.8f} < {min_cosine:g} vs the unquantized IR at "
                        f"f32 on {inputs}; try components.{component}.quantization.mode "
                        f"{'hybrid or smooth_quant_alpha' if quantized.endswith('full') else 'weights'}, more "
                        f"calibration prompts, or relax components.{component}.quantization.min_cosine")
    elif math.isnan(worst) or worst < min_cosine:
        failures.append(f"{name}: cosine similarity {worst:.8f} < {min_cosine:g} vs the same IR at f32 on {inputs}; "
                        f"{fix_hint(component, substitutable)}")
    return SubmodelResult(
        component=component, precision=mode.precision, execution=f"{'emulated' if mode.emulated else 'native'}: {mode.reason}",
        device=mode.device, inputs=inputs, calls=len(calls), counts=counts,
        min_cosine=None if math.isnan(worst) else round(worst, 8),
        max_abs_activation={k: float(f"{v:.6g}") for k, v in blocks.items()},
        first_overflow=first, failures=failures, quantized=quantized,
    )


def _where(first: str | None, blocks: dict[str, float]) -> str:
    """'; first overflow in block X (...), largest Y (...)' for the failure line."""
    if first is None:
        return "; no block exceeds the f16 range at f32: the loss is in rounding, not range"
    text = f"; first overflow in block {first}"
    if blocks.get(first, 0.0) > F16_MAX:
        text += f" (max |activation| {blocks[first]:.3g} at f32 > 65504)"
    most = max(blocks, key=lambda b: blocks[b]) if blocks else None
    if most is not None and most != first and blocks[most] > F16_MAX:
        text += f", largest in {most} ({blocks[most]:.3g})"
    return text


def markdown(results: Sequence[SubmodelResult]) -> list[str]:
    """Report lines: one row per submodel and precision, then per-block headroom."""
    if not results:
        return []
    lines = ["", "Submodels on inputs captured from an f32 run of the bundle's own pipeline "
             "(fidelity: cosine similarity of outputs vs the same IR at f32):", "",
             "| component | precision | run as | inputs | invalid (NaN / +inf / -inf) | min cosine | first overflow | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        component = f"{r.component} ({r.quantized}, vs unquantized f32)" if r.quantized else r.component
        lines.append(f"| {component} | {r.precision} | {r.execution.split(':')[0]} | {r.inputs} | "
                     f"{r.invalid}/{r.total} ({r.nan} / {r.posinf} / {r.neginf}) | "
                     f"{'n/a' if r.min_cosine is None else r.min_cosine} | {r.first_overflow or '-'} | "
                     f"{'pass' if r.passed else 'FAIL'} |")
    tapped = {r.component: r for r in results if r.max_abs_activation}
    if tapped:
        lines += ["", "Submodel max |activation| per block (f32 run) and f16 headroom (65504 / max):", "",
                  "| component | block | max abs | headroom |", "|---|---|---|---|"]
        for r in tapped.values():
            rooms = r.headrooms()
            lines += [f"| {r.component} | {block} | {value} | {_room(rooms[block])} |"
                      for block, value in r.max_abs_activation.items()]
    return lines


def _room(value: float) -> str:
    return "inf" if math.isinf(value) else str(value)
