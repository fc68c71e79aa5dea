"""What the Intel GPU plugin runs when an IR carries runtime_options/ACTIVATIONS_SCALE_FACTOR.

The GPU plugin (OpenVINO `ActivationsScaling`, `activations_scaling.cpp`, run when the
inference precision is f16) rewrites the graph before compiling it:

1. `ScaleDownSingleLayer`: every v1 Convolution and MatMul whose input is in f16 gets
   x * (1/s) on its first input; a single-consumer per-channel (or scalar) bias Add gets
   its bias * (1/s) too; the result (after the bias Add) is multiplied by s.
   GroupConvolution, ConvolutionBackpropData and ops kept in f32 are left alone.
2. Low-precision transformations (LPT) then move each scalar "* s" down the graph as a
   dequantization: through data movement, nearest Interpolate, pooling, Concat, a Multiply
   (`MoveDownScalarMul`) and an Add whose inputs ALL carry the same pending scale
   (`AddTransformation`; with an unscaled activation on the other side nothing moves).
3. `EliminateScalarMul` drops a pending "* s" (s >= 1) in front of GroupNormalization /
   MVN / RMS, dividing their eps by s**2: a norm is scale-invariant.
4. What is left is a real multiply: there the value is back at full size in f16, and
   overflows if it is above 65504. A "* (1/s)" in front of a Convolution whose input still
   carries "* s" cancels (`EliminateEltwise`).

`scale_activations` reproduces the net effect on an f32 IR: each tensor gets the power of s
it is divided by ("pending" exponent), and multiplies are inserted only where the real
graph keeps one, so `validate.precision.emulate` on the result rounds the same values the
GPU holds in f16. Not modelled (absent from SDXL's VAE, UNet and text-encoder IRs or
harmless to the verdict): Clamp/PRelu bound rescaling, Adds of different pending powers,
and `MulShareTransformation`'s re-wiring of a norm to a sibling multiply (it moves a
multiply, not a value's magnitude).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from validate.precision import _shape_subgraph  # same shape-arithmetic notion as the emulation

log = logging.getLogger(__name__)

KEY = "ACTIVATIONS_SCALE_FACTOR"
SCALED = frozenset({"Convolution", "MatMul"})
NORMS = frozenset({"GroupNormalization", "MVN"})
# Ops LPT moves a pending scalar multiply through when every activation input carries it.
MOVABLE = frozenset({
    "Add", "Concat", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "AvgPool", "Relu",
    "Split", "VariadicSplit", "StridedSlice", "Slice", "Gather", "DepthToSpace", "SpaceToDepth",
    "Broadcast", "ReduceMax", "ReduceMin", "ReduceMean", "ReduceSum", "Interpolate", "Multiply",
})
# Only these inputs carry the data; the others are shapes, axes, indices.
_DATA_PORTS = {"Add": None, "Concat": None, "Multiply": None}  # None: every input
TAG = "__activation_scale__"


@dataclass(frozen=True)
class ScaledModel:
    """The rewritten f32 model and what the rewrite did (for the report and the tests)."""

    model: ov.Model
    factor: float
    scaled_ops: int  # Convolution/MatMul given x*(1/s) ... *s
    absorbed_norms: int  # norms whose pending *s was dropped (eps / s**2)
    restored: list[str] = field(default_factory=list)  # friendly names where *s stays a real multiply


def runtime_factor(model: ov.Model) -> float | None:
    """The ACTIVATIONS_SCALE_FACTOR an IR carries in rt_info, or None."""
    if not model.has_rt_info(["runtime_options", KEY]):
        return None
    value = float(model.get_rt_info(["runtime_options", KEY]).astype(str))
    return value if value > 0 else None


def set_runtime_factor(model: ov.Model, factor: float | None) -> None:
    """Write (or, with None, remove) runtime_options/ACTIVATIONS_SCALE_FACTOR, keeping the other options."""
    rt = model.get_rt_info()
    kept: dict[str, str] = {}
    if model.has_rt_info(["runtime_options"]):
        section = rt["runtime_options"]
        kept = {k: section[k].astype(str) if hasattr(section[k], "astype") else str(section[k]) for k in section if k != KEY}
        del rt["runtime_options"]
    for key, value in kept.items():
        model.set_rt_info(value, ["runtime_options", key])
    if factor is not None:
        model.set_rt_info(f"{float(factor)}", ["runtime_options", KEY])


def _is_const(output: ov.Output) -> bool:
    node = output.get_node()
    if node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    return node.get_type_name() == "Constant"


def _key(output: ov.Output) -> tuple[str, int]:
    return output.get_node().get_name(), output.get_index()


def _data_inputs(node: ov.Node) -> list[int]:
    kind = node.get_type_name()
    return list(range(node.get_input_size())) if kind in _DATA_PORTS else [0]


def _bias_add(op: ov.Node) -> tuple[ov.Node, int] | None:
    """The Add a Convolution/MatMul's bias goes through, as ScaleDownSingleLayer finds it."""
    targets = list(op.output(0).get_target_inputs())
    if len(targets) != 1 or targets[0].get_node().get_type_name() != "Add":
        return None
    add = targets[0].get_node()
    bias_port = 1 - targets[0].get_index()
    bias = add.input_value(bias_port)
    shape = bias.get_partial_shape()
    if not _is_const(bias) or not shape.is_static:
        return None
    dims = [d.get_length() for d in shape]
    return (add, bias_port) if math.prod(dims) == 1 or sum(d > 1 for d in dims) == 1 else None


def _scaled_ops(model: ov.Model, shape: set[str]) -> dict[str, tuple[ov.Node, ov.Node, int | None]]:
    """name -> (scaled op, node whose output carries the pending *s, bias port on it or None)."""
    found = {}
    for node in model.get_ordered_ops():
        if (node.get_type_name() in SCALED and node.get_name() not in shape
                and node.get_input_element_type(0) == ov.Type.f32 and not _is_const(node.input_value(0))):
            bias = _bias_add(node)
            found[node.get_name()] = (node, bias[0], bias[1]) if bias else (node, node, None)
    return found


def pending_exponents(model: ov.Model) -> dict[tuple[str, int], int]:
    """(node name, output index) -> k, where the GPU holds the value divided by s**k (absent: 0)."""
    shape = _shape_subgraph(model)
    ends = {end.get_name() for _, end, _ in _scaled_ops(model, shape).values()}
    pending: dict[tuple[str, int], int] = {}
    for node in model.get_ordered_ops():
        if node.get_name() in ends:
            pending[(node.get_name(), 0)] = 1
            continue
        kind = node.get_type_name()
        if kind not in MOVABLE or node.get_name() in shape:
            continue
        if kind == "Interpolate" and node.get_attributes().get("mode") != "nearest":
            continue
        values = [node.input_value(i) for i in _data_inputs(node)]
        activations = [pending.get(_key(v), 0) for v in values if not _is_const(v)]
        if kind == "Multiply":
            k = sum(activations)
        elif activations and len(set(activations)) == 1:
            k = activations[0]
        else:
            k = 0
        if kind == "Concat" and any(_is_const(v) for v in values):
            k = 0
        if k > 0:
            for out in node.outputs():
                pending[(node.get_name(), out.get_index())] = k
    return pending


def _absorbs(target: ov.Input, k: int, pending: Mapping[tuple[str, int], int], scaled: set[str]) -> bool:
    """Does this consumer take the value as the GPU holds it (divided by s**k)?"""
    node, port = target.get_node(), target.get_index()
    kind = node.get_type_name()
    if kind == "ShapeOf":
        return True
    if port == 0 and (kind in NORMS or node.get_name() in scaled):
        return True
    if kind in MOVABLE and port in _data_inputs(node):
        out = pending.get((node.get_name(), 0), 0)
        return out > 0 and (kind == "Multiply" or out == k)
    return False


def _const(value: float, name: str) -> ov.Node:
    node = ops.constant(np.array(value, np.float32))
    node.set_friendly_name(name)
    return node


def _scaled_norm(norm: ov.Node, divisor: float) -> ov.Node:
    """The same norm with eps / divisor (what EliminateScalarMul sets)."""
    attrs = norm.get_attributes()
    if norm.get_type_name() == "GroupNormalization":
        new = ops.group_normalization(norm.input_value(0), norm.input_value(1), norm.input_value(2),
                                      attrs["num_groups"], attrs["epsilon"] / divisor)
    else:  # MVN-6: eps inside the sqrt scales by s**2, outside by s
        inside = str(attrs["eps_mode"]).lower() == "inside_sqrt"
        new = ops.mvn(norm.input_value(0), norm.input_value(1), attrs["normalize_variance"],
                      attrs["eps"] / (divisor if inside else math.sqrt(divisor)), attrs["eps_mode"])
    new.set_friendly_name(norm.get_friendly_name())
    norm.output(0).replace(new.output(0))
    return new


def scale_activations(model: ov.Model, factor: float) -> ScaledModel:
    """A copy of `model` (f32) computing as the GPU plugin does under ACTIVATIONS_SCALE_FACTOR `factor`.

    In f32 it returns the same outputs (power-of-two factors: bit for bit, up to the eps
    change); under `emulate(.., "f16")` its intermediate values are the ones the GPU rounds.
    """
    if not 1 <= factor <= 2.0**14:  # NaN fails too
        raise ValueError(f"activation scale factor must be in [1, 16384] (a power of two keeps it exact), got {factor!r}")
    clone = model.clone()
    shape = _shape_subgraph(clone)
    scaled = _scaled_ops(clone, shape)
    pending = pending_exponents(clone)
    ends = {end.get_name() for _, end, _ in scaled.values()}
    restored: list[str] = []
    absorbed = 0
    # 1. inputs of the scaled ops at 1/s, biases at 1/s
    for op, end, bias_port in scaled.values():
        source = op.input_value(0)
        k = pending.get(_key(source), 0)
        if k != 1:
            mul = ops.multiply(source, _const(factor ** (k - 1), f"{op.get_friendly_name()}/{TAG}/down"))
            mul.set_friendly_name(f"{op.get_friendly_name()}/{TAG}/scale_down")
            op.input(0).replace_source_output(mul.output(0))
        if bias_port is not None:
            bias = end.input_value(bias_port).get_node()
            if bias.get_type_name() == "Convert":  # decompressed f16 weights: fold the value, so the
                bias = bias.input_value(0).get_node()  # bias Add still follows the op directly (one rounding)
            divided = ops.constant(bias.get_data().astype(np.float32) / np.float32(factor))
            end.input(bias_port).replace_source_output(divided.output(0))
    for node in clone.get_ordered_ops():  # x*s^k + c == (x + c/s^k) * s^k: LPT's swap of a constant Add
        k = pending.get((node.get_name(), 0), 0)
        if node.get_type_name() == "Add" and k > 0 and node.get_name() not in ends:
            for port in range(2):
                value = node.input_value(port)
                if _is_const(value):
                    divided = ops.multiply(value, _const(factor**-k, f"{node.get_friendly_name()}/{TAG}/const"))
                    node.input(port).replace_source_output(divided.output(0))
    # 2. norms drop the pending *s (eps / s**2k); 3. everything else gets the real multiply
    for node in list(clone.get_ordered_ops()):
        for out in node.outputs():
            k = pending.get(_key(out), 0)
            if k == 0:
                continue
            targets = list(out.get_target_inputs())
            keep = [t for t in targets if not _absorbs(t, k, pending, set(scaled))]
            for t in targets:
                if t not in keep and t.get_index() == 0 and t.get_node().get_type_name() in NORMS:
                    _scaled_norm(t.get_node(), factor ** (2 * k))
                    absorbed += 1
            if keep:
                up = ops.multiply(out, _const(factor**k, f"{node.get_friendly_name()}/{TAG}/up"))
                up.set_friendly_name(f"{node.get_friendly_name()}/{TAG}/scale_up")
                for t in keep:
                    t.replace_source_output(up.output(0))
                restored.append(node.get_friendly_name())
    clone.validate_nodes_and_infer_types()
    log.debug("activation scale %g: %d ops scaled, %d norms absorb it, %d restored", factor, len(scaled), absorbed, len(restored))
    return ScaledModel(clone, float(factor), len(scaled), absorbed, restored)


def as_target_runs(model: ov.Model, target_device: str, run_device: str, precision: str) -> ov.Model:
    """`model` as the target computes it: rewritten when an Intel GPU would apply the IR's scale factor.

    Only the GPU plugin honours the key, and only at f16; a GPU that runs the check itself
    applies it on its own, so the rewrite is for checks run anywhere else.
    """
    factor = runtime_factor(model)
    if factor is None or precision != "f16" or not target_device.startswith("GPU") or run_device.startswith("GPU"):
        return model
    log.info("judging f16 with the IR's %s=%g, as the GPU plugin rewrites it", KEY, factor)
    return scale_activations(model, factor).model


def powers_of_two(largest: float = 2.0**14) -> Iterable[float]:
    """Candidate factors 1, 2, 4, ... up to `largest`."""
    return (2.0**k for k in range(int(math.log2(largest)) + 1))


# ----------------------------------------------------------------------------- judging a factor

F16_MAX = 65504.0


@dataclass(frozen=True)
class FactorTrial:
    """One factor's emulated f16 run: finiteness, the largest value f16 had to hold, fidelity."""

    factor: float
    non_finite: int
    total: int
    max_abs: float  # largest |value| rounded to f16 anywhere in the graph (inf: overflowed)
    psnr_db: float | None  # worst over the inputs; None when non-finite
    passed: bool

    @property
    def headroom(self) -> float:
        return F16_MAX / self.max_abs if self.max_abs > 0 else math.inf

    def summary(self) -> str:
        psnr = "n/a" if self.psnr_db is None else f"{self.psnr_db:.1f} dB"
        return (f"x{self.factor:g}: {self.non_finite}/{self.total} non-finite, max |f16 value| {self.max_abs:.4g} "
                f"(headroom {self.headroom:.3g}), PSNR {psnr}: {'pass' if self.passed else 'fail'}")


def judge_factor(core: ov.Core, model: ov.Model, factor: float | None, inputs: list[dict[str, np.ndarray]],
                 references: list[np.ndarray], fidelity: Callable[[np.ndarray, np.ndarray], float],
                 min_psnr_db: float, min_headroom: float) -> FactorTrial:
    """Emulated f16 of `model` as the GPU runs it with `factor` (None: no activation scaling).

    Passes when every output is finite, no f16 value comes within `min_headroom` of 65504,
    and `fidelity(output, reference)` (PSNR, dB) reaches `min_psnr_db` on every input.
    """
    from validate.host import compile_on_host
    from validate.precision import Runner, activation_maxima, emulate, with_static_shapes

    graph = scale_activations(model, factor).model if factor is not None else model
    emulated = emulate(graph, "f16")
    non_finite = total = 0
    worst: float | None = math.inf
    for x, ref in zip(inputs, references, strict=True):
        compiled = compile_on_host(core, with_static_shapes(emulated.model, x), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        out = next(iter(Runner(compiled.compiled, emulated.extra_inputs)(x).values()))
        bad = int(np.count_nonzero(~np.isfinite(out)))
        non_finite, total = non_finite + bad, total + out.size
        worst = None if bad or worst is None else min(worst, fidelity(out, ref))
    maxima = activation_maxima(core, emulated, inputs[0], group_by=lambda _name: "all")
    max_abs = float(maxima.get("all", 0.0))
    passed = non_finite == 0 and worst is not None and worst >= min_psnr_db and max_abs * min_headroom <= F16_MAX
    return FactorTrial(float(factor or 1.0), non_finite, total, max_abs, worst, passed)


def choose_factor(core: ov.Core, model: ov.Model, inputs: list[dict[str, np.ndarray]], references: list[np.ndarray],
                  fidelity: Callable[[np.ndarray, np.ndarray], float], min_psnr_db: float, min_headroom: float,
                  largest: float = 2.0**14) -> tuple[float | None, list[FactorTrial]]:
    """The smallest power of two that passes `judge_factor`, and every factor tried (None: none passed)."""
    trials = []
    for factor in powers_of_two(largest):
        trial = judge_factor(core, model, factor, inputs, references, fidelity, min_psnr_db, min_headroom)
        trials.append(trial)
        log.info("activation scale %s", trial.summary())
        if trial.passed:
            return factor, trials
    return None, trials
