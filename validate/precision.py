"""How a precision really runs on a device, and f16/bf16 emulation where it would not.

Asking OpenVINO for `INFERENCE_PRECISION_HINT=f16` proves nothing by itself: a CPU
without FP16 hardware silently runs something else (f32 on AVX2-only hosts; bf16 on
hosts with avx512_bf16 such as the EPYC dev VMs, whose default hint is also bf16),
and bf16 has f32's range, so it hides the FP16 overflow we must detect. So:

* `measured_precision` compiles a probe and reads back what actually ran, from the
  numbers (an identity 1x1 convolution over values that f32, f16 and bf16 round
  differently), not from the hint the plugin echoes back.
* `plan_execution` decides real vs emulated; `emulate` rewrites a model so that an
  f32 run rounds every value-producing op's output to the target format, with the
  rounding constants fed as runtime Parameters (the CPU plugin folds Constant
  arithmetic and Convert(f16)->Convert(f32) pairs away).
* `activation_maxima` reports max |activation| per decoder block for headroom reports.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from validate.host import MARK, compile_on_host, cpu_flags
from validate.metrics import round_to

log = logging.getLogger(__name__)

Precision = Literal["f32", "f16", "bf16"]
Inputs = Mapping[str, np.ndarray]

# Ops that only move, select or reshape existing values: their output is already
# representable in the target format if their input is, so rounding there is waste.
DATA_MOVEMENT = frozenset({
    "Parameter", "Constant", "Result", "Reshape", "Transpose", "Concat", "Gather", "GatherND",
    "GatherElements", "Squeeze", "Unsqueeze", "Split", "VariadicSplit", "StridedSlice", "Slice",
    "Broadcast", "Tile", "ShapeOf", "Pad", "DepthToSpace", "SpaceToDepth", "ReduceMax", "ReduceMin",
    "MaxPool", "Relu", "Abs", "Negative", "Select", "Range", "Reverse", "Roll",
})
# Producers whose bias Add is fused into them by runtimes (and by torch's addmm):
# rounding happens once, after the Add.
BIAS_FUSED = frozenset({"Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData"})


@dataclass(frozen=True)
class Format:
    """An IEEE-like binary format as an f32 computation can emulate it."""

    name: Precision
    split: float  # 2**(24 - significand bits) + 1: Veltkamp/Dekker split keeps the top bits
    overflow: float  # smallest |x| that rounds to inf (round to nearest even)
    big: float  # x * big is inf for every |x| >= overflow
    # x rounded, times 2**k, is inf exactly when it rounded to 2**max_exponent or more; times 2**-k
    # is x again: the range check in two multiplies instead of abs, compare, select
    range_scale: float | None = None


F16 = Format("f16", 2.0**13 + 1, 65520.0, 2.0**120, range_scale=2.0**112)
BF16 = Format("bf16", 2.0**16 + 1, (2 - 2.0**-8) * 2.0**127, 4.0)
FORMATS: dict[str, Format] = {"f16": F16, "bf16": BF16}


@dataclass(frozen=True)
class ExecutionMode:
    """How a requested precision is actually run on this host, and why."""

    precision: Precision
    device: str
    emulated: bool
    reason: str

    @property
    def hint(self) -> str:
        """The INFERENCE_PRECISION_HINT to compile with: f32 underneath any emulation."""
        return "f32" if self.emulated else self.precision


@dataclass(frozen=True)
class EmulatedModel:
    """An f32 model that rounds like `precision`, plus the values of its constant Parameters."""

    model: ov.Model
    extra_inputs: Mapping[str, np.ndarray]
    precision: Precision
    rounding_points: int
    overflow_only: bool = False

    def infer(self, compiled_or_core: ov.CompiledModel | ov.Core, inputs: Inputs,
              device: str = "CPU") -> np.ndarray:
        """First output of one inference (compiling with an f32 hint if given a Core)."""
        compiled = (compile_on_host(compiled_or_core, self.model, device, {"INFERENCE_PRECISION_HINT": "f32"}).compiled
                    if isinstance(compiled_or_core, ov.Core) else compiled_or_core)
        return next(iter(Runner(compiled, self.extra_inputs)(inputs).values()))


@dataclass(frozen=True)
class Runner:
    """A compiled model and the constant inputs it needs; call it with the user inputs."""

    compiled: ov.CompiledModel
    extra_inputs: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __call__(self, inputs: Inputs) -> dict[str, np.ndarray]:
        """Outputs keyed by tensor name (or position, for unnamed outputs)."""
        request = self.compiled.create_infer_request()
        request.infer({**dict(inputs), **dict(self.extra_inputs)})
        return {min(o.get_names(), default=str(i)): np.array(request.get_output_tensor(i).data, copy=True)
                for i, o in enumerate(self.compiled.outputs)}


# ----------------------------------------------------------------- what really runs
_HARDWARE = {"f16": ("avx512_fp16", "amx_fp16"), "bf16": ("avx512_bf16", "amx_bf16")}
_measured: dict[tuple[str, str], str] = {}  # per process: the hardware does not change


def measured_precision(core: ov.Core, device: str, hint: str) -> str:
    """Compile an identity conv with `hint` and tell from its output what precision ran.

    Channels alternate 1+2^-9 (exact in f16, not in bf16) and 1+2^-12 (exact in
    neither), so the output identifies f32/f16/bf16 whatever the plugin reports.
    """
    if (device, hint) not in _measured:
        x = np.empty((1, 16, 4, 4), np.float32)
        x[:, 0::2], x[:, 1::2] = 1 + 2.0**-9, 1 + 2.0**-12
        param = ops.parameter(list(x.shape), np.float32, name="probe")
        eye = ops.constant(np.eye(16, dtype=np.float32).reshape(16, 16, 1, 1))
        conv = ops.convolution(param, eye, [1, 1], [0, 0], [0, 0], [1, 1])
        compiled = core.compile_model(ov.Model([conv.output(0)], [param], "probe"), device,
                                      {"INFERENCE_PRECISION_HINT": hint})
        y = compiled(x)[0][0, :2, 0, 0].tolist()
        found = {(1 + 2.0**-9, 1 + 2.0**-12): "f32", (1 + 2.0**-9, 1.0): "f16", (1.0, 1.0): "bf16"}
        _measured[device, hint] = found.get(tuple(y), f"unknown {y}")
        log.debug("%s with INFERENCE_PRECISION_HINT=%s computes %s", device, hint, _measured[device, hint])
    return _measured[device, hint]


def host_supports(core: ov.Core, device: str, precision: Precision) -> bool:
    """True only if `device` really computes in `precision` when asked to (measured)."""
    return precision == "f32" or measured_precision(core, device, precision) == precision


def plan_execution(core: ov.Core, device: str, precision: Precision) -> ExecutionMode:
    """Run `precision` for real where the device does, else emulate it in f32 on the CPU.

    Emulation always runs on the CPU plugin, whose f32 is plain IEEE (checked bit-exact
    by the tests); GPU kernels may contract a*b-c into an FMA, breaking the split.
    """
    if precision == "f32":
        return ExecutionMode("f32", device, False, "explicit f32 hint (CPUs with bf16 hardware default to bf16)")
    ran = measured_precision(core, device, precision)
    if ran == precision:
        return ExecutionMode(precision, device, False, f"{device} measured computing {precision}")
    if device.startswith("CPU"):
        have = sorted(set(_HARDWARE[precision]) & cpu_flags())
        need = "/".join(_HARDWARE[precision])
        what = f"CPU has {'/'.join(have)} unused by OpenVINO" if have else f"CPU has no {need}"
    else:
        what = f"{device} does not compute in {precision}"
    return ExecutionMode(precision, "CPU", True, f"{what}: OpenVINO would silently run {ran} for "
                         f"{precision}; emulating {precision} rounding in f32 on CPU")


# ----------------------------------------------------------------- emulation
def _is_float(output: ov.Output) -> bool:
    return output.get_element_type() == ov.Type.f32


def _skips_rounding(node: ov.Node) -> bool:
    """Ops whose outputs need no rounding: data movement, nearest resize, fused-bias producers."""
    kind = node.get_type_name()
    if kind in DATA_MOVEMENT:
        return True
    if kind == "Interpolate" and node.get_attributes().get("mode") == "nearest":
        return True
    if kind == "Convert" and node.input_value(0).get_node().get_type_name() == "Constant":
        return True  # f16 weights decompressed to f32: already f16 values
    if kind in BIAS_FUSED:
        targets = list(node.output(0).get_target_inputs())
        return bool(targets) and all(
            t.get_node().get_type_name() == "Add"
            and t.get_node().input_value(1 - t.get_index()).get_node().get_type_name() in ("Constant", "Convert")
            for t in targets)
    return False


def _shape_subgraph(model: ov.Model) -> set[str]:
    """Names of ShapeOf ops and of ops computed from shapes and constants only."""
    shape: set[str] = set()
    for node in model.get_ordered_ops():
        sources = [v.get_node() for v in node.input_values()]
        if node.get_type_name() == "ShapeOf" or (
                any(s.get_name() in shape for s in sources)
                and all(s.get_name() in shape or s.get_type_name() == "Constant" for s in sources)):
            shape.add(node.get_name())
    return shape


def _weight_subgraph(model: ov.Model) -> set[str]:
    """Names of ops computed from Constants only: weight decompression (int8/int4 Convert,
    Subtract zero point, Multiply scale) and any other folding of weights.

    Not activations: they hold no overflow, and a device decompresses them inside the
    matmul/convolution kernel. Rounding or tapping them would stop the CPU plugin from
    keeping the weights compressed and make it fold a full-size UNet's weights into f32 copies
    (an int8 SDXL UNet ran out of 24 GiB that way).
    """
    weights: set[str] = set()
    for node in model.get_ordered_ops():
        sources = [v.get_node() for v in node.input_values()]
        if node.get_type_name() != "Constant" and sources and all(
                s.get_type_name() == "Constant" or s.get_name() in weights for s in sources):
            weights.add(node.get_name())
    return weights


def rounding_ops(model: ov.Model) -> list[ov.Node]:
    """Ops whose f32 outputs the emulation rounds and activation_maxima taps, in order.

    Parameters and value-producing ops, minus shape arithmetic (`_shape_subgraph`):
    sizes above 65504 must not become inf, and f16 runtimes keep those ops in f32; minus
    ops on weights alone (`_weight_subgraph`; float Constants themselves are rounded by
    `_round_weights`).
    """
    skip = _shape_subgraph(model) | _weight_subgraph(model)
    return [node for node in model.get_ordered_ops()
            if node.get_name() not in skip and MARK not in node.get_friendly_name()
            and (node.get_type_name() == "Parameter"
                 or (not _skips_rounding(node) and any(_is_float(o) for o in node.outputs())))]


def _round_weights(model: ov.Model, fmt: Format) -> int:
    """Replace float Constants by their values rounded to `fmt` (shape arithmetic kept)."""
    changed, shape = 0, _shape_subgraph(model)
    for node in model.get_ordered_ops():
        if node.get_type_name() != "Constant" or not _is_float(node.output(0)):
            continue
        if all(t.get_node().get_name() in shape for t in node.output(0).get_target_inputs()):
            continue
        values = node.get_data()
        if values.size and not np.all(np.abs(values[np.isfinite(values)]) < fmt.overflow):
            log.warning("%s: constant beyond the %s range left unrounded (runtimes clamp or keep such "
                        "constants wider)", node.get_friendly_name(), fmt.name)
            continue
        rounded = round_to(values, fmt.name)
        if not np.array_equal(rounded, values):
            new = ops.constant(rounded)
            new.set_friendly_name(node.get_friendly_name())
            node.output(0).replace(new.output(0))
            changed += 1
    return changed


def _constants(fmt: Format) -> dict[str, float]:
    values = {"split": fmt.split, "overflow": fmt.overflow, "big": fmt.big}
    return values | ({"range_up": fmt.range_scale, "range_down": 1 / fmt.range_scale} if fmt.range_scale else {})


def _rounding(x: ov.Output, p: dict[str, ov.Node], overflow_only: bool, name: str) -> ov.Node:
    """x rounded to the format and back, from f32 ops only.

    Normal range: Veltkamp split, hi = c - (c - x) with c = x * (2^k + 1), keeps the top
    24 - k significant bits, rounding to nearest even (bit-exact vs numpy, see tests).
    f16 (`range_up` given): hi * 2^112 * 2^-112 is inf exactly when hi rounded to 2^16 or more
    (|x| >= 65520) and hi otherwise; where the split gives NaN (x inf or beyond ~4e34) x itself
    goes through the range multiplies and comes out +-inf (NaN stays NaN). Seven ops and no
    abs/compare chain: the exact variant below cost 1.14x the f32 run and 1.9x its memory on
    the SDXL decoder (64x64 latent, CPU time), this one about 1.0x and 1.1x. What it
    gives up: f16 subnormals (|x| < 2^-14) keep 11 significant bits instead of the 2^-24 grid,
    an error below 2^-25 per value, far under what PSNR or cosine can see, and devices differ
    there anyway (some flush f16 subnormals to zero).
    bf16 (f32's exponent range: what it costs is precision, not range): the split, and x itself
    where the split gives NaN (x inf, or |x| > ~5.2e33 where x * split overflows f32). Five ops;
    the exact form (a scaled split above ~5e33, the subnormal grid, an overflow compare: 18 ops)
    made the f32 compile of the emulated tiny full-int8 UNet 3x slower (35.8 s vs 12.1 s, 23.7k ops vs 10k), and
    every CPU-target gate on a CPU without bf16 pays that compile. What it gives up: values beyond
    ~5.2e33 stay unrounded (including the last 0.2 % below f32's maximum, which bf16 rounds to inf),
    and bf16 subnormals (|x| < 2^-126) keep 8 significant bits instead of the 2^-133 grid: an
    activation that large is broken in f32 already, and one that small is zero to every check.
    overflow_only: from the overflow threshold on, x * big is +-inf, the rest as it is.
    NaN fails every comparison, falls through and stays NaN.
    """
    def split(v: ov.Output | ov.Node) -> ov.Node:
        c = ops.multiply(v, p["split"])
        return ops.subtract(c, ops.subtract(c, v))

    out: ov.Node
    if overflow_only:
        out = ops.select(ops.greater_equal(ops.abs(x), p["overflow"]), ops.multiply(x, p["big"]), x)
    else:
        hi = split(x)  # NaN where x is inf or |x| * split overflows f32: take x there
        out = ops.select(ops.not_equal(hi, hi), x, hi)
        if "range_up" in p:  # f16: +-inf exactly where hi rounded to 2^16 or more
            out = ops.multiply(ops.multiply(out, p["range_up"]), p["range_down"])
    todo, seen = [out], {x.get_node().get_name()}
    while todo:  # name every inserted node, so that rounding_ops and taps skip them
        node = todo.pop()
        if node.get_name() not in seen and node.get_type_name() != "Parameter":
            seen.add(node.get_name())
            node.set_friendly_name(f"{name}/{MARK}/{node.get_type_name()}{len(seen)}")
            todo += [v.get_node() for v in node.input_values()]
    return out


def _already_in(node: ov.Node, precision: Precision) -> bool:
    """A Convert from the target format itself (f16 weight decompression of int8/f16 IRs): exact.

    Rounding there is waste, and it keeps the CPU plugin from folding the decompression:
    on the tiny int8 UNet they were 264 of 941 rounding points; skipping them cut its compile 27 -> 16 s.
    """
    return (node.get_type_name() == "Convert" and precision == "f16"
            and node.input_value(0).get_element_type() == ov.Type.f16)


def emulate(model: ov.Model, precision: Precision = "f16", *, overflow_only: bool = False) -> EmulatedModel:
    """A new model whose f32 execution rounds like `precision` hardware after every op.

    Rounds each Parameter, the output of every value-producing op (`rounding_ops`) and the
    float weights once, as torch half on CPU does (f32 accumulation, one rounding per
    op result). `overflow_only` only sends |x| >= the overflow threshold to +-inf and
    leaves weights alone: a cheap range check without the mantissa loss.
    NaN and inf propagate as in the real format: downstream f32 ops see them unchanged.
    """
    fmt = FORMATS[precision]
    clone = model.clone()
    weights = 0 if overflow_only else _round_weights(clone, fmt)
    values = {f"{MARK}.{precision}.{k}": np.array(v, np.float32) for k, v in _constants(fmt).items()}
    params = {k.rsplit(".", 1)[1]: ops.parameter([], np.float32, name=k) for k in values}
    for full, p in zip(values, params.values(), strict=True):
        p.output(0).set_names({full})
    points = 0
    for node in rounding_ops(clone):
        if _already_in(node, precision):
            continue
        for out in node.outputs():
            targets = list(out.get_target_inputs())
            if not _is_float(out) or not targets:
                continue
            rounded = _rounding(out, params, overflow_only, node.get_friendly_name())
            for t in targets:
                t.replace_source_output(rounded.output(0))
            if any(t.get_node().get_type_name() == "Result" for t in targets):  # keep output names
                names = out.get_names()
                out.get_tensor().set_names(set())
                rounded.output(0).get_tensor().set_names(names)
            points += 1
    clone.add_parameters(list(params.values()))
    if clone.has_rt_info(["runtime_options", "ACTIVATIONS_SCALE_FACTOR"]):
        log.warning("emulation ignores runtime_options ACTIVATIONS_SCALE_FACTOR (a GPU-only runtime option)")
    log.debug("emulating %s%s: %d rounding points, %d constants rounded", precision,
              " overflow only" if overflow_only else "", points, weights)
    return EmulatedModel(clone, values, precision, points, overflow_only)


def emulate_f16(model: ov.Model, *, overflow_only: bool = False) -> EmulatedModel:
    """`emulate(model, "f16")`: the check that an f16 device will not overflow."""
    return emulate(model, "f16", overflow_only=overflow_only)


def with_static_shapes(model: ov.Model, inputs: Inputs) -> ov.Model:
    """A copy of `model` reshaped to the shapes of `inputs`.

    Static shapes let the CPU plugin fuse each rounding subgraph into one kernel:
    on the tiny VAE (8..64 latent) f16 emulation costs +25..35% CPU time over f32
    with static shapes, +63..93% with dynamic ones.
    """
    static = model.clone()
    static.reshape({name: ov.PartialShape(list(np.shape(v))) for name, v in inputs.items()})
    return static


def compile_for(core: ov.Core, model: ov.Model | EmulatedModel, mode: ExecutionMode,
                inputs: Inputs | None = None) -> Runner:
    """Compile for `mode`: emulating (f32 hint) if the mode says so, else with its hint.

    Given `inputs` (arrays or anything with a shape), compiles for their static shapes.
    """
    if mode.emulated and isinstance(model, ov.Model):
        model = emulate(model, mode.precision)
    if isinstance(model, EmulatedModel) and (not mode.emulated or model.precision != mode.precision):
        raise ValueError(f"an emulated {model.precision} model cannot run as {mode}")
    graph = model.model if isinstance(model, EmulatedModel) else model
    if inputs is not None:
        graph = with_static_shapes(graph, inputs)
    compiled = compile_on_host(core, graph, mode.device, {"INFERENCE_PRECISION_HINT": mode.hint}).compiled
    return Runner(compiled, model.extra_inputs if isinstance(model, EmulatedModel) else {})


def run_model(core: ov.Core, model: ov.Model | EmulatedModel, inputs: Inputs,
              mode: ExecutionMode) -> dict[str, np.ndarray]:
    """One inference under `mode` at the inputs' shapes; outputs keyed by tensor name (or position)."""
    return compile_for(core, model, mode, inputs)(inputs)


# ----------------------------------------------------------------- headroom taps
def taps_first(model: ov.Model, taps: Sequence[ov.Output]) -> ov.Model:
    """`model` with one Result per tap placed BEFORE its own outputs (taps are outputs 0..n-1).

    The CPU plugin orders execution by a depth-first walk from the Results in order. Taps
    appended after the model's outputs ran only once the whole graph had, so every tapped
    tensor stayed alive to the end: the full-size VAE decoder at 1024x1024 asked for 27.5 GB
    (3.5 GiB untapped), a batch-2 UNet at a 128x128 latent for 36 GB. Taps first run each
    reduction right after its op (full-size VAE decoder at 512x512: 6.84 GiB peak appended,
    1.38 GiB first, 1.16 GiB untapped).
    """
    results = [ops.result(t) for t in taps] + list(model.get_results())
    tapped = ov.Model(results, list(model.get_parameters()), model.get_friendly_name())
    for out, old in zip(tapped.outputs[len(taps):], model.outputs, strict=True):
        out.get_tensor().set_names(old.get_names())
    return tapped


def module_path(friendly_name: str) -> str | None:
    """The torch module path in a friendly name from ov.convert_model, without wrappers.

    `__module.vae.decoder.up_blocks.2.resnets.0.conv2/aten::_convolution/Add` ->
    `decoder.up_blocks.2.resnets.0.conv2` (the wrapper attribute, here `vae`, differs
    between our tracing wrapper and optimum's, so it is cut at the first known root).
    """
    if not friendly_name.startswith("__module."):
        return None
    parts = friendly_name.removeprefix("__module.").split("/", 1)[0].split(".")
    roots = ("decoder", "encoder", "post_quant_conv", "quant_conv")
    start = next((i for i, part in enumerate(parts) if part in roots), 0)
    return ".".join(parts[start:]) or None


def block_of(friendly_name: str) -> str | None:
    """Headroom group: `decoder.mid_block`, `decoder.up_blocks.2`, `decoder.conv_out`..."""
    path = module_path(friendly_name)
    if path is None:
        return None
    parts = path.split(".")
    if parts[0] not in ("decoder", "encoder"):
        return parts[0]
    keep = 3 if len(parts) > 2 and parts[1].endswith("blocks") and parts[2].isdigit() else 2
    return ".".join(parts[:keep])


def activation_maxima(core: ov.Core, model: ov.Model | EmulatedModel, inputs: Inputs,
                      match: Callable[[str], bool] | None = None, *,
                      group_by: Callable[[str], str | None] = block_of,
                      device: str = "CPU") -> dict[str, float]:
    """Max |activation| per group (default: decoder block), computed in f32.

    Taps the `rounding_ops` (those whose friendly name `match`es, if given) with
    ReduceMax(|x|), NaN counted as inf, so a non-finite group reports inf.
    On an EmulatedModel the taps see values before each rounding.
    """
    emulated = model if isinstance(model, EmulatedModel) else None
    clone = (emulated.model if emulated else model).clone()
    inf = ops.constant(np.array(math.inf, np.float32))
    flat = ops.constant(np.array([-1], np.int64))
    taps: list[tuple[str, ov.Output]] = []
    for node in rounding_ops(clone):
        name = node.get_friendly_name()
        group = group_by(name)
        if group is None or (match is not None and not match(name)):
            continue
        for out in (o for o in node.outputs() if _is_float(o)):
            v = ops.reshape(out, flat, False)
            taps.append((group, ops.reduce_max(ops.select(ops.is_nan(v), inf, ops.abs(v)), [0]).output(0)))
    if not taps:
        return {}
    tapped = taps_first(clone, [t for _, t in taps])
    compiled = compile_on_host(core, with_static_shapes(tapped, inputs), device, {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.compiled.create_infer_request()
    request.infer({**dict(inputs), **(dict(emulated.extra_inputs) if emulated else {})})
    maxima: dict[str, float] = {}
    for i, (group, _) in enumerate(taps):
        maxima[group] = max(maxima.get(group, 0.0), float(request.get_output_tensor(i).data))
    return maxima
