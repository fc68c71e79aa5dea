"""Run a submodel whose compiled weights would not fit as sequential pieces, one compiled at a time.

The CPU plugin expands f16 weights to f32 when it runs a model at f32 (the gate's reference,
and the f16 emulation on CPUs without f16 arithmetic): 4 bytes per parameter, 10.3 GB for a
full-size fp16 SDXL UNet, and the gate peaked at 16.2 GiB with it (measured; int8 weights stay
compressed). Cut between ops into pieces of at most `PIECE_BYTES` of compiled weights, each
piece is compiled, run and dropped in turn: the same ops on the same values, since every tensor
crossing a cut is handed to the next piece unchanged, at the cost of one compile per piece per call.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from convert.memory import release_mapped_pages, release_memory

log = logging.getLogger(__name__)

GIB = 1024**3
#: A model whose weights compile to more than this runs in pieces (the fp16 SDXL UNet at f32: 10.3 GB;
#: its int8 form, SDXL's text_encoder_2 at f32 (2.8 GB) and SD3's T5 in int8 stay whole).
SPLIT_ABOVE = 4 * GIB
#: Compiled weights per piece: the fp16 SDXL UNet at f32 becomes 5 pieces.
PIECE_BYTES = int(2.5 * GIB)
#: Names of the tensors handed from one piece to the next (never an IR's own name).
CUT = "__piece_cut"


def compiled_weight_bytes(model: ov.Model, hint: str) -> int:
    """Bytes the CPU plugin holds for `model`'s float weights when compiled with precision `hint`.

    f16/f32 weights become the inference precision (f32: 4 B, f16/bf16: 2 B per value);
    integer weights (int8/int4 compression) stay compressed and are not counted.
    """
    per_value = 4 if hint == "f32" else 2
    total = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() == "Constant" and node.get_output_element_type(0).is_real():
            total += math.prod(node.get_output_partial_shape(0).to_shape()) * per_value
    return total


def pieces_for(model: ov.Model, hint: str) -> int:
    """How many pieces `model` runs in under `hint` (1: whole)."""
    weights = compiled_weight_bytes(model, hint)
    return 1 if weights <= SPLIT_ABOVE else math.ceil(weights / PIECE_BYTES)


def piece_resident_bytes(weight_bytes: float) -> float:
    """Compiled weights held at once for a model with `weight_bytes` of compiled weights (for the budget)."""
    return weight_bytes if weight_bytes <= SPLIT_ABOVE else weight_bytes / math.ceil(weight_bytes / PIECE_BYTES)


@dataclass
class Piece:
    """One piece: its model, what it takes, and where each of its outputs goes."""

    model: ov.Model
    inputs: list[str]  # tensor names: the submodel's own inputs and cut tensors
    outputs: list[tuple[str, int | str]]  # ("out", index of the submodel's output) or ("cut", cut name)
    baked: list[str]  # integer cut tensors (shape arithmetic) made Constants before compiling

    def for_values(self, values: Mapping[str, np.ndarray]) -> ov.Model:
        """The piece with its integer cut inputs as Constants of this call's values.

        They are shape arithmetic (ShapeOf, Gather, Concat on sizes): as Parameters they would make
        every Reshape behind them dynamic; as Constants the piece compiles for static shapes like the whole.
        """
        if not self.baked:
            return self.model
        model = self.model.clone()
        for param in list(model.get_parameters()):
            name = param.output(0).get_any_name()
            if name in self.baked:
                param.output(0).replace(ops.constant(np.asarray(values[name])).output(0))
                model.remove_parameter(param)
        model.validate_nodes_and_infer_types()
        return model


def split(graph: ov.Model, parts: int, hint: str = "f32") -> list[Piece]:
    """`graph` (static shapes) cut into `parts` sequential pieces of about equal compiled weights.

    Ops computed from Constants alone (weight decompression) go with the op that consumes them,
    so weights never cross a cut; a Constant used on both sides of a cut is shared, not copied.
    """
    from validate.precision import _weight_subgraph

    g = graph.clone()
    ordered = list(g.get_ordered_ops())
    static = _weight_subgraph(g) | {n.get_name() for n in ordered if n.get_type_name() == "Constant"}
    kinds = {n.get_name(): n.get_type_name() for n in ordered}
    running = [n for n in ordered if n.get_name() not in static and kinds[n.get_name()] not in ("Parameter", "Result")]

    per_value = 4 if hint == "f32" else 2
    charged: set[str] = set()

    def weights_under(node: ov.Node) -> int:
        """Compiled bytes of the Constants behind `node`'s static inputs not charged to an earlier op."""
        total, stack = 0, [v.get_node() for v in node.input_values() if v.get_node().get_name() in static]
        while stack:
            source = stack.pop()
            if source.get_name() in charged:
                continue
            charged.add(source.get_name())
            if source.get_type_name() == "Constant":
                if source.get_output_element_type(0).is_real():
                    total += math.prod(source.get_output_partial_shape(0).to_shape()) * per_value
            else:
                stack.extend(v.get_node() for v in source.input_values())
        return total

    weights = [weights_under(n) for n in running]
    share = max(sum(weights) / parts, 1.0)
    piece: dict[str, int] = {}
    done = 0
    for node, w in zip(running, weights, strict=True):
        if w:  # an op with weights: by the weights before it
            piece[node.get_name()] = min(parts - 1, int((done + w / 2) // share))
        else:  # none: beside its latest input (a tap, a rounding or an Add stays with what it reads)
            piece[node.get_name()] = max((piece.get(v.get_node().get_name(), 0) for v in node.input_values()), default=0)
        done += w

    def piece_of(node: ov.Node) -> int:
        return piece.get(node.get_name(), 0)

    results: list[list[tuple[Any, tuple[str, int | str]]]] = [[] for _ in range(parts)]
    params: list[list[Any]] = [[] for _ in range(parts)]
    baked: list[list[str]] = [[] for _ in range(parts)]
    for index, result in enumerate(g.get_results()):
        results[piece_of(result.input_value(0).get_node())].append((result, ("out", index)))
    for param in g.get_parameters():
        users = sorted({piece_of(t.get_node()) for t in param.output(0).get_target_inputs()})
        for p in users or [0]:
            params[p].append(param)
    cuts = 0
    for node in running:
        here = piece_of(node)
        for out in node.outputs():
            later: dict[int, list[Any]] = {}
            for target in list(out.get_target_inputs()):
                user = target.get_node()
                if user.get_name() in piece and piece_of(user) > here:
                    later.setdefault(piece_of(user), []).append(target)
            if not later:
                continue
            name = f"{CUT}.{cuts}"
            cuts += 1
            handed = ops.result(out)
            results[here].append((handed, ("cut", name)))
            for p, targets in sorted(later.items()):
                param = ops.parameter(out.get_partial_shape(), out.get_element_type(), name=name)
                param.output(0).set_names({name})
                params[p].append(param)
                if not out.get_element_type().is_real():
                    baked[p].append(name)
                for target in targets:
                    target.replace_source_output(param.output(0))
    pieces = []
    for p in range(parts):
        model = ov.Model([r for r, _ in results[p]], params[p], f"{graph.get_friendly_name()}.piece{p + 1}of{parts}")
        pieces.append(Piece(model, [q.output(0).get_any_name() for q in params[p]], [k for _, k in results[p]], baked[p]))
    log.info("%s: %d pieces, %d tensors cross the cuts", graph.get_friendly_name(), parts, cuts)
    return pieces


def run_pieces(core: ov.Core, pieces: Sequence[Piece], device: str, config: Mapping[str, Any],
               inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The submodel's outputs (in its own order) for one call, each piece compiled, run and dropped in turn."""
    from validate.host import compile_on_host

    values: dict[str, np.ndarray] = dict(inputs)
    outputs: dict[int, np.ndarray] = {}
    for piece in pieces:
        compiled = compile_on_host(core, piece.for_values(values), device, config).compiled
        release_mapped_pages()  # the IR's mmapped weights of this piece, read once by the compile
        request = compiled.create_infer_request()
        request.infer({name: values[name] for name in piece.inputs if name not in piece.baked})
        for i, (kind, key) in enumerate(piece.outputs):
            value = np.array(request.get_output_tensor(i).data, copy=True)
            if kind == "out":
                outputs[int(key)] = value
            else:
                values[str(key)] = value
        del request, compiled
        release_memory()
    return [outputs[i] for i in sorted(outputs)]
